"""What a config asks Ray Serve to run, and what changing it does: the plan `keel apply` prints.

The stack is one Serve application for the front (`keel`: endpoint registry + gateways) and one
per model (`keel-model-<name>`: its engine replicas). Per model, the application's `args` are
what a change of must restart its engines (weights, engine arguments, env, resources); they make
Serve's code version, so a change there rebuilds that application alone and Serve replaces its
replicas, surge-first (`max_surge_percent`). Everything else about a model (replicas,
autoscaling, health checks, the drain timeout) is a deployment override in the same schema,
which Serve applies to running replicas. The models the gateways know and the policy are the
gateway deployment's `user_config`: a change is a `reconfigure`, no restart. Only `server:`
changes rebuild the front application, which restarts the gateways.

Plain data in, plain data out: `desired(cfg)` and `from_serve(details)` give a StackState,
`make_plan(current, new)` says per model what changes, `schema(state)` is what Serve gets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from serving.autoscaling.ray_policy import ray_autoscaling_config
from serving.autoscaling.settings import AutoscalingConfig

CONTROL_APP = "keel"
MODEL_APP_PREFIX = "keel-model-"
CONTROL_IMPORT = "serving.app:control_builder"
MODEL_IMPORT = "serving.app:model_builder"
# A stopping replica's budget beyond its drain: vLLM's own shutdown, then SIGKILL of what is left
# (serving.engine.replica STOP_GRACE_S + KILL_WAIT_S), and Serve's own bookkeeping.
STOP_BUDGET_S = 30.0
# After a submit, Serve's controller takes the new config up within a few loops (0.5 s each,
# serving.launcher sets it); until then its statuses are the old config's.
SERVE_PICKUP_S = 2.0

UNCHANGED, SCALED, ADDED, REMOVED, REPLACED = "unchanged", "scaled", "added", "removed", "replaced"


def engine_deployment_name(model: str) -> str:
    return f"engine-{model}"


@dataclass(frozen=True)
class ModelState:
    """One model as Serve runs it: `args` (a change restarts its engines) and `overrides` (a
    change applies to running replicas)."""

    args: dict
    overrides: dict

    @property
    def replicas(self) -> tuple[int, int]:
        a = self.overrides.get("autoscaling_config") or {}
        return a.get("min_replicas", 1), a.get("max_replicas", 1)

    @property
    def max_surge_percent(self) -> int:
        return self.overrides.get("max_surge_percent", 0)


@dataclass(frozen=True)
class StackState:
    server: dict  # the front application's args: a change restarts the gateways
    gateway: dict  # the gateway's user_config: {"policy": ..., "models": {name: {...}}}
    models: dict[str, ModelState] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# From a config, to Serve, from Serve


def desired(cfg) -> StackState:
    """The state a config asks for (cfg: serving.config.KeelConfig)."""
    from serving.config import models_dir
    from serving.model_registry.resolve import resolve_weights

    models, gateway_models = {}, {}
    for name, mc in cfg.models.items():
        resolved = resolve_weights(cfg, mc.weights)
        weights = resolved.path
        d = mc.deployment
        actor = {"num_cpus": d.num_cpus}
        if d.num_gpus:
            actor["num_gpus"] = d.num_gpus
        if d.resources:
            actor["resources"] = dict(d.resources)
        engine = mc.model_dump(mode="json")["engine"]
        # NAME@VERSION (immutable), so registering a newer version `weights: NAME` means is a
        # replacement the plan names, as is a plain manifest moved to another path.
        args = {
            "model": name,
            "weights": resolved.identity,
            "weights_path": str(weights),
            "engine": engine,
            "env": dict(mc.env),
            "engine_host": cfg.server.engine_host,
            "startup_timeout_s": d.startup_timeout_s,
            "ray_actor_options": actor,
        }
        models[name] = ModelState(args, model_overrides(name, d))
        # The policy's settings travel with the gateways' config, which publish them
        # (serving.autoscaling.published): in the engine deployment they would restart it.
        gateway_models[name] = {
            "weights_path": str(weights),
            "max_model_len": mc.engine.get("max_model_len"),
            "autoscaling": scale_settings(d).model_dump(mode="json", exclude_none=True),
        }
        if d.autoscaling is not None and d.autoscaling.min_replicas == 0:
            # Scale to zero: the gateways hold its requests while a replica starts (a reconfigure).
            gateway_models[name]["hold"] = {
                "timeout_s": d.autoscaling.hold_timeout,
                "max_requests": d.autoscaling.hold_max,
            }
    gateway = {"policy": cfg.policy_dict(), "models": gateway_models}
    if cfg.models_dir:  # else the gateways' own default ($KEEL_MODELS_DIR, the checkout's models/),
        # as on the machine that renders the state: a KubeRay manifest must not carry this one's path
        gateway["models_dir"] = str(models_dir(cfg))
    return StackState(server=cfg.server.model_dump(mode="json"), gateway=gateway, models=models)


def scale_settings(d) -> AutoscalingConfig:
    """A model's autoscaling settings (d: its DeploymentConfig); a fixed count is bounds equal."""
    if d.autoscaling is not None:
        return d.autoscaling
    n = d.num_replicas or 1
    return AutoscalingConfig(min_replicas=n, max_replicas=n, initial_replicas=n)


def model_overrides(name: str, d) -> dict:
    """The deployment options of a model that Serve applies to running replicas (d: its
    DeploymentConfig). A fixed count is autoscaling between equal bounds, so every engine
    deployment always has Keel's policy (Ray's default counts only requests Ray routed)."""
    return {
        "name": engine_deployment_name(name),
        "autoscaling_config": ray_autoscaling_config(name, scale_settings(d)),
        "max_surge_percent": d.max_surge_percent,
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "graceful_shutdown_timeout_s": d.drain_timeout_s + STOP_BUDGET_S,
        "user_config": {"drain_timeout_s": d.drain_timeout_s},
    }


def schema(state: StackState) -> dict:
    """The Serve deploy schema (`serve deploy` format) of a state: every application."""
    apps = [
        {
            "name": CONTROL_APP,
            "import_path": CONTROL_IMPORT,
            "route_prefix": None,
            "args": {"server": state.server},
            "deployments": [{"name": "gateway", "user_config": state.gateway}],
        }
    ]
    for name, m in state.models.items():
        apps.append(
            {
                "name": MODEL_APP_PREFIX + name,
                "import_path": MODEL_IMPORT,
                "route_prefix": None,
                "args": m.args,
                "deployments": [m.overrides],
            }
        )
    return {"proxy_location": "Disabled", "applications": apps}


def from_serve(details: dict) -> StackState | None:
    """The state Serve was last given (its `get_serve_details()`); None: no Keel stack."""
    apps = details.get("applications") or {}
    control = (apps.get(CONTROL_APP) or {}).get("deployed_app_config")
    if not control:
        return None
    if "server" not in (control.get("args") or {}):
        raise ValueError(
            "the running stack was deployed by an older Keel (one application); "
            "restart `keel serve` once to move it to one application per model"
        )
    gateway = next(
        (d.get("user_config") or {} for d in control.get("deployments") or [] if d.get("name") == "gateway"), {}
    )
    models = {}
    for app_name, app in apps.items():
        conf = (app or {}).get("deployed_app_config")
        if not app_name.startswith(MODEL_APP_PREFIX) or not conf:
            continue
        args = conf.get("args") or {}
        overrides: dict[str, Any] = next(iter(conf.get("deployments") or []), {})
        models[args.get("model", app_name[len(MODEL_APP_PREFIX) :])] = ModelState(args, overrides)
    return StackState(server=control["args"]["server"], gateway=gateway, models=models)


# ---------------------------------------------------------------------------------------------
# A rollout in progress (serving.rollout): a candidate application beside the model's, and the
# gateways' split of the model's users between them


CANDIDATE_SUFFIX = "@candidate"


def candidate_name(model: str) -> str:
    """The internal name a model's rollout candidate is served under: never a public name."""
    return model + CANDIDATE_SUFFIX


def candidate_state(base: ModelState, model: str, weights: str, weights_path: str) -> ModelState:
    """The candidate of `model`: its running engine arguments, env and scale, other weights."""
    name = candidate_name(model)
    return ModelState(
        {**base.args, "model": name, "weights": weights, "weights_path": weights_path},
        {**base.overrides, "name": engine_deployment_name(name)},
    )


def with_rollout(state: StackState, model: str, candidate: ModelState, percent: float) -> StackState:
    """`state` with the candidate deployed and getting `percent` of the model's users."""
    name = candidate.args["model"]
    base = state.gateway.get("models", {}).get(model) or {}
    split = {
        "candidate": name,
        "percent": percent,
        "weights_path": candidate.args.get("weights_path"),
        "max_model_len": base.get("max_model_len"),
    }
    gateway = {**state.gateway, "rollouts": {**(state.gateway.get("rollouts") or {}), model: split}}
    return StackState(state.server, gateway, {**state.models, name: candidate})


def without_rollout(state: StackState, model: str) -> StackState:
    """`state` with the model's candidate and split gone (its replicas drain)."""
    rollouts = {m: s for m, s in (state.gateway.get("rollouts") or {}).items() if m != model}
    gateway = {k: v for k, v in state.gateway.items() if k != "rollouts"}
    if rollouts:
        gateway["rollouts"] = rollouts
    name = candidate_name(model)
    return StackState(state.server, gateway, {m: v for m, v in state.models.items() if m != name})


def promoted(state: StackState, model: str) -> StackState:
    """The model's own application given the candidate's weights (a replacement, surge-first),
    the split and the candidate left as they are: the caller removes them once it is ready."""
    cand = state.models[candidate_name(model)]
    base = state.models[model]
    args = {**base.args, "weights": cand.args["weights"], "weights_path": cand.args["weights_path"]}
    gateway_models = {**state.gateway.get("models", {})}
    gateway_models[model] = {**gateway_models.get(model, {}), "weights_path": cand.args["weights_path"]}
    return StackState(
        state.server,
        {**state.gateway, "models": gateway_models},
        {**state.models, model: ModelState(args, base.overrides)},
    )


def keep_rollouts(current: StackState, new: StackState) -> StackState:
    """`new` (a config's state) with the rollouts running in `current` kept: `keel apply` leaves
    a candidate and its split alone, unless the config removes the model itself."""
    out = new
    for model, split in (current.gateway.get("rollouts") or {}).items():
        cand = current.models.get(split.get("candidate"))
        if model in new.models and cand is not None:
            out = with_rollout(out, model, cand, split.get("percent", 0))
    return out


def status_value(status) -> str:
    """Serve reports statuses as enums or strings, by version and by path."""
    return getattr(status, "value", status) or ""


def deploy_failures(apps: dict) -> list[str]:
    """`name: error` per application Serve gave up deploying (apps: get_serve_details()'s)."""
    out = []
    for name, app in apps.items():
        if status_value(app.get("status")) == "DEPLOY_FAILED":
            msg = app.get("message") or "deploy failed"
            for d in (app.get("deployments") or {}).values():
                if status_value(d.get("status")) in ("DEPLOY_FAILED", "UNHEALTHY"):
                    msg = d.get("message") or msg
            lines = [ln for ln in msg.splitlines() if ln.strip()]  # Serve's last line is the error
            out.append(f"{name}: {lines[-1] if lines else msg}")
    return out


def unsettled(apps: dict, gone=frozenset()) -> list[str]:
    """What is not yet running as deployed: an application not RUNNING (one still building has
    no deployments yet), a deployment not HEALTHY, a `gone` application not deleted yet."""
    waiting = []
    for name, app in apps.items():
        unhealthy = [
            f"{d_name} {status_value(d.get('status'))} "
            f"({', '.join(status_value(r.get('state')) for r in d.get('replicas') or [])})"
            for d_name, d in (app.get("deployments") or {}).items()
            if status_value(d.get("status")) != "HEALTHY"
        ]
        if name in gone:
            waiting.append(f"{name} draining")
        elif status_value(app.get("status")) != "RUNNING" or unhealthy:
            waiting.append(
                f"{name} {status_value(app.get('status'))}" + (f": {', '.join(unhealthy)}" if unhealthy else "")
            )
    return waiting


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class ModelChange:
    model: str
    kind: str  # UNCHANGED, SCALED, ADDED, REMOVED or REPLACED
    changes: tuple[str, ...] = ()  # "engine.max_model_len: 512 -> 256", one per changed key
    note: str = ""  # what it costs: surge capacity, a capacity dip, a drain


@dataclass(frozen=True)
class Plan:
    models: tuple[ModelChange, ...]
    gateway: tuple[str, ...]  # what the gateways learn live: policy, model list
    restart: tuple[str, ...]  # server keys that changed: the gateways restart (`--restart`)

    @property
    def changes_models(self) -> bool:
        return any(m.kind != UNCHANGED for m in self.models)

    @property
    def empty(self) -> bool:
        return not (self.changes_models or self.gateway or self.restart)


def make_plan(current: StackState, new: StackState) -> Plan:
    changes = []
    old_gw, new_gw = current.gateway.get("models") or {}, new.gateway.get("models") or {}
    for name in sorted(set(current.models) | set(new.models)):
        old, now = current.models.get(name), new.models.get(name)
        old_s, new_s = (old_gw.get(name) or {}).get("autoscaling"), (new_gw.get(name) or {}).get("autoscaling")
        if old is None:
            assert now is not None  # the name is in one of the two
            lo, hi = now.replicas
            changes.append(ModelChange(name, ADDED, note=f"{_count(lo, hi)} started; no other engine restarts"))
        elif now is None:
            changes.append(
                ModelChange(
                    name,
                    REMOVED,
                    note="leaves the gateways, then its replicas drain "
                    f"(up to {old.overrides.get('user_config', {}).get('drain_timeout_s')} s) and stop",
                )
            )
        elif old.args != now.args:
            changes.append(
                ModelChange(name, REPLACED, _diff(old.args, now.args, skip={"weights_path"}), _replace_note(now))
            )
        elif old.overrides != now.overrides or old_s != new_s:
            changes.append(
                ModelChange(
                    name,
                    SCALED,
                    _diff(_readable(old.overrides, old_s), _readable(now.overrides, new_s)),
                    "applied to running replicas; no engine restarts",
                )
            )
        else:
            changes.append(ModelChange(name, UNCHANGED))
    gateway = []
    old_policy, new_policy = current.gateway.get("policy") or {}, new.gateway.get("policy") or {}
    if old_policy != new_policy:  # which sections, not their values: they hold key digests
        keys = sorted(k for k in set(old_policy) | set(new_policy) if old_policy.get(k) != new_policy.get(k))
        gateway.append(f"policy: {', '.join(keys)} changed")

    def routed(models: dict) -> dict:
        return {n: {k: v for k, v in m.items() if k != "autoscaling"} for n, m in models.items()}

    if routed(old_gw) != routed(new_gw):
        gateway.append("models the gateways route to: " + ", ".join(new_gw))
    published = [n for n in new_gw if n in old_gw and old_gw[n].get("autoscaling") != new_gw[n].get("autoscaling")]
    if published:
        gateway.append("autoscaling settings the gateways publish: " + ", ".join(published))
    if current.gateway.get("models_dir") != new.gateway.get("models_dir"):
        gateway.append(f"models_dir (where the admin API registers): {new.gateway.get('models_dir')}")
    restart = tuple(f"server.{c}" for c in _diff(current.server, new.server))
    return Plan(tuple(changes), tuple(gateway), restart)


def _count(lo: int, hi: int) -> str:
    return f"{lo} replica{'s' * (lo != 1)}" + (f" (autoscaling to {hi})" if hi != lo else "")


def _replace_note(m: ModelState) -> str:
    lo, _ = m.replicas
    surge = m.max_surge_percent
    if surge <= 0:
        return (
            f"its replicas are replaced one at a time, each stopped before its replacement is "
            f"ready: capacity dips by 1 of {lo} (max_surge_percent: 0)"
        )
    extra = -(-surge * lo // 100)
    starts = "1 new replica starts and is" if extra == 1 else f"{extra} new replicas start and are"
    return f"surge-first: {starts} ready before old ones drain (needs room for {extra} more); other models untouched"


def _readable(overrides: dict, settings: dict | None) -> dict:
    """Overrides as a config reads them: the autoscaling settings as written (what the gateways
    publish), not Ray's rendering; a fixed count, not its equal bounds."""
    out = {k: v for k, v in overrides.items() if k not in ("name", "autoscaling_config", "user_config")}
    ray_scale = overrides.get("autoscaling_config") or {}
    scale = settings
    if not scale:  # deployed by a Keel from before the gateways published the settings
        scale = {k: v for k, v in ray_scale.items() if k != "policy"}
    if scale.get("min_replicas") == scale.get("max_replicas") == scale.get("initial_replicas"):
        out["num_replicas"] = scale.get("min_replicas")
    else:
        out["autoscaling"] = scale
    out.update(overrides.get("user_config") or {})
    return out


def _diff(old, new, prefix: str = "", skip=frozenset(), depth: int = 8) -> tuple[str, ...]:
    """One line per key path whose value differs: `path: old -> new`."""
    if isinstance(old, dict) and isinstance(new, dict) and depth > 0:
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if k in skip:
                continue
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{path}: (unset) -> {_show(new[k])}")
            elif k not in new:
                out.append(f"{path}: {_show(old[k])} -> (unset)")
            elif old[k] != new[k]:
                out.extend(_diff(old[k], new[k], path, depth=depth - 1))
        return tuple(out)
    return (f"{prefix}: {_show(old)} -> {_show(new)}",) if old != new else ()


def _show(v) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def render(plan: Plan) -> str:
    """The plan as `keel apply --dry-run` prints it."""
    lines = []
    width = max((len(m.model) for m in plan.models), default=5)
    for m in plan.models:
        lines.append(f"  {m.model:<{width}}  {m.kind}" + (f": {m.note}" if m.note else ""))
        lines.extend(f"  {'':<{width}}    {c}" for c in m.changes)
    for g in plan.gateway:
        lines.append(f"  gateways: {g} (live, no restart)")
    for r in plan.restart:
        lines.append(f"  restart: {r} (the gateways restart; needs --restart)")
    return "\n".join(lines) if lines else "  nothing to change"
