"""What `keel serve` does with the rollouts it finds in its state dir once ready: a driver for each
one in progress of a model it serves, none for finished ones; a failure to start one is said,
and the stack serves on."""

from __future__ import annotations

import yaml

from serving.config import REPO_ROOT, parse_config
from serving.rollout import driver
from serving.rollout.decide import DEPLOYING, PROMOTED, ROLLED_BACK, STEPPING, RolloutState
from serving.rollout.store import StateStore


def cfg_with(tmp_path):
    doc = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
    doc["rollouts"] = {"state_dir": str(tmp_path)}
    doc["models"]["other"] = doc["models"]["demo"]
    return parse_config(doc, check_engine_args=False)


def save(tmp_path, model, phase):
    StateStore(tmp_path).save(
        RolloutState(
            model=model, candidate=f"{model}@candidate", to_version="w@2", from_version="w", spec={}, phase=phase
        )
    )


def test_keel_serve_resumes_every_rollout_in_progress_and_nothing_else(tmp_path, monkeypatch):
    cfg = cfg_with(tmp_path)
    save(tmp_path, "demo", STEPPING)
    save(tmp_path, "other", DEPLOYING)
    save(tmp_path, "gone", STEPPING)  # a model this config no longer serves
    save(tmp_path, "old", PROMOTED)
    save(tmp_path, "older", ROLLED_BACK)
    (tmp_path / "broken.json").write_text("{not json")
    started, said = [], []
    monkeypatch.setattr(driver, "start", lambda c, model, key: started.append((model, key)) or True)
    assert driver.resume_all(cfg, "sk-admin", say=said.append) == ["demo", "other"]
    assert started == [("demo", "sk-admin"), ("other", "sk-admin")]
    assert said == [
        "Keel: resuming the rollout of demo to w@2 (stepping)",
        "Keel: resuming the rollout of other to w@2 (deploying)",
    ]


def test_a_driver_that_cannot_start_is_said_and_the_stack_serves_on(tmp_path, monkeypatch):
    cfg = cfg_with(tmp_path)
    save(tmp_path, "demo", STEPPING)

    def refuse(*_):
        raise RuntimeError("no room on this node")

    monkeypatch.setattr(driver, "start", refuse)
    said = []
    assert driver.resume_all(cfg, None, say=said.append) == []
    assert said == ["Keel: could not resume the rollout of demo: no room on this node"]
