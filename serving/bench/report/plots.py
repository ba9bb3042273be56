"""The report's three plots, drawn with matplotlib's Agg renderer (no display needed) and fixed
style settings, so the same results give the same bytes. With several result sets the plots
overlay them: a setting keeps its colour across the sets, each set has its own line style."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

from serving.bench.metrics import percentile_word
from serving.bench.report.results import (
    ResultSet,
    load_axis,
    load_short,
    match,
    quantile,
    setting_name,
    sorted_points,
)

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


@dataclass
class PlotLine:
    label: str
    color: Any
    style: str
    marker: str
    points: list[dict]
    set: ResultSet


def plot_lines(sets: list[ResultSet]) -> list[PlotLine]:
    """One line per (set, setting). Colour follows the setting (by name, or by position when the
    sets share no setting name) and line style the set, so matched lines share a colour."""
    palette = list(matplotlib.color_sequences["tab10"])
    by_name = len(sets) == 1 or any(match(sets[0], s).by_name for s in sets[1:])
    by_set = len(sets) > 1 and all(len(s.settings) <= 1 for s in sets)  # e.g. Keel vs bare vLLM
    colors: dict[Any, int] = {}
    lines = []
    for si, s in enumerate(sets):
        for i, st in enumerate(s.settings):
            name = setting_name(st, i)
            key = ("set", si) if by_set else name if by_name else i
            colors.setdefault(key, len(colors))
            label = name if len(sets) == 1 else f"{s.label} · {name}"
            if len(label) > _MAX_PLOT_LABEL:
                label = label[: _MAX_PLOT_LABEL - 1] + "…"
            lines.append(
                PlotLine(
                    label,
                    palette[colors[key] % len(palette)],
                    _SET_STYLES[si % len(_SET_STYLES)],
                    _SET_MARKERS[si % len(_SET_MARKERS)],
                    sorted_points(st),
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


def _pct_label(lines: list[PlotLine]) -> str:
    pcts = {ln.set.pct for ln in lines}
    return percentile_word(next(iter(pcts))) if len(pcts) == 1 else "at SLO percentile"


def _slo_lines(lines: list[PlotLine], metric: str, name: str) -> dict[str, float]:
    """One dashed line per distinct threshold, labelled with the percentiles that use it."""
    pcts: dict[float, list[str]] = {}
    for ln in lines:
        limit = ln.set.slo.get(f"{metric}_ms")
        if limit is not None and percentile_word(ln.set.pct) not in pcts.setdefault(limit, []):
            pcts[limit].append(percentile_word(ln.set.pct))
    return {f"SLO: {name} {' / '.join(pws)} ≤ {limit:g} ms": limit for limit, pws in pcts.items()}


def _plot_line(ax, ln: PlotLine, pts: list[tuple], handles: dict[str, Any]) -> None:
    """One set's line through its (x, y, ...) points, in its colour, style and marker; its legend
    handle is the first line drawn under its label."""
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


def _plot_latency(lines: list[PlotLine], title: str, path: Path) -> None:
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
            pts = [(p.get("output_throughput"), quantile(p, ln.set.pct, metric), p) for p in ln.points]
            pts = [t for t in pts if t[0] is not None and t[1] is not None]
            if not pts:
                continue
            _plot_line(ax, ln, pts, handles)
            dx, dy, ha, va = _LABEL_OFFSETS[k % len(_LABEL_OFFSETS)]
            for x, y, p in pts:
                ax.annotate(
                    load_short(p["load"]),
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


def _point_label_note(lines: list[PlotLine]) -> str:
    kinds = _kinds(lines)
    if kinds == ["concurrency"]:
        return "point labels: concurrency (c = requests in flight)"
    if kinds == ["rate"]:
        return "point labels: request rate (requests/s)"
    return "point labels: load (c = concurrency, /s = requests/s)"


def _kinds(lines: list[PlotLine]) -> list[str]:
    kinds = sorted({p["load"]["kind"] for ln in lines for p in ln.points})
    return kinds or ["concurrency"]


def _plot_cost(lines: list[PlotLine], title: str, path: Path) -> None:
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
        ax.set_xlabel(load_axis(kind))
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


def _plot_goodput(lines: list[PlotLine], title: str, path: Path) -> None:
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
                _plot_line(ax, ln, pts, handles)
                xs_all += [t[0] for t in pts]
                ys_all += [t[1] for t in pts]
            if not ys_all:
                _no_data(ax, "no figures")
            ax.set_title(name)
            ax.set_xlabel(load_axis(kind))
            ax.set_ylabel("requests/s")
            ax.yaxis.set_tick_params(labelleft=True)
            ax.margins(x=0.06, y=0.1)
            _scale_load_x(ax, xs_all)
            ax.set_ylim(bottom=0)
    _finish(fig, list(handles.values()), list(handles), None, path)


def render_plots(sets: list[ResultSet], title: str, out_dir: Path) -> list[Path]:
    lines = plot_lines(sets)
    paths = [out_dir / f for f in PLOT_FILES]
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(_RC)
        _plot_latency(lines, title, paths[0])
        _plot_cost(lines, title, paths[1])
        _plot_goodput(lines, title, paths[2])
    return paths
