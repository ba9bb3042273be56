"""What the report says, as a list of blocks (headings, paragraphs, tables, ...) that the
templates render to both Markdown and HTML, so the two say the same: the comparison with the
baseline when there are several result sets, then each set's settings, SLO-compliant maxima
and recommendation, then the plots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from serving.bench.metrics import percentile_word
from serving.bench.records import load_text
from serving.bench.report.plots import PLOT_FILES
from serving.bench.report.results import (
    ResultSet,
    failed_text,
    match,
    num,
    quantile,
    ratio,
    setting_name,
    slo_text,
    sorted_points,
)

# ---------------------------------------------------------------------------------------------
# Blocks and inline spans; `kind` is what the templates dispatch on


@dataclass
class Code:
    text: str
    kind: ClassVar[str] = "code"


@dataclass
class Bold:
    text: str
    kind: ClassVar[str] = "bold"


@dataclass
class Mark:
    """✓ or ✗: whether a point meets its SLO (coloured in HTML)."""

    ok: bool
    kind: ClassVar[str] = "mark"


Inline = str | Code | Bold | Mark
Text = str | list[Inline]


@dataclass
class Heading:
    level: int
    text: Text
    kind: ClassVar[str] = "heading"


@dataclass
class Para:
    text: Text
    kind: ClassVar[str] = "para"


@dataclass
class Bullets:
    items: list[Text]
    kind: ClassVar[str] = "bullets"


@dataclass
class Table:
    header: list[str]
    rows: list[list[Text]]
    align: str = ""  # one of l/r/c per column; default: first two left, the rest right
    kind: ClassVar[str] = "table"

    @property
    def aligns(self) -> str:
        return self.align or ("ll" + "r" * max(0, len(self.header) - 2))


@dataclass
class CodeBlock:
    text: str
    lang: str = ""
    kind: ClassVar[str] = "code_block"


@dataclass
class Image:
    file: str
    alt: str
    kind: ClassVar[str] = "image"


Block = Heading | Para | Bullets | Table | CodeBlock | Image


def spans(t: Text) -> list[Inline]:
    return [t] if isinstance(t, str) else t


# ---------------------------------------------------------------------------------------------
# The whole document


def default_title(sets: list[ResultSet]) -> str:
    if len(sets) == 1:
        return f"keel bench: {sets[0].label}"
    if len(sets) == 2:
        return f"keel bench: {sets[1].label} vs {sets[0].label}"
    return "keel bench: " + ", ".join(s.label for s in sets)


def report_blocks(sets: list[ResultSet], title: str) -> list[Block]:
    """The report of `sets`; with 2+ the first is the baseline of a comparison."""
    blocks: list[Block] = [Heading(1, title)]
    if len(sets) > 1:
        blocks += _compare_blocks(sets)
    for s in sets:
        blocks += _set_blocks(s, compare=len(sets) > 1)
    blocks += [
        Heading(2, "Plots"),
        Image(
            PLOT_FILES[0],
            "Latency (TTFT, TPOT at the SLO percentile) vs output throughput; the dashed line is the SLO threshold",
        ),
        Image(PLOT_FILES[1], "Cost per million output tokens vs load; hollow points miss the SLO"),
        Image(PLOT_FILES[2], "Request throughput and goodput vs load"),
    ]
    return blocks


# ---------------------------------------------------------------------------------------------
# The summary of one result set


def _set_blocks(s: ResultSet, compare: bool) -> list[Block]:
    r = s.result
    meta, spec, hw = r.get("meta") or {}, r.get("spec") or {}, r.get("hardware") or {}
    head: list[Inline] = [s.label]
    if compare:
        head.append(f" ({s.tag}{', baseline' if s.tag == 'A' else ''})")
    blocks: list[Block] = [Heading(2, head)]
    facts: list[Inline] = []

    def fact(name: str, value: Any, code: bool = True) -> None:
        if value in (None, ""):
            return
        if facts:
            facts.append(" · ")
        facts.extend([f"{name} ", Code(str(value)) if code else str(value)])

    fact("Date", meta.get("date"), code=False)
    fact("model", meta.get("model") or spec.get("model"))
    fact("hardware", hw.get("name"))
    if hw.get("price_per_replica_hour") is not None:
        facts.append(f" ({s.currency} {num(hw['price_per_replica_hour'])} per replica-hour)")
    fact("git", meta.get("git"))
    fact("host", meta.get("host"))
    if meta.get("cpus"):
        facts.append(f" ({meta['cpus']} CPUs)")
    fact("server", meta.get("url") or spec.get("url"))
    if facts:
        blocks.append(Para(facts))
    blocks.append(
        Para(
            [
                Bold("SLO:"),
                f" {slo_text(s)}; a load point meets it when each percentile is "
                "within its threshold and no request failed.",
            ]
        )
    )
    workload = _workload_text(spec)
    if workload:
        blocks.append(Para(workload))
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


def _setting_blocks(s: ResultSet, setting: dict, i: int) -> list[Block]:
    name = setting_name(setting, i)
    replicas = setting.get("replicas", 1)
    head: list[Inline] = ["Setting ", Code(name)]
    desc: list[Inline] = [f"{replicas} replica{'s' if replicas != 1 else ''}"]
    engine = setting.get("engine") or {}
    if engine:
        desc += ["; engine: ", Code(", ".join(f"{k}={v}" for k, v in engine.items()))]
    pw = percentile_word(s.pct)
    e2el = s.slo.get("e2el_ms") is not None
    header = (
        ["load", "req/s", "output tok/s", "TTFT p50 (ms)", f"TTFT {pw} (ms)", "TPOT p50 (ms)", f"TPOT {pw} (ms)"]
        + ([f"E2EL {pw} (ms)"] if e2el else [])
        + ["goodput (req/s)", "failed", f"{s.currency}/M output tok", "meets SLO"]
    )
    rows = []
    for p in sorted_points(setting):
        row: list[Text] = [
            load_text(p["load"]),
            num(p.get("request_throughput")),
            num(p.get("output_throughput")),
            num(p.get("median_ttft_ms")),
            _over(quantile(p, s.pct, "ttft"), s.slo.get("ttft_ms")),
            num(p.get("median_tpot_ms")),
            _over(quantile(p, s.pct, "tpot"), s.slo.get("tpot_ms")),
        ]
        if e2el:
            row.append(_over(quantile(p, s.pct, "e2el"), s.slo.get("e2el_ms")))
        row += [
            num(p.get("request_goodput")),
            failed_text(p),
            num(p.get("cost_per_million_output_tokens")),
            [Mark(bool(p.get("meets_slo")))],
        ]
        rows.append(row)
    align = "l" + "r" * (len(header) - 2) + "c"
    blocks: list[Block] = [Heading(3, head), Para(desc)]
    if setting.get("error"):
        blocks.append(Para([Bold("This setting failed:"), " " + str(setting["error"]).splitlines()[0]]))
    blocks.append(Table(header, rows, align) if rows else Para("No load points."))
    best = setting.get("slo_max")
    if best:
        text = (
            f" {load_text(best['load'])}: {num(best.get('request_throughput'))} req/s, "
            f"{num(best.get('output_throughput'))} output tok/s, TTFT {pw} {num(quantile(best, s.pct, 'ttft'))} ms, "
            f"TPOT {pw} {num(quantile(best, s.pct, 'tpot'))} ms"
        )
        cost = best.get("cost_per_million_output_tokens")
        text += f", {s.currency} {num(cost)} per million output tokens." if cost is not None else "."
    elif setting.get("error") and not rows:
        text = " none: the setting was not measured."
    else:
        text = " none: no load point met the SLO (the lowest load already misses it)."
    blocks.append(Para([Bold("SLO-compliant maximum:"), text]))
    return blocks


def _over(value: float | None, limit: float | None) -> Text:
    """A percentile cell, bold when it breaks its SLO threshold."""
    return [Bold(num(value))] if value is not None and limit is not None and value > limit else num(value)


def _recommendation_blocks(s: ResultSet) -> list[Block]:
    rec = s.result.get("recommendation")
    blocks: list[Block] = [Heading(3, "Recommendation")]
    if not rec:
        why = (
            "no setting met the SLO at any load"
            if not any(st.get("slo_max") for st in s.settings)
            else "none in this result (the spec gave no target peak load)"
        )
        blocks.append(Para(f"No recommendation: {why}."))
        return blocks
    cur = str(rec.get("currency") or s.currency)
    summary: list[Inline] = []
    if rec.get("setting") is not None:
        summary += ["Setting ", Code(str(rec["setting"]))]
    if rec.get("replicas") is not None:
        summary.append(f"{', ' if summary else ''}{rec['replicas']} replica{'s' if rec['replicas'] != 1 else ''}")
    if rec.get("cost_per_hour") is not None:
        summary.append(f"{', ' if summary else ''}{cur} {num(rec['cost_per_hour'])} per hour")
    if rec.get("cost_per_million_output_tokens") is not None:
        summary.append(
            f"{', ' if summary else ''}{cur} {num(rec['cost_per_million_output_tokens'])} per million output tokens"
        )
    if summary:
        blocks.append(Para([Bold("Recommended:"), " ", *summary, "."]))
    items: list[Text] = []
    if rec.get("engine"):
        engine = rec["engine"]
        text = ", ".join(f"{k}={v}" for k, v in engine.items()) if isinstance(engine, dict) else str(engine)
        items.append(["Engine: ", Code(text)])
    if rec.get("per_replica") is not None:
        items.append(["Per replica: ", _describe(rec["per_replica"], s)])
    if rec.get("autoscaling") is not None:
        items.append(["Autoscaling: ", _describe(rec["autoscaling"], s)])
    if items:
        blocks.append(Bullets(items))
    reasoning = rec.get("reasoning")
    if isinstance(reasoning, list):
        blocks.append(Bullets([str(x) for x in reasoning]))
    elif reasoning:
        blocks += [Para(p) for p in str(reasoning).split("\n\n") if p.strip()]
    if rec.get("config_yaml"):
        blocks.append(Para("Config to paste:"))
        blocks.append(CodeBlock(str(rec["config_yaml"]), "yaml"))
    return blocks


def _describe(value: Any, s: ResultSet) -> str:
    """A short text for a recommendation field that may be a load point, a mapping or a value."""
    if isinstance(value, dict) and isinstance(value.get("load"), dict):
        return (
            f"{load_text(value['load'])}: {num(value.get('request_throughput'))} req/s, "
            f"{num(value.get('output_throughput'))} output tok/s"
        )
    if isinstance(value, dict):
        return ", ".join(f"{k}={_describe(v, s)}" for k, v in value.items())
    if isinstance(value, float):
        return num(value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# Compare mode


def _compare_blocks(sets: list[ResultSet]) -> list[Block]:
    base = sets[0]
    pw = percentile_word(base.pct)
    blocks: list[Block] = [Heading(2, "Comparison with the baseline")]
    who: list[Inline] = ["Sets: "]
    for i, s in enumerate(sets):
        who += [("; " if i else ""), Bold(s.tag), f" = {s.label}" + (" (baseline)" if i == 0 else "")]
    blocks.append(Para(who + ["."]))
    blocks.append(
        Para(
            "Ratios are set ÷ baseline: above 1× is better for throughput, below 1× is better "
            f"for latency and cost. Latencies are at the baseline's SLO percentile ({pw})."
        )
    )
    for other in sets[1:]:
        m = match(base, other)
        a, b = base.tag, other.tag
        blocks.append(Heading(3, f"{b} vs {a}"))
        if m.by_name:
            blocks.append(Para("Points matched by setting name and load."))
        else:
            blocks.append(Para("The two sets share no setting name: points matched by setting position and load."))
        notes: list[Text] = []
        if slo_text(base) != slo_text(other):
            notes.append(
                [
                    f"The SLOs differ ({a}: {slo_text(base)}; {b}: {slo_text(other)}); each set's ",
                    Mark(True),
                    "/",
                    Mark(False),
                    " is judged against its own SLO.",
                ]
            )
        same_currency = base.currency == other.currency
        if not same_currency:
            notes.append(f"The currencies differ ({a}: {base.currency}, {b}: {other.currency}): no cost ratio.")
        blocks += [Para(n) for n in notes]
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
        rows: list[list[Text]] = []
        for bname, oname, p, q in m.rows:
            name: Text = [Code(bname)] if bname == oname else [Code(bname), " ↔ ", Code(oname)]
            cb, co = p.get("cost_per_million_output_tokens"), q.get("cost_per_million_output_tokens")
            rows.append(
                [
                    name,
                    load_text(p["load"]),
                    num(p.get("output_throughput")),
                    num(q.get("output_throughput")),
                    ratio(p.get("output_throughput"), q.get("output_throughput")),
                    num(quantile(p, base.pct, "ttft")),
                    num(quantile(q, base.pct, "ttft")),
                    ratio(quantile(p, base.pct, "ttft"), quantile(q, base.pct, "ttft")),
                    num(quantile(p, base.pct, "tpot")),
                    num(quantile(q, base.pct, "tpot")),
                    ratio(quantile(p, base.pct, "tpot"), quantile(q, base.pct, "tpot")),
                    num(cb),
                    num(co),
                    ratio(cb, co) if same_currency else "–",
                    [Mark(bool(p.get("meets_slo"))), " / ", Mark(bool(q.get("meets_slo")))],
                ]
            )
        blocks.append(Table(header, rows, "ll" + "r" * 12 + "c") if rows else Para("No load point matched."))
        if m.settings:
            blocks.append(Para([Bold("SLO-compliant maximum"), " (the highest load each set carried inside its SLO):"]))
            blocks.append(
                Table(
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
                [f"only in {a}: setting ", Code(n), f", {load_text(p['load'])}"] for n, p in m.only_base
            ]
            items += [[f"only in {b}: setting ", Code(n), f", {load_text(p['load'])}"] for n, p in m.only_other]
            blocks += [
                Para([Bold("Unmatched load points"), f" ({len(items)}, not in the table above):"]),
                Bullets(items),
            ]
        else:
            blocks.append(Para("Every load point matched."))
    return blocks


def _max_row(sb: dict, so: dict, nb: str, no: str, same_currency: bool) -> list[Text]:
    pb, po = sb.get("slo_max"), so.get("slo_max")
    name: Text = [Code(nb)] if nb == no else [Code(nb), " ↔ ", Code(no)]

    def get(p: dict | None, k: str) -> float | None:
        return p.get(k) if p else None

    cb, co = get(pb, "cost_per_million_output_tokens"), get(po, "cost_per_million_output_tokens")
    return [
        name,
        load_text(pb["load"]) if pb else "none",
        load_text(po["load"]) if po else "none",
        num(get(pb, "output_throughput")),
        num(get(po, "output_throughput")),
        ratio(get(pb, "output_throughput"), get(po, "output_throughput")),
        num(cb),
        num(co),
        ratio(cb, co) if same_currency else "–",
    ]
