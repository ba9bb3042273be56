"""The loop that drives one rollout: deploy the candidate, move traffic step by step, look at the
signals every few seconds, promote or roll back. The stack is injected (serving.rollout.stack on
Ray, a fake in the unit tests), and so are the clock and sleep; the state file is written after
every transition, so a controller started again resumes where the last one stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from serving.plan import (
    ModelState,
    StackState,
    candidate_name,
    candidate_state,
    promoted,
    with_rollout,
    without_rollout,
)
from serving.rollout.decide import (
    ABORTED,
    ACTIVE,
    DEPLOYING,
    PROMOTE,
    PROMOTED,
    PROMOTING,
    ROLLBACK,
    ROLLED_BACK,
    ROLLING_BACK,
    STEPPING,
    RolloutState,
    apply_decision,
    decide,
    record,
)
from serving.rollout.evaluate import run_eval
from serving.rollout.signals import by_variant, delta, snapshot
from serving.rollout.spec import RolloutSpec
from serving.rollout.store import ABORT, PROMOTE_NOW, StateStore

LOOK_EVERY_S = 5.0


class RolloutError(RuntimeError):
    """A rollout that cannot start or go on; str() is the message a user reads."""


class DeployFailed(RuntimeError):
    """Serve could not deploy what it was given; str() says which application and why."""


class Stack(Protocol):
    def state(self) -> StackState | None: ...  # what the running stack was last given
    def submit(self, state: StackState) -> None: ...  # deploy it (declarative: the whole stack)
    def pending(self, gone: frozenset[str]) -> list[str]: ...  # what is not settled yet; DeployFailed
    def scrape(self) -> str: ...  # the gateway's /metrics text; OSError when unreachable
    # One request to the candidate alone, through the gateway: its JSON answer; AskFailed otherwise.
    def ask(self, model: str, candidate: str, path: str, body: dict, timeout_s: float) -> dict: ...


class Controller:
    def __init__(
        self,
        store: StateStore,
        stack: Stack,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        audit: Callable[[dict], None] | None = None,
        say: Callable[[str], None] = print,
        look_every_s: float = LOOK_EVERY_S,
    ):
        self.store, self.stack = store, stack
        self.clock, self.sleep, self.say = clock, sleep, say
        self.audit = audit or (lambda rec: None)
        self.look_every_s = look_every_s
        self._split_sent: float | None = None  # what this process last gave the gateways (a resume sends it again)

    # -- start or resume -------------------------------------------------------------------------

    def begin(self, spec: RolloutSpec, weights_path: str) -> RolloutState:
        """A new rollout's state, or the one in progress when it is the same rollout (a resume)."""
        old = self.store.load(spec.model)
        if old is not None and old.phase in ACTIVE:
            if old.to_version != spec.to_version:
                raise RolloutError(
                    f"a rollout of {spec.model} to {old.to_version} is in progress ({old.phase}); "
                    f"`keel rollout abort {spec.model}` first"
                )
            self.say(f"keel rollout: resuming {spec.model} -> {old.to_version} ({_where(old)})")
            return old
        current = self._current()
        if spec.model not in current.models or spec.model not in current.gateway.get("models", {}):
            raise RolloutError(
                f"no model `{spec.model}` in the running stack; serving: "
                f"{', '.join(current.gateway.get('models', {})) or 'none'}"
            )
        base = current.models[spec.model]
        if candidate_name(spec.model) in current.gateway.get("models", {}):
            raise RolloutError(
                f"`{candidate_name(spec.model)}` is a configured model name; rename it to roll out {spec.model}"
            )
        if base.args.get("weights") == spec.to_version:
            raise RolloutError(f"{spec.model} already serves {spec.to_version}")
        now = self.clock()
        cand = candidate_state(base, spec.model, spec.to_version, weights_path)
        state = RolloutState(
            model=spec.model,
            candidate=cand.args["model"],
            to_version=spec.to_version,
            from_version=base.args.get("weights", "?"),
            spec=spec.model_dump(mode="json"),
            weights_path=weights_path,
            from_weights_path=base.args.get("weights_path", ""),
            started_at=now,
            updated_at=now,
        )
        self._transition(
            state,
            "start",
            f"deploying {cand.args['model']} with {spec.to_version} beside "
            f"{spec.model} ({state.from_version}), 0% of traffic",
        )
        return state

    # -- the loop --------------------------------------------------------------------------------

    def run(self, state: RolloutState) -> RolloutState:
        """Drive the rollout until it is promoted, rolled back or aborted; returns the final state."""
        spec = state.rollout_spec
        while state.phase in ACTIVE:
            asked = self.store.take_request(state.model)
            if asked == ABORT and state.phase in (DEPLOYING, STEPPING):
                self._abort(state)
            elif asked == PROMOTE_NOW and state.phase in (DEPLOYING, STEPPING):
                if state.phase == DEPLOYING:
                    self.say("keel rollout: promote asked while the candidate deploys; it is promoted once it serves")
                    state.promote_when_ready = True
                else:
                    state.phase = PROMOTING
                    self._transition(state, PROMOTE, "promoted by hand (keel rollout promote)")
            if state.phase == DEPLOYING:
                self._deploy(state, spec)
            elif state.phase == STEPPING:
                if self._split_sent != state.percent and not self._set_split(state, state.percent):
                    continue
                self._look(state, spec)
            elif state.phase == PROMOTING:
                self._promote(state)
            elif state.phase == ROLLING_BACK:
                self._roll_back(state)
        return state

    def _deploy(self, state: RolloutState, spec: RolloutSpec) -> None:
        current = self._current()
        if state.candidate not in current.models:
            base = current.models.get(state.model)
            if base is None:
                return self._fail(state, f"{state.model} is no longer in the running stack")
            cand = candidate_state(base, state.model, state.to_version, state.weights_path)
            self.stack.submit(with_rollout(current, state.model, cand, 0))
        deadline = (state.deploy_started_at or state.started_at) + spec.ready_timeout_s
        while True:
            try:
                waiting = self.stack.pending(frozenset())
            except DeployFailed as e:
                return self._fail(state, f"the candidate failed to deploy: {e}")
            if not waiting:
                break
            if self.clock() >= deadline:
                return self._fail(
                    state, f"the candidate did not serve within {spec.ready_timeout_s:.0f} s ({'; '.join(waiting)})"
                )
            asked = self.store.take_request(state.model)
            if asked == ABORT:
                return self._abort(state)
            if asked == PROMOTE_NOW:
                state.promote_when_ready = True
            self.sleep(self.look_every_s)
        if state.promote_when_ready:
            state.phase, state.promote_when_ready = PROMOTING, False
            return self._transition(state, PROMOTE, "promoted by hand (keel rollout promote)")
        if spec.evaluation is not None and not state.evaluated and not self._evaluate(state, spec):
            return
        again = state.step_started_at is not None  # deployed again (the stack restarted): same step
        state.phase = STEPPING
        if not self._set_split(state, state.percent):
            return
        state.step_started_at, state.warmed, state.judged_since = self.clock(), False, None
        state.start_snapshot = self._snapshot(state) or {}
        self._transition(
            state,
            "step",
            f"the candidate serves{' again' if again else ''}; step {state.step + 1}"
            f"{' starts over' if again else ''}: {state.percent:g}% of {state.model}'s users",
        )

    def _evaluate(self, state: RolloutState, spec: RolloutSpec) -> bool:
        """The evaluation gate: every case asked of the candidate alone, at 0% of traffic."""
        assert spec.evaluation is not None  # the gate runs only for a spec that has one
        self.say(
            f"keel rollout: {state.model}: asking the candidate {len(spec.evaluation.cases)} evaluation "
            f"cases from {spec.eval_file or 'the eval set'}"
        )
        result = run_eval(
            spec.evaluation,
            state.model,
            lambda path, body, timeout: self.stack.ask(state.model, state.candidate, path, body, timeout),
        )
        if not result.ok:
            state.phase = ROLLING_BACK
            self._transition(state, ROLLBACK, result.summary(), evaluation=result.to_dict())
            return False
        state.evaluated = True
        self._transition(state, "evaluated", result.summary(), evaluation=result.to_dict())
        return True

    def _look(self, state: RolloutState, spec: RolloutSpec) -> None:
        self.sleep(self.look_every_s)
        current = self._current()
        split = (current.gateway.get("rollouts") or {}).get(state.model) or {}
        if state.candidate not in current.models or split.get("percent") != state.percent:
            self._split_sent = None  # the stack was changed under the rollout (restarted): set it again
            return
        now_series = self._snapshot(state)
        if now_series is None:
            return
        signals = by_variant(delta(state.start_snapshot, now_series), state.model, state.candidate)
        d = decide(state, spec, signals, self.clock())
        rec = apply_decision(state, d, self.clock(), now_series)
        if rec is None:
            self.store.save(state)
            return
        self._publish(state, rec)

    def _promote(self, state: RolloutState) -> None:
        current = self._current()
        if state.candidate in current.models:
            self.stack.submit(
                promoted(with_rollout(current, state.model, current.models[state.candidate], 100), state.model)
            )
            if not self._settle(state, frozenset()):
                return
        current = self._current()
        self.stack.submit(without_rollout(current, state.model))
        if not self._settle(state, frozenset({state.candidate})):
            return
        state.phase = PROMOTED
        self._transition(
            state,
            "promoted",
            f"{state.model} serves {state.to_version}; the candidate is removed. "
            f"Set models.{state.model}.weights: {state.to_version} in the config (`keel apply` "
            f"refuses to put {state.from_version} back without --allow-rollback)",
        )

    def _roll_back(self, state: RolloutState) -> None:
        current = self._current()
        split = (current.gateway.get("rollouts") or {}).get(state.model)
        if split is not None and split.get("percent") and state.candidate in current.models:
            # Traffic first, at once; the candidate's replicas drain only once no gateway sends to them.
            self.stack.submit(with_rollout(current, state.model, current.models[state.candidate], 0))
            self._settle(state, frozenset(), failing_ok=True)
            current = self._current()
        self.stack.submit(without_rollout(current, state.model))
        self._settle(state, frozenset({state.candidate}), failing_ok=True)
        current = self._current()
        base = current.models.get(state.model)
        if base is not None and base.args.get("weights") != state.from_version:
            # A promotion that failed half-way: the model's own replicas go back to what they were.
            self.stack.submit(restored(current, state))
            self._settle(state, frozenset(), failing_ok=True)
        state.phase = ABORTED if state.aborted else ROLLED_BACK
        self._transition(
            state, state.phase, f"{state.model} serves {state.from_version} only; the candidate is removed"
        )

    # -- helpers -------------------------------------------------------------------------------

    def _current(self) -> StackState:
        current = self.stack.state()
        if current is None:
            raise RolloutError("no Keel stack is running; start one with `keel serve`")
        return current

    def _abort(self, state: RolloutState) -> None:
        state.phase, state.aborted = ROLLING_BACK, True
        self._transition(state, "abort", "aborted by hand (keel rollout abort)")

    def _set_split(self, state: RolloutState, percent: float) -> bool:
        current = self._current()
        cand = current.models.get(state.candidate)
        if cand is None:
            # The stack was started again from its config (`keel serve`), which has no candidate.
            state.phase, state.deploy_started_at = DEPLOYING, self.clock()
            self._transition(
                state,
                "redeploy",
                f"the candidate {state.candidate} is gone from the running stack "
                f"(restarted?); deploying it again, then step {state.step + 1} starts over",
            )
            return False
        self.stack.submit(with_rollout(current, state.model, cand, percent))
        self._split_sent = percent
        return True

    def _settle(self, state: RolloutState, gone: frozenset, failing_ok: bool = False) -> bool:
        """Wait until the stack runs what it was given; False (and a rollback) on failure."""
        while True:
            try:
                if not self.stack.pending(gone):
                    return True
            except DeployFailed as e:
                if failing_ok:
                    self.say(f"keel rollout: {e}")
                    return True
                self._fail(state, f"deploy failed: {e}")
                return False
            self.sleep(min(self.look_every_s, 1.0))

    def _snapshot(self, state: RolloutState) -> dict | None:
        try:
            return snapshot(self.stack.scrape(), (state.model, state.candidate))
        except (OSError, ValueError) as e:
            state.last_reason = f"cannot read the gateway's metrics: {e}"
            self.say(f"keel rollout: {state.last_reason}")
            return None

    def _fail(self, state: RolloutState, reason: str) -> None:
        state.phase = ROLLING_BACK
        self._transition(state, ROLLBACK, reason)
        self.say(f"keel rollout: {state.model}: {reason}; rolling back")

    def _transition(self, state: RolloutState, action: str, reason: str, **extra) -> None:
        self._publish(state, record(state, action, reason, self.clock(), **extra))

    def _publish(self, state: RolloutState, rec: dict) -> None:
        self.store.save(state)
        self.audit(rec)
        self.say(f"keel rollout: {state.model}: {rec['action']}: {rec['reason']}")


def restored(current: StackState, state: RolloutState) -> StackState:
    """`current` with the model's own application back on the weights it had before the rollout."""
    base = current.models[state.model]
    args = {**base.args, "weights": state.from_version, "weights_path": state.from_weights_path}
    models = {**current.gateway.get("models", {})}
    models[state.model] = {**models.get(state.model, {}), "weights_path": state.from_weights_path}
    return StackState(
        current.server,
        {**current.gateway, "models": models},
        {**current.models, state.model: ModelState(args, base.overrides)},
    )


def _where(state: RolloutState) -> str:
    if state.phase == STEPPING:
        return f"step {state.step + 1} of {len(state.spec['steps'])}, {state.percent:g}%"
    return state.phase
