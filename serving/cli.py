"""The `keel` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

from serving.config import REPO_ROOT, ConfigError

DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="keel", description="Keel: OpenAI-compatible LLM serving on Ray Serve + vLLM.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help="start the stack in the foreground")
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))

    p = sub.add_parser(
        "apply",
        help="apply a changed config to the running stack, live: only what changed "
        "restarts (a model's engines when its weights, engine args, env or resources change)",
    )
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    p.add_argument("--address", default="auto", help="Ray cluster of the running stack (default: this machine's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan per model and change nothing")
    p.add_argument(
        "--restart",
        action="store_true",
        help="also apply `server:` changes, which restart the gateways (after draining them)",
    )
    p.add_argument(
        "--allow-rollback",
        action="store_true",
        help="apply even where it puts back the weights a `keel rollout` promotion replaced",
    )
    p.add_argument(
        "--admin-key",
        default=None,
        metavar="KEY",
        help="an admin key of the stack: `keel history` then names its id as who made the change "
        "(default: $KEEL_ADMIN_KEY; a key typed here shows in ps and the shell's history)",
    )

    p = sub.add_parser("config", help="validate a config or print its JSON Schema")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    v = csub.add_parser("validate", help="check a config file (including engine arguments)")
    v.add_argument("file")
    s = csub.add_parser("schema", help="print the config's JSON Schema (for editors)")
    s.add_argument("--out", default=None)

    p = sub.add_parser("kuberay", help="deploy on Kubernetes with KubeRay (deploy/kuberay/rayservice.yaml)")
    kr = p.add_subparsers(dest="kuberay_cmd", required=True)
    r = kr.add_parser(
        "serve-config",
        help="print a config as the RayService's serveConfigV2 (one Serve "
        "application per model), or write it into a RayService manifest",
    )
    r.add_argument("config")
    r.add_argument(
        "--write",
        metavar="RAYSERVICE_YAML",
        default=None,
        help="replace the serveConfigV2 block in this manifest instead of printing",
    )

    p = sub.add_parser("models", help="registered weights")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    from serving.model_registry.cli import add_parsers as add_registry_parsers

    add_registry_parsers(msub)  # register, list, show, verify, retire
    b = msub.add_parser("build", help="build weights Keel can make (the demo model)")
    b.add_argument("name", nargs="?", default="demo-tiny")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    e = msub.add_parser("ensure", help="build whatever a config's models need")
    e.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))

    from serving.rollout.cli import add_parser as add_rollout_parser

    add_rollout_parser(sub, str(DEFAULT_CONFIG))

    from serving.autoscaling.cli import add_parser as add_autoscale_parser

    add_autoscale_parser(sub)

    from serving.ops.commands import add_parsers as add_ops_parsers

    add_ops_parsers(sub)  # slo, cost, dashboard, history

    p = sub.add_parser("keys", help="API keys for tenants (the config stores only their digests)")
    ksub = p.add_subparsers(dest="keys_cmd", required=True)
    k = ksub.add_parser("create", help="make a key; prints it once, and the config line to paste")
    k.add_argument("--tenant", required=True, help="tenant name (a key under tenants:)")
    k.add_argument("--role", choices=["app", "admin"], default="app")
    k.add_argument(
        "--id",
        type=_key_id,
        default=None,
        help="key id shown in audit and metrics (default: key- and 6 random hex characters)",
    )
    ksub.add_parser("digest", help="read a key from stdin and print its digest (keeps it out of shell history)")

    p = sub.add_parser("audit", help="the hash-chained audit files")
    asub = p.add_subparsers(dest="audit_cmd", required=True)
    a = asub.add_parser(
        "verify", help="check files' hash chains, and that rotated files link up; exit status 0 only if all verify"
    )
    a.add_argument(
        "files", nargs="+", metavar="FILE_OR_DIR", help="audit files, or directories (every audit-*.jsonl in them)"
    )
    a.add_argument(
        "--no-head", action="store_true", help="for copies shipped without their .head file: skip the truncation check"
    )
    a.add_argument(
        "--hmac-key-file",
        metavar="PATH",
        default=None,
        help="the key the files were written with (audit.hmac_key_file): also check every "
        "record's and head's MAC (default: $KEEL_AUDIT_HMAC_KEY_FILE, if set)",
    )
    g = asub.add_parser("keygen", help="make a new HMAC key file (mode 0600) for audit.hmac_key_file")
    g.add_argument("path", metavar="PATH", help="where to write it: outside the audit dir; never overwritten")
    t = asub.add_parser("tail", help="pretty-print the last records of a file")
    t.add_argument("file", metavar="FILE")
    t.add_argument("-n", type=int, default=10, help="how many records (default 10)")

    p = sub.add_parser("bench", help="measure throughput, latency and cost; sweep settings; report")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    r = bsub.add_parser(
        "run",
        help="run a bench spec (see configs/bench/demo.yaml): every setting, "
        "every load point; writes one result file. Or measure a running server: "
        "keel bench run --url URL --model NAME [--levels 1,4,16] ...",
    )
    r.add_argument("spec", metavar="SPEC", nargs="?")
    r.add_argument("--url", help="without SPEC: an OpenAI-compatible server already running")
    r.add_argument("--model", help="without SPEC: the model name to request")
    r.add_argument("--api-key", help="without SPEC: bearer key ($NAME reads the environment)")
    r.add_argument("--mode", choices=["concurrency", "rate"], default="concurrency")
    r.add_argument("--levels", default="1,4,16", help="without SPEC: load points, comma-separated")
    r.add_argument("--num-requests", type=int, default=64)
    r.add_argument("--input-len", type=int, default=256)
    r.add_argument("--output-len", type=int, default=128)
    r.add_argument(
        "--slo",
        default="ttft=1000,tpot=100,p=99",
        help="without SPEC: thresholds in ms and the percentile, e.g. ttft=500,tpot=50,e2el=20000,p=90",
    )
    r.add_argument("--hardware", default="cpu-2core", help="without SPEC: a profile in configs/bench/hardware.yaml")
    r.add_argument("--label", default=None)
    r.add_argument("--out", default=None, help="result file (default benchmarks/results/bench-LABEL-TIME.json)")
    r.add_argument("--report", default=None, metavar="DIR", help="also write the report into DIR")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    rp = bsub.add_parser(
        "report",
        help="HTML page, PNG plots and a Markdown summary of result files; "
        "with several, compare them (the first is the baseline)",
    )
    rp.add_argument("results", nargs="+", metavar="RESULTS")
    rp.add_argument("--out", default=None, metavar="DIR", help="default: next to the first result file")
    rp.add_argument("--title", default=None)

    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in bench results
    from serving.launcher import StartupError

    try:
        return _run(args)
    except ConfigError as e:
        print(f"keel: invalid config:\n{e}", file=sys.stderr)
        return 2
    except (StartupError, TimeoutError) as e:
        print(f"keel: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from serving.config import KeelConfig, config_json_schema, load_config

    if args.cmd == "serve":
        from serving.launcher import serve_forever

        serve_forever(load_config(args.config))
        return 0
    if args.cmd == "apply":
        from serving.launcher import apply_config

        print(
            apply_config(
                load_config(args.config),
                address=args.address,
                allow_restart=args.restart,
                dry_run=args.dry_run,
                allow_rollback=args.allow_rollback,
                admin_key=args.admin_key or os.environ.get("KEEL_ADMIN_KEY"),
            ),
            flush=True,
        )
        return 0
    if args.cmd == "config":
        if args.config_cmd == "validate":
            cfg = load_config(args.file)
            print(f"{args.file}: ok ({len(cfg.models)} model(s): {', '.join(cfg.models)})")
            return 0
        text = json.dumps(config_json_schema(), indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
        else:
            print(text)
        return 0
    if args.cmd == "kuberay":
        from serving.kuberay import serve_config, write_serve_config

        # vLLM (checking engine arguments) logs to stdout, which here is the rendered config.
        with contextlib.redirect_stdout(sys.stderr):
            text = serve_config(load_config(args.config))
        if args.write is None:
            print(text, end="")
        else:
            changed = write_serve_config(Path(args.write), text)
            print(
                f"{args.write}: serveConfigV2 {'updated' if changed else 'unchanged'}; "
                "`kubectl apply -f` it to change the running stack"
            )
        return 0
    if args.cmd == "models":
        from serving.model_registry import cli as registry_cli
        from serving.models import ensure_weights

        if args.models_cmd in registry_cli.COMMANDS:
            return registry_cli.run(args)
        if args.models_cmd == "ensure":
            cfg = load_config(args.config, check_engine_args=False)
            for mc in cfg.models.values():
                print(ensure_weights(cfg, mc.weights))
            return 0
        cfg = KeelConfig.model_construct(models={}, models_dir=None)
        print(ensure_weights(cfg, args.name, rebuild=args.force))
        return 0
    if args.cmd == "rollout":
        from serving.rollout.cli import run as run_rollout

        return run_rollout(args)
    if args.cmd == "autoscale":
        from serving.autoscaling.cli import run as run_autoscale

        return run_autoscale(args)
    from serving.ops.commands import run as run_ops

    status = run_ops(args)
    if status is not None:
        return status
    if args.cmd == "keys":
        return _keys(args)
    if args.cmd == "audit":
        return _audit(args)
    if args.cmd == "bench":
        return _bench(args)
    return 1


def _adhoc_spec(args):
    """A bench spec from `keel bench run --url ...` flags."""
    from pydantic import ValidationError

    from serving.bench.spec import BenchSpec
    from serving.config import format_validation_error

    slo: dict = {}
    for part in filter(None, args.slo.split(",")):
        key, _, value = part.partition("=")
        names = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2el_ms", "p": "percentile"}
        if key not in names or not value:
            raise ConfigError(f"--slo: `{part}` is not one of ttft=MS, tpot=MS, e2el=MS, p=PERCENTILE")
        slo[names[key]] = value  # converted and checked by BenchSpec, like every other flag
    doc = {
        "url": args.url,
        "model": args.model,
        "api_key": args.api_key,
        "label": args.label or "adhoc",
        "dataset": {"kind": "random", "input_len": args.input_len, "output_len": args.output_len},
        "load": {
            "mode": args.mode,
            "levels": [x for x in args.levels.split(",") if x],
            "num_requests": args.num_requests,
        },
        "slo": slo,
        "hardware": args.hardware,
    }
    try:
        spec = BenchSpec.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "keel bench run flags", BenchSpec)) from None
    return spec


def _bench(args) -> int:
    from serving.bench.report import load_results, write_report

    if args.bench_cmd == "run":
        from serving.bench.runner import run_spec
        from serving.bench.spec import load_spec

        if args.spec:
            spec_path = Path(args.spec)
            spec = load_spec(spec_path)
        else:
            if not args.url or not args.model:
                print("keel: give a SPEC file, or --url and --model to measure a running server", file=sys.stderr)
                return 2
            spec = _adhoc_spec(args)
            spec_path = Path.cwd() / f"{spec.label}.yaml"  # relative paths resolve from here
        try:
            out = run_spec(
                spec,
                spec_path,
                Path(args.out) if args.out else None,
                progress=not args.no_progress,
                command="keel " + shlex.join(args.argv),
            )
        except ValueError as e:
            print(f"keel: {e}", file=sys.stderr)
            return 2
        print(f"results: {out}")
        if args.report:
            paths = write_report(load_results([out]), Path(args.report))
            print(f"report: {paths['html']}\n{Path(paths['markdown']).read_text()}")
        return 0
    try:
        results = load_results([Path(p) for p in args.results])
    except ValueError as e:
        print(f"keel: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else Path(args.results[0]).parent / (Path(args.results[0]).stem + "-report")
    paths = write_report(results, out_dir, title=args.title)
    print(Path(paths["markdown"]).read_text())
    print(f"report: {paths['html']} ({len(paths['png'])} plots in {out_dir})")
    return 0


def _key_id(s: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", s):
        raise argparse.ArgumentTypeError(
            "use letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit"
        )
    return s


def _keys(args) -> int:
    import secrets

    from serving.policy.identity import generate_key, key_digest

    if args.keys_cmd == "create":
        key = generate_key()
        key_id = args.id or f"key-{secrets.token_hex(3)}"
        print(f"New API key for tenant `{args.tenant}` (id {key_id}, role {args.role}):\n\n    {key}\n")
        print("This key is shown only once: store it now (Keel keeps only its digest).")
        print(f"\nPaste under tenants.{args.tenant}.keys in your config:\n")
        print(f'    - {{id: {key_id}, digest: "{key_digest(key)}", role: {args.role}}}')
        return 0
    if sys.stdin.isatty():
        import getpass

        key = getpass.getpass("API key (not echoed): ")
    else:
        key = sys.stdin.readline()
    key = key.strip()
    if not key:
        print("keel: no key on stdin", file=sys.stderr)
        return 2
    print(key_digest(key))
    return 0


def _audit(args) -> int:
    from serving.policy.audit import (
        KEY_FILE_ENV,
        AuditKeyError,
        chain_order,
        create_key_file,
        load_key,
        tail,
        verify_chain,
    )

    if args.audit_cmd == "keygen":
        try:
            created = create_key_file(args.path)
        except AuditKeyError as e:
            print(f"keel: {e}", file=sys.stderr)
            return 1
        print(f"wrote a new audit HMAC key to {args.path} (mode 0600, key id {created.id})")
        print(
            f"set `audit: {{hmac_key_file: {Path(args.path).absolute()}}}` in the config; keep the file "
            "outside the audit dir, on every gateway node, and where `keel audit verify` runs"
        )
        return 0
    if args.audit_cmd == "tail":
        try:
            records = tail(args.file, args.n)
        except OSError as e:
            print(f"keel: {args.file}: {e.strerror}", file=sys.stderr)
            return 1
        for record in records:
            print(json.dumps(record, indent=2, ensure_ascii=False))
        return 0
    paths = _audit_files(args.files)
    if isinstance(paths, str):
        print(f"keel: {paths}", file=sys.stderr)
        return 1
    key = None
    key_file = args.hmac_key_file or os.environ.get(KEY_FILE_ENV) or None
    if key_file:
        try:
            key = load_key(key_file)
        except AuditKeyError as e:
            print(f"keel: {e}", file=sys.stderr)
            return 2
    for _ in range(3):
        checked = [
            pr for chain in chain_order(paths) for pr in verify_chain(chain, require_head=not args.no_head, key=key)
        ]
        now = paths if all(result.ok for _, result in checked) else _audit_files(args.files)
        if not isinstance(now, list) or now == paths:
            break
        paths = now  # a writer rotated a file meanwhile: again, with the files as they are now
    all_ok = True
    for f, result in checked:
        all_ok = all_ok and result.ok
        if result.ok:
            print(f"{f}: OK ({result.records} records, chain intact" + (", MACs match" if key else "") + ")")
        else:
            print(f"{f}: FAILED ({result.records} records, {len(result.problems)} problem(s))")
        for problem in result.problems:
            print(f"{f}: {problem}")
        for warning in result.warnings:
            print(f"{f}: warning: {warning}")
    return 0 if all_ok else 1


def _audit_files(names: list[str]) -> list[Path] | str:
    """The files named, and every audit-*.jsonl in the directories named; a str is an error."""
    paths = []
    for name in names:
        p = Path(name)
        if p.is_dir():
            found = sorted(p.glob("audit-*.jsonl"))
            if not found:
                return f"{name}: no audit-*.jsonl files in this directory"
            paths += found
        else:
            paths.append(p)
    return paths


if __name__ == "__main__":
    sys.exit(main())
