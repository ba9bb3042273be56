"""Admission: a request's prompt counted with its model's tokenizer (`CountTokens`), checked
against the model's context, and reserved against its tenant's and key's quotas (`Admit`), then
settled to what it is charged when it ends (`charged_tokens`). Stages of the policy pipeline
(serving/gateway/policy.py); the quota arithmetic itself is serving/policy/quotas/.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.errors import GatewayError
from serving.gateway.offload import off_loop
from serving.gateway.request_fields import Generation
from serving.gateway.stages import Outcome, RequestContext
from serving.policy.quotas import QuotaBackendError, Scope

if TYPE_CHECKING:
    from serving.policy.tokens import TokenCounter

log = logging.getLogger("keel.gateway")


@dataclass
class ModelInfo:
    """What the gateway knows of a configured model without asking its engine."""

    name: str
    counter: TokenCounter | None
    max_model_len: int | None


# Prompts longer than this (request body bytes, ~4 bytes a token) are counted off the event
# loop (serving/gateway/offload.py): the tokenizer releases the GIL, so a long prompt (~1 µs a
# token) does not hold every other request's stream for milliseconds. Shorter ones are counted
# inline: handing work to a thread and back costs more than counting them.
OFFLOAD_COUNT_BYTES = 8192


class CountTokens:
    """Prompt tokens with the model's own tokenizer, for tenants whose token quotas or
    max_prompt_tokens guardrail need them before the engine runs (ASCII text for a byte-level
    BPE tokenizer through a per-word cache, serving.policy.tokens._AsciiCounter; other text
    ~1 µs a token; the engine's own count settles the quota and goes to the audit log either way)."""

    name = "count_tokens"

    def __init__(self, rt):
        """rt: the PolicyRuntime."""
        self.rt = rt
        pol = rt.policy
        self.needed = set()
        for name, t in pol.tenants.items():
            limits = [t.quotas] + [k.quotas for k in t.keys if k.quotas]
            tokens = any(q.tokens_per_minute or q.tokens_per_day for q in limits)
            guard = pol.guardrails.get(t.guardrails) if t.guardrails else None
            max_prompt = guard is not None and any(r.kind.reads_prompt_tokens for r in guard.input)
            if tokens or max_prompt:
                self.needed.add(name)

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.tenant not in self.needed:
            return
        await count_prompt(ctx, self.rt.models.get(ctx.target) if ctx.target is not None else None)

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        pass


async def count_prompt(ctx: RequestContext, info: ModelInfo | None) -> None:
    """ctx.prompt_counts (one per prompt the engine runs) and their sum ctx.prompt_tokens, from
    the model's tokenizer: inline, or on a worker thread when long."""
    if info is None or info.counter is None:
        return
    assert ctx.payload is not None  # ParseBody, the first stage, set it
    if len(ctx.body) > OFFLOAD_COUNT_BYTES:
        # Nothing else touches this request's payload until the count is back.
        counts = await off_loop(info.counter.count_each, ctx.path, ctx.payload)
    else:
        counts = info.counter.count_each(ctx.path, ctx.payload)
    ctx.prompt_counts = counts
    ctx.prompt_tokens = sum(counts)


def check_context(ctx: RequestContext, info: ModelInfo | None) -> None:
    """400 context_length_exceeded for what the engine refuses for its length, before any quota
    is taken; a prompt the gateway did not count is left to the engine."""
    limit = info.max_model_len if info is not None else None
    field = "messages" if ctx.path.endswith("/chat/completions") else "prompt"
    err = (ctx.generation or Generation()).context_error(ctx.prompt_counts, limit, field)
    if err is not None:
        raise err


def reservation(ctx: RequestContext, info: ModelInfo | None) -> tuple[int, int]:
    """(prompt, output) tokens the request may use at most (request_fields.Generation.reservation)."""
    limit = info.max_model_len if info is not None else None
    return (ctx.generation or Generation()).reservation(ctx.prompt_counts, limit)


class Admit:
    """Token and request quotas: reserve at admission, settle to the engine's usage at the end."""

    name = "quota"

    def __init__(self, rt):
        """rt: the PolicyRuntime (its quota backend, metrics, tenants and models)."""
        self.rt = rt
        self.fail_open = rt.policy.quotas.on_backend_error == "fail_open"
        # The in-memory backend settles without waiting: inline, no task per request.
        self._settle_now = getattr(rt.quota_backend, "settle_now", None)
        self._settling: set[asyncio.Task] = set()  # referenced so they are not collected mid-run
        self._last_warning = 0.0

    def scopes(self, ctx: RequestContext) -> list[Scope]:
        tenant = self.rt.tenant(ctx)
        scopes = []
        if tenant is not None and not tenant.quotas.is_empty():
            assert ctx.tenant is not None  # rt.tenant found it by this name
            scopes.append(Scope("tenant", ctx.tenant, tenant.quotas))
        kq = (
            self.rt.key_quotas.get((ctx.tenant, ctx.key_id))
            if ctx.tenant is not None and ctx.key_id is not None
            else None
        )
        if kq is not None and not kq.is_empty():
            scopes.append(Scope("key", f"{ctx.tenant}/{ctx.key_id}", kq))
        return scopes

    async def on_request(self, ctx: RequestContext) -> None:
        info = self.rt.models.get(ctx.target) if ctx.target is not None else None
        check_context(ctx, info)  # an invalid request is a 400, not a 429 the client would retry
        scopes = self.scopes(ctx)
        if not scopes:
            ctx.quota = "unlimited"
            return
        prompt, cap = reservation(ctx, info)
        tokens = prompt + cap
        m = self.rt.metrics
        assert self.rt.quota_backend is not None  # quota scopes exist only with tenants (not open)
        try:
            adm = await self.rt.quota_backend.reserve(scopes, tokens, ctx.request_id)
        except QuotaBackendError as e:
            mode = "fail_open" if self.fail_open else "fail_closed"
            m.quota_backend_errors.labels(mode).inc()
            self._warn_backend(e, mode)
            ctx.quota = mode
            if self.fail_open:
                return
            raise GatewayError(
                503,
                "The quota service is unavailable; retry shortly.",
                code="quota_service_unavailable",
                headers={"retry-after": "1"},
            ) from None
        ctx.response_headers.update(adm.headers)
        if not adm.allowed:
            assert adm.scope is not None  # a refusal names the scope that refused
            m.quota_rejections.labels(ctx.tenant, adm.limit).inc()
            ctx.quota = f"rejected:{adm.scope.name}:{adm.limit}"
            who = f"{adm.scope.name} `{adm.scope.id}`"
            if adm.never_fits:
                gen = ctx.generation or Generation()
                raise GatewayError(
                    429,
                    f"Request too large for the {adm.limit} limit of {who}: it may use up to {tokens} "
                    f"tokens (prompt {prompt} + output {cap}: {gen.n} choice(s) for each of {gen.prompts} "
                    "prompt(s)), more than the limit allows at once. Lower max_tokens or n, or send "
                    "shorter or fewer prompts.",
                    code="request_too_large",
                )
            retry = max(adm.retry_after_s, 0.001)
            raise GatewayError(
                429,
                f"Rate limit reached for {who} on {adm.limit}. Retry in {retry:.3g}s.",
                code="rate_limit_exceeded",
                headers={"retry-after": str(max(1, math.ceil(retry)))},
            )
        ctx.reservation = adm.reservation
        ctx.reserved_tokens = tokens
        ctx.quota = "admitted"
        m.reserved_tokens.labels(ctx.tenant).inc(tokens)

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        r = ctx.reservation
        if r is None:
            return
        ctx.reservation = None
        actual = charged_tokens(ctx, outcome)
        if self._settle_now is not None:
            self._settle_now(r, actual)
            self.rt.metrics.reserved_tokens.labels(ctx.tenant).dec(ctx.reserved_tokens)
            return
        task = asyncio.get_running_loop().create_task(self._settle(r, actual, ctx.tenant, ctx.reserved_tokens))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _warn_backend(self, e: Exception, mode: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:  # at most one line per 10 s while the backend is down
            self._last_warning = now
            log.warning(
                "quota backend unreachable (%s): %s",
                e,
                "admitting without quotas (fail_open)"
                if mode == "fail_open"
                else "rejecting requests with 503 (fail_closed)",
            )

    async def _settle(self, r, actual: int, tenant: str | None, reserved: int) -> None:
        try:
            for attempt in range(3):
                try:
                    assert self.rt.quota_backend is not None  # it reserved r
                    await self.rt.quota_backend.settle(r, actual)
                    return
                except QuotaBackendError as e:
                    if attempt == 2:
                        log.warning("could not settle reservation %s (%s); its lease expires it", r.id, e)
                    else:
                        await asyncio.sleep(0.2 * (attempt + 1))
        finally:
            self.rt.metrics.reserved_tokens.labels(tenant).dec(reserved)


def charged_tokens(ctx: RequestContext, outcome: Outcome) -> int:
    """What a request that ended is charged: the engine's usage when the response carried it."""
    if ctx.usage and isinstance(ctx.usage.get("total_tokens"), int):
        return ctx.usage["total_tokens"]
    if not ctx.sent_to_engine:  # refused before an engine saw it: the whole reservation goes back
        return 0
    if outcome.status == 499 and not (ctx.payload or {}).get("stream"):
        # The client left while the engine worked on an answer nobody reads; how much it generated
        # before it stopped is reported to no one, so the reservation (its most) is charged.
        return ctx.reserved_tokens
    if outcome.status == 499 or outcome.bytes_out:
        # A stream cut short (client gone, engine gone, output blocked): its prompt and the
        # chunks the engine had sent by then.
        return (ctx.prompt_tokens or 0) + ctx.completion_chunks
    return 0  # the engine refused it (4xx/5xx): nothing was generated
