"""`keel rollout`: flags over the config's defaults, refusals before anything is deployed, and
what `status` shows. Nothing here reaches Ray."""

from __future__ import annotations

import argparse

import pytest
import yaml

from serving.cli import main
from serving.config import REPO_ROOT, ConfigError, parse_config
from serving.rollout.cli import render_status, spec_from_args
from serving.rollout.decide import STEPPING, RolloutState, record
from serving.rollout.spec import RolloutDefaults
from serving.rollout.store import StateStore


def config_file(tmp_path, **rollouts) -> str:
    doc = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
    doc["rollouts"] = {"state_dir": str(tmp_path / "rollouts"), **rollouts}
    path = tmp_path / "keel.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def flags(**over):
    base = {"model": "demo", "to_version": "demo-tiny@v2", "steps": None, "hold": None, "gate": []}
    return argparse.Namespace(**{**base, **over})


def test_flags_override_the_configs_defaults():
    defaults = RolloutDefaults.model_validate({"hold_s": 120, "gates": {"min_requests": 50}})
    s = spec_from_args(flags(steps="10,100", hold="10m", gate=["ttft=1.5", "errors=0.02"]), defaults)
    assert s.steps == [10, 100] and s.hold_s == 600
    assert s.gates.max_ttft_p95_ratio == 1.5 and s.gates.max_error_rate_increase == 0.02
    assert s.gates.min_requests == 50 and s.gates.max_tpot_p95_ratio == 1.25  # from the config, the default
    assert spec_from_args(flags(), defaults).hold_s == 120
    assert spec_from_args(flags(gate=["warmup=90s"]), defaults).gates.warmup_s == 90


@pytest.mark.parametrize(
    "over, message",
    [
        ({"gate": ["latency=2"]}, "--gate: `latency=2` is not one of errors=VALUE"),
        ({"gate": ["ttft=-1"]}, "gates.max_ttft_p95_ratio"),
        ({"steps": "50,25,100"}, "steps must increase"),
        ({"steps": "5,x,100"}, "--steps/--hold"),
        ({"hold": "soon"}, "`soon` is not a duration"),
        ({"gate": ["warmup=soon"]}, "--gate warmup: `soon` is not a duration"),
        ({"gate": ["warmup=2h"]}, "gates.warmup_s: Input should be less than or equal to 3600"),
        ({"gate": ["warmup=-5"]}, "--gate warmup: `-5` is not a duration"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(over, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_args(flags(**over), RolloutDefaults())


def test_the_configs_rollouts_section_is_strict():
    doc = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
    doc["rollouts"] = {"defaults": {"hold": 60}}
    with pytest.raises(ConfigError, match="rollouts.defaults.hold: unknown key; did you mean 'hold_s'"):
        parse_config(doc, check_engine_args=False)
    doc["rollouts"] = {"defaults": {"steps": [50]}}
    with pytest.raises(ConfigError, match="at least two steps"):
        parse_config(doc, check_engine_args=False)


def test_unknown_weights_are_refused_before_anything_is_deployed(tmp_path, capsys):
    rc = main(["rollout", "start", "demo", "--to", "no-such-weights", "--config", config_file(tmp_path)])
    assert rc == 2
    assert "--to no-such-weights: no model manifest" in capsys.readouterr().err
    assert not (tmp_path / "rollouts").exists()


def test_promote_or_abort_without_a_rollout_says_so(tmp_path, capsys):
    assert main(["rollout", "abort", "demo", "--config", config_file(tmp_path)]) == 1
    assert "no rollout of demo in progress" in capsys.readouterr().err


def test_status_shows_the_step_the_gates_and_whether_anything_drives_it(tmp_path, capsys):
    cfg = config_file(tmp_path)
    st = RolloutState(
        model="demo",
        candidate="demo@candidate",
        to_version="demo-tiny@v2",
        from_version="demo-tiny",
        spec={"model": "demo", "to_version": "demo-tiny@v2", "steps": [5, 25, 50, 100]},
        phase=STEPPING,
        step=1,
    )
    record(st, "advance", "step 1 (5%) held 600 s: errors 0.00% vs 0.00%", 1_700_000_000)
    st.last_reason = "step 2 (25%): gates hold; 30 of 600 s"
    StateStore(tmp_path / "rollouts").save(st)
    assert main(["rollout", "status", "demo", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "demo: demo-tiny -> demo-tiny@v2  step 2 of 4: 25% of users on the candidate" in out
    assert "NOT driven: run `keel rollout start demo --to demo-tiny@v2` to resume" in out
    assert "now: step 2 (25%): gates hold; 30 of 600 s" in out
    assert "advance       25%  step 1 (5%) held 600 s" in out
    assert render_status(st, driven=True).splitlines()[1] == "  driven by the stack (its rollout driver)"


def _state(**over):
    return RolloutState(
        **{
            "model": "demo",
            "candidate": "demo@candidate",
            "to_version": "demo-tiny@v2",
            "from_version": "demo-tiny",
            "spec": {"steps": [50, 100]},
            **over,
        }
    )


def test_start_follows_the_drivers_decisions_until_it_is_done(tmp_path, capsys, monkeypatch):
    import threading

    from serving.rollout import cli
    from serving.rollout.decide import PROMOTED, ROLLED_BACK

    monkeypatch.setattr(cli, "FOLLOW_EVERY_S", 0.01)
    store = StateStore(tmp_path)
    st = _state()
    record(st, "start", "deploying", 1.0)
    store.save(st)

    def driver(final):
        fd = store.lock("demo", wait_s=10)  # as the driver actor takes it, past `driven()`'s probes
        for i, action in enumerate(("step", "advance", "promote")):
            record(st, action, f"reason {i}", 2.0 + i)
            store.save(st)
        st.phase = final
        record(st, final, "done", 9.0)
        store.save(st)
        store.unlock(fd)

    t = threading.Thread(target=driver, args=(PROMOTED,))
    t.start()
    assert cli._follow(store, "demo", seen=1) == 0
    t.join()
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "keel rollout: demo: step: reason 0",
        "keel rollout: demo: advance: reason 1",
        "keel rollout: demo: promote: reason 2",
        "keel rollout: demo: promoted: done",
    ]
    st.phase = ROLLED_BACK
    store.save(st)
    assert cli._follow(store, "demo", seen=len(st.history)) == 3


def test_following_a_rollout_nothing_drives_gives_up_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from serving.rollout import cli

    monkeypatch.setattr(cli, "FOLLOW_EVERY_S", 0.01)
    monkeypatch.setattr(cli, "UNDRIVEN_GRACE_S", 0.05)
    store = StateStore(tmp_path)
    store.save(_state(phase=STEPPING))
    assert cli._follow(store, "demo", seen=0) == 1
    assert (
        "nothing drives demo's rollout (stepping); `keel rollout start demo --to demo-tiny@v2` resumes it"
        in capsys.readouterr().err
    )
