"""Cost per tenant: replica-time priced per hardware profile, split by each tenant's tokens.

For each model and each hour: cost = replica-hours x the profile's price per replica-hour; the
tenants that used the model in that hour share it by their weighted tokens (prompt x
token_weights.prompt + completion x token_weights.completion). An hour with replicas and no
tokens is idle: listed per model as unallocated, or with `costs.idle: spread`, shared among the
model's tenants by their weighted tokens over the whole period. Plain Python over plain data:
serving.ops.usage reads the audit log, serving.ops.replica_time integrates replica counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from serving.ops.cost_config import CostConfig
from serving.ops.replica_time import ReplicaTime, integrate
from serving.ops.usage import Usage

UNALLOCATED = "(unallocated)"


@dataclass(frozen=True)
class Price:
    profile: str
    per_replica_hour: float
    currency: str


def load_prices(costs: CostConfig, models: set[str], base: Path | None = None) -> tuple[dict[str, Price], list[str]]:
    """The price of each model that has a profile, and notes for those that have none. A profile
    named but missing from the file, or two currencies, is a ConfigError naming the key."""
    from pydantic import ValidationError

    from serving.bench.spec import DEFAULT_HARDWARE_FILE, HardwareProfile  # serving.config imports us
    from serving.config import ConfigError, format_validation_error, read_yaml

    path = Path(costs.hardware_file) if costs.hardware_file else DEFAULT_HARDWARE_FILE
    if base is not None and not path.is_absolute() and costs.hardware_file:
        path = base / path
    profiles = read_yaml(path)
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: expected a mapping of hardware profile names")
    prices: dict[str, Price] = {}
    notes = []
    for model in sorted(models):
        name = costs.hardware.get(model, costs.default_hardware)
        key = f"costs.hardware.{model}" if model in costs.hardware else "costs.default_hardware"
        if name is None:
            notes.append(
                f"model {model}: no hardware profile (costs.hardware.{model} or "
                "costs.default_hardware): its replica time is not priced"
            )
            continue
        if name not in profiles:
            raise ConfigError(f"{key}: no hardware profile `{name}` in {path}; profiles: {', '.join(sorted(profiles))}")
        try:
            profile = HardwareProfile.model_validate(profiles[name])
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"{path} ({name})", HardwareProfile)) from None
        prices[model] = Price(name, profile.price_per_replica_hour, profile.currency)
    currencies = {p.currency for p in prices.values()}
    if len(currencies) > 1:
        raise ConfigError(
            f"costs: the models' profiles are priced in {', '.join(sorted(currencies))}; "
            "costs add up in one currency only"
        )
    return prices, notes


@dataclass
class Line:
    tenant: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost_per_million(self) -> float | None:
        return self.cost / self.tokens * 1e6 if self.tokens else None


@dataclass
class Allocation:
    """Cost per (tenant, model, hour) and idle cost per (model, hour); the report and the forecast
    sum these their own way."""

    cost: dict[tuple[str, str, int], float] = field(default_factory=dict)
    idle: dict[tuple[str, int], float] = field(default_factory=dict)
    replica_hours: dict[str, float] = field(default_factory=dict)
    prices: dict[str, Price] = field(default_factory=dict)
    unobserved_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def currency(self) -> str:
        return next(iter(self.prices.values())).currency if self.prices else ""


def allocate(
    usage: Usage, costs: CostConfig, prices: dict[str, Price], replicas: ReplicaTime | None = None
) -> Allocation:
    """Each model's hourly replica cost, split among that hour's tenants by weighted tokens."""
    if replicas is None:
        replicas = integrate(usage.replica_events, usage.since, usage.until)
    wp, wc = costs.token_weights.prompt, costs.token_weights.completion
    weights: dict[tuple[str, int], dict[str, float]] = {}  # (model, hour) -> tenant -> weighted tokens
    for (tenant, model, hour), (_, prompt, completion) in usage.tokens.items():
        per = weights.setdefault((model, hour), {})
        per[tenant] = per.get(tenant, 0.0) + wp * prompt + wc * completion
    out = Allocation(prices=prices, unobserved_s=replicas.unobserved_s)
    for model, hours in sorted(replicas.seconds.items()):
        out.replica_hours[model] = sum(hours.values()) / 3600
        price = prices.get(model)
        if price is None:
            continue
        for hour, seconds in hours.items():
            amount = seconds / 3600 * price.per_replica_hour
            tenants = weights.get((model, hour))
            total = sum(tenants.values()) if tenants else 0.0
            if tenants is None or total <= 0:
                out.idle[(model, hour)] = out.idle.get((model, hour), 0.0) + amount
                continue
            for tenant, w in tenants.items():
                key = (tenant, model, hour)
                out.cost[key] = out.cost.get(key, 0.0) + amount * w / total
    for model in sorted({m for (_, m, _) in usage.tokens} - set(replicas.seconds)):
        out.notes.append(
            f"model {model}: tokens but no replica records in the period (gateways older "
            "than the replica records, or audit files missing): its tokens cost 0 here"
        )
    if costs.idle == "spread":
        _spread_idle(out, weights)
    return out


def _spread_idle(out: Allocation, weights: dict[tuple[str, int], dict[str, float]]) -> None:
    """Move each model's idle cost to its tenants, by their weighted tokens over the period; the
    idle cost of a model nobody used stays unallocated. Charged to the idle hour itself."""
    share: dict[str, dict[str, float]] = {}
    for (model, _), per in weights.items():
        for tenant, w in per.items():
            share.setdefault(model, {})[tenant] = share.get(model, {}).get(tenant, 0.0) + w
    for (model, hour), amount in list(out.idle.items()):
        tenants = share.get(model)
        total = sum(tenants.values()) if tenants else 0.0
        if tenants is None or total <= 0:
            continue
        del out.idle[(model, hour)]
        for tenant, w in tenants.items():
            key = (tenant, model, hour)
            out.cost[key] = out.cost.get(key, 0.0) + amount * w / total


@dataclass
class CostReport:
    lines: list[Line]  # per tenant and model, tenants by cost
    idle: dict[str, float]  # model -> unallocated cost
    allocation: Allocation

    @property
    def total(self) -> Line:
        t = Line("total", "")
        for line in self.lines:
            t.requests += line.requests
            t.prompt_tokens += line.prompt_tokens
            t.completion_tokens += line.completion_tokens
            t.cost += line.cost
        t.cost += sum(self.idle.values())
        return t


def report(usage: Usage, alloc: Allocation) -> CostReport:
    lines: dict[tuple[str, str], Line] = {}
    for (tenant, model, _), (requests, prompt, completion) in usage.tokens.items():
        line = lines.setdefault((tenant, model), Line(tenant, model))
        line.requests += requests
        line.prompt_tokens += prompt
        line.completion_tokens += completion
    for (tenant, model, _), amount in alloc.cost.items():
        lines.setdefault((tenant, model), Line(tenant, model)).cost += amount
    idle: dict[str, float] = {}
    for (model, _), amount in alloc.idle.items():
        idle[model] = idle.get(model, 0.0) + amount
    by_tenant: dict[str, float] = {}
    for line in lines.values():
        by_tenant[line.tenant] = by_tenant.get(line.tenant, 0.0) + line.cost
    ordered = sorted(lines.values(), key=lambda ln: (-by_tenant[ln.tenant], ln.tenant, -ln.cost, ln.model))
    return CostReport(ordered, idle, alloc)
