"""Cost settings: what a replica-hour of each model costs, and how that cost is split among tenants.

`costs:` is read by `keel cost` only: not policy, not server (a change restarts nothing).

    costs:
      hardware: {demo: cpu-2core}        # model (or rollout candidate) -> profile in hardware_file
      default_hardware: cpu-2core        # models not listed
      token_weights: {prompt: 0.25, completion: 1.0}
      idle: unallocated                  # or: spread
      budgets: {acme: 500.0}             # per tenant, per 30 days, in the profiles' currency
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from serving.schema import Strict

MAX_BUDGET = 1e12  # any real monthly budget is far below; keeps sums finite


class TokenWeights(Strict):
    """How much a prompt token and a completion token count when a model's cost is split: a
    completion token takes a decode step, a prompt token a share of one prefill."""

    prompt: float = Field(0.25, ge=0, le=100, description="Weight of one prompt token.")
    completion: float = Field(1.0, ge=0, le=100, description="Weight of one completion token.")

    @field_validator("completion")
    @classmethod
    def _not_both_zero(cls, v: float, info) -> float:
        if v == 0 and info.data.get("prompt", 1) == 0:
            raise ValueError("prompt and completion weights cannot both be 0 (nothing to split by)")
        return v


class CostConfig(Strict):
    """Prices per replica-hour (hardware profiles, as `keel bench` uses) and their allocation."""

    hardware_file: str | None = Field(
        None,
        max_length=4096,
        description="Hardware profiles file (name -> price_per_replica_hour, "
        "currency); default configs/bench/hardware.yaml, the one `keel bench` prices with.",
    )
    hardware: dict[str, str] = Field(
        default_factory=dict,
        max_length=1000,
        description="Model (deployment name: a model, or a rollout candidate) -> hardware profile its replicas run on.",
    )
    default_hardware: str | None = Field(
        None,
        max_length=200,
        description="Profile of models not under `hardware`; null: such models "
        "get no cost (their tokens are still reported, with a note).",
    )
    token_weights: TokenWeights = Field(default_factory=TokenWeights)
    idle: Literal["unallocated", "spread"] = Field(
        "unallocated",
        description="Replica time in an hour when a model served no tokens: "
        "unallocated lists it on its own line per model; spread shares it among the tenants by "
        "their share of that model's weighted tokens over the whole period.",
    )
    budgets: dict[str, float] = Field(
        default_factory=dict,
        max_length=10_000,
        description="Tenant -> budget per 30 days (profile "
        "currency); `keel cost forecast` flags a tenant whose forecast passes it.",
    )

    @field_validator("budgets")
    @classmethod
    def _budgets_positive(cls, budgets: dict[str, float]) -> dict[str, float]:
        for tenant, amount in budgets.items():
            if not 0 < amount <= MAX_BUDGET:
                raise ValueError(f"budgets.{tenant}: {amount} must be > 0 and <= {MAX_BUDGET:g}")
        return budgets
