"""Cost per tenant: replica-time priced per profile, split by weighted tokens, from real audit files."""

from __future__ import annotations

import datetime as dt

import pytest

from serving.config import ConfigError
from serving.ops.cost import allocate, load_prices, report
from serving.ops.cost_config import CostConfig
from serving.ops.replica_time import integrate
from serving.ops.usage import SHADOW, UsageError, read_usage
from serving.policy.audit import AuditLog

DAY = dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc)  # a Monday


def at(hour: int, minute: int = 0) -> dt.datetime:
    return DAY + dt.timedelta(hours=hour, minutes=minute)


def request(when: dt.datetime, tenant: str, prompt: int, completion: int | None, model="demo", **extra) -> dict:
    return {
        "time": when.isoformat(timespec="milliseconds"),
        "request_id": "r",
        "tenant": tenant,
        "model": model,
        "variant": model,
        "shadow": False,
        "status": 200 if completion is not None else 429,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "latency_ms": 10.0,
        **extra,
    }


def replicas(when: dt.datetime, ready: int, model="demo") -> dict:
    return {"event": "replicas", "time": when.isoformat(timespec="milliseconds"), "model": model, "ready": ready}


def write_audit(directory, records: list[dict]) -> None:
    with AuditLog(directory) as log:
        for rec in records:
            log.write(rec)


@pytest.fixture
def hardware(tmp_path):
    path = tmp_path / "hardware.yaml"
    path.write_text(
        "small: {price_per_replica_hour: 2.0, currency: USD}\n"
        "big: {price_per_replica_hour: 10.0, currency: USD}\n"
        "euro: {price_per_replica_hour: 1.0, currency: EUR}\n"
    )
    return str(path)


# The hand-computed example. Model demo at 2.00 USD per replica-hour, weights prompt 0.25,
# completion 1.0, from 10:00 to 13:00:
#   replicas: 2 from 10:00, 1 from 12:00  -> hour 10: 4.00, hour 11: 4.00, hour 12: 2.00 (5 replica-h)
#   hour 10: acme 400 prompt + 100 completion = 200 weighted; beta 0 + 600 = 600 -> acme 1.00, beta 3.00
#   hour 11: acme 800 prompt + 0 completion = 200 weighted, alone           -> acme 4.00
#   hour 12: no tokens                                                       -> idle 2.00
#   acme 5.00 (1,300 tokens: 3,846.15 per million), beta 3.00, unallocated 2.00, total 10.00
HAND_RECORDS = [
    replicas(at(10), 2),
    request(at(10, 5), "acme", 400, 100),
    request(at(10, 20), "beta", 0, 600),
    request(at(11, 30), "acme", 800, 0),
    replicas(at(12), 1),
]


def hand_report(tmp_path, hardware, **costs):
    write_audit(tmp_path / "audit", HAND_RECORDS)
    usage = read_usage(tmp_path / "audit", at(10).timestamp(), at(13).timestamp())
    cfg = CostConfig(hardware_file=hardware, hardware={"demo": "small"}, **costs)
    prices, notes = load_prices(cfg, {"demo"})
    # valid_s: the example has no refresh records (gateways write one every 10 minutes)
    alloc = allocate(usage, cfg, prices, integrate(usage.replica_events, usage.since, usage.until, valid_s=1e9))
    return report(usage, alloc)


def test_cost_is_split_by_weighted_tokens_per_hour_and_idle_time_is_listed(tmp_path, hardware):
    rep = hand_report(tmp_path, hardware)
    by_tenant = {line.tenant: line for line in rep.lines}
    assert [line.tenant for line in rep.lines] == ["acme", "beta"]  # most expensive first
    assert by_tenant["acme"].cost == pytest.approx(5.00)
    assert by_tenant["beta"].cost == pytest.approx(3.00)
    assert rep.idle == {"demo": pytest.approx(2.00)}
    assert rep.total.cost == pytest.approx(10.00)
    assert rep.allocation.replica_hours == {"demo": pytest.approx(5.0)}
    acme = by_tenant["acme"]
    assert (acme.requests, acme.prompt_tokens, acme.completion_tokens) == (2, 1200, 100)
    assert acme.cost_per_million == pytest.approx(5.00 / 1300 * 1e6)
    assert rep.allocation.currency == "USD"


def test_idle_spread_moves_idle_cost_to_tenants_by_their_period_share(tmp_path, hardware):
    rep = hand_report(tmp_path, hardware, idle="spread")
    by_tenant = {line.tenant: line.cost for line in rep.lines}
    # period weights: acme 200 + 200 = 400, beta 600 -> the 2.00 idle splits 0.80 / 1.20
    assert by_tenant == {"acme": pytest.approx(5.80), "beta": pytest.approx(4.20)}
    assert rep.idle == {}
    assert rep.total.cost == pytest.approx(10.00)


def test_token_weights_change_the_split(tmp_path, hardware):
    rep = hand_report(tmp_path, hardware, token_weights={"prompt": 1.0, "completion": 1.0})
    by_tenant = {line.tenant: line.cost for line in rep.lines}
    # hour 10: acme 500, beta 600 of 1,100 -> 4 x 5/11 and 4 x 6/11; hour 11: acme 4.00
    assert by_tenant == {"acme": pytest.approx(4 * 5 / 11 + 4), "beta": pytest.approx(4 * 6 / 11)}


def test_refused_requests_are_not_billed_and_shadow_copies_are_the_platforms(tmp_path):
    write_audit(
        tmp_path / "audit",
        [
            request(at(10), "acme", 50, None),  # a 429: never reached an engine
            request(at(10, 1), "acme", 10, 5, shadow=True),
            {"event": "config_change", "time": at(10, 2).isoformat()},
        ],
    )
    usage = read_usage(tmp_path / "audit", at(10).timestamp(), at(11).timestamp())
    assert list(usage.tokens) == [(SHADOW, "demo", int(at(10).timestamp()))]
    assert sum(usage.skipped.values()) == 1


def test_replica_records_of_several_gateways_merge_latest_first():
    t0 = at(10).timestamp()
    events = [(t0, "demo", 1), (t0 + 0.5, "demo", 1), (t0 + 1800, "demo", 2), (t0 + 1800.4, "demo", 2)]
    rt = integrate(events, t0, t0 + 3600, valid_s=1e9)
    assert rt.total_hours("demo") == pytest.approx(1 * 0.5 + 2 * 0.5)
    assert rt.unobserved_s == 0


def test_a_record_counts_only_until_it_goes_stale():
    t0 = at(10).timestamp()
    rt = integrate([(t0, "demo", 3)], t0, t0 + 7200, valid_s=900)
    assert rt.total_hours("demo") == pytest.approx(3 * 0.25)
    assert rt.unobserved_s == pytest.approx(7200 - 900)


def test_a_record_before_the_period_sets_its_starting_count():
    t0 = at(10).timestamp()
    rt = integrate([(t0 - 600, "demo", 2)], t0, t0 + 3600, valid_s=900)
    assert rt.total_hours("demo") == pytest.approx(2 * 300 / 3600)


def test_an_unknown_hardware_profile_is_an_error_naming_the_key(hardware):
    cfg = CostConfig(hardware_file=hardware, hardware={"demo": "h200"})
    with pytest.raises(ConfigError, match=r"costs.hardware.demo: no hardware profile `h200`.*big, euro, small"):
        load_prices(cfg, {"demo"})


def test_a_model_without_a_profile_is_noted_not_priced(hardware):
    prices, notes = load_prices(CostConfig(hardware_file=hardware), {"demo"})
    assert prices == {} and "model demo: no hardware profile" in notes[0]


def test_two_currencies_cannot_be_added(hardware):
    cfg = CostConfig(hardware_file=hardware, hardware={"a": "small", "b": "euro"})
    with pytest.raises(ConfigError, match="EUR, USD"):
        load_prices(cfg, {"a", "b"})


def test_no_audit_files_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no audit files"):
        read_usage(tmp_path / "empty", 0, 1)
    with pytest.raises(UsageError, match="no such audit directory"):
        read_usage(tmp_path / "missing", 0, 1)


def test_cost_config_rejects_bad_values_naming_the_key():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="budgets.acme"):
        CostConfig(budgets={"acme": -5})
    with pytest.raises(ValidationError, match="both be 0"):
        CostConfig(token_weights={"prompt": 0, "completion": 0})
    with pytest.raises(ValidationError, match="idle"):
        CostConfig(idle="ignore")
