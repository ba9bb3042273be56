"""The data of a registered version: names, the immutable version manifest, and its refusals."""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from pydantic import Field

from serving.schema import Strict

# Letters, digits, `.`, `_`, `-`, starting with a letter or digit: safe as a file name on every
# node (no `/`, no `..`) and unambiguous in `weights: NAME@VERSION`.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
GIB = 1 << 30


class RegistrationError(ValueError):
    """Weights Keel refuses to register or serve; str() names the file and what is wrong."""


def check_name(what: str, value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise RegistrationError(
            f"{what} {value!r}: use letters, digits, '.', '_' and '-' (at most 128), starting with a "
            "letter or digit (no '@' or '/')"
        )
    return value


class WeightFile(Strict):
    name: str = Field(description="File name inside the weights directory.")
    size: int = Field(ge=0, description="Bytes.")
    sha256: str


class MemoryEstimate(Strict):
    """What the weights take on the GPUs; the rest of vLLM's budget is KV cache and activations."""

    weights_bytes: int = Field(description="All parameters at the dtype vLLM serves them in (dtype auto).")
    served_dtype: str = Field(description="`as stored`, or `16-bit` where vLLM downcasts a float32 checkpoint.")
    tensor_parallel_size: int = 1
    weights_bytes_per_gpu: int
    gpu_memory_gib: float | None = Field(None, description="The GPU it was checked against, if any.")
    gpu_memory_utilization: float | None = None
    headroom_bytes_per_gpu: int | None = Field(
        None, description="vLLM's budget minus the weights: what is left for KV cache and activations."
    )


class VersionManifest(Strict):
    """models/NAME/versions/VERSION.yaml, written once by `keel models register`."""

    name: str
    version: str
    path: str = Field(description="The weights directory, absolute.")
    created: str = Field(description="Registration time, ISO 8601 UTC; `NAME` alone means the newest.")
    architectures: list[str]
    model_type: str | None = None
    dtypes: dict[str, int] = Field(description="Parameter count per stored dtype (safetensors names).")
    parameter_count: int
    parameter_bytes: int = Field(description="Bytes of tensor data in the weight files.")
    memory: MemoryEstimate
    chat_template: bool = Field(description="Whether the tokenizer has a chat template.")
    files: list[WeightFile] = Field(description="Every top-level file of the directory.")
    digest: str = Field(description="sha256 of the files' `sha256sum` lines, sorted by name.")
    validated_with: dict[str, str] = Field(default_factory=dict, description="Library versions.")


class RetiredMark(Strict):
    """models/NAME/retired/VERSION.yaml: the version stays on disk, configs may no longer use it."""

    version: str
    retired: str
    reason: str = ""


def files_digest(files: list[WeightFile]) -> str:
    """One sha256 for the whole set, reproducible in the directory with `LC_ALL=C sha256sum * | sha256sum`."""
    lines = "".join(f"{f.sha256}  {f.name}\n" for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(lines.encode()).hexdigest()


VersionState = Literal["registered", "retired"]
