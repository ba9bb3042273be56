"""The rollout controller's view of a running stack on Ray: the only part of serving.rollout that
knows Ray Serve. Connects as `keel apply` does; reads and submits whole StackStates
(serving.app), and scrapes the gateway's /metrics over HTTP."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request

from serving.plan import MODEL_APP_PREFIX, SERVE_PICKUP_S, StackState
from serving.rollout.controller import DeployFailed, RolloutError
from serving.rollout.evaluate import AskFailed

ADMIN_KEY_ENV = "KEEL_ADMIN_KEY"


class RayStack:
    def __init__(self, address: str | None = "auto", admin_key: str | None = None):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # as `keel apply`: a local stack's token auth
        import ray

        self._owns_ray = not ray.is_initialized()  # inside the stack (the driver actor) it is
        if self._owns_ray:
            try:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            except (ConnectionError, RuntimeError) as e:
                raise RolloutError(f"no running Ray cluster at {address!r} ({e}); is `keel serve` running?") from None
        self.admin_key = admin_key

    def close(self) -> None:
        import ray

        if self._owns_ray:
            ray.shutdown()

    def state(self) -> StackState | None:
        from ray.serve.exceptions import RayServeException

        from serving.app import deployed_state

        try:
            return deployed_state()
        except RayServeException:
            return None  # no Serve on this cluster: no stack
        except ValueError as e:
            raise RolloutError(str(e)) from None

    def submit(self, state: StackState) -> None:
        from serving.app import submit

        submit(state)
        time.sleep(SERVE_PICKUP_S)  # until Serve's controller has taken it up, its statuses are the old ones

    def pending(self, gone: frozenset[str]) -> list[str]:
        """What is not running as given yet ([] once settled); DeployFailed when Serve gave up."""
        from ray.serve.context import _get_global_client

        from serving.plan import deploy_failures, unsettled

        # it raises, not returns None, when no controller runs (raise_if_no_controller_running)
        apps = _get_global_client().get_serve_details().get("applications") or {}  # type: ignore[union-attr]
        failed = deploy_failures(apps)
        if failed:
            raise DeployFailed("; ".join(failed))
        return unsettled(apps, {MODEL_APP_PREFIX + g for g in gone})

    def scrape(self) -> str:
        """The gateway's /metrics: its metrics listener when configured, else the API port with
        an admin key (its labels name tenants)."""
        server = (self.state() or StackState({}, {})).server
        if server.get("gateway_replicas", 1) > 1:
            # Each replica counts its own requests and a scrape reaches one of them at random.
            raise RolloutError(
                "rollouts read the gateway's request counters from one scrape, and with "
                "server.gateway_replicas > 1 each scrape reaches another replica; "
                "not supported yet"
            )
        if server.get("metrics_port"):
            host, port, headers = _local(server.get("metrics_host")), server["metrics_port"], {}
        else:
            host, port, headers = *self._api(server), self._admin()
        req = urllib.request.Request(f"http://{host}:{port}/metrics", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise RolloutError(
                    "the gateway's /metrics needs an admin key: set server.metrics_port, or give one in $KEEL_ADMIN_KEY"
                ) from None
            raise OSError(f"GET /metrics: HTTP {e.code}") from None
        except urllib.error.URLError as e:
            raise OSError(f"GET http://{host}:{port}/metrics: {e.reason}") from None

    def ask(self, model: str, candidate: str, path: str, body: dict, timeout_s: float) -> dict:
        """One request through the gateway's API port, pinned to the candidate (an admin key's
        `x-keel-variant`): the answer's JSON, or AskFailed saying what came back instead."""
        from serving.gateway.policy import VARIANT_HEADER

        host, port = self._api((self.state() or StackState({}, {})).server)
        headers = {"content-type": "application/json", VARIANT_HEADER: candidate, **self._admin()}
        req = urllib.request.Request(
            f"http://{host}:{port}{path}", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = _error_message(e.read())
            if e.code in (401, 403):
                raise RolloutError(
                    f"the evaluation gate needs an admin key: give one in ${ADMIN_KEY_ENV} "
                    f"(the gateway said HTTP {e.code}: {detail})"
                ) from None
            raise AskFailed(f"HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise AskFailed(f"no answer within {timeout_s:g} s: {getattr(e, 'reason', e)}") from None
        except ValueError:
            raise AskFailed("the answer is not JSON") from None

    def check_admin(self) -> None:
        """RolloutError unless this process may pin requests to a candidate (the evaluation
        gate): an admin key, or a stack without tenants. Asked before anything is deployed."""
        host, port = self._api((self.state() or StackState({}, {})).server)
        req = urllib.request.Request(f"http://{host}:{port}/v1/admin/policy", headers=self._admin())
        try:
            with urllib.request.urlopen(req, timeout=10):
                return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise RolloutError(
                    f"the evaluation gate asks the candidate with an admin key: give one in "
                    f"${ADMIN_KEY_ENV} (the gateway said HTTP {e.code}: "
                    f"{_error_message(e.read())})"
                ) from None
            raise RolloutError(f"GET /v1/admin/policy: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RolloutError(
                f"cannot reach the gateway at {host}:{port} ({getattr(e, 'reason', e)}); is the stack up?"
            ) from None

    def _api(self, server: dict) -> tuple[str, int]:
        return _local(server.get("host")), server.get("port", 8000)

    def _admin(self) -> dict:
        return {"authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}


def _local(host: str | None) -> str:
    """Where this process reaches a listener bound to `host` (all addresses: loopback)."""
    return "127.0.0.1" if host in (None, "0.0.0.0", "", "::") else host


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return raw[:300].decode(errors="replace")
