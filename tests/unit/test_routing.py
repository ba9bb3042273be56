"""Sticky A/B routing: users keep their variant, splits follow the weights, reweighting moves few."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.policy.config import Experiment
from serving.policy.routing import assign_variant, shadow_selected

REPO = Path(__file__).resolve().parents[2]
USERS = [f"user-{i}" for i in range(100_000)]


def assignments(variants, experiment="chat", tenant="acme", users=USERS):
    return [assign_variant(experiment, tenant, u, variants) for u in users]


@pytest.fixture(scope="module")
def half_half():
    return assignments({"model-a": 50, "model-b": 50})


def test_a_user_gets_the_same_variant_on_every_call():
    variants = {"model-a": 50, "model-b": 50}
    first = assignments(variants, users=USERS[:1000])
    assert assignments(variants, users=USERS[:1000]) == first


def test_a_user_gets_the_same_variant_in_another_process():
    # A fresh interpreter has a different PYTHONHASHSEED, so this fails if Python's hash() is used.
    code = (
        "from serving.policy.routing import assign_variant;"
        "print(','.join(assign_variant('chat', 'acme', f'user-{i}', {'model-a': 1, 'model-b': 1})"
        " for i in range(200)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345"},
        cwd=REPO,
    )
    assert out.stdout.strip().split(",") == assignments({"model-a": 1, "model-b": 1}, users=USERS[:200])


def test_observed_split_follows_the_weights_within_one_percent():
    counts = Counter(assignments({"model-a": 70, "model-b": 20, "model-c": 10}))
    shares = {name: counts[name] / len(USERS) for name in counts}
    assert shares["model-a"] == pytest.approx(0.70, abs=0.01)
    assert shares["model-b"] == pytest.approx(0.20, abs=0.01)
    assert shares["model-c"] == pytest.approx(0.10, abs=0.01)


def test_even_weights_split_users_evenly(half_half):
    counts = Counter(half_half)
    assert counts["model-a"] / len(USERS) == pytest.approx(0.5, abs=0.01)


def test_raising_a_weight_moves_only_users_into_that_variant_and_about_the_difference(half_half):
    after = assignments({"model-a": 60, "model-b": 40})
    moves = Counter((b, a) for b, a in zip(half_half, after) if b != a)
    assert set(moves) == {("model-b", "model-a")}
    assert moves[("model-b", "model-a")] / len(USERS) == pytest.approx(0.10, abs=0.01)


def test_adding_a_variant_moves_users_only_into_it(half_half):
    after = assignments({"model-a": 50, "model-b": 50, "model-c": 20})
    moved_to = {a for b, a in zip(half_half, after) if b != a}
    assert moved_to == {"model-c"}
    # C takes 20/120 of everyone, evenly from A and B.
    assert after.count("model-c") / len(USERS) == pytest.approx(20 / 120, abs=0.01)


def test_draining_a_variant_to_weight_zero_moves_its_users_and_only_them(half_half):
    after = assignments({"model-a": 50, "model-b": 0})
    assert set(after) == {"model-a"}
    assert all(a == b for b, a in zip(half_half, after) if b == "model-a")


def test_a_variant_with_weight_zero_gets_nobody():
    got = set(assignments({"model-a": 1, "model-b": 0, "model-c": 1}, users=USERS[:20_000]))
    assert got == {"model-a", "model-c"}


def test_assigning_with_no_positive_weight_is_an_error():
    with pytest.raises(ValueError, match="no variant with weight > 0"):
        assign_variant("chat", "acme", "u1", {"model-a": 0})


@pytest.mark.parametrize("field, one, other", [("tenant", "acme", "globex"), ("experiment", "chat", "code")])
def test_tenants_and_experiments_get_independent_assignments(field, one, other):
    variants = {"model-a": 50, "model-b": 50}
    a = assignments(variants, **{field: one}, users=USERS[:20_000])
    b = assignments(variants, **{field: other}, users=USERS[:20_000])
    agree = sum(x == y for x, y in zip(a, b)) / len(a)
    assert agree == pytest.approx(0.5, abs=0.02)


def test_field_boundaries_matter_in_the_hash():
    # ("ab", "c") and ("a", "bc") must not collide into one key.
    variants = {f"model-{i}": 1 for i in range(16)}
    split = [assign_variant("chat", f"acme{i}", f"x{i}", variants) for i in range(50)]
    shifted = [assign_variant("chat", "acme", f"{i}x{i}", variants) for i in range(50)]
    assert split != shifted


def test_shadow_share_is_about_the_configured_percent():
    ids = [f"req-{i}" for i in range(100_000)]
    share = sum(shadow_selected("chat", rid, 5.0) for rid in ids) / len(ids)
    assert share == pytest.approx(0.05, abs=0.005)


def test_shadow_decision_is_the_same_for_the_same_request_id():
    ids = [f"req-{i}" for i in range(5000)]
    first = [shadow_selected("chat", rid, 30.0) for rid in ids]
    assert [shadow_selected("chat", rid, 30.0) for rid in ids] == first
    assert any(first) and not all(first)


def test_shadow_at_one_hundred_percent_mirrors_every_request():
    assert all(shadow_selected("chat", f"req-{i}", 100) for i in range(1000))


def test_experiment_accepts_a_drained_variant_and_a_shadow():
    exp = Experiment(variants={"model-a": 1, "model-b": 0}, shadow={"variant": "model-b", "percent": 10})
    assert exp.shadow.percent == 10
    assert exp.user_header == "x-keel-user"


def test_experiment_lower_cases_the_user_header():
    assert Experiment(variants={"model-a": 1}, user_header="X-End-User").user_header == "x-end-user"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"variants": {"model-a": -1, "model-b": 1}}, "'model-a' has weight -1.0; weights must be finite and >= 0"),
        ({"variants": {"model-a": 0, "model-b": 0}}, "at least one variant needs a weight > 0"),
        ({"variants": {}}, "give at least one variant"),
        ({"variants": {"model-a": float("inf")}}, "weights must be finite"),
        (
            {"variants": {"model-a": 1}, "shadow": {"variant": "model-b", "percent": 0}},
            "shadow percent must be > 0 and <= 100, got 0",
        ),
        (
            {"variants": {"model-a": 1}, "shadow": {"variant": "model-b", "percent": 150}},
            "shadow percent must be > 0 and <= 100, got 150",
        ),
        (
            {"variants": {"model-a": 1, "model-b": 0}, "shadow": {"variant": "model-a", "percent": 5}},
            "shadow.variant 'model-a' is the only variant with weight > 0",
        ),
        ({"variants": {"model-a": 1}, "user_header": "x user"}, "not a valid HTTP header name"),
        ({"variants": {"model-a": 1}, "weights": {}}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_experiment_is_rejected_with_a_clear_message(doc, message):
    with pytest.raises(ValidationError) as e:
        Experiment.model_validate(doc)
    assert message in str(e.value)
