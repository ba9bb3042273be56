"""The stack config: one YAML file, validated by pydantic models with extra="forbid".

Errors name the file, the key path and what is allowed (`ConfigError`). Engine arguments are
checked against vLLM's own argument parser (`serving.engine.args`), so a typo or a bad value
fails at start, not inside a replica half a minute later.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from serving.autoscaling.settings import AutoscalingConfig
from serving.gateway.limits import HttpLimits
from serving.ops.cost_config import CostConfig
from serving.policy.config import POLICY_KEYS, PolicyConfig, check_policy_refs
from serving.rollout.spec import RolloutsConfig
from serving.schema import Strict

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR_ENV = "KEEL_MODELS_DIR"


class ConfigError(ValueError):
    """A config file that cannot be used; str() is the message a user reads."""


class ServerConfig(Strict):
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    gateway_replicas: int = Field(1, ge=1, description="Gateway replicas per node; they share the port (SO_REUSEPORT).")
    engine_host: str = Field(
        "127.0.0.1",
        description="Address each engine replica's HTTP server binds to. Use 0.0.0.0 on a "
        "multi-node cluster; replicas then advertise their node IP to the gateway.",
    )
    gateway_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each gateway replica needs, e.g. {keel-gateway: 1} given "
        "only to the nodes a load balancer sends traffic to.",
    )
    limits: HttpLimits = Field(
        default_factory=HttpLimits,
        description="The front door's limits on what clients send: sizes, counts and times (413, 414, 431, 408, 503).",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="A second listener that serves /metrics (and /health) "
        "without a key, for Prometheus; on the API port /metrics needs an admin key when tenants "
        "are configured (its labels name tenants).",
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics listener binds to.")
    allow_unauthenticated: bool = Field(
        False,
        description="Serve without API keys on a non-loopback host. Without tenants, a gateway "
        "listening beyond loopback refuses to start unless this is true (e.g. behind a proxy that "
        "authenticates); give tenants keys instead (`keel keys create --tenant NAME`).",
    )
    upstream_connect_timeout_s: float = Field(5.0, gt=0)
    drain_timeout_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="A gateway that stops (Ctrl-C, a server change) stops accepting, "
        "then waits this long at most for the requests it is relaying to finish.",
    )

    @model_validator(mode="after")
    def _two_listeners(self):
        if self.metrics_port == self.port:
            raise ValueError(
                f"metrics_port must differ from port ({self.port}): the metrics listener is a second socket"
            )
        return self


class RayConfig(Strict):
    address: str | None = Field(None, description="Ray cluster to join (e.g. 'auto'); null starts a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="Logical CPUs for a local Ray.")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for a local Ray.")


class DeploymentConfig(Strict):
    """Ray Serve options for the deployment that serves one model."""

    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count.")
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(1, ge=0, description="Ray CPUs reserved per replica.")
    num_gpus: float = Field(0, ge=0, description="Ray GPUs per replica (tensor_parallel_size).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources.")
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    startup_timeout_s: float = Field(600.0, gt=0, description="How long a replica may take to load weights and answer.")
    drain_timeout_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="A replica that stops (scale-down, replacement, removal, Ctrl-C) "
        "leaves the registry first, then waits this long at most for the requests it is answering "
        "to finish before its engine stops. Changing it restarts nothing.",
    )
    max_surge_percent: int = Field(
        100,
        ge=0,
        le=100,
        description="Replacing replicas (changed engine arguments, weights, env "
        "or resources): new replicas, as a percentage of the replica count, started and ready "
        "before old ones drain (Ray Serve's max_surge_percent). 100: capacity never drops; 0: one "
        "at a time, stopped before its replacement starts, for clusters with no spare GPUs.",
    )

    @model_validator(mode="after")
    def _one_of(self):
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give either num_replicas or autoscaling, not both")
        return self


class ModelConfig(Strict):
    weights: str = Field(
        description="Registered weights: NAME@VERSION (`keel models register`), NAME "
        "(its newest version not retired), or a plain manifest models/NAME/manifest.yaml."
    )
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments (the `vllm serve` flags, snake_case), validated by vLLM.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment for the engine process (e.g. VLLM_CPU_KVCACHE_SPACE)."
    )
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)

    @field_validator("engine")
    @classmethod
    def _engine_keys_owned_by_keel(cls, engine: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(engine) & ENGINE_ARGS_SET_BY_KEEL)
        if owned:
            raise ValueError(
                f"{', '.join(owned)} is set by Keel (weights come from the manifest, the "
                "served name is the key under models:, host/port are per replica)"
            )
        return engine


# Engine flags Keel derives itself; a config that sets them is rejected.
ENGINE_ARGS_SET_BY_KEEL = {"model", "served_model_name", "host", "port", "tokenizer"}


class KeelConfig(PolicyConfig):
    """The whole file: the stack (server, ray, models) plus the policy keys of PolicyConfig."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    models: dict[str, ModelConfig] = Field(description="Public model name -> how it is served.")
    models_dir: str | None = Field(
        None,
        description="Directory of model manifests; default: $KEEL_MODELS_DIR (the GPU image "
        "sets /app/models), else the checkout's models/ (an editable install).",
    )
    rollouts: RolloutsConfig = Field(
        default_factory=RolloutsConfig,
        description="`keel rollout`: where rollout state lives and the "
        "default steps, hold and gates. Read by the rollout command only: not policy (the gateways "
        "never read it) nor server (a change restarts nothing).",
    )

    costs: CostConfig = Field(
        default_factory=CostConfig,
        description="`keel cost`: prices per replica-hour and how cost is "
        "allocated to tenants. Read by the cost commands only (a change restarts nothing).",
    )

    @field_validator("models")
    @classmethod
    def _at_least_one(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        if not models:
            raise ValueError("configure at least one model")
        for name in models:
            if not name or any(c.isspace() for c in name):
                raise ValueError(f"model name {name!r} must be non-empty with no whitespace")
        return models

    def policy_dict(self) -> dict:
        """The part `keel apply` changes live, as the gateway's user_config. Only what the file
        set: defaults stay implicit, so the dict validates again as it was written."""
        return self.model_dump(mode="json", include=set(POLICY_KEYS), exclude_unset=True)


class ModelManifest(Strict):
    """models/NAME/manifest.yaml: a registered set of weights."""

    name: str
    description: str = ""
    format: Literal["huggingface"] = "huggingface"
    path: str = Field(description="Weights directory; relative paths are relative to the manifest.")
    builder: Literal["demo"] | None = Field(
        None, description="How Keel makes the weights when they are missing (demo: the tiny Llama)."
    )
    corpus: str | None = Field(None, description="Tokenizer training text for the demo builder.")

    def resolved_path(self, manifest_dir: Path) -> Path:
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else (manifest_dir / p).resolve()


# ---------------------------------------------------------------------------------------------
# Loading


def read_yaml(path: str | Path) -> Any:
    """A YAML file's document; ConfigError naming the file when it is missing or not YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def load_config(path: str | Path, *, check_engine_args: bool = True) -> KeelConfig:
    return parse_config(read_yaml(path), source=str(path), check_engine_args=check_engine_args)


def parse_config(raw: Any, *, source: str = "<config>", check_engine_args: bool = True) -> KeelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with at least `models:`")
    try:
        cfg = KeelConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, KeelConfig)) from None
    problems = [f"{source}: {p}" for p in check_policy_refs(cfg, list(cfg.models))]
    exposed = open_beyond_loopback(cfg)
    if exposed:
        problems.append(f"{source}: {exposed}")
    # Gateway replicas run in Ray's working directory: the audit dir goes to them absolute.
    cfg.audit = cfg.audit.model_copy(update={"dir": str(Path(cfg.audit.dir).resolve())})
    cfg.audit.model_fields_set.add("dir")
    for name, model in cfg.models.items():
        try:
            load_manifest(cfg, model.weights)
        except ConfigError as e:
            problems.append(f"{source}: models.{name}.weights: {e}")
    if check_engine_args:
        from serving.engine.args import EngineArgsError, validate_engine_args

        for name, model in cfg.models.items():
            try:
                validate_engine_args(model.engine)
            except EngineArgsError as e:
                problems.append(f"{source}: models.{name}.engine{('.' + e.key) if e.key else ''}: {e.message}")
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def open_beyond_loopback(cfg: KeelConfig) -> str | None:
    """Secure by default: a gateway reachable from other machines with no keys at all is refused,
    unless the config says so. The message says how to make a key."""
    s = cfg.server
    if cfg.tenants or s.allow_unauthenticated or is_loopback(s.host):
        return None
    return (
        f"server.host: {s.host} is reachable beyond this machine and no tenants are configured, so "
        "anyone who reaches the port could use every model. Add a tenant with a key: `keel keys "
        "create --tenant NAME` prints a new key once and the `digest: sha256:...` line to paste "
        "under tenants.NAME.keys (`keel keys digest` makes the digest of a key you have). Or, to "
        "serve without keys (e.g. behind a proxy that authenticates), set "
        "server.allow_unauthenticated: true."
    )


def default_models_dir() -> Path:
    """$KEEL_MODELS_DIR, else the checkout's models/. A package installed from a wheel lives in
    site-packages, where REPO_ROOT/models does not exist: the image sets the variable."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).resolve() if env else REPO_ROOT / "models"


def models_dir(cfg: KeelConfig) -> Path:
    base = Path(cfg.models_dir).resolve() if cfg.models_dir else default_models_dir()
    if not base.is_dir():
        where = "models_dir in the config" if cfg.models_dir else f"${MODELS_DIR_ENV} (or models_dir in the config)"
        raise ConfigError(
            f"the models directory {base} does not exist: set {where} to the directory that holds NAME/manifest.yaml"
        )
    return base


def load_manifest(cfg: KeelConfig, name: str) -> tuple[ModelManifest, Path]:
    """The manifest that `weights: NAME` or `NAME@VERSION` names, and the weights directory."""
    # Imported here: the registry reads this module's ModelManifest and ConfigError.
    from serving.model_registry.resolve import resolve_weights

    resolved = resolve_weights(cfg, name)
    return resolved.manifest, resolved.path


def config_json_schema() -> dict:
    schema = KeelConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Keel stack config"
    return schema


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, e["loc"][:-1])
            msg = "unknown key"
            if allowed:
                close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
                msg += f"; did you mean {close[0]!r}?" if close else ""
                msg += f" Allowed: {', '.join(allowed)}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and e["type"] not in ("dict_type", "model_type"):
            msg += f" (got {json.dumps(e['input'], default=str)})"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def _allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the pydantic model found at loc (walks dict values by key)."""
    model: Any = root
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = model.model_fields.get(str(part))
        if field is None:  # a dict key such as a model name
            continue
        model = _inner_model(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(model.model_fields)
    return []


def _inner_model(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None
