"""Per-tenant and per-key quotas: requests/minute, tokens/minute, tokens/day, concurrent requests.

The gateway calls `reserve` at admission with the request's worst-case token cost (each prompt
plus n times its max_tokens, serving.gateway.admission.reservation) and `settle` exactly once when
the request ends: with the engine's real usage, or without one with what the gateway charges
(serving.gateway.admission.charged_tokens: 0 for a request no engine saw, a release).

All limits of all scopes of a request are checked and applied atomically, all or nothing: a
request rejected by one limit consumes nothing from any other.

Backends: `MemoryQuotaBackend` (one gateway process) and `RedisQuotaBackend` (shared by all
gateway replicas: one Lua script per operation, on Redis's own clock). A Redis failure raises
`QuotaBackendError`; the gateway decides, by `on_backend_error`, to admit or to refuse.

The package, by concern: `gcra` (the limits and the arithmetic both backends share: verdicts,
settling, headers), `backend` (the backend protocol, its error, lease renewals), `memory` and
`redis` (the backends), `config` (the backend config and the registry `BACKENDS`: a new backend
is its module plus one entry there).
"""

from serving.policy.quotas.backend import QuotaBackend, QuotaBackendError
from serving.policy.quotas.config import BACKENDS, QuotaBackendConfig, make_backend
from serving.policy.quotas.gcra import Admission, QuotaLimits, Reservation, Scope, format_duration
from serving.policy.quotas.memory import MemoryQuotaBackend
from serving.policy.quotas.redis import RedisQuotaBackend, redis_key

__all__ = [
    "BACKENDS",
    "Admission",
    "MemoryQuotaBackend",
    "QuotaBackend",
    "QuotaBackendConfig",
    "QuotaBackendError",
    "QuotaLimits",
    "RedisQuotaBackend",
    "Reservation",
    "Scope",
    "format_duration",
    "make_backend",
    "redis_key",
]
