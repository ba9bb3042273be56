"""Small valid model directories for the registry's tests: copies of the demo model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from serving.config import KeelConfig
from serving.models import ensure_weights


@pytest.fixture(scope="session")
def demo_weights() -> Path:
    """The built demo model (.keel/models/demo-tiny), built here if this checkout lacks it."""
    return ensure_weights(KeelConfig.model_construct(models={}, models_dir=None), "demo-tiny")


@pytest.fixture
def model_dir(tmp_path, demo_weights) -> Path:
    """A fresh, valid, writable copy of the demo model."""
    return copy_model(demo_weights, tmp_path / "weights")


@pytest.fixture
def models_base(tmp_path) -> Path:
    """An empty models directory (where manifests are written)."""
    base = tmp_path / "models"
    base.mkdir()
    return base


@pytest.fixture
def two_versions(models_base, model_dir, tmp_path) -> tuple[Path, Path]:
    """m@1 (the demo model) and m@2 (another generation config), registered in that order."""
    from serving.model_registry.store import register_version

    register_version(models_base, "m", "1", model_dir)
    v2 = copy_model(model_dir, tmp_path / "weights-2")
    edit_json(v2 / "generation_config.json", temperature=0.7)
    register_version(models_base, "m", "2", v2)
    return model_dir, v2


def blocking_model(tmp_path: Path, demo_weights: Path) -> Path:
    """A model directory whose index is a FIFO: registering it blocks, reading it, until killed."""
    d = copy_model(demo_weights, tmp_path / "blocking")
    os.mkfifo(d / "model.safetensors.index.json")
    return d


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(file: Path, **changes) -> None:
    doc = json.loads(file.read_text())
    doc.update(changes)
    file.write_text(json.dumps(doc, indent=2))


def shard(model_dir: Path) -> list[str]:
    """Split model.safetensors into two shards plus the index, as large checkpoints come."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, model_dir / file, metadata={"format": "pt"})
    (model_dir / "model.safetensors").unlink()
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return list(parts)
