"""`keel bench report`: result files -> PNG plots, a Markdown summary and one self-contained HTML page.

    paths = write_report(load_results([Path("bench-keel.json")]), Path("report/"))

The Markdown is what ops read in a PR or a terminal; the HTML has the same tables plus the plots
embedded as data URIs (no external assets, no JS). With two or more result sets the first is
the baseline: a comparison table gives every other set's figures and their ratio to it, and the
plots overlay the sets. The plots are drawn with matplotlib's Agg renderer, no display needed,
with fixed style settings so the same results give the same bytes.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

from serving.bench.metrics import percentile_key, percentile_word
from serving.bench.records import FORMAT_VERSION, load_text

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

PLOT_FILES = ("latency_vs_throughput.png", "cost_vs_load.png", "goodput_vs_load.png")

# Fixed style, independent of the user's matplotlibrc; parse_math off so a "$" in a setting
# name is drawn as text, not parsed as TeX.
_RC: dict[RcKeyType, Any] = {
    "text.parse_math": False,
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "figure.titlesize": 13,
    "legend.fontsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "figure.facecolor": "white",
}
_SLO_COLOR = "#b22222"
_SET_STYLES = ("-", "--", ":", "-.")
_SET_MARKERS = ("o", "s", "^", "D", "v", "P")
_MAX_PLOT_LABEL = 60
_HALO = [patheffects.withStroke(linewidth=2.5, foreground="white")]  # point labels stay legible over lines
# Where each line's point labels go (dx, dy in points, ha, va), so two lines' labels part.
_LABEL_OFFSETS = (
    (6, 5, "left", "bottom"),
    (6, -5, "left", "top"),
    (-6, 5, "right", "bottom"),
    (-6, -5, "right", "top"),
)


# ---------------------------------------------------------------------------------------------
# Loading


def load_results(paths: list[Path]) -> list[dict]:
    """Reads keel bench result files, in order. Raises ValueError naming the file when one is
    not a result of this format. A result without a label gets its file name as label."""
    results = []
    for path in map(Path, paths):
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a keel bench result (not JSON: {e})") from None
        if not isinstance(doc, dict) or "keel_bench" not in doc:
            raise ValueError(
                f'{path}: not a keel bench result (no "keel_bench" key; result files are written by `keel bench run`)'
            )
        if doc["keel_bench"] != FORMAT_VERSION:
            raise ValueError(
                f"{path}: keel bench result format {doc['keel_bench']!r}; "
                f"this version of Keel reads format {FORMAT_VERSION}"
            )
        _check_shape(doc, path)
        meta = doc.setdefault("meta", {})
        if not meta.get("label"):
            meta["label"] = path.stem
        results.append(doc)
    return results


def _check_shape(doc: dict, path: Path) -> None:
    settings = doc.get("settings")
    if not isinstance(settings, list):
        raise ValueError(f'{path}: malformed keel bench result: "settings" is not a list')
    for i, s in enumerate(settings):
        if not isinstance(s, dict) or not isinstance(s.get("points"), list):
            raise ValueError(f'{path}: malformed keel bench result: settings[{i}] has no "points" list')
        for j, p in enumerate(s["points"]):
            load = p.get("load") if isinstance(p, dict) else None
            if not isinstance(load, dict) or "kind" not in load or "value" not in load:
                raise ValueError(
                    f'{path}: malformed keel bench result: settings[{i}].points[{j}] has no "load" {{kind, value}}'
                )


# ---------------------------------------------------------------------------------------------
# Reading a result set


@dataclass
class _Set:
    """One result file as the report reads it."""

    tag: str  # A, B, ...: short name in comparison tables
    label: str
    result: dict
    slo: dict
    pct: float
    currency: str

    @property
    def settings(self) -> list[dict]:
        return self.result.get("settings") or []


def _sets(results: list[dict]) -> list[_Set]:
    out: list[_Set] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(results):
        label = str((r.get("meta") or {}).get("label") or (r.get("spec") or {}).get("label") or f"set {i + 1}")
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # two runs with the same label: keep them apart in legends
            label = f"{label} #{seen[label]}"
        slo = r.get("slo") or {}
        out.append(
            _Set(
                tag=_tag(i),
                label=label,
                result=r,
                slo=slo,
                pct=float(slo.get("percentile") or 99),
                currency=str((r.get("hardware") or {}).get("currency") or "USD"),
            )
        )
    return out


def _tag(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"S{i + 1}"


def _setting_name(s: dict, i: int) -> str:
    return str(s.get("name") or f"setting {i + 1}")


def _q(point: dict | None, pct: float, metric: str) -> float | None:
    """A latency percentile of a point in ms, e.g. p99 TTFT; None when the point lacks it."""
    if point is None:
        return None
    v = point.get(percentile_key(pct, metric))
    if v is None and pct == 50:
        v = point.get(f"median_{metric}_ms")
    return v


def _num(x: float | None) -> str:
    """A figure for a table: 2,129 / 396.4 / 12.3 / 2.13 / 0.0123; "–" when missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    if a == 0:
        return "0"
    return f"{x:.3g}"


def _ratio(base: float | None, other: float | None) -> str:
    if base is None or other is None or base == 0:
        return "–"
    return f"{other / base:.2f}×"


def _load_short(load: dict) -> str:
    v = float(load["value"])
    return f"c={v:g}" if load["kind"] == "concurrency" else f"{v:g}/s"


def _load_axis(kind: str) -> str:
    return "concurrency (requests in flight)" if kind == "concurrency" else "request rate (requests/s)"


def _slo_text(s: _Set) -> str:
    parts = [
        f"{name} {percentile_word(s.pct)} ≤ {s.slo[key]:g} ms"
        for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("E2EL", "e2el_ms"))
        if s.slo.get(key) is not None
    ]
    return ", ".join(parts) if parts else "none"


def _failed_text(p: dict) -> str:
    n = p.get("failed") or 0
    by = p.get("failures_by_status") or {}
    if not n or not by:
        return str(n)
    return f"{n} (" + ", ".join(f"{k}: {v}" for k, v in sorted(by.items())) + ")"


def _sorted_points(s: dict) -> list[dict]:
    return sorted(s.get("points") or [], key=lambda p: (p["load"]["kind"], float(p["load"]["value"])))


# ---------------------------------------------------------------------------------------------
# Document blocks, rendered to both Markdown and HTML so the two say the same


@dataclass
class _Code:
    text: str


@dataclass
class _Bold:
    text: str


Inline = str | _Code | _Bold
Text = str | list[Inline]


@dataclass
class _Heading:
    level: int
    text: Text


@dataclass
class _Para:
    text: Text


@dataclass
class _List:
    items: list[Text]


@dataclass
class _Table:
    header: list[str]
    rows: list[list[Text]]
    align: str = ""  # one of l/r/c per column; default: first two left, the rest right


@dataclass
class _CodeBlock:
    text: str
    lang: str = ""


@dataclass
class _Image:
    file: str
    alt: str


Block = _Heading | _Para | _List | _Table | _CodeBlock | _Image


def _spans(t: Text) -> list[Inline]:
    return [t] if isinstance(t, str) else t


def _md_escape(s: str, in_table: bool) -> str:
    for ch in "\\`*<>[]":
        s = s.replace(ch, "\\" + ch)
    if in_table:
        s = s.replace("|", "\\|")
    return s.replace("\n", " ")


def _md_code(s: str, in_table: bool) -> str:
    s = s.replace("\n", " ")
    if in_table:
        s = s.replace("|", "\\|")
    run, longest = 0, 0
    for ch in s:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _md_inline(t: Text, in_table: bool = False) -> str:
    out = []
    for span in _spans(t):
        if isinstance(span, _Code):
            out.append(_md_code(span.text, in_table))
        elif isinstance(span, _Bold):
            out.append(f"**{_md_escape(span.text, in_table)}**")
        else:
            out.append(_md_escape(span, in_table))
    return "".join(out)


def _align(table: _Table) -> str:
    return table.align or ("ll" + "r" * max(0, len(table.header) - 2))


def _to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, _Heading):
            lines += ["#" * b.level + " " + _md_inline(b.text), ""]
        elif isinstance(b, _Para):
            lines += [_md_inline(b.text), ""]
        elif isinstance(b, _List):
            lines += [f"- {_md_inline(item)}" for item in b.items] + [""]
        elif isinstance(b, _Table):
            marks = {"l": "---", "r": "---:", "c": ":---:"}
            lines.append("| " + " | ".join(_md_escape(h, True) for h in b.header) + " |")
            lines.append("|" + "|".join(marks[a] for a in _align(b)) + "|")
            lines += ["| " + " | ".join(_md_inline(c, True) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, _CodeBlock):
            fence = "````" if "```" in b.text else "```"
            lines += [fence + b.lang, b.text.rstrip("\n"), fence, ""]
        elif isinstance(b, _Image):
            lines += [f"![{_md_escape(b.alt, False)}]({b.file})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _html_inline(t: Text) -> str:
    out = []
    for span in _spans(t):
        if isinstance(span, _Code):
            out.append(f"<code>{html.escape(span.text)}</code>")
        elif isinstance(span, _Bold):
            out.append(f"<strong>{html.escape(span.text)}</strong>")
        else:
            out.append(html.escape(span))
    # The marks are ours, never from results, so wrapping them after escaping is safe.
    return "".join(out).replace("✓", '<span class="ok">✓</span>').replace("✗", '<span class="bad">✗</span>')


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f2430;
 max-width:1280px;margin:24px auto;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.3em}
h2{font-size:1.3em;border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse;margin:.5em 0 1em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:4px 9px;vertical-align:top}
th{background:#f1f3f6;text-align:center;font-weight:600}
tr:nth-child(even) td{background:#fafbfc}
td.r{text-align:right;white-space:nowrap} td.c{text-align:center} td.l{text-align:left}
.ok{color:#1a7f37;font-weight:700} .bad{color:#cf222e;font-weight:700}
code{background:#f1f3f6;border-radius:3px;padding:0 4px;font-size:92%}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:4px;padding:10px 12px;overflow:auto}
pre code{background:none;padding:0}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #e3e6ea}
figcaption{color:#57606a;font-size:90%}
"""


def _to_html(blocks: list[Block], title: str, images: dict[str, bytes]) -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, _Heading):
            body.append(f"<h{b.level}>{_html_inline(b.text)}</h{b.level}>")
        elif isinstance(b, _Para):
            body.append(f"<p>{_html_inline(b.text)}</p>")
        elif isinstance(b, _List):
            body.append("<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, _Table):
            align = _align(b)
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            rows = "".join(
                "<tr>" + "".join(f'<td class="{a}">{_html_inline(c)}</td>' for a, c in zip(align, row)) + "</tr>"
                for row in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, _CodeBlock):
            cls = f' class="language-{html.escape(b.lang)}"' if b.lang else ""
            body.append(f"<pre><code{cls}>{html.escape(b.text.rstrip())}</code></pre>")
        elif isinstance(b, _Image):
            data = base64.b64encode(images[b.file]).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b.alt)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------------------------
# The summary of one result set


def _set_blocks(s: _Set, compare: bool) -> list[Block]:
    r = s.result
    meta, spec, hw = r.get("meta") or {}, r.get("spec") or {}, r.get("hardware") or {}
    head: list[Inline] = [s.label]
    if compare:
        head.append(f" ({s.tag}{', baseline' if s.tag == 'A' else ''})")
    blocks: list[Block] = [_Heading(2, head)]
    facts: list[Inline] = []

    def fact(name: str, value: Any, code: bool = True) -> None:
        if value in (None, ""):
            return
        if facts:
            facts.append(" · ")
        facts.extend([f"{name} ", _Code(str(value)) if code else str(value)])

    fact("Date", meta.get("date"), code=False)
    fact("model", meta.get("model") or spec.get("model"))
    fact("hardware", hw.get("name"))
    if hw.get("price_per_replica_hour") is not None:
        facts.append(f" ({s.currency} {_num(hw['price_per_replica_hour'])} per replica-hour)")
    fact("git", meta.get("git"))
    fact("host", meta.get("host"))
    if meta.get("cpus"):
        facts.append(f" ({meta['cpus']} CPUs)")
    fact("server", meta.get("url") or spec.get("url"))
    if facts:
        blocks.append(_Para(facts))
    blocks.append(
        _Para(
            [
                _Bold("SLO:"),
                f" {_slo_text(s)}; a load point meets it when each percentile is "
                "within its threshold and no request failed.",
            ]
        )
    )
    workload = _workload_text(spec)
    if workload:
        blocks.append(_Para(workload))
    for i, setting in enumerate(s.settings):
        blocks += _setting_blocks(s, setting, i)
    blocks += _recommendation_blocks(s)
    return blocks


def _workload_text(spec: dict) -> str:
    load, ds = spec.get("load") or {}, spec.get("dataset") or {}
    parts = []
    if ds.get("kind"):
        d = f"dataset {ds['kind']}"
        if ds["kind"] != "sharegpt" or not ds.get("output_len_from_dataset"):
            d += f", {ds.get('input_len', '?')} input / {ds.get('output_len', '?')} output tokens"
        parts.append(d)
    if load.get("mode"):
        mode = "concurrency (closed loop)" if load["mode"] == "concurrency" else "request rate (open loop)"
        if load["mode"] == "rate" and load.get("burstiness", 1) != 1:
            mode += f", burstiness {load['burstiness']:g}"
        parts.append(f"load by {mode}")
    if load.get("num_requests"):
        parts.append(f"{load['num_requests']} requests per load point")
    return ("Workload: " + "; ".join(parts) + ".") if parts else ""


def _setting_blocks(s: _Set, setting: dict, i: int) -> list[Block]:
    name = _setting_name(setting, i)
    replicas = setting.get("replicas", 1)
    head: list[Inline] = ["Setting ", _Code(name)]
    desc: list[Inline] = [f"{replicas} replica{'s' if replicas != 1 else ''}"]
    engine = setting.get("engine") or {}
    if engine:
        desc += ["; engine: ", _Code(", ".join(f"{k}={v}" for k, v in engine.items()))]
    pw = percentile_word(s.pct)
    e2el = s.slo.get("e2el_ms") is not None
    header = (
        ["load", "req/s", "output tok/s", "TTFT p50 (ms)", f"TTFT {pw} (ms)", "TPOT p50 (ms)", f"TPOT {pw} (ms)"]
        + ([f"E2EL {pw} (ms)"] if e2el else [])
        + ["goodput (req/s)", "failed", f"{s.currency}/M output tok", "meets SLO"]
    )
    rows = []
    for p in _sorted_points(setting):
        row: list[Text] = [
            load_text(p["load"]),
            _num(p.get("request_throughput")),
            _num(p.get("output_throughput")),
            _num(p.get("median_ttft_ms")),
            _over(_q(p, s.pct, "ttft"), s.slo.get("ttft_ms")),
            _num(p.get("median_tpot_ms")),
            _over(_q(p, s.pct, "tpot"), s.slo.get("tpot_ms")),
        ]
        if e2el:
            row.append(_over(_q(p, s.pct, "e2el"), s.slo.get("e2el_ms")))
        row += [
            _num(p.get("request_goodput")),
            _failed_text(p),
            _num(p.get("cost_per_million_output_tokens")),
            "✓" if p.get("meets_slo") else "✗",
        ]
        rows.append(row)
    align = "l" + "r" * (len(header) - 2) + "c"
    blocks: list[Block] = [_Heading(3, head), _Para(desc)]
    if setting.get("error"):
        blocks.append(_Para([_Bold("This setting failed:"), " " + str(setting["error"]).splitlines()[0]]))
    blocks.append(_Table(header, rows, align) if rows else _Para("No load points."))
    best = setting.get("slo_max")
    if best:
        text = (
            f" {load_text(best['load'])}: {_num(best.get('request_throughput'))} req/s, "
            f"{_num(best.get('output_throughput'))} output tok/s, TTFT {pw} {_num(_q(best, s.pct, 'ttft'))} ms, "
            f"TPOT {pw} {_num(_q(best, s.pct, 'tpot'))} ms"
        )
        cost = best.get("cost_per_million_output_tokens")
        text += f", {s.currency} {_num(cost)} per million output tokens." if cost is not None else "."
    elif setting.get("error") and not rows:
        text = " none: the setting was not measured."
    else:
        text = " none: no load point met the SLO (the lowest load already misses it)."
    blocks.append(_Para([_Bold("SLO-compliant maximum:"), text]))
    return blocks


def _over(value: float | None, limit: float | None) -> Text:
    """A percentile cell, bold when it breaks its SLO threshold."""
    return [_Bold(_num(value))] if value is not None and limit is not None and value > limit else _num(value)


def _recommendation_blocks(s: _Set) -> list[Block]:
    rec = s.result.get("recommendation")
    blocks: list[Block] = [_Heading(3, "Recommendation")]
    if not rec:
        why = (
            "no setting met the SLO at any load"
            if not any(st.get("slo_max") for st in s.settings)
            else "none in this result (the spec gave no target peak load)"
        )
        blocks.append(_Para(f"No recommendation: {why}."))
        return blocks
    cur = str(rec.get("currency") or s.currency)
    summary: list[Inline] = []
    if rec.get("setting") is not None:
        summary += ["Setting ", _Code(str(rec["setting"]))]
    if rec.get("replicas") is not None:
        summary.append(f"{', ' if summary else ''}{rec['replicas']} replica{'s' if rec['replicas'] != 1 else ''}")
    if rec.get("cost_per_hour") is not None:
        summary.append(f"{', ' if summary else ''}{cur} {_num(rec['cost_per_hour'])} per hour")
    if rec.get("cost_per_million_output_tokens") is not None:
        summary.append(
            f"{', ' if summary else ''}{cur} {_num(rec['cost_per_million_output_tokens'])} per million output tokens"
        )
    if summary:
        blocks.append(_Para([_Bold("Recommended:"), " ", *summary, "."]))
    items: list[Text] = []
    if rec.get("engine"):
        engine = rec["engine"]
        text = ", ".join(f"{k}={v}" for k, v in engine.items()) if isinstance(engine, dict) else str(engine)
        items.append(["Engine: ", _Code(text)])
    if rec.get("per_replica") is not None:
        items.append(["Per replica: ", _describe(rec["per_replica"], s)])
    if rec.get("autoscaling") is not None:
        items.append(["Autoscaling: ", _describe(rec["autoscaling"], s)])
    if items:
        blocks.append(_List(items))
    reasoning = rec.get("reasoning")
    if isinstance(reasoning, list):
        blocks.append(_List([str(x) for x in reasoning]))
    elif reasoning:
        blocks += [_Para(p) for p in str(reasoning).split("\n\n") if p.strip()]
    if rec.get("config_yaml"):
        blocks.append(_Para("Config to paste:"))
        blocks.append(_CodeBlock(str(rec["config_yaml"]), "yaml"))
    return blocks


def _describe(value: Any, s: _Set) -> str:
    """A short text for a recommendation field that may be a load point, a mapping or a value."""
    if isinstance(value, dict) and isinstance(value.get("load"), dict):
        return (
            f"{load_text(value['load'])}: {_num(value.get('request_throughput'))} req/s, "
            f"{_num(value.get('output_throughput'))} output tok/s"
        )
    if isinstance(value, dict):
        return ", ".join(f"{k}={_describe(v, s)}" for k, v in value.items())
    if isinstance(value, float):
        return _num(value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# Compare mode


@dataclass
class _Match:
    by_name: bool
    rows: list[tuple[str, str, dict, dict]] = field(default_factory=list)  # base name, other name, points
    settings: list[tuple[dict, dict, str, str]] = field(default_factory=list)  # matched settings
    only_base: list[tuple[str, dict]] = field(default_factory=list)
    only_other: list[tuple[str, dict]] = field(default_factory=list)


def _match(base: _Set, other: _Set) -> _Match:
    """Pairs points by (setting name, load kind, load value), or by the setting's position when
    the two sets share no setting name (e.g. "Keel" vs "bare vLLM")."""
    base_names = [_setting_name(st, i) for i, st in enumerate(base.settings)]
    other_names = [_setting_name(st, i) for i, st in enumerate(other.settings)]
    m = _Match(by_name=bool(set(base_names) & set(other_names)))

    def skey(names: list[str], i: int) -> Any:
        return names[i] if m.by_name else i

    def pkey(p: dict) -> tuple[str, float]:
        return p["load"]["kind"], round(float(p["load"]["value"]), 9)

    other_settings = {skey(other_names, i): (st, other_names[i]) for i, st in enumerate(other.settings)}
    pending: dict[tuple, list[dict]] = {}
    for i, st in enumerate(other.settings):
        for p in _sorted_points(st):
            pending.setdefault((skey(other_names, i), *pkey(p)), []).append(p)
    for i, st in enumerate(base.settings):
        k = skey(base_names, i)
        if k in other_settings:
            m.settings.append((st, other_settings[k][0], base_names[i], other_settings[k][1]))
        for p in _sorted_points(st):
            found = pending.get((k, *pkey(p)))
            if found:
                m.rows.append((base_names[i], other_settings[k][1], p, found.pop(0)))
            else:
                m.only_base.append((base_names[i], p))
    for i, st in enumerate(other.settings):
        for p in _sorted_points(st):
            left = pending.get((skey(other_names, i), *pkey(p)))
            if left and any(q is p for q in left):
                m.only_other.append((other_names[i], p))
    return m


def _compare_blocks(sets: list[_Set]) -> list[Block]:
    base = sets[0]
    pw = percentile_word(base.pct)
    blocks: list[Block] = [_Heading(2, "Comparison with the baseline")]
    who: list[Inline] = ["Sets: "]
    for i, s in enumerate(sets):
        who += [("; " if i else ""), _Bold(s.tag), f" = {s.label}" + (" (baseline)" if i == 0 else "")]
    blocks.append(_Para(who + ["."]))
    blocks.append(
        _Para(
            "Ratios are set ÷ baseline: above 1× is better for throughput, below 1× is better "
            f"for latency and cost. Latencies are at the baseline's SLO percentile ({pw})."
        )
    )
    for other in sets[1:]:
        m = _match(base, other)
        a, b = base.tag, other.tag
        blocks.append(_Heading(3, f"{b} vs {a}"))
        if m.by_name:
            blocks.append(_Para("Points matched by setting name and load."))
        else:
            blocks.append(_Para("The two sets share no setting name: points matched by setting position and load."))
        notes = []
        if _slo_text(base) != _slo_text(other):
            notes.append(
                f"The SLOs differ ({a}: {_slo_text(base)}; {b}: {_slo_text(other)}); each set's "
                "✓/✗ is judged against its own SLO."
            )
        same_currency = base.currency == other.currency
        if not same_currency:
            notes.append(f"The currencies differ ({a}: {base.currency}, {b}: {other.currency}): no cost ratio.")
        blocks += [_Para(n) for n in notes]
        cur = base.currency if same_currency else "cost"
        header = [
            "setting",
            "load",
            f"output tok/s {a}",
            b,
            "ratio",
            f"TTFT {pw} (ms) {a}",
            b,
            "ratio",
            f"TPOT {pw} (ms) {a}",
            b,
            "ratio",
            f"{cur}/M output tok {a}",
            b,
            "ratio",
            f"meets SLO {a} / {b}",
        ]
        rows = []
        for bname, oname, p, q in m.rows:
            name: Text = [_Code(bname)] if bname == oname else [_Code(bname), " ↔ ", _Code(oname)]
            cb, co = p.get("cost_per_million_output_tokens"), q.get("cost_per_million_output_tokens")
            rows.append(
                [
                    name,
                    load_text(p["load"]),
                    _num(p.get("output_throughput")),
                    _num(q.get("output_throughput")),
                    _ratio(p.get("output_throughput"), q.get("output_throughput")),
                    _num(_q(p, base.pct, "ttft")),
                    _num(_q(q, base.pct, "ttft")),
                    _ratio(_q(p, base.pct, "ttft"), _q(q, base.pct, "ttft")),
                    _num(_q(p, base.pct, "tpot")),
                    _num(_q(q, base.pct, "tpot")),
                    _ratio(_q(p, base.pct, "tpot"), _q(q, base.pct, "tpot")),
                    _num(cb),
                    _num(co),
                    _ratio(cb, co) if same_currency else "–",
                    f"{'✓' if p.get('meets_slo') else '✗'} / {'✓' if q.get('meets_slo') else '✗'}",
                ]
            )
        blocks.append(_Table(header, rows, "ll" + "r" * 12 + "c") if rows else _Para("No load point matched."))
        if m.settings:
            blocks.append(
                _Para([_Bold("SLO-compliant maximum"), " (the highest load each set carried inside its SLO):"])
            )
            blocks.append(
                _Table(
                    [
                        "setting",
                        f"max load {a}",
                        b,
                        f"output tok/s {a}",
                        b,
                        "ratio",
                        f"{cur}/M output tok {a}",
                        b,
                        "ratio",
                    ],
                    [_max_row(sb, so, nb, no, same_currency) for sb, so, nb, no in m.settings],
                    "lllrrrrrr",
                )
            )
        if m.only_base or m.only_other:
            items: list[Text] = [
                [f"only in {a}: setting ", _Code(n), f", {load_text(p['load'])}"] for n, p in m.only_base
            ]
            items += [[f"only in {b}: setting ", _Code(n), f", {load_text(p['load'])}"] for n, p in m.only_other]
            blocks += [
                _Para([_Bold("Unmatched load points"), f" ({len(items)}, not in the table above):"]),
                _List(items),
            ]
        else:
            blocks.append(_Para("Every load point matched."))
    return blocks


def _max_row(sb: dict, so: dict, nb: str, no: str, same_currency: bool) -> list[Text]:
    pb, po = sb.get("slo_max"), so.get("slo_max")
    name: Text = [_Code(nb)] if nb == no else [_Code(nb), " ↔ ", _Code(no)]

    def get(p: dict | None, k: str) -> float | None:
        return p.get(k) if p else None

    cb, co = get(pb, "cost_per_million_output_tokens"), get(po, "cost_per_million_output_tokens")
    return [
        name,
        load_text(pb["load"]) if pb else "none",
        load_text(po["load"]) if po else "none",
        _num(get(pb, "output_throughput")),
        _num(get(po, "output_throughput")),
        _ratio(get(pb, "output_throughput"), get(po, "output_throughput")),
        _num(cb),
        _num(co),
        _ratio(cb, co) if same_currency else "–",
    ]


# ---------------------------------------------------------------------------------------------
# Plots


@dataclass
class _Line:
    label: str
    color: Any
    style: str
    marker: str
    points: list[dict]
    set: _Set


def _lines(sets: list[_Set]) -> list[_Line]:
    """One line per (set, setting). Colour follows the setting (by name, or by position when the
    sets share no setting name) and line style the set, so matched lines share a colour."""
    palette = list(matplotlib.color_sequences["tab10"])
    by_name = len(sets) == 1 or any(_match(sets[0], s).by_name for s in sets[1:])
    by_set = len(sets) > 1 and all(len(s.settings) <= 1 for s in sets)  # e.g. Keel vs bare vLLM
    colors: dict[Any, int] = {}
    lines = []
    for si, s in enumerate(sets):
        for i, st in enumerate(s.settings):
            name = _setting_name(st, i)
            key = ("set", si) if by_set else name if by_name else i
            colors.setdefault(key, len(colors))
            label = name if len(sets) == 1 else f"{s.label} · {name}"
            if len(label) > _MAX_PLOT_LABEL:
                label = label[: _MAX_PLOT_LABEL - 1] + "…"
            lines.append(
                _Line(
                    label,
                    palette[colors[key] % len(palette)],
                    _SET_STYLES[si % len(_SET_STYLES)],
                    _SET_MARKERS[si % len(_SET_MARKERS)],
                    _sorted_points(st),
                    s,
                )
            )
    return lines


def _plain_ticks(ax: Axes, axis: str) -> None:
    """Log-axis ticks at 1, 2, 5 × 10^k, written as plain numbers (no TeX)."""
    fmt = FuncFormatter(lambda v, _: f"{v:,.10g}")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(fmt)
    target.set_minor_formatter(NullFormatter())


def _scale_y(ax: Axes, values: Sequence[float | None]) -> None:
    """Log y when the values span 50× or more (queueing blow-ups), else linear from 0."""
    pos = [v for v in values if v is not None and v > 0]
    if len(pos) >= 2 and max(pos) / min(pos) >= 50:
        ax.set_yscale("log")
        _plain_ticks(ax, "y")
    else:
        ax.set_ylim(bottom=0)


def _scale_load_x(ax: Axes, values: Sequence[float | None]) -> None:
    """Load levels are usually doubling (1, 2, 4, ...): a log2 axis with a tick at each level."""
    levels = sorted({float(v) for v in values if v is not None and v > 0})
    if len(levels) >= 2 and levels[-1] / levels[0] >= 8:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(levels))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(True, axis="x", which="major")
    else:
        ax.set_xlim(left=0)


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#666666")


def _legend_cols(labels: list[str], width_in: float) -> int:
    """As many legend columns as fit the figure's width (about 6.5 px per character at 9 pt)."""
    col_px = 70 + 6.5 * max((len(lab) for lab in labels), default=1)
    return max(1, min(len(labels), int(width_in * 100 * 0.95 // col_px)))


def _figure(width_in: float, plots_height_in: float, labels: list[str], legend_title: bool) -> Figure:
    """A figure tall enough for its plots plus the legend rows below them."""
    rows = math.ceil(len(labels) / _legend_cols(labels, width_in)) if labels else 0
    return Figure(
        figsize=(width_in, plots_height_in + 0.22 * rows + (0.25 if legend_title else 0)), layout="constrained"
    )


def _finish(fig: Figure, handles: list, labels: list[str], legend_title: str | None, path: Path) -> None:
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=_legend_cols(labels, fig.get_figwidth()),
            frameon=False,
            title=legend_title,
        )
    fig.savefig(path, format="png", metadata={"Software": None})


def _pct_label(lines: list[_Line]) -> str:
    pcts = {ln.set.pct for ln in lines}
    return percentile_word(next(iter(pcts))) if len(pcts) == 1 else "at SLO percentile"


def _slo_lines(lines: list[_Line], metric: str, name: str) -> dict[str, float]:
    """One dashed line per distinct threshold, labelled with the percentiles that use it."""
    pcts: dict[float, list[str]] = {}
    for ln in lines:
        limit = ln.set.slo.get(f"{metric}_ms")
        if limit is not None and percentile_word(ln.set.pct) not in pcts.setdefault(limit, []):
            pcts[limit].append(percentile_word(ln.set.pct))
    return {f"SLO: {name} {' / '.join(pws)} ≤ {limit:g} ms": limit for limit, pws in pcts.items()}


def _plot_latency(lines: list[_Line], title: str, path: Path) -> None:
    slo_labels = [
        label for metric, name in (("ttft", "TTFT"), ("tpot", "TPOT")) for label in _slo_lines(lines, metric, name)
    ]
    fig = _figure(12.5, 5.0, list(dict.fromkeys([ln.label for ln in lines] + slo_labels)), True)
    fig.suptitle(f"{title}\nLatency vs output throughput")
    axes = fig.subplots(1, 2)
    handles: dict[str, Any] = {}
    pl = _pct_label(lines)
    for ax, metric, name in zip(axes, ("ttft", "tpot"), ("TTFT", "TPOT")):
        ys_all: list[float | None] = []
        for k, ln in enumerate(lines):
            pts = [(p.get("output_throughput"), _q(p, ln.set.pct, metric), p) for p in ln.points]
            pts = [t for t in pts if t[0] is not None and t[1] is not None]
            if not pts:
                continue
            (h,) = ax.plot(
                [t[0] for t in pts],
                [t[1] for t in pts],
                color=ln.color,
                linestyle=ln.style,
                marker=ln.marker,
                markersize=6,
                linewidth=1.8,
            )
            handles.setdefault(ln.label, h)
            dx, dy, ha, va = _LABEL_OFFSETS[k % len(_LABEL_OFFSETS)]
            for x, y, p in pts:
                ax.annotate(
                    _load_short(p["load"]),
                    (x, y),
                    xytext=(dx, dy),
                    textcoords="offset points",
                    ha=ha,
                    va=va,
                    fontsize=8,
                    color=ln.color,
                    path_effects=_HALO,
                )
            ys_all += [t[1] for t in pts]
        seen = _slo_lines(lines, metric, name)
        for label, limit in seen.items():
            handles.setdefault(label, ax.axhline(limit, color=_SLO_COLOR, linestyle=(0, (6, 4)), linewidth=1.4))
            ys_all.append(limit)
        if not ys_all:
            _no_data(ax, f"no {name} figures")
        ax.set_title(f"{name} {pl}" + ("" if seen else " (no SLO threshold)"))
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{name} {pl} (ms)")
        ax.margins(x=0.08, y=0.1)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.10g}"))
        ax.set_xlim(left=0)
        _scale_y(ax, ys_all)
    _finish(fig, list(handles.values()), list(handles), _point_label_note(lines), path)


def _point_label_note(lines: list[_Line]) -> str:
    kinds = _kinds(lines)
    if kinds == ["concurrency"]:
        return "point labels: concurrency (c = requests in flight)"
    if kinds == ["rate"]:
        return "point labels: request rate (requests/s)"
    return "point labels: load (c = concurrency, /s = requests/s)"


def _kinds(lines: list[_Line]) -> list[str]:
    kinds = sorted({p["load"]["kind"] for ln in lines for p in ln.points})
    return kinds or ["concurrency"]


def _plot_cost(lines: list[_Line], title: str, path: Path) -> None:
    kinds = _kinds(lines)
    currencies = {ln.set.currency for ln in lines}
    one_currency = len(currencies) == 1
    labels = [ln.label if one_currency else f"{ln.label} ({ln.set.currency})" for ln in lines]
    fig = _figure(max(8.5, 6.5 * len(kinds)), 5.0, list(dict.fromkeys(labels)) + ["meets SLO", "misses SLO"], False)
    fig.suptitle(f"{title}\nCost per million output tokens vs load")
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    handles: dict[str, Any] = {}
    for ax, kind in zip(axes, kinds):
        ys_all, xs_all = [], []
        for ln in lines:
            pts = [
                (float(p["load"]["value"]), p.get("cost_per_million_output_tokens"), bool(p.get("meets_slo")))
                for p in ln.points
                if p["load"]["kind"] == kind
            ]
            pts = [t for t in pts if t[1] is not None]
            if not pts:
                continue
            label = ln.label if one_currency else f"{ln.label} ({ln.set.currency})"
            (h,) = ax.plot(
                [t[0] for t in pts],
                [t[1] for t in pts],
                color=ln.color,
                linestyle=ln.style,
                linewidth=1.8,
                marker=ln.marker,
                markersize=7,
                markerfacecolor=ln.color,
            )
            for x, y, ok in pts:  # hollow markers over the line's for points outside the SLO
                if not ok:
                    ax.plot(
                        [x],
                        [y],
                        linestyle="none",
                        marker=ln.marker,
                        markersize=7,
                        markeredgewidth=1.6,
                        markeredgecolor=ln.color,
                        markerfacecolor="white",
                        zorder=h.get_zorder() + 0.1,
                    )
            handles.setdefault(label, h)
            xs_all += [t[0] for t in pts]
            ys_all += [t[1] for t in pts]
        if not ys_all:
            _no_data(ax, "no cost figures (no hardware price?)")
        ax.set_title(f"by {kind}")
        ax.set_xlabel(_load_axis(kind))
        ax.set_ylabel(
            f"{next(iter(currencies))} per 1M output tokens"
            if one_currency
            else "cost per 1M output tokens (currency in legend)"
        )
        ax.margins(x=0.06, y=0.1)
        _scale_load_x(ax, xs_all)
        _scale_y(ax, ys_all)
    handles["meets SLO (filled)"] = Line2D([], [], linestyle="none", marker="o", markersize=7, color="#555555")
    handles["misses SLO (hollow)"] = Line2D(
        [],
        [],
        linestyle="none",
        marker="o",
        markersize=7,
        color="#555555",
        markerfacecolor="white",
        markeredgewidth=1.6,
    )
    _finish(fig, list(handles.values()), list(handles), None, path)


def _plot_goodput(lines: list[_Line], title: str, path: Path) -> None:
    kinds = _kinds(lines)
    has_goodput = any(p.get("request_goodput") is not None for ln in lines for p in ln.points)
    cols = 2 if has_goodput else 1
    fig = _figure(
        12.5 if has_goodput else 8.5, 0.4 + 4.6 * len(kinds), list(dict.fromkeys(ln.label for ln in lines)), False
    )
    fig.suptitle(f"{title}\nRequest throughput" + (" and goodput" if has_goodput else "") + " vs load")
    grid = fig.subplots(len(kinds), cols, squeeze=False, sharey="row")
    handles: dict[str, Any] = {}
    panels = [("request_throughput", "Request throughput (all successful requests)")]
    if has_goodput:
        panels.append(("request_goodput", "Request goodput (requests meeting every SLO threshold)"))
    for row, kind in zip(grid, kinds):
        for ax, (key, name) in zip(row, panels):
            xs_all, ys_all = [], []
            for ln in lines:
                pts = [(float(p["load"]["value"]), p.get(key)) for p in ln.points if p["load"]["kind"] == kind]
                pts = [t for t in pts if t[1] is not None]
                if not pts:
                    continue
                (h,) = ax.plot(
                    [t[0] for t in pts],
                    [t[1] for t in pts],
                    color=ln.color,
                    linestyle=ln.style,
                    marker=ln.marker,
                    markersize=6,
                    linewidth=1.8,
                )
                handles.setdefault(ln.label, h)
                xs_all += [t[0] for t in pts]
                ys_all += [t[1] for t in pts]
            if not ys_all:
                _no_data(ax, "no figures")
            ax.set_title(name)
            ax.set_xlabel(_load_axis(kind))
            ax.set_ylabel("requests/s")
            ax.yaxis.set_tick_params(labelleft=True)
            ax.margins(x=0.06, y=0.1)
            _scale_load_x(ax, xs_all)
            ax.set_ylim(bottom=0)
    _finish(fig, list(handles.values()), list(handles), None, path)


def _render_plots(sets: list[_Set], title: str, out_dir: Path) -> list[Path]:
    lines = _lines(sets)
    paths = [out_dir / f for f in PLOT_FILES]
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(_RC)
        _plot_latency(lines, title, paths[0])
        _plot_cost(lines, title, paths[1])
        _plot_goodput(lines, title, paths[2])
    return paths


# ---------------------------------------------------------------------------------------------
# Entry point


def _default_title(sets: list[_Set]) -> str:
    if len(sets) == 1:
        return f"keel bench: {sets[0].label}"
    if len(sets) == 2:
        return f"keel bench: {sets[1].label} vs {sets[0].label}"
    return "keel bench: " + ", ".join(s.label for s in sets)


def write_report(results: list[dict], out_dir: Path, title: str | None = None) -> dict[str, Any]:
    """Writes report.md, report.html and the PNG plots into out_dir (created if needed).
    Returns {"html": path, "markdown": path, "png": [paths]}. With 2+ results the first is the
    baseline of a comparison."""
    if not results:
        raise ValueError("no results to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = _sets(results)
    title = title or _default_title(sets)
    pngs = _render_plots(sets, title, out_dir)
    blocks: list[Block] = [_Heading(1, title)]
    if len(sets) > 1:
        blocks += _compare_blocks(sets)
    for s in sets:
        blocks += _set_blocks(s, compare=len(sets) > 1)
    blocks += [
        _Heading(2, "Plots"),
        _Image(
            PLOT_FILES[0],
            "Latency (TTFT, TPOT at the SLO percentile) vs output throughput; the dashed line is the SLO threshold",
        ),
        _Image(PLOT_FILES[1], "Cost per million output tokens vs load; hollow points miss the SLO"),
        _Image(PLOT_FILES[2], "Request throughput and goodput vs load"),
    ]
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(_to_markdown(blocks), encoding="utf-8")
    images = {p.name: p.read_bytes() for p in pngs}
    html_path.write_text(_to_html(blocks, title, images), encoding="utf-8")
    return {"html": html_path, "markdown": md_path, "png": pngs}
