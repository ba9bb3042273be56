"""The policy schema: tenants and their keys, quotas, guardrails, experiments, audit, SLOs,
anomalies. It is the part of the stack YAML `keel apply` changes live (it reaches the gateways as
Ray Serve `user_config`; engines are not restarted).

Every policy model is defined here except those bound to a registry or owned by ops, which this
module imports (each of them imports only serving.schema and its own package's leaf modules, so
the schema has no import cycle): guardrail rules and RULE_TYPES (serving.policy.guardrails.config),
quota backends and BACKENDS (serving.policy.quotas.config) with the limits they enforce
(QuotaLimits, serving.policy.quotas.gcra), SLOs and anomaly detection (serving.ops.slo_config,
serving.ops.anomaly_config).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from serving.ops.anomaly_config import AnomalyConfig
from serving.ops.slo_config import SloConfig, check_slos
from serving.policy.audit import key_inside
from serving.policy.guardrails import GuardrailPolicy
from serving.policy.identity import check_digest
from serving.policy.quotas import QuotaBackendConfig, QuotaLimits
from serving.schema import Strict as _Strict

ALL_MODELS = "*"
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")


class KeyConfig(_Strict):
    id: str = Field(description="Key id: what audit records, logs and metrics show (never the key).")
    digest: str = Field(description="sha256:<hex> of the key, as `keel keys create` prints it.")
    role: Literal["app", "admin"] = Field(
        "app",
        description="app: inference on the tenant's models. admin: also the admin API and "
        "forcing an experiment variant with the x-keel-variant header.",
    )
    quotas: QuotaLimits | None = Field(None, description="Limits for this key alone, on top of the tenant's.")

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        return check_digest(v)


class TenantConfig(_Strict):
    keys: list[KeyConfig] = Field(default_factory=list)
    models: list[str] = Field(
        default_factory=lambda: [ALL_MODELS],
        description="Public model names (models or experiments) this tenant may use; '*' = all.",
    )
    quotas: QuotaLimits = Field(default_factory=QuotaLimits)
    guardrails: str | None = Field(None, description="Name of a policy under guardrails:.")
    audit_content: bool = Field(False, description="Also record the (redacted) prompt and response in the audit log.")


class AuditConfig(_Strict):
    enabled: bool = True
    dir: str = Field(
        ".keel/audit",
        description="Directory of the hash-chained JSONL files "
        "(one per gateway process: audit-0.jsonl, audit-1.jsonl, ...).",
    )
    max_file_mb: int | None = Field(
        1024,
        gt=0,
        description="Rotate a file once it reaches this many MiB: it is renamed "
        "audit-<n>.<its first seq>.jsonl and a new audit-<n>.jsonl continues its chain. Keel never "
        "deletes rotated files. null: never rotate.",
    )
    hmac_key_file: str | None = Field(
        None,
        description="A key file (`keel audit keygen PATH`) outside `dir`: every record and "
        "head then carries an HMAC-SHA256, so nobody without the key can edit, add or cut records "
        "undetected (`keel audit verify --hmac-key-file`). It must exist on every gateway node. A "
        "changed key starts new chains in new files. null: hash chain only.",
    )

    @field_validator("hmac_key_file")
    @classmethod
    def _key_file_outside_the_log(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        # Gateway replicas run in Ray's working directory: the path goes to them absolute.
        v = str(Path(v).expanduser().absolute())
        if "dir" in info.data and key_inside(v, info.data["dir"]):
            raise ValueError(
                f"{v} is inside the audit dir {info.data['dir']}; whoever can write the logs "
                "could read or replace the key there, so keep it elsewhere (e.g. /etc/keel/audit.key)"
            )
        return v


class ShadowConfig(_Strict):
    """Mirror a share of an experiment's requests to one more model; its answers are discarded."""

    variant: str
    percent: float  # 0 < percent <= 100: share of requests mirrored to `variant`

    @field_validator("variant")
    @classmethod
    def _variant_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("shadow variant must name a configured model")
        return value

    @field_validator("percent")
    @classmethod
    def _percent_in_range(cls, value: float) -> float:
        if not (0 < value <= 100):
            raise ValueError(f"shadow percent must be > 0 and <= 100, got {value}")
        return value


class Experiment(_Strict):
    """One public model name split across weighted variants, each a configured model name."""

    variants: dict[str, float]  # model (deployment) name -> weight >= 0
    shadow: ShadowConfig | None = None
    user_header: str = "x-keel-user"  # fallback header for the end-user id when the body has no `user`

    @field_validator("variants")
    @classmethod
    def _weights_usable(cls, variants: dict[str, float]) -> dict[str, float]:
        if not variants:
            raise ValueError("give at least one variant: {model name: weight}")
        for name, weight in variants.items():
            if not name.strip():
                raise ValueError("variant names must be configured model names, got an empty name")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(
                    f"variant {name!r} has weight {weight}; weights must be finite and >= 0 "
                    "(0 drains a variant: it gets no new users)"
                )
        if not any(weight > 0 for weight in variants.values()):
            raise ValueError("at least one variant needs a weight > 0, or nobody can be routed")
        return variants

    @field_validator("user_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        # Header names are matched lower-cased, as the gateway stores them.
        name = value.strip().lower()
        if not _HEADER_NAME.match(name):
            raise ValueError(f"user_header {value!r} is not a valid HTTP header name")
        return name

    @model_validator(mode="after")
    def _shadow_is_not_the_live_model(self):
        if self.shadow is None:
            return self
        live = [name for name, weight in self.variants.items() if weight > 0]
        if live == [self.shadow.variant]:
            raise ValueError(
                f"shadow.variant {self.shadow.variant!r} is the only variant with weight > 0, so "
                "every mirrored request would go to the model that already served it; shadow a "
                "different model"
            )
        return self


class PolicyConfig(_Strict):
    """Everything the gateway decides per request. No tenants: every request is accepted without a key."""

    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    quotas: QuotaBackendConfig = Field(default_factory=QuotaBackendConfig)
    guardrails: dict[str, GuardrailPolicy] = Field(
        default_factory=dict, description="Named guardrail policies; tenants pick one by name."
    )
    experiments: dict[str, Experiment] = Field(
        default_factory=dict, description="Public model name -> weighted variants (configured models)."
    )
    audit: AuditConfig = Field(default_factory=AuditConfig)
    slos: dict[str, SloConfig] = Field(
        default_factory=dict,
        description="Named service-level objectives; the gateways count good and "
        "bad events for each (`keel slo rules` makes the Prometheus rules).",
    )
    anomalies: AnomalyConfig = Field(
        default_factory=AnomalyConfig, description="Online anomaly detection per tenant and model."
    )


POLICY_KEYS = tuple(PolicyConfig.model_fields)


def check_policy_refs(policy: PolicyConfig, models: list[str]) -> list[str]:
    """Cross-references a schema cannot check; each problem as 'key.path: message'."""
    problems = []
    public = set(models) | set(policy.experiments)
    for name, exp in policy.experiments.items():
        if name in models:
            problems.append(
                f"experiments.{name}: `{name}` is already a model name; give the experiment its own public name"
            )
        for v in exp.variants:
            if v not in models:
                problems.append(f"experiments.{name}.variants.{v}: no such model; configured: {', '.join(models)}")
        if exp.shadow is not None and exp.shadow.variant not in models:
            problems.append(
                f"experiments.{name}.shadow.variant: no such model `{exp.shadow.variant}`; "
                f"configured: {', '.join(models)}"
            )
    seen: dict[str, str] = {}
    for tname, t in policy.tenants.items():
        for m in t.models:
            if m != ALL_MODELS and m not in public:
                problems.append(
                    f"tenants.{tname}.models: no model or experiment `{m}`; available: {', '.join(sorted(public))}"
                )
        if t.guardrails is not None and t.guardrails not in policy.guardrails:
            problems.append(
                f"tenants.{tname}.guardrails: no guardrail policy `{t.guardrails}`; "
                f"defined: {', '.join(policy.guardrails) or 'none'}"
            )
        for i, k in enumerate(t.keys):
            where = f"tenants.{tname}.keys.{i}"
            if k.digest in seen:
                problems.append(f"{where}.digest: the same key is also registered as {seen[k.digest]}")
            seen[k.digest] = f"tenants.{tname} key {k.id}"
        ids = [k.id for k in t.keys]
        for dup in sorted({i for i in ids if ids.count(i) > 1}):
            problems.append(f"tenants.{tname}.keys: key id `{dup}` is used twice")
    return problems + check_slos(policy.slos, public, set(policy.tenants))
