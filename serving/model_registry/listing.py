"""The registry as data: what `keel models list` prints and `GET /v1/admin/models` answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.model_registry.memory import format_bytes
from serving.model_registry.resolve import read_plain_manifest
from serving.model_registry.store import RegisteredVersion, list_versions, model_names, newest


def list_models(base: Path) -> list[dict]:
    """Every model under BASE, by name: its versions (oldest registration first), `latest` (what
    `weights: NAME` means, None when every version is retired), and its plain manifest if any."""
    models = []
    for name in model_names(base):
        versions = list_versions(base, name)
        latest = newest(versions)
        entry: dict[str, Any] = {
            "name": name,
            "latest": latest.manifest.version if latest else None,
            "versions": [_version(v, v is latest) for v in versions],
            "manifest": None,
        }
        if (base / name / "manifest.yaml").is_file():
            _, path = read_plain_manifest(base, name)
            entry["manifest"] = {
                "path": str(path),
                "state": "present" if (path / "config.json").is_file() else "missing",
            }
        models.append(entry)
    return models


def _version(v: RegisteredVersion, latest: bool) -> dict:
    m = v.manifest
    return {
        "version": m.version,
        "ref": v.ref,
        "state": v.state,
        "latest": latest,
        "registered_at": m.created,
        "bytes": sum(f.size for f in m.files),
        "architectures": list(m.architectures),
        "path": m.path,
        "retired_at": v.retired.retired if v.retired else None,
        "retired_reason": v.retired.reason if v.retired else None,
    }


def format_table(models: list[dict]) -> list[str]:
    """`keel models list`: one row per plain manifest and per version; `*` marks the latest."""
    rows = [("NAME", "VERSION", "STATE", "SIZE", "ARCHITECTURE", "PATH")]
    for m in models:
        if m["manifest"]:
            rows.append((m["name"], "-", m["manifest"]["state"], "-", "-", m["manifest"]["path"]))
        for v in m["versions"]:
            rows.append(
                (
                    m["name"],
                    v["version"] + ("*" if v["latest"] else ""),
                    v["state"],
                    format_bytes(v["bytes"]),
                    ",".join(v["architectures"]),
                    v["path"],
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5] for row in rows]
    if any(r[1].endswith("*") for r in rows[1:]):
        lines.append("* what `weights: NAME` resolves to (the newest version not retired)")
    return lines
