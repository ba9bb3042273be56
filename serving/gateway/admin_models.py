"""The model registry's admin API: start a registration, read its job, list the registry.

The gateway only starts and reads jobs (serving/model_registry/jobs.py): the registration
itself, which hashes every byte of the weights, runs in a child process, never on this event
loop nor in this process. File reads run on a worker thread: the models directory may be a
network file system.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from serving.config import ConfigError
from serving.errors import GatewayError
from serving.model_registry.jobs import RegistrationRequest, TooManyRegistrations, check_weights_dir
from serving.model_registry.listing import list_models
from serving.model_registry.manifest import RegistrationError

if TYPE_CHECKING:
    from serving.gateway.http import Request

REGISTER_PATH = "/v1/admin/models/register"
RETRY_REGISTRATION_S = 30
_FIELDS = ", ".join(RegistrationRequest.model_fields)


async def admin_register(gw, req: Request):
    """POST /v1/admin/models/register: 202 and the job, which runs on; its Location reads it."""
    request = parse_registration(req.body)
    try:
        await asyncio.to_thread(check_weights_dir, request.path)
    except RegistrationError as e:
        raise GatewayError(400, str(e), code="invalid_path", param="path") from None
    try:
        job = gw.registrations.start(request)  # here, on the gateway's thread: see start()
    except TooManyRegistrations as e:
        raise GatewayError(
            429, str(e), code="too_many_registrations", headers={"retry-after": str(RETRY_REGISTRATION_S)}
        ) from None
    return 202, _json(job), {"location": f"{REGISTER_PATH}/{job['id']}"}, "application/json"


async def admin_registration(gw, req: Request):
    """GET /v1/admin/models/register/ID: the job, from its file (any replica's job)."""
    job_id = req.path[len(REGISTER_PATH) + 1 :]
    gw.registrations.running()  # reap this replica's finished children first
    job = await asyncio.to_thread(gw.registrations.read, job_id)
    if job is None:
        raise GatewayError(404, f"No registration job `{job_id[:80]}`.", code="job_not_found")
    return 200, _json(job), None, "application/json"


async def admin_models(gw, req: Request):
    """GET /v1/admin/models: what `keel models list` shows, as data."""
    try:
        models = await asyncio.to_thread(list_models, gw.registrations.models_dir)
    except ConfigError as e:  # a manifest edited by hand: the admin should see which
        raise GatewayError(500, str(e), code="registry_unreadable") from None
    return 200, _json({"object": "list", "data": models}), None, "application/json"


def parse_registration(body: bytes) -> RegistrationRequest:
    """The request body, strictly: a JSON object of known fields of the right types."""
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError as e:
        raise GatewayError(400, f"The body is not valid JSON ({e}).", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise GatewayError(400, f"The body must be a JSON object with fields {_FIELDS}.", code="invalid_body")
    try:
        return RegistrationRequest.model_validate(doc)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        param = ".".join(str(p) for p in errors[0]["loc"])
        raise GatewayError(
            400, "; ".join(_describe(err) for err in errors), code="invalid_registration", param=param
        ) from None


def _describe(err: Mapping[str, Any]) -> str:  # one of ValidationError.errors()
    field = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"`{field}` is not a field of a registration (fields: {_FIELDS})"
    if err["type"] == "missing":
        return f"`{field}` is required"
    msg = err["msg"].removeprefix("Value error, ")
    return f"`{field}`: {msg}"


def _json(doc: dict) -> bytes:
    return json.dumps(doc).encode()
