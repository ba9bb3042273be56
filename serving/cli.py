"""The `keel` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serving.config import REPO_ROOT, ConfigError

DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="keel", description="Keel: OpenAI-compatible LLM serving on Ray Serve + vLLM.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help="start the stack in the foreground")
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))

    p = sub.add_parser("config", help="validate a config or print its JSON Schema")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    v = csub.add_parser("validate", help="check a config file (including engine arguments)")
    v.add_argument("file")
    s = csub.add_parser("schema", help="print the config's JSON Schema (for editors)")
    s.add_argument("--out", default=None)

    p = sub.add_parser("models", help="registered weights")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="list model manifests under models/")
    b = msub.add_parser("build", help="build weights Keel can make (the demo model)")
    b.add_argument("name", nargs="?", default="demo-tiny")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    e = msub.add_parser("ensure", help="build whatever a config's models need")
    e.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))

    args = ap.parse_args(argv)
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
    if args.cmd == "models":
        from serving.models import ensure_weights, list_manifests

        if args.models_cmd == "ensure":
            cfg = load_config(args.config, check_engine_args=False)
            for mc in cfg.models.values():
                print(ensure_weights(cfg, mc.weights))
            return 0
        cfg = KeelConfig.model_construct(models={}, models_dir=None)
        if args.models_cmd == "list":
            for manifest, path in list_manifests(cfg):
                state = "present" if (path / "config.json").is_file() else "missing"
                print(f"{manifest.name:20} {state:8} {path}  {manifest.description}")
            return 0
        print(ensure_weights(cfg, args.name, rebuild=args.force))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
