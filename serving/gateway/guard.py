"""The guardrail stages of the request path: the tenant's input rules over every text the
request gives the model, its output rules over every text the client is shown (a response
watch). Which texts those are comes from textfields.py; what the rules do from
serving.policy.guardrails (InputGuard.check, OutputGuard.stream/check_text only).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from serving.errors import GatewayError
from serving.gateway.offload import off_loop
from serving.gateway.stages import Outcome, RequestContext
from serving.gateway.textfields import (
    CHAT,
    COMPLETIONS,
    Endpoint,
    Unscannable,
    endpoint_for,
    request_slots,
    unscannable_error,
    unscanned_options,
)
from serving.policy.guardrails import GuardrailAction, GuardrailBlocked, InputGuard, OutputGuard

TOKENS_FIELD = "logprobs"  # a choice's logprob tokens, concatenated: scanned, never shown as text

# Request bodies longer than this are scanned by the input rules off the event loop
# (serving/gateway/offload.py): the default rules take ~0.12 ms a KiB of prose, a hand-off
# ~0.06 ms. (regex's concurrent=True, which would let go of the GIL during a search, was
# measured and not used: docs/architecture.md.)
OFFLOAD_GUARD_BYTES = 4096


class GuardInput:
    """The tenant's input guardrails over every text the request gives the model (which fields:
    textfields.py; token-id prompts decoded with the model's tokenizer): block (400), redact in
    place, or flag. A field they cannot read is a 400 naming it."""

    name = "guard_input"

    def __init__(self, rt, recount: Callable[[RequestContext, Any], Awaitable[None]]):
        """rt: the PolicyRuntime; recount(ctx, model info): counts a redacted prompt again."""
        self.rt = rt
        self.recount = recount
        # Policies with rules that read text (max_prompt_tokens alone reads only the count).
        self.text_rules = {n: any(r.kind.reads_text for r in g.input) for n, g in rt.policy.guardrails.items()}

    async def on_request(self, ctx: RequestContext) -> None:
        tenant = self.rt.tenant(ctx)
        endpoint = endpoint_for(ctx.path)
        if tenant is None or tenant.guardrails is None or endpoint is None:
            return
        info = self.rt.models.get(ctx.target)
        tokenizer = getattr(info.counter, "tokenizer", None) if info is not None else None
        assert ctx.payload is not None  # ParseBody, the first stage, set it
        args = (
            self.rt.input_guards[tenant.guardrails],
            endpoint,
            ctx.payload,
            tokenizer,
            ctx.prompt_tokens,
            self.text_rules[tenant.guardrails],
        )
        try:
            if len(ctx.body) > OFFLOAD_GUARD_BYTES:
                # Nothing else touches this request's payload until the scan is back.
                changed, actions = await off_loop(scan_request, *args)
            else:
                changed, actions = scan_request(*args)
        except GuardrailBlocked as e:
            ctx.blocked = e
            ctx.guardrail_actions.append(GuardrailAction(e.guardrail, "block", e.direction, e.entity))
            raise GatewayError(400, e.message, code="content_policy_violation") from None
        except Unscannable as e:
            raise unscannable_error(e) from None
        ctx.guardrail_actions.extend(actions)
        if changed:
            ctx.payload_changed = True
            if ctx.prompt_tokens is not None:  # counted before: count the redacted prompt again
                await self.recount(ctx, info)

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        pass


class GuardOutput:
    """The tenant's output guardrails over every text the client is shown: a response watch.
    Request options that would show text the rules cannot see (token ids, the rendered prompt,
    prompt logprobs) are a 400 naming the option."""

    name = "guard_output"

    def __init__(self, rt):
        self.rt = rt

    def _guard(self, ctx: RequestContext) -> OutputGuard | None:
        tenant = self.rt.tenant(ctx)
        if tenant is None or tenant.guardrails is None:
            return None
        guard = self.rt.output_guards[tenant.guardrails]
        return guard if guard.active else None

    async def on_request(self, ctx: RequestContext) -> None:
        endpoint = endpoint_for(ctx.path)
        if endpoint is None or self._guard(ctx) is None:
            return
        assert ctx.payload is not None  # ParseBody, the first stage, set it
        for option in unscanned_options(endpoint, ctx.payload):
            raise GatewayError(
                400,
                f"`{option}` is not available to tenant `{ctx.tenant}`: its output "
                "guardrails cannot check the text it would return.",
                code="unsupported_with_guardrails",
                param=option,
            )

    def on_response(self, ctx: RequestContext) -> OutputGuardWatch | None:
        guard = self._guard(ctx)
        return OutputGuardWatch(guard, ctx.guardrail_actions) if guard is not None else None

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        pass


def prompt_slots(payload: dict | None) -> list[tuple]:
    """(get, put) pairs for every prompt text in a chat or completion body, in order (token-id
    prompts need a tokenizer: textfields.request_slots)."""
    if not payload:
        return []
    return request_slots(CHAT if "messages" in payload else COMPLETIONS, payload)


def scan_request(
    guard: InputGuard, endpoint: Endpoint, payload: dict, tokenizer: Any, prompt_tokens: int | None, text_rules: bool
) -> tuple[bool, list[GuardrailAction]]:
    """Apply the input rules to every text the request gives the model, in place. Returns
    (whether a text changed, the actions). Raises GuardrailBlocked, or textfields.Unscannable
    for a field the rules cannot read. Touches only this request's payload, so it may run on a
    worker thread."""
    slots = request_slots(endpoint, payload, tokenizer) if text_rules else []
    texts, actions = guard.check([get() for get, _ in slots], prompt_tokens)
    changed = False
    for (get, put), new in zip(slots, texts):
        if new != get():
            put(new)
            changed = True
    return changed, actions


class OutputGuardWatch:
    """A tenant's output rules over one response (a ResponseWatch): a StreamScanner per text
    field of each choice, so a span split across events of one field is caught and the texts
    of two fields are never joined."""

    def __init__(self, guard: OutputGuard, actions: list):
        self.guard = guard
        self.actions = actions  # the request's ctx.guardrail_actions, filled at close()
        self.scanners: list[tuple[Any, Any]] = []  # (field name, scanner)

    def field(self, choice: int, name):
        scanner = self.guard.stream()
        self.scanners.append((name, scanner))
        return scanner

    def allows_alternative(self, context: str, token: str) -> bool:
        text = context + token
        try:
            out, _ = self.guard.check_text(text)
        except GuardrailBlocked:
            return False
        return out == text

    def usage(self, usage: dict) -> None:
        pass

    def close(self) -> None:
        scanners, self.scanners = self.scanners, []
        for name, scanner in scanners:
            if name == TOKENS_FIELD:  # the text's own scanner counted the redactions and flags
                self.actions.extend(a for a in scanner.actions if a.action == "block")
            else:
                self.actions.extend(scanner.actions)
