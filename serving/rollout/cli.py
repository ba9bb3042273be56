"""`keel rollout start | status | promote | abort`: parsers and what each does."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from datetime import datetime, timezone

FOLLOW_EVERY_S = 1.0
# Another shell's `status` holds the model's lock for an instant (driven()); a start waits it out.
PROBE_WAIT_S = 1.0
# A driver that Ray restarts takes a few seconds to take the lock again; longer means none runs.
UNDRIVEN_GRACE_S = 60.0


def add_parser(sub, default_config: str) -> None:
    p = sub.add_parser("rollout", help="roll a model out to new weights in steps, with automatic rollback")
    rsub = p.add_subparsers(dest="rollout_cmd", required=True)
    s = rsub.add_parser(
        "start",
        help="deploy the candidate beside the model and move traffic to it step by "
        "step, judging live gates; driven inside the stack, followed here (again: resumes)",
    )
    s.add_argument("model")
    s.add_argument(
        "--to",
        required=True,
        dest="to_version",
        metavar="VERSION",
        help="the candidate's weights, as a config's `weights:` (NAME or NAME@VERSION)",
    )
    s.add_argument("--steps", default=None, help="candidate's share per step, e.g. 5,25,50,100")
    s.add_argument("--hold", default=None, help="how long each step holds every gate, e.g. 10m (default 600 s)")
    s.add_argument(
        "--gate",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="errors=0.01 (max error-rate increase), ttft=1.25, tpot=1.25 (max p95 ratios), "
        "min_requests=20, warmup=60 (s of each step before latency is judged); repeatable",
    )
    s.add_argument(
        "--eval",
        default=None,
        dest="eval_file",
        metavar="FILE",
        help="an evaluation set (prompts with regex / exact / json_schema expectations) the "
        "candidate must pass, alone, before its first step; default: rollouts.defaults.eval_file",
    )
    st = rsub.add_parser("status", help="where a rollout is, and its decisions")
    st.add_argument("model", nargs="?", help="default: every rollout in the state dir")
    pr = rsub.add_parser("promote", help="promote now: the candidate takes all traffic and replaces the model")
    pr.add_argument("model")
    ab = rsub.add_parser("abort", help="roll back now: traffic back to the model, the candidate removed")
    ab.add_argument("model")
    s.add_argument(
        "--detach",
        action="store_true",
        help="return once the rollout is handed to the stack's driver, instead of following it to the end",
    )
    for q in (s, st, pr, ab):
        q.add_argument("--config", default=default_config, help="the stack's config (rollouts:, models_dir)")
        q.add_argument("--address", default="auto", help="Ray cluster of the running stack")


_GATES = {
    "errors": "max_error_rate_increase",
    "ttft": "max_ttft_p95_ratio",
    "tpot": "max_tpot_p95_ratio",
    "min_requests": "min_requests",
    "warmup": "warmup_s",
}


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
        if name == "warmup":
            try:
                value = parse_duration(value)
            except ValueError as e:
                raise ConfigError(f"--gate warmup: {e}") from None
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
            return _start(cfg, store, args, spec, str(resolved.path))
        state = store.load(args.model)
        if state is None or state.phase not in _active():
            print(
                f"keel: no rollout of {args.model} in progress" + (f" ({state.phase})" if state else ""),
                file=sys.stderr,
            )
            return 1
        store.request(args.model, PROMOTE_NOW if args.rollout_cmd == "promote" else ABORT)
        if not store.driven(args.model):  # nobody drives it (`keel serve` was down): the stack does now
            with _connected(args):
                _start_driver(cfg, args.model)
        print(f"keel: asked the driver of {args.model}'s rollout; following it ...", flush=True)
        return _follow(store, args.model, len(state.history))
    except (RolloutError, RolloutBusy) as e:
        print(f"keel: {e}", file=sys.stderr)
        return 1


def _active():
    from serving.rollout.decide import ACTIVE

    return ACTIVE


def _start(cfg, store, args, spec, weights_path: str) -> int:
    """Begin (or find) the rollout here, where its errors are the user's to read, then hand it to
    a driver in the stack and follow it (`--detach`: do not)."""
    from serving.rollout.controller import Controller, RolloutError
    from serving.rollout.driver import AuditRecords
    from serving.rollout.store import RolloutBusy

    with _connected(args) as stack:
        old = store.load(args.model)
        if old is None or old.phase not in _active():
            try:  # the gates need the metrics: find out now, before anything is deployed
                stack.scrape()
            except OSError as e:
                raise RolloutError(f"cannot read the gateway's metrics ({e}); is the stack up?") from None
            if spec.evaluation is not None:
                stack.check_admin()
        try:
            lock = store.lock(args.model, wait_s=PROBE_WAIT_S)
        except RolloutBusy:  # its driver runs: the same rollout is followed, another refused
            if old is None or old.to_version != spec.to_version:
                raise
            state = old
        else:
            audit = AuditRecords(cfg) if cfg.audit.enabled else None
            try:
                state = Controller(store, stack, audit=audit, say=lambda line: print(line, flush=True)).begin(
                    spec, weights_path
                )
            finally:
                store.unlock(lock)
                if audit is not None:
                    audit.close()
        _start_driver(cfg, args.model)
    if args.detach:
        print(
            f"keel: the rollout of {args.model} goes on in the stack; `keel rollout status {args.model}` "
            "shows where it is"
        )
        return 0
    return _follow(store, args.model, len(state.history))


@contextlib.contextmanager
def _connected(args):
    """The stack's Ray cluster for the length of a `with` (RayStack: its state, its gateway)."""
    from serving.rollout.stack import ADMIN_KEY_ENV, RayStack

    stack = RayStack(args.address, os.environ.get(ADMIN_KEY_ENV))
    try:
        yield stack
    finally:
        stack.close()


def _start_driver(cfg, model: str) -> None:
    from serving.rollout.driver import start
    from serving.rollout.stack import ADMIN_KEY_ENV

    start(cfg, model, os.environ.get(ADMIN_KEY_ENV))


def _follow(store, model: str, seen: int) -> int:
    """Print the rollout's transitions as its driver records them, until it is done: 0 when
    promoted, 3 when rolled back or aborted; 1 when nothing drives it any more. Ctrl-C stops
    following, not the rollout."""
    from serving.rollout.decide import DONE, PROMOTED

    undriven_since = None
    try:
        while True:
            state = store.load(model)
            for rec in state.history[seen:]:
                print(f"keel rollout: {model}: {rec['action']}: {rec['reason']}", flush=True)
            seen = len(state.history)
            if state.phase in DONE:
                return 0 if state.phase == PROMOTED else 3
            if store.driven(model):
                undriven_since = None
            elif undriven_since is None:
                undriven_since = time.monotonic()
            elif time.monotonic() - undriven_since > UNDRIVEN_GRACE_S:
                print(
                    f"keel: nothing drives {model}'s rollout ({state.phase}); `keel rollout start {model} "
                    f"--to {state.to_version}` resumes it",
                    file=sys.stderr,
                )
                return 1
            time.sleep(FOLLOW_EVERY_S)
    except KeyboardInterrupt:
        print(
            f"\nkeel: stopped following; the rollout goes on in the stack (`keel rollout status {model}`)",
            file=sys.stderr,
        )
        return 130


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
        lines.append(
            "  driven by the stack (its rollout driver)"
            if driven
            else f"  NOT driven: run `keel rollout start {state.model} --to {state.to_version}` to resume"
        )
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
