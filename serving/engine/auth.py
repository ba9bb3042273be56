"""An engine answers only the gateway: every route but /health and /metrics needs the stack's secret.

vLLM's own `--api-key` (VLLM_API_KEY) guards only paths under /v1, /v2, /inference and /cohere;
/invocations (SageMaker: the same generation as /v1), /tokenize, /pooling, /abort_requests and
the rest stay open (vLLM's docs say so). This ASGI middleware, which the replica adds to the
engine's server with vLLM's `--middleware` hook, denies by default instead. It reads the same
VLLM_API_KEY the replica puts in the engine's environment, so vLLM's own check stays on too.
"""

from __future__ import annotations

import hashlib
import hmac
import os

KEY_ENV = "VLLM_API_KEY"
MIDDLEWARE = "serving.engine.auth.EngineAuth"  # the import path vLLM's --middleware takes
# The replica's health check and autoscaling read these, and the gateway scrapes /metrics.
OPEN_PATHS = frozenset({"/health", "/metrics"})
_DENIED = (
    b'{"error":{"message":"This engine answers only its Keel gateway.","type":"invalid_request_error",'
    b'"param":null,"code":"invalid_api_key"}}'
)


class EngineAuth:
    """Pure ASGI middleware: `Authorization: Bearer <secret>` on every request, or 401."""

    def __init__(self, app, api_key: str | None = None):
        self.app = app
        key = api_key if api_key is not None else os.environ.get(KEY_ENV)
        if not key:  # fail closed: an engine started without its secret must not serve
            raise RuntimeError(f"EngineAuth needs the stack's secret in ${KEY_ENV}")
        self._digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or _path(scope) in OPEN_PATHS or self._authorised(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
        else:
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_DENIED)).encode()),
                        (b"www-authenticate", b"Bearer"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _DENIED})

    def _authorised(self, scope) -> bool:
        values = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
        if len(values) != 1:  # none, or two that could be read two ways
            return False
        scheme, _, token = values[0].partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self._digest)


def _path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
