"""A rollout in the stack's state: the candidate application beside the model's, the gateways'
split, and `keel apply` keeping both while the rollout runs."""

from __future__ import annotations

import copy

import yaml
from ray.serve.schema import ServeDeploySchema

from serving.config import REPO_ROOT, parse_config
from serving.plan import (
    ADDED,
    MODEL_APP_PREFIX,
    REMOVED,
    REPLACED,
    UNCHANGED,
    candidate_name,
    candidate_state,
    desired,
    from_serve,
    keep_rollouts,
    make_plan,
    promoted,
    schema,
    with_rollout,
    without_rollout,
)
from serving.rollout.spec import TrafficSplit, check_splits

CAND = "demo@candidate"


def raw() -> dict:
    return yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())


def state(doc: dict):
    return desired(parse_config(doc, check_engine_args=False))


def rolling(percent=5, doc=None):
    base = state(doc or raw())
    cand = candidate_state(base.models["demo"], "demo", "demo-tiny@v2", "/weights/v2")
    return base, with_rollout(base, "demo", cand, percent)


def kinds(plan) -> dict:
    return {m.model: m.kind for m in plan.models}


def test_a_candidate_is_its_own_application_with_the_models_engine_and_other_weights():
    base, s = rolling()
    assert candidate_name("demo") == CAND
    cand = s.models[CAND]
    assert cand.args["model"] == CAND and cand.args["weights"] == "demo-tiny@v2"
    assert cand.args["engine"] == base.models["demo"].args["engine"]
    assert cand.overrides["name"] == "engine-demo@candidate"
    assert kinds(make_plan(base, s)) == {"demo": UNCHANGED, CAND: ADDED}
    doc = schema(s)
    ServeDeploySchema.model_validate(doc)
    assert MODEL_APP_PREFIX + CAND in [a["name"] for a in doc["applications"]]


def test_the_split_reaches_the_gateways_as_they_validate_it():
    _, s = rolling(25)
    splits = {m: TrafficSplit.model_validate(v) for m, v in s.gateway["rollouts"].items()}
    assert splits["demo"].candidate == CAND and splits["demo"].percent == 25
    assert check_splits(splits, list(s.gateway["models"])) == []
    assert CAND not in s.gateway["models"]  # never a public model


def test_a_rollout_reads_back_from_serve_as_it_was_deployed():
    _, s = rolling(50)
    details = {"applications": {a["name"]: {"deployed_app_config": a} for a in schema(s)["applications"]}}
    back = from_serve(details)
    assert back.gateway["rollouts"] == s.gateway["rollouts"] and back.models[CAND] == s.models[CAND]
    assert make_plan(back, s).empty


def test_keel_apply_keeps_a_running_rollout():
    _, deployed = rolling(25)
    changed = raw()
    changed["tenants"]["demo"]["quotas"]["requests_per_minute"] = 5
    new = keep_rollouts(deployed, state(changed))
    plan = make_plan(deployed, new)
    assert kinds(plan) == {"demo": UNCHANGED, CAND: UNCHANGED}
    assert plan.gateway == ("policy: tenants changed",)
    assert new.gateway["rollouts"] == deployed.gateway["rollouts"]


def test_keel_apply_that_removes_the_model_removes_its_candidate_too():
    two = raw()
    two["models"]["demo-b"] = copy.deepcopy(two["models"]["demo"])
    _, deployed = rolling(25, two)
    only_b = copy.deepcopy(two)
    del only_b["models"]["demo"]
    only_b.pop("slos", None)  # they name demo: a config removing it must drop them too
    only_b["tenants"]["demo"]["models"] = ["*"]
    new = keep_rollouts(deployed, state(only_b))
    assert kinds(make_plan(deployed, new)) == {"demo": REMOVED, CAND: REMOVED, "demo-b": UNCHANGED}
    assert "rollouts" not in new.gateway


def test_a_rollback_leaves_the_stack_as_it_was_before():
    base, s = rolling(50)
    back = without_rollout(s, "demo")
    assert back == base and "rollouts" not in back.gateway
    assert kinds(make_plan(s, back)) == {"demo": UNCHANGED, CAND: REMOVED}


def test_a_promotion_replaces_the_model_with_the_candidates_weights_then_drops_the_candidate():
    base, s = rolling(100)
    step1 = promoted(s, "demo")
    plan = make_plan(s, step1)
    m = {c.model: c for c in plan.models}
    was = s.models["demo"].args["weights"]  # the registry's identity of the plain manifest
    assert m["demo"].kind == REPLACED and m["demo"].changes == (f'weights: "{was}" -> "demo-tiny@v2"',)
    assert m[CAND].kind == UNCHANGED and step1.gateway["rollouts"]["demo"]["percent"] == 100
    done = without_rollout(step1, "demo")
    assert done.models["demo"].args["weights_path"] == "/weights/v2"
    assert done.models["demo"].overrides == base.models["demo"].overrides  # its own scale, name and drain
    assert done.gateway["models"]["demo"]["weights_path"] == "/weights/v2"
    assert set(done.models) == {"demo"} and "rollouts" not in done.gateway


def test_keel_apply_of_the_pre_promotion_config_is_refused_as_a_rollback(tmp_path):
    from serving.rollout.decide import PROMOTED, ROLLED_BACK, RolloutState
    from serving.rollout.store import StateStore, undone_promotions

    base = state(raw())
    old_weights = base.models["demo"].args["weights"]
    cand = candidate_state(base.models["demo"], "demo", "demo-tiny@v2", "/weights/v2")
    after = without_rollout(promoted(with_rollout(base, "demo", cand, 100), "demo"), "demo")
    assert after.models["demo"].args["weights"] == "demo-tiny@v2"
    store = StateStore(tmp_path)
    done = RolloutState(
        model="demo",
        candidate=CAND,
        to_version="demo-tiny@v2",
        from_version=old_weights,
        spec={},
        phase=PROMOTED,
        updated_at=1_780_000_000,
    )
    store.save(done)
    # The config the stack was started with still names the old weights: refused, naming the key.
    [problem] = undone_promotions(store, after, base)
    assert problem.startswith("models.demo.weights: the stack serves demo-tiny@v2, promoted by `keel rollout` at ")
    assert f"this config says {old_weights}, which would roll demo back" in problem
    # A config that says the promoted version, or a third one, or a rollback that never promoted: fine.
    assert undone_promotions(store, after, after) == []
    third = copy.deepcopy(base)
    third.models["demo"].args["weights"] = "demo-tiny@v3"
    assert undone_promotions(store, after, third) == []
    store.save(RolloutState(**{**done.to_dict(), "phase": ROLLED_BACK}))
    assert undone_promotions(store, after, base) == []
    assert undone_promotions(StateStore(tmp_path / "none"), after, base) == []
