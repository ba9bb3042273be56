"""Reads a weights directory the way vLLM will, before anything can serve it.

Every check names the file and what is wrong; independent checks (config, weights, tokenizer)
all run, so one registration attempt lists every problem. Hashing, the slow part, runs last and
only when everything else passed.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.model_registry.manifest import RegistrationError, WeightFile

INDEX_FILE = "model.safetensors.index.json"
HASH_BLOCK = 1 << 20  # 1 MiB: large enough that hashlib runs without the GIL, small for the page cache


@dataclass
class ModelFacts:
    """What registration learnt about a directory that passed every check."""

    path: Path
    architectures: list[str]
    model_type: str | None
    config_dtype: str | None
    dtypes: dict[str, int]
    parameter_count: int
    parameter_bytes: int
    chat_template: bool
    files: list[WeightFile]


def inspect_model_dir(
    path: str | Path, *, chat: bool = True, progress: Callable[[Path, int], None] | None = None
) -> ModelFacts:
    """Check DIR as a servable model; RegistrationError lists every problem found."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RegistrationError(f"{path}: no such directory")
    if not path.is_dir():
        raise RegistrationError(f"{path}: not a directory (give the model's directory, not a file in it)")
    path = path.resolve()
    problems: list[str] = []
    config = _check_config(path, problems)
    weights = _check_weights(path, problems)
    # Without a usable config.json the tokenizer's errors would only repeat that problem.
    has_template = _check_tokenizer(path, chat, problems) if config is not None else False
    if problems or config is None or weights is None:
        raise RegistrationError("\n".join(problems))
    dtypes, parameter_count, parameter_bytes = weights
    return ModelFacts(
        path=path,
        architectures=list(config["architectures"]),
        model_type=config.get("model_type"),
        config_dtype=config.get("dtype") or config.get("torch_dtype"),
        dtypes=dtypes,
        parameter_count=parameter_count,
        parameter_bytes=parameter_bytes,
        chat_template=has_template,
        files=hash_files(path, progress),
    )


def hash_files(path: Path, progress: Callable[[Path, int], None] | None = None) -> list[WeightFile]:
    """Every top-level, non-hidden file (what vLLM may read from a local directory), hashed;
    progress(file, size) is called before each."""
    files = []
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        size = file.stat().st_size
        if progress:
            progress(file, size)
        files.append(WeightFile(name=file.name, size=size, sha256=sha256_file(file)))
    return files


def sha256_file(file: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


@functools.cache
def supported_architectures() -> frozenset[str]:
    """The architectures the installed vLLM serves, from its own model registry (imported once:
    the import takes seconds)."""
    try:
        from vllm.model_executor.models import ModelRegistry
    except ImportError as e:
        raise RegistrationError(
            f"vLLM is not installed here ({e}): register weights on a machine "
            "with the engine, so its model registry can be asked"
        ) from None
    return frozenset(ModelRegistry.get_supported_archs())


def _vllm_version() -> str:
    try:
        from vllm import __version__
    except ImportError:
        return "?"
    return __version__


def _check_config(path: Path, problems: list[str]) -> dict | None:
    file = path / "config.json"
    if not file.is_file():
        problems.append(f"{file}: missing (a Hugging Face model directory has one; it names the architecture)")
        return None
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{file}: not valid JSON ({e})")
        return None
    if not isinstance(config, dict):
        problems.append(f"{file}: must be a JSON object, got {type(config).__name__}")
        return None
    archs = config.get("architectures")
    if not (isinstance(archs, list) and archs and all(isinstance(a, str) and a for a in archs)):
        problems.append(
            f"{file}: `architectures` must be a non-empty list of model class names, "
            f'e.g. ["LlamaForCausalLM"] (got {json.dumps(archs)})'
        )
        return None
    supported = supported_architectures()
    for arch in archs:
        if arch not in supported:
            close = difflib.get_close_matches(arch, sorted(supported), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            problems.append(
                f"{file}: architecture {arch} is not one the installed vLLM {_vllm_version()} supports{hint}"
            )
    return config


def _check_weights(path: Path, problems: list[str]) -> tuple[dict[str, int], int, int] | None:
    """Parse every weight file's header: (parameters per dtype, parameter count, tensor bytes)."""
    index = path / INDEX_FILE
    weight_map: dict[str, str] = {}
    if index.exists():
        read = _read_index(index, problems)
        if read is None:
            return None
        weight_map = read
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
        if not shards:
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = (
                (f"; found {', '.join(pickles)}: convert to safetensors (pickle files run code when loaded)")
                if pickles
                else ""
            )
            problems.append(f"{path}: no *.safetensors weight files and no {INDEX_FILE}{hint}")
            return None
    dtypes: dict[str, int] = {}
    count = nbytes = 0
    held: dict[str, set[str]] = {}
    before = len(problems)
    for shard in shards:
        file = path / shard
        if Path(shard).name != shard or shard in (".", ".."):
            problems.append(f"{index}: shard {shard!r} is not a file name in the model directory")
            continue
        if not file.is_file():
            problems.append(f"{index}: names shard {shard}, which is missing from {path}")
            continue
        try:
            tensors, data_bytes = read_safetensors_header(file)
        except RegistrationError as e:
            problems.append(str(e))
            continue
        held[shard] = set(tensors)
        for dtype, shape in tensors.values():
            dtypes[dtype] = dtypes.get(dtype, 0) + math.prod(shape)
            count += math.prod(shape)
        nbytes += data_bytes
    strays = [(t, s) for t, s in weight_map.items() if s in held and t not in held[s]]
    for tensor, shard in strays[:3]:
        problems.append(f"{index}: maps tensor {tensor} to {shard}, which does not hold it")
    if len(strays) > 3:
        problems.append(f"{index}: ... and {len(strays) - 3} more tensors mapped to shards without them")
    if len(problems) > before:
        return None
    return dict(sorted(dtypes.items(), key=lambda kv: -kv[1])), count, nbytes


def _read_index(index: Path, problems: list[str]) -> dict[str, str] | None:
    try:
        doc = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{index}: not valid JSON ({e})")
        return None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        problems.append(f"{index}: needs a non-empty `weight_map` of tensor name -> shard file name")
        return None
    return weight_map


def read_safetensors_header(file: Path) -> tuple[dict[str, tuple[str, list[int]]], int]:
    """{tensor: (dtype, shape)} and the bytes of tensor data, read by the safetensors library
    (which also checks that the header's offsets cover the file exactly)."""
    from safetensors import safe_open

    size = file.stat().st_size
    if size == 0:
        raise RegistrationError(f"{file}: empty file")
    try:
        tensors = {}
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__ or __contains__
                part = f.get_slice(name)
                tensors[name] = (part.get_dtype(), list(part.get_shape()))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error, OSError or ValueError
        reason = str(e)
        if "not fully covered" in reason:
            raise RegistrationError(f"{file}: {_coverage(file, size)}") from None
        raise RegistrationError(f"{file}: not a safetensors file: its header does not parse ({reason})") from None
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return tensors, size - 8 - header_len


def _coverage(file: Path, size: int) -> str:
    """Why safetensors said "not fully covered", in bytes (only on that error path: the library
    has already refused the file, this reads its header once more to say by how much)."""
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    except (struct.error, ValueError, KeyError, TypeError, IndexError):
        return "truncated or corrupt: the safetensors header does not match the file's size"
    expected = 8 + header_len + end
    if size < expected:
        return f"truncated: its header describes {expected:,} bytes, the file has {size:,}"
    return f"corrupt: {size - expected:,} bytes after the tensor data its header describes"


def _check_tokenizer(path: Path, chat: bool, problems: list[str]) -> bool:
    """Load the tokenizer as vLLM will (AutoTokenizer, local files only); True if it has a chat
    template."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, TypeError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        problems.append(f"{path}: the tokenizer does not load (tokenizer.json, tokenizer_config.json): {first}")
        return False
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        problems.append(
            f"{path}: the tokenizer has no chat template (chat_template.jinja, or `chat_template` in "
            "tokenizer_config.json), and Keel serves /v1/chat/completions; add one, or register "
            "with --no-chat for a completions-only model"
        )
    return has_template
