"""`keel serve`: start Ray (or join a cluster), deploy the stack, wait until it answers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time

from serving.config import KeelConfig
from serving.httpraw import http_get
from serving.models import ensure_weights
from serving.policy.identity import DEMO_KEY, key_digest

log = logging.getLogger("keel")


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
    for name, mc in cfg.models.items():
        ensure_weights(cfg, mc.weights)
    if not cfg.ray.address:  # on a cluster the gateway may run on another node
        check_port_free(cfg.server.host, cfg.server.port)
        if cfg.server.metrics_port is not None:
            check_port_free(cfg.server.metrics_host, cfg.server.metrics_port, "server.metrics_port")
        check_audit_key(cfg)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Serve's controller reconciles every 0.1 s by default; at 0.5 s it takes a fifth of the
    # CPU it did from the cores the engine uses, and replicas still start and heal in seconds.
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
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

    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location="Disabled")
        # Declarative, as `serve deploy` does it: the policy is the gateway's user_config, so
        # `keel apply` can change it later without restarting anything.
        submit(cfg)
        url = f"http://{cfg.server.host}:{cfg.server.port}"
        wait_ready(cfg.server.host, cfg.server.port, ready_timeout_s, stop, deploy_failed=_deploy_error)
        if stop.is_set():
            return
        print(ready_message(cfg, url, ray.get_runtime_context().gcs_address), flush=True)
        if on_ready:
            on_ready()
        while not stop.wait(1.0):
            pass
        print("\nKeel: stopping...", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        print("Keel: stopped.", flush=True)


def _deploy_error() -> str | None:
    """The first line of Serve's error once the application failed to deploy, else None."""
    from ray import serve

    from serving.app import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    if app is None or app.status != "DEPLOY_FAILED":
        return None
    msg = app.message or "deploy failed"
    for d in app.deployments.values():
        if d.status == "DEPLOY_FAILED" or "UNHEALTHY" in str(d.status):
            msg = d.message or msg
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    # Serve's message carries the replica's traceback; its last line is the error itself.
    return lines[-1] if lines else msg


def wait_ready(host: str, port: int, timeout_s: float, stop: threading.Event, deploy_failed=None) -> None:
    deadline = time.monotonic() + timeout_s
    check_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    while time.monotonic() < deadline and not stop.is_set():
        if deploy_failed is not None:
            err = deploy_failed()
            if err:
                raise StartupError(f"the stack failed to start: {err} (Serve logs in "
                                   "/tmp/ray/session_latest/logs/serve/)")
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
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "Hello"}], '
            '"max_tokens": 32, "stream": true}' % model)
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
        f"  Policy changes apply live: {apply}\n"
        f"  (Ctrl-C stops Keel and Ray)\n"
    )


def apply_config(cfg: KeelConfig, *, address: str = "auto", allow_restart: bool = False,
                 timeout_s: float = 120.0) -> str:
    """`keel apply`: hand a changed config to the running stack and wait until it is in force."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A local `keel serve` cluster uses Ray's default token auth (~/.ray/auth_token); a client
    # joining it must send the token, which Ray only does with the mode set explicitly.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray import serve

    from serving.app import APP_NAME, deploy_schema, deployed_schema, submit

    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        raise StartupError(f"no running Ray cluster at {address!r} ({e}); is `keel serve` running?") from None
    try:
        current = deployed_schema()
        if current is None:
            raise StartupError("no Keel stack is deployed on this Ray cluster; start one with `keel serve`")
        new = deploy_schema(cfg)["applications"][0]
        restart = current.get("args") != new["args"]
        if restart and not allow_restart:
            raise StartupError(
                "this config also changes server/ray/models, which redeploys the stack and restarts "
                "the engines; re-run with --restart to do that (policy-only changes apply live)")
        submit(cfg)
        deadline = time.monotonic() + timeout_s
        time.sleep(1.0)  # the controller picks the new config up on its next loop
        while time.monotonic() < deadline:
            app = serve.status().applications.get(APP_NAME)
            if app is not None and app.status == "RUNNING":
                break
            if app is not None and app.status == "DEPLOY_FAILED":
                raise StartupError(f"the new config failed to deploy: {_deploy_error()}")
            time.sleep(0.5)
        else:
            raise StartupError(f"the stack did not settle within {timeout_s:.0f}s; see `serve status`")
        what = "stack redeployed" if restart else "policy applied live; engines untouched"
        return f"keel: {what} ({len(cfg.tenants)} tenants, {len(cfg.experiments)} experiments)"
    finally:
        ray.shutdown()
