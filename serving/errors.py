"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

import json
from http import HTTPStatus

# OpenAI's `type` for each status we send.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class GatewayError(Exception):
    """Raised by a request-path stage to answer the client with an error instead."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self, request_id: str | None = None) -> bytes:
        return error_body(self.status, self.message, code=self.code, param=self.param, request_id=request_id)


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    request_id: str | None = None,
) -> bytes:
    err = {"message": message, "type": error_type(status), "param": param, "code": code}
    if request_id:
        err["request_id"] = request_id
    return json.dumps({"error": err}).encode()


def reshape_upstream_error(status: int, body: bytes, request_id: str) -> bytes:
    """Turn an engine's error body into Keel's shape, keeping its message and param.

    vLLM answers {"error": {"message", "type": "BadRequestError", "code": 400, ...}} (or a
    FastAPI {"detail": ...} for some validation errors); clients should see one shape.
    """
    message, param, code = None, None, None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            message = err.get("message")
            param = err.get("param")
            code = err.get("code") if isinstance(err.get("code"), str) else None
        elif isinstance(doc.get("detail"), list):  # FastAPI request validation
            parts = []
            for d in doc["detail"]:
                loc = ".".join(str(p) for p in d.get("loc", []) if p != "body")
                parts.append(f"{loc}: {d.get('msg')}" if loc else str(d.get("msg")))
                param = param or (loc or None)
            message = "; ".join(parts)
        elif isinstance(doc.get("detail"), str):
            message = doc["detail"]
        elif isinstance(doc.get("message"), str):
            message = doc["message"]
    if not message:
        message = status_phrase(status)
    if status >= 500:
        # Engine internals are not the client's business; the request id finds them in the logs.
        message = f"The model server failed to complete the request ({status})."
        param = None
    return error_body(status, str(message), code=code, param=param, request_id=request_id)
