"""Configs name registered weights as NAME@VERSION or NAME (the newest not retired); plain
manifests (models/NAME/manifest.yaml) resolve as before; a deployment checks a version's files."""

from __future__ import annotations

import pytest

from serving.config import ConfigError, KeelConfig, load_manifest, parse_config
from serving.model_registry.resolve import resolve_weights
from serving.model_registry.store import register_version, retire_version
from serving.models import ensure_weights
from tests.unit.model_registry_fixtures import copy_model


def config(models_base, weights: str):
    return parse_config(
        {"models": {"chat": {"weights": weights}}, "models_dir": str(models_base)}, check_engine_args=False
    )


def cfg_for(models_base) -> KeelConfig:
    return KeelConfig.model_construct(models={}, models_dir=str(models_base))


# --- resolution -------------------------------------------------------------------------------


def test_name_at_version_resolves_to_that_versions_directory(models_base, two_versions):
    v1, v2 = two_versions
    cfg = config(models_base, "m@1")
    manifest, path = load_manifest(cfg, cfg.models["chat"].weights)
    assert path == v1 and manifest.name == "m"
    resolved = resolve_weights(cfg, "m@1")
    assert (resolved.version, resolved.identity) == ("1", "m@1") and len(resolved.digest) == 64


def test_plain_name_resolves_to_the_newest_registered_version(models_base, two_versions):
    v1, v2 = two_versions
    resolved = resolve_weights(config(models_base, "m"), "m")
    assert (resolved.path, resolved.identity) == (v2, "m@2")


def test_newest_is_the_last_registered_not_the_highest_version(models_base, model_dir, tmp_path):
    register_version(models_base, "m", "2.0", model_dir)
    register_version(models_base, "m", "1.1", copy_model(model_dir, tmp_path / "hotfix"))
    assert resolve_weights(cfg_for(models_base), "m").version == "1.1"


def test_unknown_version_names_the_key_and_lists_the_registered_ones(models_base, two_versions):
    with pytest.raises(ConfigError) as e:
        config(models_base, "m@3")
    assert "models.chat.weights: m has no version 3; registered: 1, 2" in str(e.value)


def test_retired_version_is_refused_and_plain_name_moves_to_the_one_before(models_base, two_versions):
    v1, v2 = two_versions
    retire_version(models_base, "m", "2", reason="failed its eval")
    with pytest.raises(ConfigError) as e:
        config(models_base, "m@2")
    assert "models.chat.weights: m@2 was retired on" in str(e.value)
    assert "(failed its eval); registered: 1, 2 (retired)" in str(e.value)
    assert resolve_weights(config(models_base, "m"), "m").path == v1
    assert v2.exists()  # retiring never deletes


def test_all_versions_retired_is_refused_not_a_fallback(models_base, two_versions):
    retire_version(models_base, "m", "1")
    retire_version(models_base, "m", "2")
    with pytest.raises(ConfigError, match="every version of m is retired"):
        config(models_base, "m")


@pytest.mark.parametrize("ref", ["m@", "m@../../etc/x", "../m", "m@1@2"])
def test_malformed_references_are_refused(models_base, two_versions, ref):
    with pytest.raises(ConfigError, match="letters, digits"):
        config(models_base, ref)


def test_existing_plain_manifest_resolves_as_before(models_base, demo_weights):
    (models_base / "demo-tiny").mkdir()
    (models_base / "demo-tiny" / "manifest.yaml").write_text(f"name: demo-tiny\npath: {demo_weights}\n")
    resolved = resolve_weights(config(models_base, "demo-tiny"), "demo-tiny")
    assert (resolved.version, resolved.path, resolved.digest) == (None, demo_weights, None)
    assert resolved.identity == f"demo-tiny:{demo_weights}"


def test_the_repositorys_demo_manifest_still_resolves(demo_weights):
    manifest, path = load_manifest(KeelConfig.model_construct(models={}, models_dir=None), "demo-tiny")
    assert manifest.builder == "demo" and path == demo_weights


def test_ensure_weights_refuses_a_version_whose_files_changed(models_base, two_versions):
    v1, _ = two_versions
    assert ensure_weights(cfg_for(models_base), "m@1") == v1
    (v1 / "model.safetensors").write_bytes(b"short")
    with pytest.raises(ConfigError) as e:
        ensure_weights(cfg_for(models_base), "m@1")
    assert "m@1: the weights changed since registration" in str(e.value)
    assert f"{v1 / 'model.safetensors'}: 5 bytes, registered" in str(e.value)
