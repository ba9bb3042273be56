"""The quota backend a policy picks, and the registry of backends it picks from.

A new backend is one module with a class that satisfies `QuotaBackend`, and one entry in
`BACKENDS` here: the config's allowed values, its JSON Schema and `make_backend` all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator

from serving.policy.quotas.backend import QuotaBackend
from serving.policy.quotas.memory import MemoryQuotaBackend
from serving.policy.quotas.redis import RedisQuotaBackend
from serving.schema import Strict as _Strict
from serving.schema import one_of


@dataclass(frozen=True)
class BackendType:
    description: str  # for `quotas.backend` in the JSON Schema and the docs
    make: Callable[[QuotaBackendConfig], QuotaBackend]


BACKENDS: dict[str, BackendType] = {
    "memory": BackendType(
        "counters in each gateway process (one gateway).", lambda cfg: MemoryQuotaBackend(lease_s=cfg.lease_s)
    ),
    "redis": BackendType("shared by every gateway replica.", RedisQuotaBackend),
}


def make_backend(cfg: QuotaBackendConfig) -> QuotaBackend:
    return BACKENDS[cfg.backend].make(cfg)


class QuotaBackendConfig(_Strict):
    backend: str = Field(
        "memory",
        description=" ".join(f"{name}: {b.description}" for name, b in BACKENDS.items()),
        json_schema_extra={"enum": list(BACKENDS)},
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis://, rediss:// or unix:// URL.")
    on_backend_error: Literal["fail_closed", "fail_open"] = Field(
        "fail_closed",
        description="When Redis cannot be reached: fail_closed answers 503, "
        "fail_open admits the request without a quota check.",
    )
    timeout_s: float = Field(0.25, gt=0, description="Socket timeout for each Redis call.")
    lease_s: float = Field(
        900,
        gt=0,
        description="How long a request's concurrency slot lasts without renewal. The "
        "gateway renews it every lease_s/3 while the request runs; one that dies stops renewing, "
        "so its slots free at most this long later.",
    )
    key_prefix: str = Field("keel", min_length=1, description="Prefix of every Redis key Keel writes.")

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        return one_of(v, BACKENDS)

    @field_validator("redis_url")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme = urlparse(v).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got `{v}`")
        return v

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if "{" in v or "}" in v:
            raise ValueError(
                "must not contain `{` or `}` (Keel puts the tenant in braces, as the Redis Cluster hash tag)"
            )
        return v
