"""What `keel autoscale simulate` shows: settings side by side, the cheapest that meets the SLO
as the block to paste, a plot of demand against replicas, and the results as JSON."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import yaml
from rich.table import Table

from serving.autoscaling.calibrate import SLO
from serving.autoscaling.settings import AutoscalingConfig
from serving.autoscaling.simulate import SimResult

# Always written in the pasted block, even at their defaults: what a reader checks first.
_ALWAYS = ("min_replicas", "max_replicas", "signal", "target")


def table(results: list[SimResult], slo: SLO) -> Table:
    t = Table(title=f"SLO: {slo.describe()}", title_justify="left")
    t.add_column("setting", no_wrap=True)
    for col in ("SLO", "attainment", "TTFT ms p50/p95/p99", "TPOT ms p95", "failed", "replica-h", "cost", "scalings"):
        t.add_column(col, justify="right", no_wrap=True)
    best = cheapest(results)
    for r in results:
        ttft = "/".join(f"{r.ttft_ms[p]:.0f}" for p in ("p50", "p95", "p99"))
        t.add_row(
            r.name + (" *" if r is best else ""),
            "met" if r.meets_slo else "missed",
            f"{r.slo_attainment:.2%}",
            ttft,
            f"{r.tpot_ms['p95']:.1f}",
            str(r.failed),
            f"{r.replica_hours:.2f}",
            f"{money(r.cost)} {r.currency}",
            str(len(r.scale_events)),
        )
    if best is not None:
        t.caption = "* the cheapest setting that meets the SLO"
        t.caption_justify = "left"
    return t


def money(x: float) -> str:
    """2 decimals, 4 below 1 (a short trace on a cheap replica costs cents)."""
    return f"{x:.2f}" if x >= 1 or x == 0 else f"{x:.4f}"


def cheapest(results: list[SimResult]) -> SimResult | None:
    """The lowest cost among settings that meet the SLO; ties: fewer scale events, then the
    earlier setting."""
    ok = [(r.cost, len(r.scale_events), i, r) for i, r in enumerate(results) if r.meets_slo]
    return min(ok, key=lambda x: x[:3])[3] if ok else None


def settings_block(settings: AutoscalingConfig) -> dict:
    """The settings as ops write them: what was set, plus the keys in _ALWAYS."""
    block = settings.model_dump(mode="json", exclude_unset=True)
    full = settings.model_dump(mode="json")
    for key in _ALWAYS:
        block.setdefault(key, full[key] if full[key] is not None else settings.target_value)
    return {k: block[k] for k in full if k in block}  # in the schema's order


def paste_block(result: SimResult, slo: SLO) -> str:
    """A commented `autoscaling:` block for models.NAME.deployment, checked by AutoscalingConfig."""
    block = settings_block(result.settings)
    AutoscalingConfig.model_validate(block)  # what is pasted must load as what was simulated
    why = (
        f"keel autoscale simulate: setting {result.name!r} kept {result.slo_attainment:.1%} of "
        f"{result.requests} requests within the SLO ({slo.describe()}) for {money(result.cost)} "
        f"{result.currency} ({result.replica_hours:.2f} replica-hours, {len(result.scale_events)} scale events) "
        f"over {result.duration_s:.0f} s of trace."
    )
    header = "".join(f"# {line}\n" for line in textwrap.wrap(why, 96))
    header += "# Paste under models.NAME.deployment, then: keel apply --dry-run CONFIG; keel apply CONFIG\n"
    return header + yaml.safe_dump({"autoscaling": block}, sort_keys=False)


def events_text(result: SimResult, limit: int = 20) -> str:
    lines = [f"  {e.t:8.1f} s  {e.from_replicas} -> {e.to_replicas}  {e.reason}" for e in result.scale_events[:limit]]
    if len(result.scale_events) > limit:
        lines.append(f"  ... {len(result.scale_events) - limit} more (--json has them all)")
    return "\n".join(lines) or "  none"


def plot(results: list[SimResult], path: str | Path, title: str = "") -> Path:
    """One panel per setting: requests in the system (left axis) against replicas ready and
    wanted (right axis), over the trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.6 * n + 0.6), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        tl = r.timeline
        ax.plot(tl.t, tl.in_system, color="tab:blue", lw=0.8, label="requests in the system")
        ax.set_ylabel("requests", color="tab:blue")
        ax2 = ax.twinx()
        ax2.step(tl.t, tl.wanted, where="post", color="tab:orange", lw=1, ls="--", label="replicas wanted")
        ax2.step(tl.t, tl.ready, where="post", color="tab:red", lw=1.3, label="replicas ready")
        ax2.set_ylabel("replicas")
        ax2.set_ylim(bottom=0, top=max([1, *tl.wanted, *tl.ready]) * 1.2)
        ax.set_title(
            f"{r.name}: SLO attainment {r.slo_attainment:.1%}, {r.replica_hours:.2f} replica-h, "
            f"{money(r.cost)} {r.currency}",
            fontsize=9,
            loc="left",
        )
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds from the trace's start")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(results: list[SimResult], slo: SLO, path: str | Path, meta: dict) -> Path:
    best = cheapest(results)
    doc = {
        "meta": meta,
        "slo": slo.__dict__,
        "results": [r.to_dict() for r in results],
        "cheapest": best.name if best else None,
        "config_block": paste_block(best, slo) if best else None,
    }
    Path(path).write_text(json.dumps(doc, indent=2, default=float))
    return Path(path)
