"""`slos:` in a config: what it accepts, what it refuses and how the error names the key."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serving.config import REPO_ROOT, load_config
from serving.ops.slo_config import DEFAULT_ALERTS, SloConfig, duration_s
from serving.policy.config import PolicyConfig, check_policy_refs


def slo(**over) -> dict:
    return {"kind": "availability", "objective": 0.99, **over}


def refused(**over) -> str:
    with pytest.raises(ValidationError) as e:
        PolicyConfig.model_validate({"slos": {"s": slo(**over)}})
    return str(e.value)


def test_defaults_are_every_model_28d_and_the_workbook_alerts():
    s = SloConfig.model_validate(slo())
    assert s.models == ["*"] and s.window == "28d" and not s.per_tenant
    assert [(a.severity, a.long_window, a.short_window, a.factor) for a in s.burn_alerts] == [
        ("page", "1h", "5m", 14.4),
        ("page", "6h", "30m", 6),
        ("ticket", "1d", "2h", 3),
        ("ticket", "3d", "6h", 1),
    ]
    assert s.rate_windows() == ["5m", "30m", "1h", "2h", "6h", "1d", "3d", "28d"]


def test_custom_alert_windows_are_recorded_too():
    s = SloConfig.model_validate(
        slo(
            objective=0.9,
            window="1h",
            alerts=[{"severity": "page", "long_window": "1m", "short_window": "15s", "factor": 2}],
        )
    )
    assert s.burn_alerts[0].factor == 2 and s.alerts is not None
    assert s.rate_windows()[:2] == ["15s", "1m"] and s.rate_windows()[-1] == "1h"


@pytest.mark.parametrize(
    "over, words",
    [
        ({"objective": 0.999999}, "less than or equal to 0.99999"),
        ({"objective": 0.4}, "greater than or equal to 0.5"),
        ({"window": "10m"}, "between 1h and 365d"),
        ({"window": "28 days"}, "slos.s.window"),
        ({"threshold_ms": 100}, "availability has no threshold"),
        ({"kind": "ttft"}, "threshold_ms: required for kind ttft"),
        ({"kind": "tpot", "threshold_ms": 0}, "greater than 0"),
        ({"models": ["*", "demo"]}, '"*" already means every model'),
        ({"objective": 0.9}, "factor 14.4 x error budget 0.1 >= 1"),
        (
            {"alerts": [{"severity": "page", "long_window": "5m", "short_window": "1h", "factor": 2}]},
            "must be shorter than long_window",
        ),
        (
            {"window": "1h", "alerts": [{"severity": "page", "long_window": "6h", "short_window": "5m", "factor": 2}]},
            "longer than the SLO window",
        ),
        ({"alerts": [{"severity": "Page!", "long_window": "1h", "short_window": "5m", "factor": 2}]}, "severity"),
        ({"colour": "red"}, "slos.s.colour"),
    ],
)
def test_bad_slo_is_refused_with_the_key_and_the_reason(over, words):
    assert words in refused(**over)


def test_references_to_unknown_models_and_tenants_are_problems():
    pol = PolicyConfig.model_validate(
        {"slos": {"a": slo(models=["nope"]), "b": slo(tenants=["ghost"]), "bad name!": slo()}}
    )
    problems = check_policy_refs(pol, ["demo"])
    assert any(p.startswith("slos.a.models: no model or experiment `nope`") for p in problems)
    assert any(p.startswith("slos.b.tenants: no tenant `ghost`") for p in problems)
    assert any(p.startswith("slos.bad name!: a name is") for p in problems)


def test_duration_units():
    assert [duration_s(d) for d in ("30s", "5m", "1h", "28d", "2w")] == [30, 300, 3600, 28 * 86400, 14 * 86400]
    with pytest.raises(ValueError, match="is not a duration"):
        duration_s("1h30m")


def test_local_config_ships_valid_slos():
    cfg = load_config(REPO_ROOT / "configs" / "local.yaml", check_engine_args=False)
    assert set(cfg.slos) == {"demo-availability", "demo-ttft", "demo-tpot"}
    assert cfg.slos["demo-ttft"].burn_alerts == DEFAULT_ALERTS
