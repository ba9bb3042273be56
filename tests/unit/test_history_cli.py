"""`keel history` and `keel history show N`: the list, one change's diff, rollout steps beside
config changes, bad numbers, and audit files that fail verification."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml

from serving.cli import main
from serving.config import REPO_ROOT, parse_config
from serving.ops import history
from serving.plan import desired
from serving.rollout.driver import AuditRecords


def write_doc(tmp_path, doc) -> str:
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.fixture
def stack(tmp_path):
    """A config whose audit dir holds: keel serve (1), keel apply (2), a rollout step (3),
    a failed keel apply (4)."""
    doc = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
    doc["audit"]["dir"] = str(tmp_path / "audit")
    cfg = parse_config(copy.deepcopy(doc), check_engine_args=False)
    first = history.config_view(desired(cfg))
    after = copy.deepcopy(doc)
    after["models"]["demo"]["deployment"]["num_replicas"] = 2
    after["tenants"]["demo"]["quotas"]["requests_per_minute"] = 100
    second = history.config_view(desired(parse_config(copy.deepcopy(after), check_engine_args=False)))
    who = {"user": "alice", "host": "ops-1", "key_id": "ops", "tenant": "platform"}
    records = [
        history.change_record(
            command="serve",
            who={"user": "alice", "host": "ops-1"},
            old_view=None,
            new_view=first,
            plan={"models": {"demo": "added"}, "gateways": [], "restart": []},
        ),
        history.change_record(
            command="apply",
            who=who,
            old_view=first,
            new_view=second,
            plan={"models": {"demo": "scaled"}, "gateways": ["policy: tenants changed"], "restart": []},
        ),
    ]
    for rec in records:
        with history.ChangeRecorder(cfg, rec):
            pass
    log = AuditRecords(cfg)
    log(
        {
            "event": "rollout",
            "time": time.time(),
            "model": "demo",
            "to_version": "demo-tiny@2",
            "from_version": "demo-tiny@1",
            "action": "advance",
            "phase": "running",
            "step": 1,
            "percent": 25,
            "reason": "errors 0.00% vs 0.00%",
        }
    )
    log({"request_id": "req-1", "tenant": "demo", "status": 200, "time": time.time()})  # not a change
    log.close()
    with (
        pytest.raises(RuntimeError),
        history.ChangeRecorder(cfg, {**records[1], "who": {"user": "bob", "host": "ops-2"}}),
    ):
        raise RuntimeError("keel-model-demo: engine did not start")
    return write_doc(tmp_path, doc)


def test_the_list_numbers_every_change_oldest_first(stack, capsys):
    assert main(["history", stack]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "4 change(s)" in lines[0] and "verify" in lines[0]
    assert lines[1].split()[:4] == ["N", "TIME", "(UTC)", "WHO"]
    rows = lines[2:]
    assert [r.split()[0] for r in rows] == ["1", "2", "3", "4"]
    assert "alice@ops-1" in rows[0] and "serve applied: demo added" in rows[0]
    assert "platform/ops (alice@ops-1)" in rows[1] and "apply applied: demo scaled; policy: tenants changed" in rows[1]
    assert "keel rollout" in rows[2] and "rollout demo: advance (step 1, 25% to demo-tiny@2)" in rows[2]
    assert "bob@ops-2" in rows[3] and "apply failed: keel-model-demo: engine did not start" in rows[3]
    assert "req-1" not in out


def test_n_lists_the_last_changes_with_their_numbers(stack, capsys):
    assert main(["history", stack, "-n", "2"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["3", "4"]


def test_show_prints_who_the_versions_and_the_diff(stack, capsys):
    assert main(["history", "show", "2", stack]) == 0
    out = capsys.readouterr().out
    assert "change 2 of 4" in out and "keel apply: applied" in out
    assert "who       platform/ops (alice@ops-1)" in out
    recs = [e.record for e in history.read_history(yaml.safe_load(Path(stack).read_text())["audit"]["dir"]).entries]
    assert f"version   {recs[1]['version']} (before: {recs[0]['version']}, as deployed)" in out
    assert "  ~ models.demo.deployment.num_replicas: 1 -> 2" in out
    assert "  ~ policy.tenants.demo.quotas.requests_per_minute: 6000 -> 100" in out
    assert "chain verified" in out


def test_show_json_prints_the_record(stack, capsys):
    assert main(["history", "show", "1", stack, "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["event"] == "config_change" and rec["command"] == "serve" and "config" in rec


def test_show_of_a_rollout_step_prints_its_decision(stack, capsys):
    assert main(["history", "show", "3", stack]) == 0
    out = capsys.readouterr().out
    assert "rollout demo" in out and "percent       25" in out and "reason        errors 0.00%" in out


@pytest.mark.parametrize(
    "n, message",
    [
        ("9", "no such change; .* holds 4 \\(1 to 4\\)"),
        ("0", "no such change"),
        ("two", "N is a change's number from `keel history`, not 'two'"),
    ],
)
def test_a_bad_n_is_a_clear_error(stack, capsys, n, message):
    import re

    assert main(["history", "show", n, stack]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_show_without_n_says_how(capsys):
    assert main(["history", "show"]) == 2
    assert "show needs the number of a change" in capsys.readouterr().err


def test_an_empty_or_missing_audit_dir_is_said_plainly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["history", "--audit-dir", str(tmp_path / "empty")]) == 0
    assert "no changes recorded" in capsys.readouterr().out
    assert main(["history", "--audit-dir", str(tmp_path / "nowhere")]) == 1
    assert "no such audit directory" in capsys.readouterr().err


def test_an_edited_record_fails_verification_and_is_marked(stack, capsys):
    audit = yaml.safe_load(Path(stack).read_text())["audit"]["dir"]
    (path,) = sorted(Path(audit).glob("audit-*.jsonl"))
    text = path.read_text()
    path.write_text(text.replace('"new":100', '"new":999', 1))  # someone rewrites what was changed
    assert main(["history", stack]) == 1
    captured = capsys.readouterr()
    assert "FAIL verification" in captured.out and "2!" in captured.out
    assert "WARNING" in captured.err and "keel audit verify" in captured.err
    assert main(["history", stack, "--no-verify"]) == 0
