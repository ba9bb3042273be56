"""`keel kuberay serve-config`: a Keel config as a KubeRay RayService's `serveConfigV2`.

The RayService carries the stack as Serve's own multi-application schema, rendered from the Keel
config by the code `keel apply` deploys with (serving.plan.schema): one application for the
front (`keel`) and one per model (`keel-model-<name>`). KubeRay resubmits `serveConfigV2` to the
cluster when, and only when, its text changes (ray-operator rayservice_controller.go,
checkIfNeedSubmitServeApplications), so a changed Keel config reaches the stack by rendering it
again and `kubectl apply`: Serve then changes each application in place as `keel apply` would.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from serving.config import KeelConfig
from serving.plan import desired, schema

_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)serveConfigV2:[ \t]*\|[-+]?[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+.*\n|[ \t]*\n)*)", re.MULTILINE
)


def serve_config(cfg: KeelConfig) -> str:
    """The `serveConfigV2` text of a config (YAML, the applications in config order)."""
    return yaml.safe_dump(schema(desired(cfg)), sort_keys=False, width=100)


def serve_config_of(manifest_text: str) -> str:
    """The `serveConfigV2` block of a RayService manifest, dedented; ValueError if there is none."""
    for doc in yaml.safe_load_all(manifest_text):
        if isinstance(doc, dict) and doc.get("kind") == "RayService":
            return doc["spec"]["serveConfigV2"]
    raise ValueError("no RayService with spec.serveConfigV2 in this manifest")


def write_serve_config(manifest: Path, text: str) -> bool:
    """Replace the RayService's `serveConfigV2: |` block in a manifest file, keeping every other
    line (comments too). Returns whether the file changed."""
    old = manifest.read_text()
    m = _BLOCK.search(old)
    if m is None:
        raise ValueError(f"{manifest}: no `serveConfigV2: |` block to replace")
    indent = m.group("indent") + "  "
    body = "".join(indent + line if line.strip() else "\n" for line in text.splitlines(keepends=True))
    new = old[: m.start("body")] + body + old[m.end("body") :]
    if new != old:
        manifest.write_text(new)
    return new != old
