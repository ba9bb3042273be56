"""`keel models register | list | show | verify | retire`: the registry's command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serving.config import MODELS_DIR_ENV, ConfigError, KeelConfig, default_models_dir
from serving.model_registry.listing import format_table, list_models
from serving.model_registry.manifest import RegistrationError, check_name
from serving.model_registry.memory import VLLM_DEFAULT_GPU_MEMORY_UTILIZATION, format_bytes
from serving.model_registry.resolve import ResolvedWeights, resolve_weights
from serving.model_registry.store import (
    RegisteredVersion,
    list_versions,
    newest,
    read_version,
    register_version,
    retire_version,
    verify_version,
)

COMMANDS = ("register", "list", "show", "verify", "retire")
PROGRESS_MIN_BYTES = 100 << 20  # say which file is being hashed only when it takes a moment


def add_parsers(msub: argparse._SubParsersAction) -> None:
    """Add the registry's subcommands to `keel models`."""
    r = msub.add_parser("register", help="check a weights directory and register it as NAME@VERSION (immutable)")
    r.add_argument("name", metavar="NAME")
    r.add_argument("--version", required=True, metavar="V", help="letters, digits, '.', '_', '-'")
    r.add_argument(
        "--path",
        required=True,
        metavar="DIR",
        help="the Hugging Face model directory "
        "(config.json, tokenizer, *.safetensors); recorded absolute: it must be the same "
        "path on every node",
    )
    r.add_argument(
        "--no-chat", action="store_true", help="do not require a chat template (a model served only on /v1/completions)"
    )
    r.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        metavar="N",
        help="refuse weights that do not fit a GPU of N GiB (default: no check)",
    )
    r.add_argument(
        "--tensor-parallel-size", type=int, default=1, metavar="N", help="GPUs the weights are split over (default 1)"
    )
    r.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=VLLM_DEFAULT_GPU_MEMORY_UTILIZATION,
        metavar="U",
        help=f"vLLM's share of each GPU (default {VLLM_DEFAULT_GPU_MEMORY_UTILIZATION})",
    )
    lst = msub.add_parser("list", help="models and their registered versions")
    lst.add_argument("--json", action="store_true", help="as JSON (what GET /v1/admin/models answers)")
    s = msub.add_parser("show", help="a version's manifest (NAME: what `weights: NAME` resolves to)")
    s.add_argument("ref", metavar="NAME[@VERSION]")
    v = msub.add_parser(
        "verify", help="re-hash a version's files against its manifest; exit 1 if any changed or is missing"
    )
    v.add_argument("ref", metavar="NAME[@VERSION]")
    t = msub.add_parser("retire", help="stop configs from using a version (its files stay)")
    t.add_argument("ref", metavar="NAME@VERSION")
    t.add_argument("--reason", default="", help="shown to whoever still names the version")
    for p in (r, msub.choices["list"], s, v, t):
        p.add_argument(
            "--models-dir",
            default=None,
            metavar="DIR",
            help="where manifests live (default: $KEEL_MODELS_DIR, else the checkout's models/)",
        )


def run(args: argparse.Namespace) -> int:
    base = Path(args.models_dir).resolve() if args.models_dir else default_models_dir()
    if args.models_cmd != "register" and not base.is_dir():
        print(
            f"keel: error:\nthe models directory {base} does not exist: pass --models-dir, or set "
            f"${MODELS_DIR_ENV} to the directory that holds NAME/manifest.yaml",
            file=sys.stderr,
        )
        return 1
    try:
        return _COMMANDS[args.models_cmd](args, base)
    except (RegistrationError, ConfigError) as e:
        text = refusal_text(args.name, args.version, e) if args.models_cmd == "register" else f"error:\n{e}"
        print(f"keel: {text}", file=sys.stderr)
        return 1


def _register(args, base: Path) -> int:
    found, new = register_version(
        base,
        args.name,
        args.version,
        args.path,
        chat=not args.no_chat,
        gpu_memory_gib=args.gpu_memory_gib,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        progress=_progress,
    )
    print(registered_text(found, new))
    return 0


def registered_text(found: RegisteredVersion, new: bool) -> str:
    """What a registration that passed says (the CLI's output, and the admin API's job)."""
    if not new:
        return f"{found.ref} is already registered with these bytes ({found.file}); nothing changed"
    m = found.manifest
    mem = m.memory
    fit = ""
    if mem.gpu_memory_gib:
        assert mem.headroom_bytes_per_gpu is not None  # estimated against that GPU
        fit = (
            f"; fits a {mem.gpu_memory_gib:g} GiB GPU with {format_bytes(mem.headroom_bytes_per_gpu)} left "
            "for the KV cache"
        )
    return (
        f"registered {found.ref}: {', '.join(m.architectures)}, {m.parameter_count:,} parameters "
        f"({', '.join(m.dtypes)}), {format_bytes(mem.weights_bytes_per_gpu)} of weights per GPU "
        f"({mem.served_dtype}){fit}\n"
        f"  manifest: {found.file}\n"
        f"  in a config: `weights: {found.ref}`, then `keel apply`"
    )


def refusal_text(name: str, version: str, error: Exception) -> str:
    """What a refused registration says (after `keel: ` on the CLI's stderr, and in the job)."""
    return f"refused to register {name}@{version}:\n{error}"


def _list(args, base: Path) -> int:
    models = list_models(base)
    for line in [json.dumps(models, indent=2)] if args.json else format_table(models):
        print(line)
    return 0


def _show(args, base: Path) -> int:
    found = _lookup(base, args.ref)
    if isinstance(found, ResolvedWeights):
        print(f"# {found.name}: a plain manifest (no registered versions), weights at {found.path}")
        print((base / found.name / "manifest.yaml").read_text().rstrip())
        return 0
    print(f"# {found.ref}: {found.state}" + ("" if "@" in args.ref else f" (what `weights: {args.ref}` means)"))
    print(found.file.read_text().rstrip())
    return 0


def _verify(args, base: Path) -> int:
    found = _lookup(base, args.ref)
    if isinstance(found, ResolvedWeights):
        print(
            f"keel: {found.name} has no registered versions, so no hashes to verify against "
            f"(`keel models register {found.name} --version V --path {found.path}`)",
            file=sys.stderr,
        )
        return 1
    problems = verify_version(found, _progress)
    for line in problems:
        print(line)
    m = found.manifest
    if problems:
        print(f"{found.ref}: FAILED ({len(problems)} of {len(m.files)} files changed or missing)")
        return 1
    print(f"{found.ref}: OK ({len(m.files)} files match, digest {m.digest})")
    return 0


def _retire(args, base: Path) -> int:
    name, at, version = args.ref.partition("@")
    if not at:
        print(f"keel: retire needs NAME@VERSION, got {args.ref!r}", file=sys.stderr)
        return 1
    found, now = retire_version(base, name, version, args.reason)
    if not now:
        assert found.retired is not None  # not retired now: it was already
        print(f"{found.ref} was already retired on {found.retired.retired}")
        return 0
    latest = newest(list_versions(base, name))
    then = f"`weights: {name}` now means {latest.ref}" if latest else f"`weights: {name}` now resolves to nothing"
    print(f"retired {found.ref} (files kept at {found.manifest.path}); configs naming it are refused; {then}")
    return 0


def _lookup(base: Path, ref: str) -> RegisteredVersion | ResolvedWeights:
    """NAME@VERSION even when retired (retiring stops serving, not looking); NAME as a config's
    `weights: NAME` resolves: a version, or a plain manifest (a ResolvedWeights)."""
    name, at, version = ref.partition("@")
    if at:
        found = read_version(base, check_name("model name", name), check_name("version", version))
        if found is not None:
            return found
    resolved = resolve_weights(KeelConfig.model_construct(models={}, models_dir=str(base)), ref)
    if resolved.version is None:
        return resolved
    found = read_version(base, resolved.name, resolved.version)
    assert found is not None  # resolve_weights found it registered
    return found


def _progress(file: Path, size: int) -> None:
    if size >= PROGRESS_MIN_BYTES:
        print(f"keel: hashing {file.name} ({format_bytes(size)})", file=sys.stderr, flush=True)


_COMMANDS = {"register": _register, "list": _list, "show": _show, "verify": _verify, "retire": _retire}
