"""The rollout loop against a stand-in stack (no Ray): what it deploys, in which order, what it
decides from the traffic it sees, and that a second controller resumes from the state file."""

from __future__ import annotations

import pytest
import yaml

from serving.config import REPO_ROOT, parse_config
from serving.plan import desired
from serving.rollout.controller import Controller, DeployFailed, RolloutError
from serving.rollout.decide import ABORTED, PROMOTED, ROLLED_BACK, STEPPING
from serving.rollout.spec import RolloutSpec
from serving.rollout.store import ABORT, PROMOTE_NOW, StateStore

CAND = "demo@candidate"
INF = "+Inf"


class Crash(Exception):
    """The controller's process dies here."""


class FakeStack:
    """A deployed StackState, and a gateway whose counters grow with every scrape: `per_look`
    requests split by the deployed percent, the candidate answering with `cand_ttft` seconds and
    `cand_error_every`-th request a 500."""

    def __init__(self, cand_ttft=0.05, cand_error_every=0, per_look=40, pending=None, crash_after=None):
        self.deployed = desired(
            parse_config(yaml.safe_load((REPO_ROOT / "configs/local.yaml").read_text()), check_engine_args=False)
        )
        self.original = self.deployed
        self.submits = []
        self.cand_ttft, self.cand_error_every, self.per_look = cand_ttft, cand_error_every, per_look
        self.pending_results = list(pending or [])
        self.crash_after = crash_after
        self.counts = {"demo": [0, 0, 0], CAND: [0, 0, 0]}  # ok, 5xx
        self.buckets = {name: {"0.1": 0, "1.0": 0, INF: 0} for name in self.counts}  # TTFT (and TPOT) histograms
        self.scrapes = 0
        self.on_scrape = None
        self.asked, self.answer = [], "hello there"

    def state(self):
        return self.deployed

    def submit(self, state):
        self.deployed = state
        self.submits.append(state)

    def pending(self, gone):
        if self.pending_results:
            r = self.pending_results.pop(0)
            if isinstance(r, Exception):
                raise r
            return r
        return []

    def percent(self):
        return ((self.deployed.gateway.get("rollouts") or {}).get("demo") or {}).get("percent", 0)

    def scrape(self):
        self.scrapes += 1
        if self.crash_after is not None and self.scrapes > self.crash_after:
            raise Crash()
        if self.on_scrape:
            self.on_scrape(self.scrapes)
        n_cand = round(self.per_look * self.percent() / 100) if CAND in self.deployed.models else 0
        for name, n in (("demo", self.per_look - n_cand), (CAND, n_cand)):
            ttft = self.cand_ttft if name == CAND else 0.05
            for _ in range(n):
                c = self.counts[name]
                if name == CAND and self.cand_error_every and (c[0] + c[1]) % self.cand_error_every == 0:
                    c[1] += 1
                else:
                    c[0] += 1
                    for le in self.buckets[name]:  # each answer observed with the TTFT it had then
                        self.buckets[name][le] += float(le) >= ttft
        lines = []
        for name, (ok, err, _) in self.counts.items():
            lines.append(f'keel_requests_total{{tenant="t",model="demo",variant="{name}",status="200"}} {ok}')
            lines.append(f'keel_requests_total{{tenant="t",model="demo",variant="{name}",status="500"}} {err}')
            for le, n in self.buckets[name].items():
                for metric in ("vllm:time_to_first_token_seconds", "vllm:request_time_per_output_token_seconds"):
                    lines.append(f'{metric}_bucket{{le="{le}",model_name="{name}",replica="r"}} {n}')
        return "\n".join(lines) + "\n"

    def ask(self, model, candidate, path, body, timeout_s):
        """The candidate answers `self.answer` (its share is what the gateway would pin it at)."""
        self.asked.append((model, candidate, path, body, self.percent(), CAND in self.deployed.models))
        if isinstance(self.answer, Exception):
            raise self.answer
        return {"choices": [{"message": {"content": self.answer}}]}

    def percents(self):
        return [((s.gateway.get("rollouts") or {}).get("demo") or {}).get("percent") for s in self.submits]


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def spec(**over):
    return RolloutSpec.model_validate(
        {
            "model": "demo",
            "to_version": "demo-tiny@v2",
            "steps": [10, 50, 100],
            "hold_s": 60,
            "gates": {"min_requests": 20, "warmup_s": 0},
            **over,
        }
    )


def controller(tmp_path, stack, audit=None):
    clock = Clock()
    return Controller(
        StateStore(tmp_path), stack, clock=clock, sleep=clock.sleep, audit=audit, say=lambda _: None, look_every_s=5
    ), clock


def test_a_healthy_candidate_goes_through_every_step_and_is_promoted(tmp_path):
    stack, audit = FakeStack(), []
    c, clock = controller(tmp_path, stack, audit.append)
    st = c.run(c.begin(spec(), "/weights/v2"))
    assert st.phase == PROMOTED
    assert [h["action"] for h in st.history] == ["start", "step", "advance", "advance", "promote", "promoted"]
    assert audit == st.history and StateStore(tmp_path).load("demo") == st
    # candidate at 0%, then 10, 50, 100; the model replaced while the candidate has all traffic; then alone
    assert stack.percents() == [0, 10, 50, 100, 100, None]
    assert stack.submits[4].models["demo"].args["weights"] == "demo-tiny@v2" and CAND in stack.submits[4].models
    final = stack.deployed
    assert set(final.models) == {"demo"} and final.models["demo"].args["weights_path"] == "/weights/v2"
    assert "rollouts" not in final.gateway
    advance_times = [h["time"] for h in st.history if h["action"] in ("advance", "promote")]
    assert all(b - a >= 60 for a, b in zip(advance_times, advance_times[1:]))  # each step held its hold


def test_a_candidate_that_breaks_its_latency_gate_is_rolled_back_traffic_first(tmp_path):
    stack = FakeStack(cand_ttft=0.5)  # 10x the baseline's
    c, _ = controller(tmp_path, stack)
    st = c.run(c.begin(spec(), "/weights/v2"))
    assert st.phase == ROLLED_BACK
    rollback = next(h for h in st.history if h["action"] == "rollback")
    assert rollback["reason"].startswith("TTFT p95: candidate") and rollback["step"] == 0
    # split to 0 with the candidate still there, and only then the candidate removed
    assert stack.percents()[-2:] == [0, None] and CAND in stack.submits[-2].models
    assert stack.deployed == stack.original


def test_errors_on_the_candidate_roll_back_before_the_hold_is_over(tmp_path):
    stack = FakeStack(cand_error_every=4)
    c, clock = controller(tmp_path, stack)
    st = c.run(c.begin(spec(), "/weights/v2"))
    rollback = next(h for h in st.history if h["action"] == "rollback")
    assert st.phase == ROLLED_BACK and rollback["reason"].startswith("error rate: candidate 25.00%")
    step_start = next(h for h in st.history if h["action"] == "step")["time"]
    assert rollback["time"] - step_start < 60


def test_a_candidate_that_fails_to_deploy_is_removed(tmp_path):
    stack = FakeStack(pending=[["keel-model-demo@candidate: starting"], DeployFailed("no such architecture")])
    c, _ = controller(tmp_path, stack)
    st = c.run(c.begin(spec(), "/weights/v2"))
    assert st.phase == ROLLED_BACK and "no such architecture" in st.history[-2]["reason"]
    assert stack.deployed == stack.original


def test_a_candidate_that_never_serves_is_given_up_after_its_ready_timeout(tmp_path):
    stack = FakeStack(pending=[["starting"]] * 1000)
    c, clock = controller(tmp_path, stack)
    st = c.run(c.begin(spec(ready_timeout_s=120), "/weights/v2"))
    assert st.phase == ROLLED_BACK and "did not serve within 120 s" in st.history[-2]["reason"]


def test_a_new_controller_resumes_the_step_where_the_last_one_died(tmp_path):
    stack = FakeStack(crash_after=20)  # ~100 s in: in the second step
    c, clock = controller(tmp_path, stack)
    with pytest.raises(Crash):
        c.run(c.begin(spec(), "/weights/v2"))
    saved = StateStore(tmp_path).load("demo")
    assert saved.phase == STEPPING and saved.step == 1
    stack.crash_after = None
    c2 = Controller(StateStore(tmp_path), stack, clock=clock, sleep=clock.sleep, say=lambda _: None, look_every_s=5)
    resumed = c2.begin(spec(), "/weights/v2")
    assert resumed.step_started_at == saved.step_started_at  # the hold goes on, not from zero
    st = c2.run(resumed)
    assert st.phase == PROMOTED
    assert [h["action"] for h in st.history].count("start") == 1


def test_abort_from_another_shell_rolls_back_at_the_next_look(tmp_path):
    stack = FakeStack()
    c, _ = controller(tmp_path, stack)
    stack.on_scrape = lambda n: n == 4 and StateStore(tmp_path).request("demo", ABORT)
    st = c.run(c.begin(spec(), "/weights/v2"))
    assert st.phase == ABORTED and st.history[-2]["action"] == "abort"
    assert stack.deployed == stack.original


def test_promote_by_hand_skips_the_remaining_steps(tmp_path):
    stack = FakeStack()
    c, _ = controller(tmp_path, stack)
    stack.on_scrape = lambda n: n == 2 and StateStore(tmp_path).request("demo", PROMOTE_NOW)
    st = c.run(c.begin(spec(), "/weights/v2"))
    assert st.phase == PROMOTED and "by hand" in next(h for h in st.history if h["action"] == "promote")["reason"]
    assert stack.deployed.models["demo"].args["weights"] == "demo-tiny@v2"


def test_a_rollout_that_cannot_start_says_why(tmp_path):
    c, _ = controller(tmp_path, FakeStack())
    with pytest.raises(RolloutError, match="no model `nope` in the running stack; serving: demo"):
        c.begin(spec(model="nope"), "/w")
    serving = c.stack.deployed.models["demo"].args["weights"]  # the registry's identity
    with pytest.raises(RolloutError, match="demo already serves demo-tiny"):
        c.begin(spec(to_version=serving), "/w")
    c.begin(spec(), "/w")  # in progress now (state saved)
    with pytest.raises(RolloutError, match="a rollout of demo to demo-tiny@v2 is in progress"):
        c.begin(spec(to_version="demo-tiny@v3"), "/w")


EVAL = {
    "cases": [
        {"name": "greets", "messages": [{"role": "user", "content": "hi"}], "expect": {"regex": "(?i)hello"}},
        {
            "name": "json",
            "messages": [{"role": "user", "content": "json please"}],
            "expect": {"json_schema": {"type": "object"}},
        },
    ],
    "min_pass_rate": 0.5,
}


def test_the_evaluation_gate_asks_the_candidate_alone_before_any_traffic(tmp_path):
    stack = FakeStack()
    c, _ = controller(tmp_path, stack)
    st = c.run(c.begin(spec(evaluation=EVAL), "/weights/v2"))
    assert st.phase == PROMOTED
    assert [h["action"] for h in st.history][:3] == ["start", "evaluated", "step"]
    ev = st.history[1]
    assert ev["evaluation"]["passed"] == 1 and ev["evaluation"]["total"] == 2  # 1 of 2 >= 50%
    assert "json: not JSON" in ev["reason"]
    # both cases, to the candidate (deployed, 0% of users), through the public model name
    assert [(a[0], a[1], a[2], a[4], a[5]) for a in stack.asked] == [
        ("demo", CAND, "/v1/chat/completions", 0, True)
    ] * 2
    assert stack.asked[0][3]["temperature"] == 0.0


def test_a_candidate_that_fails_its_evaluation_never_gets_traffic(tmp_path):
    stack = FakeStack()
    stack.answer = "goodbye"
    c, _ = controller(tmp_path, stack)
    st = c.run(c.begin(spec(evaluation={**EVAL, "min_pass_rate": 1.0}), "/weights/v2"))
    assert st.phase == ROLLED_BACK
    rollback = next(h for h in st.history if h["action"] == "rollback")
    assert rollback["reason"].startswith("evaluation: 0 of 2 cases passed (needed 100%)")
    assert 'greets: no match for /(?i)hello/ in "goodbye"' in rollback["reason"]
    assert set(stack.percents()) <= {0, None}  # no user ever reached it
    assert stack.deployed == stack.original


def test_a_candidate_that_errors_fails_its_evaluation_cases(tmp_path):
    from serving.rollout.evaluate import AskFailed

    stack = FakeStack()
    stack.answer = AskFailed("HTTP 500: boom")
    c, _ = controller(tmp_path, stack)
    st = c.run(c.begin(spec(evaluation=EVAL), "/weights/v2"))
    assert st.phase == ROLLED_BACK and "greets: HTTP 500: boom" in st.history[-2]["reason"]


def test_a_resumed_rollout_does_not_evaluate_twice(tmp_path):
    stack = FakeStack(crash_after=3)
    c, clock = controller(tmp_path, stack)
    with pytest.raises(Crash):
        c.run(c.begin(spec(evaluation=EVAL), "/weights/v2"))
    stack.crash_after = None
    c2 = Controller(StateStore(tmp_path), stack, clock=clock, sleep=clock.sleep, say=lambda _: None, look_every_s=5)
    st = c2.run(c2.begin(spec(evaluation=EVAL), "/weights/v2"))
    assert st.phase == PROMOTED and len(stack.asked) == 2


def test_a_stack_restarted_under_the_rollout_gets_the_candidate_again_at_the_same_step(tmp_path):
    stack = FakeStack()
    c, _ = controller(tmp_path, stack)

    def restart(n):
        if n == 16:  # in step 2: `keel serve` started again from its config, which has no candidate
            stack.deployed = stack.original

    stack.on_scrape = restart
    st = c.run(c.begin(spec(), "/weights/v2"))
    actions = [(h["action"], h["step"]) for h in st.history]
    assert actions == [
        ("start", 0),
        ("step", 0),
        ("advance", 1),
        ("redeploy", 1),
        ("step", 1),
        ("advance", 2),
        ("promote", 2),
        ("promoted", 2),
    ], actions
    assert "step 2 starts over: 50%" in st.history[4]["reason"]
    assert st.phase == PROMOTED and stack.deployed.models["demo"].args["weights"] == "demo-tiny@v2"


def test_a_candidate_slow_only_while_it_warms_up_is_judged_after_its_warm_up(tmp_path):
    def cold_then_warm(stack):
        stack.cand_ttft = 0.5  # 10x the baseline's for its first 30 s, then as fast
        stack.on_scrape = lambda n: setattr(stack, "cand_ttft", 0.5 if n <= 6 else 0.05)
        return stack

    gates = {"min_requests": 20}
    stack = cold_then_warm(FakeStack())
    c, _ = controller(tmp_path / "no-warmup", stack)
    st = c.run(c.begin(spec(gates={**gates, "warmup_s": 0}), "/weights/v2"))
    assert st.phase == ROLLED_BACK and st.history[-2]["reason"].startswith("TTFT p95: candidate")

    stack = cold_then_warm(FakeStack())
    c, _ = controller(tmp_path / "warmup", stack)
    st = c.run(c.begin(spec(gates={**gates, "warmup_s": 45}), "/weights/v2"))
    assert st.phase == PROMOTED
    steps = [h for h in st.history if h["action"] in ("step", "advance", "promote")]
    assert all(b["time"] - a["time"] >= 45 + 60 for a, b in zip(steps, steps[1:]))  # warm-up, then the hold
