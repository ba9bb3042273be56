"""`keel serve`: start Ray (or join a cluster), deploy the stack, wait until it answers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time

from serving.config import KeelConfig
from serving.httpraw import http_get
from serving.models import ensure_weights
from serving.plan import deploy_failures, unsettled
from serving.policy.identity import DEMO_KEY, key_digest

log = logging.getLogger("keel")

# Serve's controller reconciles every 0.1 s by default; at 0.5 s it takes a fifth of the CPU it
# did from the cores the engine uses, and replicas still start and heal in seconds. The
# KubeRay pods set the same (deploy/kuberay/rayservice.yaml).
CONTROL_LOOP_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}


class StartupError(RuntimeError):
    """The stack could not start; str() is the message a user reads."""


def check_port_free(host: str, port: int, key: str = "server.port") -> None:
    """Fail in a second, with a clear message, instead of after Ray's replica retries."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise StartupError(
                f"{host}:{port} is not available ({e.strerror}): another Keel or server is listening "
                f"there; stop it or set {key} in the config"
            ) from None


def check_audit_key(cfg: KeelConfig) -> None:
    """A missing or unusable audit key fails here, not in every gateway replica's start."""
    if cfg.audit.enabled and cfg.audit.hmac_key_file is not None:
        from serving.policy.audit import AuditKeyError, load_key

        try:
            load_key(cfg.audit.hmac_key_file)
        except AuditKeyError as e:
            raise StartupError(f"audit.hmac_key_file: {e}") from None


def serve_forever(cfg: KeelConfig, *, ready_timeout_s: float = 900.0, on_ready=None) -> None:
    for mc in cfg.models.values():
        ensure_weights(cfg, mc.weights)
    if not cfg.ray.address:  # on a cluster the gateway may run on another node
        check_port_free(cfg.server.host, cfg.server.port)
        if cfg.server.metrics_port is not None:
            check_port_free(cfg.server.metrics_host, cfg.server.metrics_port, "server.metrics_port")
        check_audit_key(cfg)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name, value in CONTROL_LOOP_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    redis = None
    if cfg.quotas.backend == "redis":  # a loopback Redis the config asks for is ours to start
        from serving.policy.redis_server import ensure_local_redis

        try:
            redis = ensure_local_redis(cfg.quotas.redis_url)
        except RuntimeError as e:
            raise StartupError(str(e)) from None
    try:
        _serve(cfg, ready_timeout_s, on_ready)
    finally:
        if redis is not None:
            redis.stop()


def _serve(cfg: KeelConfig, ready_timeout_s: float, on_ready) -> None:
    import ray
    from ray import serve

    from serving.app import submit
    from serving.plan import desired
    from serving.rollout import driver as rollout_driver
    from serving.rollout.stack import ADMIN_KEY_ENV

    if cfg.ray.address:
        use_ray_token_if_any()
        ray.init(address=cfg.ray.address)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False)
    stop = threading.Event()

    def on_signal(*_):
        if stop.is_set():  # the second Ctrl-C: no drain, stop now
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        serve.start(proxy_location="Disabled")
        url = f"http://{cfg.server.host}:{cfg.server.port}"
        with _history(
            cfg, "serve", None, desired(cfg), None, os.environ.get(ADMIN_KEY_ENV), lambda line: print(line, flush=True)
        ) as change:
            # Declarative, as `serve deploy` does it: the policy is the gateway's user_config, so
            # `keel apply` can change it later without restarting anything.
            submit(cfg)
            wait_ready(cfg.server.host, cfg.server.port, ready_timeout_s, stop, deploy_failed=_deploy_error)
            if stop.is_set() and change is not None:
                change.fail("stopped before the stack was ready")
        if stop.is_set():
            return
        print(ready_message(cfg, url, ray.get_runtime_context().gcs_address), flush=True)
        rollout_driver.resume_all(cfg, os.environ.get(ADMIN_KEY_ENV), say=lambda line: print(line, flush=True))
        if on_ready:
            on_ready()
        while not stop.wait(1.0):
            pass
        print(
            f"\nKeel: draining: the requests in flight finish (at most {drain_bound(cfg):.0f} s); "
            "Ctrl-C again stops at once",
            flush=True,
        )
        # Rollouts first: they stay where they are (state files) and resume at the next start.
        rollout_driver.stop_all()
        _drain_and_shutdown(cfg)
    except KeyboardInterrupt:
        print("\nKeel: stopping at once", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        print("Keel: stopped.", flush=True)


def use_ray_token_if_any() -> None:
    """Joining a cluster by address: `ray start` turns token auth on whenever this machine has a
    token (~/.ray/auth_token, RAY_AUTH_TOKEN[_PATH]), but `ray.init(address=...)` sends it only
    with RAY_AUTH_MODE=token set. Set it the way `ray start` decides; an explicit mode is kept."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def drain_bound(cfg: KeelConfig) -> float:
    """How long a drained stop may take: the longest drain, then the engine's own stop."""
    from serving.plan import STOP_BUDGET_S

    longest = max([cfg.server.drain_timeout_s, *(m.deployment.drain_timeout_s for m in cfg.models.values())])
    return longest + STOP_BUDGET_S


def _drain_and_shutdown(cfg: KeelConfig) -> None:
    """Serve deletes every application; each replica leaves the registry and drains as it
    would on a scale-down (EngineDeployment.__del__, GatewayDeployment.__del__)."""
    from ray.serve.context import _get_global_client

    # it raises, not returns None, when no controller runs (raise_if_no_controller_running)
    _get_global_client().shutdown(timeout_s=drain_bound(cfg) + 10)  # type: ignore[union-attr]


def _deploy_error() -> str | None:
    """Serve's error once an application of the stack failed to deploy, else None."""
    from ray.serve.context import _get_global_client

    # it raises, not returns None, when no controller runs (raise_if_no_controller_running)
    apps = _get_global_client().get_serve_details().get("applications") or {}  # type: ignore[union-attr]
    return "; ".join(deploy_failures(apps)) or None


def wait_ready(host: str, port: int, timeout_s: float, stop: threading.Event, deploy_failed=None) -> None:
    deadline = time.monotonic() + timeout_s
    check_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    while time.monotonic() < deadline and not stop.is_set():
        if deploy_failed is not None:
            err = deploy_failed()
            if err:
                raise StartupError(
                    f"the stack failed to start: {err} (Serve logs in /tmp/ray/session_latest/logs/serve/)"
                )
        try:
            status, _ = asyncio.run(http_get(check_host, port, "/health", timeout=2.0))
            if status == 200:
                return
        except (OSError, asyncio.TimeoutError, ValueError):
            pass
        time.sleep(0.5)
    if not stop.is_set():
        raise TimeoutError(f"Keel did not become ready on {host}:{port} within {timeout_s:.0f}s")


def ready_message(cfg: KeelConfig, url: str, ray_address: str | None = None) -> str:
    model = next(iter(cfg.models))
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32, "stream": True}
    )
    auth = ""
    if cfg.tenants:
        auth = " -H 'Authorization: Bearer $KEEL_API_KEY'"
        demo_digest = key_digest(DEMO_KEY)
        demo = DEMO_KEY if any(k.digest == demo_digest for t in cfg.tenants.values() for k in t.keys) else None
        key_line = f"  (KEEL_API_KEY={demo}: the demo tenant's key)\n" if demo else ""
    else:
        key_line = "  (no tenants configured: every request is accepted without a key)\n"
    apply = f"keel apply --address {ray_address} CONFIG" if ray_address else "keel apply CONFIG"
    return (
        f"\nKeel is ready on {url}  models: {', '.join(list(cfg.models) + list(cfg.experiments))}\n"
        f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n"
        f"{key_line}"
        f"  Config changes apply live: {apply}  (--dry-run prints the plan first)\n"
        f"  (Ctrl-C stops Keel and Ray)\n"
    )


def apply_config(
    cfg: KeelConfig,
    *,
    address: str = "auto",
    allow_restart: bool = False,
    dry_run: bool = False,
    timeout_s: float | None = None,
    say=print,
    allow_rollback: bool = False,
    admin_key: str | None = None,
) -> str:
    """`keel apply`: change the running stack to what cfg asks, with the least disruption
    (serving.plan): models scale in place, are added or replaced (surge-first) beside the others,
    the gateways learn models and policy live, removed models drain. Returns the last line.
    A change that starts is recorded in the history (serving.ops.history), applied or failed;
    admin_key (optional) names who made it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A local `keel serve` cluster uses Ray's default token auth (~/.ray/auth_token); a client
    # joining it must send the token, which Ray only does with the mode set explicitly.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from serving.app import deployed_state, submit
    from serving.plan import MODEL_APP_PREFIX, REMOVED, REPLACED, StackState, desired, keep_rollouts, make_plan, render
    from serving.rollout.store import StateStore, undone_promotions

    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        raise StartupError(f"no running Ray cluster at {address!r} ({e}); is `keel serve` running?") from None
    try:
        try:
            current = deployed_state()
        except ValueError as e:
            raise StartupError(str(e)) from None
        if current is None:
            raise StartupError("no Keel stack is deployed on this Ray cluster; start one with `keel serve`")
        if not dry_run:
            for mc in cfg.models.values():  # weights present (the demo model built) before any engine starts
                ensure_weights(cfg, mc.weights)
        new = keep_rollouts(current, desired(cfg))  # a rollout in progress is not the config's to undo
        plan = make_plan(current, new)
        undone = [] if allow_rollback else undone_promotions(StateStore(cfg.rollouts.state_dir), current, new)
        if dry_run:
            return (
                "keel apply --dry-run: nothing is changed; the plan:\n"
                + render(plan)
                + "".join(f"\n  refused without --allow-rollback: {u}" for u in undone)
            )
        if undone:
            raise StartupError(
                "\n".join(undone) + "\nSet weights: to the promoted version in the config, or "
                "re-run with --allow-rollback to go back to the old weights. Nothing was changed."
            )
        if plan.restart and not allow_restart:
            raise StartupError(
                "this config changes `server:`, which restarts the gateways (requests in "
                "flight are drained, new ones refused meanwhile); re-run with --restart "
                "to do that. The plan:\n" + render(plan)
            )
        if plan.empty:
            return "keel: nothing to change"
        say("keel apply: the plan\n" + render(plan))
        if timeout_s is None:
            timeout_s = 120 + max(
                m.deployment.startup_timeout_s + m.deployment.drain_timeout_s for m in cfg.models.values()
            )
        removed = {MODEL_APP_PREFIX + m.model for m in plan.models if m.kind == REMOVED}
        with _history(cfg, "apply", current, new, plan, admin_key, say):
            if plan.changes_models and not plan.restart:
                # First the models: added, replaced (Serve starts the new replicas before the old
                # ones drain) and scaled, with the removed ones still serving and the gateways as
                # they are; once ready, the gateways learn them.
                say("keel apply: models ...")
                submit(StackState(current.server, current.gateway, {**current.models, **new.models}))
                _wait_settled(timeout_s)
            say("keel apply: gateways" + (" and removed models ..." if removed else " ..."))
            submit(new)
            _wait_settled(timeout_s, gone=removed)
        if plan.restart:
            return "keel: applied (the gateways restarted)"
        restarted = [m.model for m in plan.models if m.kind in (REPLACED, REMOVED)]
        return (
            "keel: applied live; engines restarted: "
            + (", ".join(restarted) if restarted else "none")
            + " (replaced surge-first, removed ones drained)" * bool(restarted)
        )
    finally:
        ray.shutdown()


def _history(cfg: KeelConfig, command: str, current, new, plan, admin_key: str | None, say):
    """The change's history record (serving.ops.history) as a context: opened before anything
    is deployed, written when the block ends (applied, or failed with the exception's message).
    current: the deployed StackState (None: `keel serve`, diffed against the last recorded
    config). A nullcontext when audit is off."""
    import contextlib

    from serving.ops import history
    from serving.policy.audit import AuditError

    if not cfg.audit.enabled:
        say(f"keel {command}: not recorded in the history (audit.enabled is false)")
        return contextlib.nullcontext()
    new_view = history.config_view(new)
    policies = [p for p in ((current.gateway.get("policy") if current else None), new_view["policy"]) if p]
    who = history.identify(admin_key, policies)
    if who.get("key_note"):
        say(f"keel {command}: recorded as {who['user']}@{who['host']}: {who['key_note']}")
    previous = None
    if current is None:
        try:
            previous = history.read_history(cfg.audit.dir, verify=False).last_change()
        except FileNotFoundError:
            previous = None
    record = history.change_record(
        command=command,
        who=who,
        old_view=history.config_view(current) if current else None,
        new_view=new_view,
        previous=previous,
        # a first deploy adds every model; nothing else is a change of plan
        plan=history.plan_summary(plan) if plan else history.first_deploy(new),
    )
    try:
        return history.ChangeRecorder(cfg, record, say)
    except (OSError, AuditError) as e:
        raise StartupError(
            f"cannot record the change in the history ({cfg.audit.dir}): {e}; nothing was changed"
        ) from None


def _wait_settled(timeout_s: float, gone: frozenset[str] | set[str] = frozenset()) -> None:
    """Until every application runs with all deployments healthy and `gone` ones are deleted."""
    from ray.serve.context import _get_global_client

    from serving.plan import SERVE_PICKUP_S

    client = _get_global_client()
    assert client is not None  # it raises, not returns None, when no controller runs
    start = time.monotonic()
    said = start
    time.sleep(SERVE_PICKUP_S)  # statuses read before it are the old config's
    while time.monotonic() - start < timeout_s:
        apps = client.get_serve_details().get("applications") or {}
        failed = deploy_failures(apps)
        if failed:
            raise StartupError("the new config failed to deploy: " + "; ".join(failed))
        waiting = unsettled(apps, gone)
        if not waiting:
            return
        if time.monotonic() - said >= 15:
            print(f"keel apply: {time.monotonic() - start:.0f} s, waiting for {'; '.join(waiting)}", flush=True)
            said = time.monotonic()
        time.sleep(0.5)
    raise StartupError(f"the stack did not settle within {timeout_s:.0f}s; see `serve status`")
