"""Registered weights (models/NAME/manifest.yaml): list them, build the ones Keel can make."""

from __future__ import annotations

from pathlib import Path

from serving.config import ConfigError, KeelConfig, ModelManifest, load_manifest, models_dir


def ensure_weights(cfg: KeelConfig, name: str, *, rebuild: bool = False) -> Path:
    """Return the weights directory of manifest NAME, building it first if Keel can and must."""
    manifest, path = load_manifest(cfg, name)
    if manifest.builder == "demo":
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
    return [load_manifest(cfg, p.parent.name) for p in sorted(models_dir(cfg).glob("*/manifest.yaml"))]


def _corpus(cfg: KeelConfig, name: str, manifest: ModelManifest) -> Path:
    if not manifest.corpus:
        raise ConfigError(f"model {manifest.name}: builder `demo` needs `corpus:`")
    return models_dir(cfg) / name / manifest.corpus
