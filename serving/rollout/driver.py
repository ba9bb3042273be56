"""The rollout's driver inside the stack: one detached Ray actor per model rolling out
(`keel-rollout:MODEL`), so a rollout goes on when the shell that started it closes, and comes
back when its process dies (Ray restarts it; it resumes from the state file). `keel serve`
starts one for every rollout its state dir says is in progress, and stops them before it drains.

The actor runs on the node it was started from (the state dir and the audit log are that
node's files) in that process's working directory, so relative paths mean what they meant
there. Everything it does is `drive()`: the Controller (serving.rollout.controller) over a
RayStack, holding the model's lock so two drivers never drive one rollout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone

NAMESPACE = "keel"
NAME_PREFIX = "keel-rollout:"
# A driver whose loop fails (Serve or the gateway unreachable) tries again from the state file;
# after this many tries (~5 min) it stops and `keel rollout status` says nothing drives it.
RETRIES, RETRY_AFTER_S = 10, 30.0
# `keel rollout start` (begin) and status probes (`driven()`) hold the lock for an instant.
LOCK_WAIT_S = 10.0

log = logging.getLogger("keel.rollout")


def drive(cfg, model: str, admin_key: str | None, *, address: str | None = None, say=print):
    """Run `model`'s rollout from its state file until it is done; the final RolloutState."""
    from serving.rollout.controller import Controller
    from serving.rollout.decide import ACTIVE
    from serving.rollout.stack import RayStack
    from serving.rollout.store import StateStore

    store = StateStore(cfg.rollouts.state_dir)
    lock = store.lock(model, wait_s=LOCK_WAIT_S)  # RolloutBusy when another process drives it
    stack = RayStack(address, admin_key)
    audit = AuditRecords(cfg) if cfg.audit.enabled else None
    try:
        state = store.load(model)
        if state is None or state.phase not in ACTIVE:
            return state  # done meanwhile (or never begun): nothing to drive
        return Controller(store, stack, audit=audit, say=say).run(state)
    finally:
        if audit is not None:
            audit.close()
        stack.close()
        store.unlock(lock)


class AuditRecords:
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


class RolloutDriver:
    """The actor (made remote in `start`): drives the rollout on a thread of its own, so Ray can
    ask it `running()` meanwhile, then removes itself for good (no restart)."""

    def __init__(self, cfg, model: str, admin_key: str | None, cwd: str):
        os.chdir(cwd)
        self.cfg, self.model, self.admin_key = cfg, model, admin_key
        self.thread = threading.Thread(target=self._run, name=f"rollout-{model}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import ray

        from serving.rollout.store import RolloutBusy

        for attempt in range(1, RETRIES + 1):
            try:
                drive(self.cfg, self.model, self.admin_key, say=lambda line: print(line, flush=True))
                break
            except RolloutBusy as e:
                print(f"keel rollout: {e}; this driver stops", flush=True)
                break
            except Exception:  # Serve or the gateway out of reach a while: the state file says where it was
                log.exception("the rollout of %s stopped (try %d of %d)", self.model, attempt, RETRIES)
                if attempt < RETRIES:
                    time.sleep(RETRY_AFTER_S)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def running(self) -> bool:
        return self.thread.is_alive()


def start(cfg, model: str, admin_key: str | None) -> bool:
    """Start `model`'s driver on this node unless one runs; True when this call started it.
    Needs a connected Ray (ray.init)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = NAME_PREFIX + model
    try:
        ray.get_actor(name, namespace=NAMESPACE)
        return False
    except ValueError:
        pass
    actor = (
        ray.remote(RolloutDriver)
        .options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=2,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        )
        .remote(cfg, model, admin_key, os.getcwd())
    )
    # Constructed, on this node: its thread drives. (Ray types an actor's methods without .remote.)
    ray.get(actor.running.remote(), timeout=120)  # type: ignore[attr-defined]
    return True


def stop_all() -> list[str]:
    """Stop every driver (before `keel serve` drains); their state files keep each rollout where
    it was, and the next `keel serve` resumes them. The models whose drivers were stopped."""
    import ray

    stopped = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a.get("namespace") == NAMESPACE and a.get("name", "").startswith(NAME_PREFIX):
            try:
                ray.kill(ray.get_actor(a["name"], namespace=NAMESPACE), no_restart=True)
                stopped.append(a["name"][len(NAME_PREFIX) :])
            except ValueError:
                pass
    return stopped


def resume_all(cfg, admin_key: str | None, say=print) -> list[str]:
    """A driver for every rollout in progress in the state dir (`keel serve`, once ready)."""
    from serving.rollout.decide import ACTIVE
    from serving.rollout.store import StateStore

    store = StateStore(cfg.rollouts.state_dir)
    resumed = []
    for model in store.models():
        state = store.peek(model)
        if state is None or state.phase not in ACTIVE or model not in cfg.models:
            continue
        try:
            if start(cfg, model, admin_key):
                say(f"Keel: resuming the rollout of {model} to {state.to_version} ({state.phase})")
                resumed.append(model)
        except Exception as e:  # noqa: BLE001 - the stack serves; the rollout waits for `keel rollout start`
            say(f"Keel: could not resume the rollout of {model}: {e}")
    return resumed
