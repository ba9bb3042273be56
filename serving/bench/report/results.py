"""Result files as the report reads them: loading and checking them, one `ResultSet` per file,
the figures formatted for tables, and the pairing of two sets' load points in compare mode."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.bench.metrics import percentile_key, percentile_word
from serving.bench.records import FORMAT_VERSION

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
class ResultSet:
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


def result_sets(results: list[dict]) -> list[ResultSet]:
    out: list[ResultSet] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(results):
        label = str((r.get("meta") or {}).get("label") or (r.get("spec") or {}).get("label") or f"set {i + 1}")
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # two runs with the same label: keep them apart in legends
            label = f"{label} #{seen[label]}"
        slo = r.get("slo") or {}
        out.append(
            ResultSet(
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


def setting_name(s: dict, i: int) -> str:
    return str(s.get("name") or f"setting {i + 1}")


def quantile(point: dict | None, pct: float, metric: str) -> float | None:
    """A latency percentile of a point in ms, e.g. p99 TTFT; None when the point lacks it."""
    if point is None:
        return None
    v = point.get(percentile_key(pct, metric))
    if v is None and pct == 50:
        v = point.get(f"median_{metric}_ms")
    return v


def num(x: float | None) -> str:
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


def ratio(base: float | None, other: float | None) -> str:
    if base is None or other is None or base == 0:
        return "–"
    return f"{other / base:.2f}×"


def load_short(load: dict) -> str:
    v = float(load["value"])
    return f"c={v:g}" if load["kind"] == "concurrency" else f"{v:g}/s"


def load_axis(kind: str) -> str:
    return "concurrency (requests in flight)" if kind == "concurrency" else "request rate (requests/s)"


def slo_text(s: ResultSet) -> str:
    parts = [
        f"{name} {percentile_word(s.pct)} ≤ {s.slo[key]:g} ms"
        for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("E2EL", "e2el_ms"))
        if s.slo.get(key) is not None
    ]
    return ", ".join(parts) if parts else "none"


def failed_text(p: dict) -> str:
    n = p.get("failed") or 0
    by = p.get("failures_by_status") or {}
    if not n or not by:
        return str(n)
    return f"{n} (" + ", ".join(f"{k}: {v}" for k, v in sorted(by.items())) + ")"


def sorted_points(s: dict) -> list[dict]:
    return sorted(s.get("points") or [], key=lambda p: (p["load"]["kind"], float(p["load"]["value"])))


# ---------------------------------------------------------------------------------------------
# Compare mode: which points of two sets are the same measurement


@dataclass
class Match:
    by_name: bool
    rows: list[tuple[str, str, dict, dict]] = field(default_factory=list)  # base name, other name, points
    settings: list[tuple[dict, dict, str, str]] = field(default_factory=list)  # matched settings
    only_base: list[tuple[str, dict]] = field(default_factory=list)
    only_other: list[tuple[str, dict]] = field(default_factory=list)


def match(base: ResultSet, other: ResultSet) -> Match:
    """Pairs points by (setting name, load kind, load value), or by the setting's position when
    the two sets share no setting name (e.g. "Keel" vs "bare vLLM")."""
    base_names = [setting_name(st, i) for i, st in enumerate(base.settings)]
    other_names = [setting_name(st, i) for i, st in enumerate(other.settings)]
    m = Match(by_name=bool(set(base_names) & set(other_names)))

    def skey(names: list[str], i: int) -> Any:
        return names[i] if m.by_name else i

    def pkey(p: dict) -> tuple[str, float]:
        return p["load"]["kind"], round(float(p["load"]["value"]), 9)

    other_settings = {skey(other_names, i): (st, other_names[i]) for i, st in enumerate(other.settings)}
    pending: dict[tuple, list[dict]] = {}
    for i, st in enumerate(other.settings):
        for p in sorted_points(st):
            pending.setdefault((skey(other_names, i), *pkey(p)), []).append(p)
    for i, st in enumerate(base.settings):
        k = skey(base_names, i)
        if k in other_settings:
            m.settings.append((st, other_settings[k][0], base_names[i], other_settings[k][1]))
        for p in sorted_points(st):
            found = pending.get((k, *pkey(p)))
            if found:
                m.rows.append((base_names[i], other_settings[k][1], p, found.pop(0)))
            else:
                m.only_base.append((base_names[i], p))
    for i, st in enumerate(other.settings):
        for p in sorted_points(st):
            left = pending.get((skey(other_names, i), *pkey(p)))
            if left and any(q is p for q in left):
                m.only_other.append((other_names[i], p))
    return m
