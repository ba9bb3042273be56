"""Registered weights (models/NAME/manifest.yaml, models/NAME/versions/): list them, build the
ones Keel can make, and check a registered version's files before it is deployed."""

from __future__ import annotations

from pathlib import Path

from serving.config import ConfigError, KeelConfig, ModelManifest, models_dir


def ensure_weights(cfg: KeelConfig, name: str, *, rebuild: bool = False) -> Path:
    """Return the weights directory `weights: NAME[@VERSION]` names, building it first if Keel
    can and must; a registered version must still have its files at their registered sizes."""
    from serving.model_registry.resolve import check_files_present, resolve_weights

    resolved = resolve_weights(cfg, name)
    manifest, path = resolved.manifest, resolved.path
    if resolved.version is not None:
        check_files_present(resolved)
    elif manifest.builder == "demo":
        from serving.demo_model import build_demo_model, is_built

        corpus = _corpus(cfg, name, manifest)
        if rebuild or not is_built(path, corpus):
            print(f"keel: building {name} into {path}", flush=True)
            build_demo_model(path, corpus)
    elif not (path / "config.json").is_file():
        raise ConfigError(
            f"model {name}: no weights at {path} (manifest models/{name}/manifest.yaml); "
            "copy or mount the checkout there"
        )
    return path


def list_manifests(cfg: KeelConfig) -> list[tuple[ModelManifest, Path]]:
    """The plain manifests (models/NAME/manifest.yaml); versions are in serving.model_registry."""
    from serving.model_registry.resolve import read_plain_manifest

    base = models_dir(cfg)
    return [read_plain_manifest(base, p.parent.name) for p in sorted(base.glob("*/manifest.yaml"))]


def _corpus(cfg: KeelConfig, name: str, manifest: ModelManifest) -> Path:
    if not manifest.corpus:
        raise ConfigError(f"model {manifest.name}: builder `demo` needs `corpus:`")
    return models_dir(cfg) / name / manifest.corpus
