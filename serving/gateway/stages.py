"""The gateway's request path: a list of stages, each one small class with one interface.

A stage sees a request once, after its head and body are read and before any byte goes to an
engine (`on_request`), and once more when the request ends, however it ends (`on_complete`).
It rejects a request by raising `GatewayError`.

A stage that must see the response (an output guardrail) also has `on_response`: once the
request is admitted it returns a ResponseWatch for that request, or None. The response
inspector (inspect.py, watched.py) hands every watch each text field of each choice as it
streams, and the usage chunk; token-level data (logprobs) goes out only as far as the watches
released its text unchanged. Watches run in reverse stage order, as on_complete does, so the
first stage sees what the client sees. Without watches (and without audit text) the gateway
does not parse the response at all.

Adding a concern to the request path (auth, quotas, guardrails, routing, audit) is one class
here and one entry in `default_stages`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from serving.errors import GatewayError
from serving.gateway import request_body, request_fields


@dataclass
class RequestContext:
    request_id: str
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    received_at: float = field(default_factory=time.monotonic)
    payload: dict[str, Any] | None = None  # the parsed JSON body
    generation: request_fields.Generation | None = None  # prompts, n, max tokens, as the engine reads them
    model: str | None = None  # the public model name
    upstream_headers: dict[str, str] = field(default_factory=dict)  # extra headers to the engine
    response_headers: dict[str, str] = field(default_factory=dict)  # extra headers to the client
    stages_entered: int = 0  # how many stages' on_request ran: they, and only they, see on_complete
    # Set by the policy stages (serving/gateway/policy.py); their defaults mean "no policy".
    tenant: str | None = None
    key_id: str | None = None
    role: str | None = None
    target: str | None = None  # the model deployment the request goes to (an experiment's variant)
    variant: str | None = None  # reported in x-keel-variant, metrics and audit
    shadow: str | None = None  # a model deployment that gets a mirrored copy
    payload_changed: bool = False  # the body is re-serialised from payload before it is sent
    prompt_tokens: int | None = None  # counted with the model's tokenizer
    prompt_counts: list[int] | None = None  # the same, per prompt the engine runs
    reserved_tokens: int = 0
    reservation: Any = None
    quota: str | None = None  # the quota decision, for the audit record
    guardrail_actions: list = field(default_factory=list)
    blocked: Any = None  # the GuardrailBlocked that ended the request, if one did
    inspect: bool = False  # the relay reads the response (usage, output guardrails, audit text)
    client_wants_usage: bool = True
    watches: list = field(default_factory=list)  # ResponseWatch of each stage that reads the response
    keep_text: bool = False  # audit_content: keep the (redacted) response text
    response_text: list = field(default_factory=list)
    response_fields: dict = field(default_factory=dict)  # audit_content: "<choice>.<field>" -> pieces
    usage: dict | None = None  # the engine's own usage, when the response carried it
    completion_chunks: int = 0
    # Set by the relay once the request is written to an engine: from then on the engine may be
    # generating, and a client that leaves is charged for it (admission.Admit.on_complete).
    sent_to_engine: bool = False


@dataclass
class Outcome:
    """How a request ended, as the client saw it."""

    status: int  # HTTP status sent; 499 when the client went away first
    error: str | None = None  # the error message sent, if any
    first_byte_at: float | None = None
    finished_at: float = field(default_factory=time.monotonic)
    bytes_out: int = 0


class Stage(Protocol):
    name: str

    async def on_request(self, ctx: RequestContext) -> None: ...

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None: ...

    # Optional: def on_response(self, ctx: RequestContext) -> ResponseWatch | None


class TextWatch(Protocol):
    """One text field of one choice as one watch sees it (a guardrail StreamScanner is one)."""

    def feed(self, piece: str) -> str:
        """The field's next piece: returns what the client may see now, holding back or
        rewriting the rest. Raises GuardrailBlocked to end the response."""

    def last(self, piece: str) -> str:
        """The field's last piece (may be ""): returns all that is left to show. A whole
        (non-streamed) text is one last piece."""


class ResponseWatch(Protocol):
    """One stage's view of one response. A choice's fields are named "content", "refusal",
    "reasoning", "reasoning_content", "text", ("tool_calls", i, "arguments"), ..., and
    "logprobs": the tokens of the choice's logprobs, concatenated (never shown as text: a
    logprob entry goes out once its token is released unchanged by every watch)."""

    def field(self, choice: int, name) -> TextWatch:
        """A watch for a field of a choice, made when its first piece arrives."""

    def allows_alternative(self, context: str, token: str) -> bool:
        """May the client see a token the model did not pick (top_logprobs) after context?"""

    def usage(self, usage: dict) -> None:
        """The engine's token usage for the response."""

    def close(self) -> None:
        """The response ended (finished, cut by a block, or the client gone)."""


class Pipeline:
    """Runs stages in order; every stage whose on_request ran sees on_complete (in reverse)."""

    def __init__(self, stages: list[Stage]):
        self.stages = list(stages)
        self.responders = [s for s in reversed(self.stages) if hasattr(s, "on_response")]

    async def admit(self, ctx: RequestContext) -> None:
        """Run each stage's on_request; a GatewayError from one stops the rest and propagates.
        Once all have admitted the request, the response watches are made (ctx.watches)."""
        for stage in self.stages:
            ctx.stages_entered += 1
            await stage.on_request(ctx)
        ctx.watches = self.watch(ctx)

    def watch(self, ctx: RequestContext) -> list:
        """New response watches for an admitted request, in the order they see the response."""
        return [w for w in (s.on_response(ctx) for s in self.responders) if w is not None]

    def complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        for stage in reversed(self.stages[: ctx.stages_entered]):
            stage.on_complete(ctx, outcome)


class ParseBody:
    """The body, parsed and checked once (serving/gateway/request_body.py, request_fields.py):
    malformed JSON, a body that is not an object or nests too deep, and a field Keel reads that
    the engine would refuse are a 400 before anything else runs; lax spellings of those fields
    ("20" for 20) are written back as the engine reads them."""

    name = "parse_body"

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.payload = request_body.parse(ctx.body)
        ctx.generation, changed = request_fields.check_fields(ctx.path, ctx.payload)
        if changed:
            ctx.payload_changed = True

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        pass


class ResolveModel:
    """The `model` field names one of the configured public models, or the request is 404.
    (With a policy, serving.gateway.policy.Route does this and more.)"""

    name = "resolve_model"

    def __init__(self, models: list[str]):
        self.models = set(models)

    async def on_request(self, ctx: RequestContext) -> None:
        model = (ctx.payload or {}).get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "`model` is required and must be a string.", param="model")
        if model not in self.models:
            raise GatewayError(
                404,
                f"The model `{model}` does not exist. Available: {', '.join(sorted(self.models))}.",
                code="model_not_found",
                param="model",
            )
        ctx.model = ctx.target = ctx.variant = model

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        pass


def default_stages(models: list[str]) -> list[Stage]:
    return [ParseBody(), ResolveModel(models)]
