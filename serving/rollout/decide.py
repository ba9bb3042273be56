"""The rollout's state machine: plain data in, a Decision out, no clock or I/O of its own.

deploying -> step 0 .. step n-1 (the candidate gets steps[i] percent) -> promoting -> promoted
                 \\-> rolling_back -> rolled_back (a gate failed, or the candidate never served)
any active phase -> aborted (`keel rollout abort`: as a rollback, by hand)

At each look during a step, `decide` compares candidate and baseline over the step so far:
first a warm-up (gates.warmup_s: errors judged, latency not: a fresh engine's first requests are
slow), after which the signals count again from zero; then rollback at once when a gate fails
(given enough candidate requests to judge), hold until the step has held hold_s or while it has
too few requests, then advance (promote after the last).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from serving.rollout.signals import BASELINE, CANDIDATE, error_rate, histogram_quantile
from serving.rollout.spec import RolloutSpec

DEPLOYING, STEPPING, PROMOTING, ROLLING_BACK = "deploying", "stepping", "promoting", "rolling_back"
PROMOTED, ROLLED_BACK, ABORTED = "promoted", "rolled_back", "aborted"
ACTIVE = (DEPLOYING, STEPPING, PROMOTING, ROLLING_BACK)
DONE = (PROMOTED, ROLLED_BACK, ABORTED)

HOLD, ADVANCE, PROMOTE, ROLLBACK = "hold", "advance", "promote", "rollback"
WARMED = "warmed"  # the step's warm-up is over: its signals count again from now (not a transition)
QUANTILE = 0.95


@dataclass
class RolloutState:
    """One rollout as its state file holds it (serving.rollout.store)."""

    model: str
    candidate: str  # the internal model name the candidate is served under (plan.candidate_name)
    to_version: str
    from_version: str
    spec: dict  # RolloutSpec, as JSON
    weights_path: str = ""  # the candidate's weights directory
    from_weights_path: str = ""  # the model's, before: a rollback that finds it replaced restores it
    phase: str = DEPLOYING
    step: int = 0
    step_started_at: float | None = None
    start_snapshot: dict = field(default_factory=dict)  # series the step's signals count from (signals.snapshot)
    warmed: bool = False  # the step's warm-up is over: latency is judged, from `judged_since`
    judged_since: float | None = None
    baseline_ref: dict | None = None  # the baseline's summary from the last step that measured it
    started_at: float = 0.0
    deploy_started_at: float | None = None  # the candidate's latest deploy (None: at started_at)
    updated_at: float = 0.0
    last_reason: str = ""  # the latest decision's reason, holds included (what `status` shows)
    history: list[dict] = field(default_factory=list)  # every transition: the audit records
    aborted: bool = False  # the rollback was asked for by hand
    promote_when_ready: bool = False  # `keel rollout promote` came while the candidate deployed
    evaluated: bool = False  # the candidate passed the evaluation gate (a resume does not ask again)

    @property
    def rollout_spec(self) -> RolloutSpec:
        return RolloutSpec.model_validate(self.spec)

    @property
    def percent(self) -> float:
        """The candidate's share of traffic in this phase."""
        if self.phase == STEPPING:
            return self.spec["steps"][self.step]
        if self.phase == PROMOTING:
            return 100.0
        return 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RolloutState:
        return cls(**d)


@dataclass(frozen=True)
class Decision:
    action: str  # HOLD, ADVANCE, PROMOTE or ROLLBACK
    reason: str  # names the gate and its numbers
    summary: dict = field(default_factory=dict)  # both variants' numbers over the step


def summarise(variant: dict) -> dict:
    """Requests, error rate and p95s of one variant's signals (signals.by_variant)."""
    return {
        "requests": variant["requests"],
        "errors": variant["errors"],
        "error_rate": error_rate(variant),
        "ttft_p95": histogram_quantile(QUANTILE, variant["ttft"]),
        "tpot_p95": histogram_quantile(QUANTILE, variant["tpot"]),
    }


def decide(state: RolloutState, spec: RolloutSpec, signals: dict, now: float) -> Decision:
    """What to do now in a step, given the signals since it began ({"baseline", "candidate"})."""
    if state.phase != STEPPING:
        return Decision(HOLD, f"nothing to decide while {state.phase}")
    g = spec.gates
    cand, base = summarise(signals[CANDIDATE]), summarise(signals[BASELINE])
    ref, ref_note = base, "this step"
    if base["requests"] < g.min_requests and state.baseline_ref is not None:
        ref, ref_note = state.baseline_ref, "the previous step"  # at 100% the baseline gets nothing
    summary = {"candidate": cand, "baseline": ref, "baseline_from": ref_note}
    percent = spec.steps[state.step]
    if not state.warmed:  # errors are judged at once, latency once the engines are warm
        failed = _failed_errors(cand, ref, g) if cand["requests"] >= g.min_requests else None
        if failed:
            return Decision(ROLLBACK, failed, summary)
        warm = now - (state.step_started_at if state.step_started_at is not None else now)
        if warm >= g.warmup_s:
            return Decision(
                WARMED,
                f"step {state.step + 1} ({percent:g}%): warmed up {warm:.0f} s; every gate is judged from now",
                summary,
            )
        return Decision(
            HOLD,
            f"step {state.step + 1} ({percent:g}%): warming up, {warm:.0f} of "
            f"{g.warmup_s:.0f} s (errors judged, latency not yet)",
            summary,
        )
    if cand["requests"] < g.min_requests:
        return Decision(HOLD, f"{cand['requests']} of {g.min_requests} candidate requests needed to judge", summary)
    failed = _failed_gate(cand, ref, g)
    if failed:
        return Decision(ROLLBACK, failed, summary)
    if ref["requests"] < g.min_requests:
        return Decision(HOLD, f"{ref['requests']} of {g.min_requests} baseline requests needed to compare", summary)
    missing = [k for k in ("ttft_p95", "tpot_p95") if cand[k] is None]
    if missing:
        return Decision(HOLD, f"no {', '.join(missing)} from the candidate's engines yet", summary)
    held = now - (state.judged_since if state.judged_since is not None else now)
    passing = _passing(cand, ref, g)
    if held < spec.hold_s:
        return Decision(
            HOLD,
            f"step {state.step + 1} ({percent:g}%): gates hold ({passing}); {held:.0f} of {spec.hold_s:.0f} s",
            summary,
        )
    last = state.step == len(spec.steps) - 1
    return Decision(
        PROMOTE if last else ADVANCE, f"step {state.step + 1} ({percent:g}%) held {held:.0f} s: {passing}", summary
    )


def _failed_errors(cand: dict, base: dict, g) -> str | None:
    ce, be = cand["error_rate"], base["error_rate"] or 0.0
    if ce is not None and ce > be + g.max_error_rate_increase:
        return (
            f"error rate: candidate {ce:.2%} ({cand['errors']}/{cand['requests']}) > baseline {be:.2%} "
            f"+ {g.max_error_rate_increase:.2%}"
        )
    return None


def _failed_gate(cand: dict, base: dict, g) -> str | None:
    failed = _failed_errors(cand, base, g)
    if failed:
        return failed
    for key, label, ratio in (
        ("ttft_p95", "TTFT p95", g.max_ttft_p95_ratio),
        ("tpot_p95", "TPOT p95", g.max_tpot_p95_ratio),
    ):
        c, b = cand[key], base[key]
        if c is not None and b is not None and c > ratio * b:
            return f"{label}: candidate {_ms(c)} > {ratio:g} x baseline {_ms(b)} ({_ms(ratio * b)})"
    return None


def _passing(cand: dict, base: dict, g) -> str:
    parts = [f"errors {cand['error_rate']:.2%} vs {(base['error_rate'] or 0.0):.2%}"]
    for key, label in (("ttft_p95", "TTFT p95"), ("tpot_p95", "TPOT p95")):
        if base[key] is not None:
            parts.append(f"{label} {_ms(cand[key])} vs {_ms(base[key])}")
    return ", ".join(parts)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"


def record(state: RolloutState, action: str, reason: str, now: float, **extra) -> dict:
    """Append a transition to the state's history; the same dict is the audit record."""
    rec = {
        "event": "rollout",
        "time": now,
        "model": state.model,
        "to_version": state.to_version,
        "from_version": state.from_version,
        "action": action,
        "phase": state.phase,
        "step": state.step,
        "percent": state.percent,
        "reason": reason,
        **extra,
    }
    state.history.append(rec)
    state.last_reason = reason
    state.updated_at = now
    return rec


def apply_decision(state: RolloutState, decision: Decision, now: float, snapshot: dict) -> dict | None:
    """Move the state on by a decision; returns the audit record of a transition (None: a hold).
    `snapshot` is the series now: the next step's signals are counted from it."""
    state.updated_at = now
    if decision.action == HOLD:
        state.last_reason = decision.reason
        return None
    if decision.action == WARMED:  # not a transition: the latency window starts here
        state.warmed, state.judged_since, state.start_snapshot = True, now, snapshot
        state.last_reason = decision.reason
        return None
    base = decision.summary.get("baseline")
    if decision.summary.get("baseline_from") == "this step" and base and base["requests"] >= 1:
        state.baseline_ref = base
    if decision.action == ADVANCE:
        state.step += 1
        state.step_started_at, state.start_snapshot = now, snapshot
        state.warmed, state.judged_since = False, None
    elif decision.action == PROMOTE:
        state.phase = PROMOTING
    elif decision.action == ROLLBACK:
        state.phase = ROLLING_BACK
    return record(state, decision.action, decision.reason, now, signals=decision.summary)
