"""What a config's `weights:` means: NAME@VERSION, NAME (its newest version), or a plain manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from serving.config import ConfigError, KeelConfig, ModelManifest, format_validation_error, models_dir
from serving.model_registry.manifest import NAME_PATTERN, WeightFile
from serving.model_registry.store import RegisteredVersion, list_versions, model_names, newest, read_version


@dataclass(frozen=True)
class ResolvedWeights:
    name: str
    version: str | None  # None: a plain manifest (models/NAME/manifest.yaml), no versions
    path: Path
    manifest: ModelManifest  # what load_manifest returns, for callers that predate versions
    digest: str | None  # sha256 over the registered files' sha256 lines; None when unversioned
    files: tuple[WeightFile, ...] = ()  # as registered; empty when unversioned

    @property
    def identity(self) -> str:
        """Stable across processes and nodes: NAME@VERSION (immutable), or NAME:PATH."""
        return f"{self.name}@{self.version}" if self.version else f"{self.name}:{self.path}"


def resolve_weights(cfg: KeelConfig, ref: str) -> ResolvedWeights:
    """Resolve a `weights:` value; ConfigError says what is registered when it cannot."""
    base = models_dir(cfg)
    name, at, version = ref.partition("@")
    for what, value in [("model name", name)] + ([("version", version)] if at else []):
        if not NAME_PATTERN.fullmatch(value):
            raise ConfigError(f"{ref!r}: the {what} must be letters, digits, '.', '_' or '-' (NAME or NAME@VERSION)")
    versions = list_versions(base, name)
    if at:
        found = read_version(base, name, version)
        if found is None:
            raise ConfigError(f"{name} has no version {version}; {_registered(name, versions)}")
        if found.retired:
            why = f" ({found.retired.reason})" if found.retired.reason else ""
            raise ConfigError(f"{found.ref} was retired on {found.retired.retired}{why}; {_registered(name, versions)}")
        return _versioned(found)
    if versions:
        latest = newest(versions)
        if latest is None:
            raise ConfigError(f"every version of {name} is retired; {_registered(name, versions)}")
        return _versioned(latest)
    manifest, path = read_plain_manifest(base, name)
    return ResolvedWeights(name, None, path, manifest, None)


def read_plain_manifest(base: Path, name: str) -> tuple[ModelManifest, Path]:
    """models/NAME/manifest.yaml and the directory its weights live in."""
    file = base / name / "manifest.yaml"
    if not file.is_file():
        known = model_names(base)
        raise ConfigError(
            f"no model manifest {file} and no registered versions of {name}; registered: {', '.join(known) or 'none'}"
        )
    try:
        manifest = ModelManifest.model_validate(yaml.safe_load(file.read_text()))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(file), ModelManifest)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML: {e}") from None
    return manifest, manifest.resolved_path(file.parent)


def check_files_present(resolved: ResolvedWeights) -> None:
    """Before deploying a version: every registered file is there at its registered size (a stat
    each, so every start can afford it; `keel models verify` re-hashes)."""
    problems = []
    for f in resolved.files:
        file = resolved.path / f.name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != f.size:
            problems.append(f"{file}: {file.stat().st_size:,} bytes, registered {f.size:,}")
    if problems:
        raise ConfigError(
            f"{resolved.identity}: the weights changed since registration "
            f"(run `keel models verify {resolved.identity}`):\n" + "\n".join(problems)
        )


def _versioned(found: RegisteredVersion) -> ResolvedWeights:
    m = found.manifest
    manifest = ModelManifest(name=m.name, description=f"version {m.version}", path=m.path)
    return ResolvedWeights(m.name, m.version, Path(m.path), manifest, m.digest, tuple(m.files))


def _registered(name: str, versions: list[RegisteredVersion]) -> str:
    if not versions:
        return f"{name} has no registered versions"
    return "registered: " + ", ".join(v.manifest.version + (" (retired)" if v.retired else "") for v in versions)
