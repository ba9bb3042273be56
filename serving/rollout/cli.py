"""`keel rollout start | status | promote | abort`: parsers and what each does."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone

WAIT_FOR_DRIVER_S = 900.0


def add_parser(sub, default_config: str) -> None:
    p = sub.add_parser("rollout", help="roll a model out to new weights in steps, with automatic rollback")
    rsub = p.add_subparsers(dest="rollout_cmd", required=True)
    s = rsub.add_parser("start", help="deploy the candidate beside the model and move traffic to it step by "
                        "step, judging live gates; runs in the foreground (again: resumes)")
    s.add_argument("model")
    s.add_argument("--to", required=True, dest="to_version", metavar="VERSION",
                   help="the candidate's weights, as a config's `weights:` (NAME or NAME@VERSION)")
    s.add_argument("--steps", default=None, help="candidate's share per step, e.g. 5,25,50,100")
    s.add_argument("--hold", default=None, help="how long each step holds every gate, e.g. 10m (default 600 s)")
    s.add_argument("--gate", action="append", default=[], metavar="NAME=VALUE",
                   help="errors=0.01 (max error-rate increase), ttft=1.25, tpot=1.25 (max p95 ratios), "
                   "min_requests=20; repeatable")
    s.add_argument("--eval", default=None, dest="eval_file", metavar="FILE",
                   help="an evaluation set (prompts with regex / exact / json_schema expectations) the "
                   "candidate must pass, alone, before its first step; default: rollouts.defaults.eval_file")
    st = rsub.add_parser("status", help="where a rollout is, and its decisions")
    st.add_argument("model", nargs="?", help="default: every rollout in the state dir")
    pr = rsub.add_parser("promote", help="promote now: the candidate takes all traffic and replaces the model")
    pr.add_argument("model")
    ab = rsub.add_parser("abort", help="roll back now: traffic back to the model, the candidate removed")
    ab.add_argument("model")
    for q in (s, st, pr, ab):
        q.add_argument("--config", default=default_config, help="the stack's config (rollouts:, models_dir)")
        q.add_argument("--address", default="auto", help="Ray cluster of the running stack")


_GATES = {"errors": "max_error_rate_increase", "ttft": "max_ttft_p95_ratio", "tpot": "max_tpot_p95_ratio",
          "min_requests": "min_requests"}


def spec_from_args(args, defaults):
    """The RolloutSpec of `keel rollout start` flags over the config's rollouts.defaults."""
    from pydantic import ValidationError

    from serving.config import ConfigError, format_validation_error
    from serving.rollout.evaluate import EvalError, load_eval_set
    from serving.rollout.spec import RolloutSpec, parse_duration

    doc = defaults.model_dump(mode="json")
    doc.update(model=args.model, to_version=args.to_version)
    try:
        if args.steps:
            doc["steps"] = [float(x) for x in args.steps.split(",") if x.strip()]
        if args.hold:
            doc["hold_s"] = parse_duration(args.hold)
    except ValueError as e:
        raise ConfigError(f"--steps/--hold: {e}") from None
    for g in args.gate:
        name, _, value = g.partition("=")
        if name not in _GATES or not value:
            raise ConfigError(f"--gate: `{g}` is not one of {', '.join(k + '=VALUE' for k in _GATES)}")
        doc["gates"][_GATES[name]] = value
    eval_file = getattr(args, "eval_file", None) or doc.get("eval_file")
    if eval_file:
        try:
            doc["eval_file"] = eval_file
            doc["evaluation"] = load_eval_set(eval_file).model_dump(mode="json")
        except EvalError as e:
            where = "--eval" if getattr(args, "eval_file", None) else "rollouts.defaults.eval_file"
            raise ConfigError(f"{where}: {e}") from None
    try:
        return RolloutSpec.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "keel rollout start flags", RolloutSpec)) from None


def run(args) -> int:
    from serving.config import ConfigError, load_config
    from serving.model_registry.resolve import resolve_weights
    from serving.rollout.controller import RolloutError
    from serving.rollout.store import ABORT, PROMOTE_NOW, RolloutBusy, StateStore

    cfg = load_config(args.config, check_engine_args=False)
    store = StateStore(cfg.rollouts.state_dir)
    try:
        if args.rollout_cmd == "status":
            return _status(store, args.model)
        if args.rollout_cmd == "start":
            spec = spec_from_args(args, cfg.rollouts.defaults)
            try:
                resolved = resolve_weights(cfg, spec.to_version)
            except ConfigError as e:
                raise ConfigError(f"--to {spec.to_version}: {e}") from None
            # The registry's identity (NAME@VERSION), as the plan names what a model serves.
            spec = spec.model_copy(update={"to_version": resolved.identity})
            return _drive(cfg, store, args, spec=spec, weights_path=str(resolved.path))
        state = store.load(args.model)
        if state is None or state.phase not in _active():
            print(f"keel: no rollout of {args.model} in progress" + (f" ({state.phase})" if state else ""),
                  file=sys.stderr)
            return 1
        store.request(args.model, PROMOTE_NOW if args.rollout_cmd == "promote" else ABORT)
        if store.driven(args.model):
            return _wait_for_driver(store, args.model)
        return _drive(cfg, store, args)  # nobody drives it (its process died): this one does
    except (RolloutError, RolloutBusy) as e:
        print(f"keel: {e}", file=sys.stderr)
        return 1


def _active():
    from serving.rollout.decide import ACTIVE

    return ACTIVE


def _drive(cfg, store, args, spec=None, weights_path: str = "") -> int:
    from serving.rollout.controller import Controller, RolloutError
    from serving.rollout.decide import PROMOTED
    from serving.rollout.stack import ADMIN_KEY_ENV, RayStack

    lock = store.lock(args.model)
    stack = RayStack(args.address, os.environ.get(ADMIN_KEY_ENV))
    audit = _audit_writer(cfg)
    try:
        if spec is not None and store.load(args.model) is None:
            try:  # the gates need the metrics: find out now, before anything is deployed
                stack.scrape()
            except OSError as e:
                raise RolloutError(f"cannot read the gateway's metrics ({e}); is the stack up?") from None
            if spec.evaluation is not None:
                stack.check_admin()
        c = Controller(store, stack, audit=audit, say=lambda line: print(line, flush=True))
        state = c.begin(spec, weights_path) if spec is not None else store.load(args.model)
        state = c.run(state)
        return 0 if state.phase == PROMOTED else 3
    finally:
        if hasattr(audit, "close"):
            audit.close()
        stack.close()
        store.unlock(lock)


class _AuditRecords:
    """Each transition as a record in the stack's audit log (its chain and HMAC key), beside the
    gateways' request records: `keel audit verify` covers both."""

    def __init__(self, cfg):
        from serving.policy.audit import AuditLog

        self.log = AuditLog(cfg.audit.dir, hmac_key_file=cfg.audit.hmac_key_file)

    def __call__(self, rec: dict) -> None:
        when = datetime.fromtimestamp(rec["time"], timezone.utc).isoformat(timespec="milliseconds")
        self.log.write({**rec, "time": when})
        self.log.flush()

    def close(self) -> None:
        self.log.close()


def _audit_writer(cfg):
    return _AuditRecords(cfg) if cfg.audit.enabled else None


def _wait_for_driver(store, model: str) -> int:
    from serving.rollout.decide import DONE, PROMOTED

    print(f"keel: asked the process driving {model}'s rollout; waiting for it ...", flush=True)
    deadline = time.monotonic() + WAIT_FOR_DRIVER_S
    while time.monotonic() < deadline:
        state = store.load(model)
        if state is not None and state.phase in DONE:
            print(f"keel: {model}: {state.phase}: {state.last_reason}")
            return 0 if state.phase == PROMOTED else 3
        time.sleep(1.0)
    print(f"keel: {model}'s rollout did not finish within {WAIT_FOR_DRIVER_S:.0f} s; see `keel rollout status`",
          file=sys.stderr)
    return 1


def _status(store, model: str | None) -> int:
    models = [model] if model else store.models()
    if not models:
        print(f"no rollouts in {store.dir}")
        return 0
    for m in models:
        state = store.load(m)
        if state is None:
            print(f"keel: no rollout of {m} in {store.dir}", file=sys.stderr)
            return 1
        print(render_status(state, store.driven(m)))
    return 0


def render_status(state, driven: bool) -> str:
    from serving.rollout.decide import ACTIVE, STEPPING

    where = state.phase
    if state.phase == STEPPING:
        steps = state.spec["steps"]
        where = f"step {state.step + 1} of {len(steps)}: {state.percent:g}% of users on the candidate"
    lines = [f"{state.model}: {state.from_version} -> {state.to_version}  {where}"]
    if state.phase in ACTIVE:
        lines.append("  driven by a running `keel rollout start`" if driven else
                     f"  NOT driven: run `keel rollout start {state.model} --to {state.to_version}` to resume")
    if state.last_reason:
        lines.append(f"  now: {state.last_reason}")
    for h in state.history:
        when = datetime.fromtimestamp(h["time"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"  {when}  {h['action']:<10} {h['percent']:>5g}%  {h['reason']}")
    return "\n".join(lines)


def main(argv=None) -> int:  # for `python -m serving.rollout.cli` while testing by hand
    ap = argparse.ArgumentParser(prog="keel")
    add_parser(ap.add_subparsers(dest="cmd", required=True), "configs/local.yaml")
    return run(ap.parse_args(argv))
