"""Config changes applied with `keel apply` while clients stream without pause: no request
fails, and only the changed model's engines restart. The changes build on each other, in order,
on one stack (`python -m benchmarks.live_changes` runs the same with the issue's whole table)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from benchmarks.live_changes import (
    StreamingLoad,
    _add_model,
    _autoscaling,
    _engine_args,
    _remove_model,
    _scale_to_1,
    _scale_to_2,
    base_doc,
    engine_pids,
    keel_apply,
    restarted,
    wait_engines,
)
from tests.e2e.conftest import AUTH, running_stack

pytestmark = pytest.mark.e2e

SETTLE_S = 3  # load kept on after `keel apply` returns, so a late failure is counted too


class Live:
    def __init__(self, stack, doc: dict):
        self.stack = stack
        self.config = stack.log.parent / "stack.yaml"  # what `keel serve` was started with
        self.doc = doc  # its document, with the ports running_stack chose

    def apply(self, change, engines: dict[str, int]) -> tuple[list[str], dict[str, int], str]:
        """Apply a change under load: (failed requests, engines restarted per model, apply's output)."""
        change(self.doc)
        before = engine_pids(self.config)
        with StreamingLoad(self.stack.url, "demo", clients=4) as load:
            time.sleep(1)
            rc, _, out = keel_apply(self.config, self.doc, "--address", self.stack.ray_address)
            time.sleep(SETTLE_S)
        assert rc == 0, out
        after = wait_engines(self.config, engines)
        assert {m: len(p) for m, p in after.items() if p} == engines, after
        stats = load.stats
        assert stats.requests > 0
        return stats.failed, restarted(before, after), out


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    doc = base_doc(0, 0)
    tmp = tmp_path_factory.mktemp("live")
    doc["audit"]["dir"] = str(tmp / "audit")  # this stack's own: `keel history` reads its changes alone
    with running_stack(doc, tmp) as stack:
        yield Live(stack, doc)


def complete(url: str, model: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/completions", headers=AUTH, timeout=60, json={"model": model, "prompt": "hi", "max_tokens": 4}
    )


def test_dry_run_prints_the_plan_and_changes_nothing(live):
    doc = dict(live.doc, models={**live.doc["models"]})
    _add_model(doc)
    before = engine_pids(live.config)
    try:
        rc, _, out = keel_apply(live.config, doc, "--dry-run", "--address", live.stack.ray_address)
    finally:
        live.config.write_text(yaml.safe_dump(live.doc))  # the file as the stack runs it
    assert rc == 0, out
    assert "demo-b  added" in out and "demo    unchanged" in out
    assert engine_pids(live.config) == before
    assert complete(live.stack.url, "demo-b").status_code == 404


def test_changing_autoscaling_restarts_nothing(live):
    failed, gone, out = live.apply(_autoscaling, {"demo": 1})
    assert failed == [] and gone == {}, (failed, gone)
    assert "demo  scaled" in out
    # The history has the first deploy and this change, from the audit files, which verify.
    keel = Path(sys.executable).with_name("keel")
    history = subprocess.run([str(keel), "history", str(live.config)], capture_output=True, text=True, timeout=60)
    assert history.returncode == 0, history.stdout + history.stderr
    rows = history.stdout.splitlines()[2:]
    assert len(rows) == 2 and "serve applied: demo added" in rows[0] and "apply applied: demo scaled" in rows[1], (
        history.stdout
    )


def test_adding_a_model_leaves_the_first_untouched(live):
    failed, gone, out = live.apply(_add_model, {"demo": 1, "demo-b": 1})
    assert failed == [] and gone == {}, (failed, gone)
    r = complete(live.stack.url, "demo-b")
    assert r.status_code == 200, r.text
    assert [m["id"] for m in httpx.get(live.stack.url + "/v1/models", headers=AUTH).json()["data"]] == [
        "demo",
        "demo-b",
    ]


def test_changing_engine_arguments_replaces_only_that_models_engines(live):
    failed, gone, out = live.apply(_engine_args, {"demo": 1, "demo-b": 1})
    assert failed == [] and gone == {"demo": 1}, (failed, gone)
    assert "engine.max_num_seqs: 128 -> 64" in out


def test_scaling_down_cuts_no_stream(live):
    failed, gone, _ = live.apply(_scale_to_2, {"demo": 2, "demo-b": 1})
    assert failed == [] and gone == {}, (failed, gone)
    failed, gone, _ = live.apply(_scale_to_1, {"demo": 1, "demo-b": 1})
    assert failed == [] and gone == {"demo": 1}, (failed, gone)  # one drained, not cut


def test_removing_a_model_drains_it_and_the_other_serves_on(live):
    failed, gone, _ = live.apply(_remove_model, {"demo": 1})
    assert failed == [] and gone == {"demo-b": 1}, (failed, gone)
    assert complete(live.stack.url, "demo-b").status_code == 404
