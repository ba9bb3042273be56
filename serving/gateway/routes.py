"""The gateway's routes: which paths exist, on which listener, for whom, and who answers them.

One table: a new endpoint is one `Route` here (and its handler). The gateway checks the table
when a request head arrives, before the body is read: an unknown path is 404, a wrong method
405, a path that needs a key and has none 401, an admin path with an app key 403. With
tenants configured every path but the public ones needs a key, unknown paths too, so the
route table cannot be probed without one.
"""

from __future__ import annotations

from dataclasses import dataclass

PUBLIC, KEY, ADMIN = "public", "key", "admin"
MAIN, METRICS = "main", "metrics"  # the listeners: the API port, and the optional metrics port


@dataclass(frozen=True)
class Route:
    path: str  # exact, or a prefix when it ends with "/"
    methods: frozenset[str]
    access: str  # PUBLIC, KEY (any tenant key), ADMIN (an admin key)
    handler: str  # "proxy" (to an engine) or the name of a Gateway method answering locally
    listeners: frozenset[str] = frozenset({MAIN})

    @property
    def prefix(self) -> bool:
        return self.path.endswith("/")


def _route(path: str, method: str, access: str, handler: str, *listeners: str) -> Route:
    return Route(path, frozenset({method}), access, handler, frozenset(listeners or (MAIN,)))


ROUTES = (
    _route("/v1/chat/completions", "POST", KEY, "proxy"),
    _route("/v1/completions", "POST", KEY, "proxy"),
    _route("/v1/models", "GET", KEY, "models"),
    _route("/v1/models/", "GET", KEY, "model_card"),
    _route("/v1/admin/policy", "GET", ADMIN, "admin_policy"),
    _route("/v1/admin/models", "GET", ADMIN, "admin_models"),
    _route("/v1/admin/models/register", "POST", ADMIN, "admin_register"),
    _route("/v1/admin/models/register/", "GET", ADMIN, "admin_registration"),
    _route("/v1/admin/anomalies", "GET", ADMIN, "admin_anomalies"),
    _route("/health", "GET", PUBLIC, "health", MAIN, METRICS),
    # Ray Serve's proxy paths, which KubeRay asks on the serve port: 200 once every model has a
    # ready replica (the head's serve label, the workers' readiness), 503 before.
    _route("/-/healthz", "GET", PUBLIC, "serve_healthz"),
    _route("/-/routes", "GET", PUBLIC, "serve_routes"),
    # Tenant names are in the labels: an admin key on the API port, or the metrics listener
    # (`server.metrics_port`, for a Prometheus that scrapes without a key).
    _route("/metrics", "GET", ADMIN, "metrics", MAIN),
    _route("/metrics", "GET", PUBLIC, "metrics", METRICS),
)

_EXACT = {(r.path, lst): r for r in ROUTES if not r.prefix for lst in r.listeners}
_PREFIXES = [r for r in ROUTES if r.prefix]


def find_route(listener: str, path: str) -> Route | None:
    route = _EXACT.get((path, listener))
    if route is not None:
        return route
    for r in _PREFIXES:
        if listener in r.listeners and path.startswith(r.path) and len(path) > len(r.path):
            return r
    return None


def proxied_paths() -> set[str]:
    return {r.path for r in ROUTES if r.handler == "proxy"}
