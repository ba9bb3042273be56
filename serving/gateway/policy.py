"""The policy stages of the request path, built from the policy part of the config.

Order (each a Stage: `on_request` may raise GatewayError, `on_complete` always runs):

  Anomalies -> Audit -> ParseBody -> Authenticate -> Route -> CountTokens -> GuardInput
        -> GuardOutput -> Admit -> Prepare

Anomalies (serving/gateway/anomalies.py) only reads each request as it ends: being first, its
on_complete runs last and sees the final tenant, model, usage and status.

The guard stages live in serving/gateway/guard.py; GuardOutput also reads the response: its
`on_response` watch sees every text field the client is shown.

Audit comes first so that every request, however early it is rejected, leaves a record. The
decisions themselves live in serving/policy/ (plain Python, unit-tested without a gateway);
these classes only read the request, call them, and translate their answers into HTTP.

`PolicyRuntime` is one immutable version of the policy. `keel apply` builds a new one in each
gateway (Ray Serve `reconfigure`); requests in flight finish on the version they started with.
The quota backend and the audit log carry over between versions, so a reload loses no
reservation and does not restart a hash chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import orjson

from serving.errors import GatewayError
from serving.gateway import anomalies
from serving.gateway.guard import GuardInput, GuardOutput
from serving.gateway.offload import off_loop
from serving.gateway.request_fields import Generation
from serving.gateway.stages import Outcome, ParseBody, Pipeline, RequestContext, Stage
from serving.ops.slo_events import SloJudge
from serving.policy.audit import AuditLog
from serving.policy.config import ALL_MODELS, PolicyConfig, TenantConfig
from serving.policy.guardrails import InputGuard, OutputGuard
from serving.policy.identity import KeyRing
from serving.policy.quotas import QuotaBackend, QuotaBackendError, Scope, make_backend
from serving.policy.routing import assign_variant, shadow_selected

if TYPE_CHECKING:
    from serving.policy.tokens import TokenCounter

log = logging.getLogger("keel.gateway")

VARIANT_HEADER = "x-keel-variant"
OPEN_TENANT = "-"  # tenant label of requests when no tenants are configured


@dataclass
class ModelInfo:
    """What the gateway knows of a configured model without asking its engine."""

    name: str
    counter: TokenCounter | None
    max_model_len: int | None


class PolicyRuntime:
    def __init__(
        self,
        policy: PolicyConfig,
        models: dict[str, ModelInfo],
        metrics,
        previous: PolicyRuntime | None = None,
        rollouts: dict | None = None,
    ):
        self.policy = policy
        self.version = hashlib.sha256(policy.model_dump_json().encode()).hexdigest()[:12]
        self.models = models  # candidates of rollouts included: their tokenizers count their prompts
        # model -> (candidate, percent): serving.rollout; a candidate is never a public name
        self.rollouts = {m: (s.candidate, s.percent) for m, s in (rollouts or {}).items()}
        self.candidate_of = {c: m for m, (c, _) in self.rollouts.items()}  # candidate -> its model
        self.metrics = metrics
        if metrics is not None:
            metrics.use_slos(SloJudge(policy.slos))  # live: the next request is judged by these
        self.tenants = policy.tenants
        self.open = not policy.tenants
        self.keyring = KeyRing.from_tenants(policy.tenants)
        self.key_quotas = {(t, k.id): k.quotas for t, tc in policy.tenants.items() for k in tc.keys if k.quotas}
        self.input_guards = {n: InputGuard(g.input) for n, g in policy.guardrails.items()}
        self.output_guards = {n: OutputGuard(g.output) for n, g in policy.guardrails.items()}
        candidates = {c for c, _ in self.rollouts.values()}
        self.public = (set(models) - candidates) | set(policy.experiments)
        self.allowed = {t: allowed_models(tc, self.public) for t, tc in policy.tenants.items()}
        # State that outlives a reload: kept when its config did not change.
        self.quota_backend: QuotaBackend | None
        self.audit_log: AuditLog | None
        if previous is not None and previous.policy.quotas == policy.quotas:
            self.quota_backend = previous.quota_backend
        else:
            self.quota_backend = make_backend(policy.quotas) if not self.open else None
            if previous is not None and previous.quota_backend is not None:
                previous.retire_backend()
        mb = policy.audit.max_file_mb
        max_file_bytes = mb * 2**20 if mb is not None else None
        if previous is not None and _same_log(previous.policy.audit, policy.audit):
            # The same file and chain; a changed rotation size applies to it as it is.
            self.audit_log = previous.audit_log
            if self.audit_log is not None:
                self.audit_log.resize(max_file_bytes)
        else:
            self.audit_log = (
                AuditLog(policy.audit.dir, max_file_bytes=max_file_bytes, hmac_key_file=policy.audit.hmac_key_file)
                if policy.audit.enabled
                else None
            )
            if previous is not None and previous.audit_log is not None:
                previous.audit_log.close()
        self.audit = Audit(self) if self.audit_log is not None else None
        # The detector's baselines outlive a reload too (serving/gateway/anomalies.py).
        self.anomalies: anomalies.AnomalyWatch | None
        self.anomalies = anomalies.carry(
            previous.anomalies if previous is not None else None, policy.anomalies, metrics, self.audit_log
        )
        # Does the relay read responses? Only when something needs usage or text (output
        # guardrails exist only with tenants, so they are covered by `not open`).
        # A tpot SLO needs the completion tokens of streams, from the usage chunk.
        self.inspects = (
            not self.open or self.audit_log is not None or any(s.kind == "tpot" for s in policy.slos.values())
        )
        self.pipeline = Pipeline(self._stages())

    def _stages(self) -> list[Stage]:
        stages: list[Stage] = []
        if self.anomalies is not None:  # first: its on_complete sees the request's final state
            stages.append(anomalies.AnomalyFeed(self.anomalies))
        if self.audit is not None:
            stages.append(self.audit)
        stages.append(ParseBody())
        if not self.open:
            stages.append(Authenticate(self))
        stages.append(Route(self))
        if not self.open:
            stages += [CountTokens(self), GuardInput(self, recount=count_prompt), GuardOutput(self), Admit(self)]
        stages.append(Prepare(self))
        return stages

    def tenant(self, ctx: RequestContext) -> TenantConfig | None:
        return self.tenants.get(ctx.tenant) if ctx.tenant else None

    def retire_backend(self) -> None:
        backend = self.quota_backend
        if backend is not None:
            # Settlements still running on it finish first; a few seconds is plenty.
            asyncio.get_running_loop().call_later(30, lambda: asyncio.ensure_future(backend.close()))

    def audit_plain(
        self,
        rid: str,
        method: str,
        path: str,
        status: int,
        error: str | None,
        received_at: float,
        tenant: str | None = None,
        key_id: str | None = None,
    ) -> None:
        """A record for a request that does not go through the pipeline (413, 405, admin API)."""
        if self.audit is None:
            return
        ctx = RequestContext(rid, method, path, {}, b"", received_at=received_at)
        ctx.tenant, ctx.key_id = tenant, key_id
        self.audit.on_complete(ctx, Outcome(status, error=error))

    def close(self) -> None:
        if self.anomalies is not None:
            self.anomalies.close()
        if self.audit_log is not None:
            self.audit_log.close()


def _same_log(a, b) -> bool:
    """Two audit configs that write the same log (the rotation size aside)."""
    return a.model_copy(update={"max_file_mb": None}) == b.model_copy(update={"max_file_mb": None})


# ---------------------------------------------------------------------------------------------
# Stages


class _PolicyStage:
    def __init__(self, rt: PolicyRuntime):
        self.rt = rt

    async def on_request(self, ctx: RequestContext) -> None:
        pass

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        pass


class Audit(_PolicyStage):
    """One hash-chained record per request, written when it ends, whatever the ending."""

    name = "audit"

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        usage = ctx.usage or {}
        rec = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": ctx.request_id,
            "method": ctx.method,
            "path": ctx.path,
            "tenant": ctx.tenant,
            "key_id": ctx.key_id,
            "model": ctx.model,
            "variant": ctx.variant,
            "shadow": ctx.shadow,
            "status": outcome.status,
            "error": outcome.error,
            "prompt_tokens": usage.get("prompt_tokens", ctx.prompt_tokens),
            "completion_tokens": usage.get("completion_tokens"),
            "reserved_tokens": ctx.reserved_tokens or None,
            "latency_ms": round((outcome.finished_at - ctx.received_at) * 1000, 3),
            "ttfb_ms": round((outcome.first_byte_at - ctx.received_at) * 1000, 3) if outcome.first_byte_at else None,
            "guardrails": [_action_dict(a) for a in ctx.guardrail_actions],
            "quota": ctx.quota,
        }
        if ctx.keep_text and ctx.payload is not None:
            rec["prompt"] = ctx.payload.get("messages", ctx.payload.get("prompt"))
            rec["response"] = "".join(ctx.response_text)
            if ctx.response_fields:  # what else the client was shown: refusal, reasoning, tool calls
                rec["response_fields"] = {k: "".join(v) for k, v in ctx.response_fields.items()}
        assert self.rt.audit_log is not None  # this stage exists only with an audit log
        self.rt.audit_log.write(rec)


def _action_dict(a) -> dict:
    return {
        "guardrail": a.guardrail,
        "action": a.action,
        "direction": a.direction,
        "entity": a.entity,
        "count": a.count,
    }


class Authenticate(_PolicyStage):
    """Bearer key -> tenant, key id and role; 401 otherwise."""

    name = "authenticate"

    async def on_request(self, ctx: RequestContext) -> None:
        p = self.rt.keyring.authenticate(ctx.headers.get("authorization"))  # AuthError: a 401
        ctx.tenant, ctx.key_id, ctx.role = p.tenant, p.key_id, p.role
        tenant = self.rt.tenants[p.tenant]
        ctx.keep_text = tenant.audit_content


class Route(_PolicyStage):
    """Public name -> model deployment: 404 unknown, 403 not the tenant's, experiments pick a
    sticky variant (or the one an admin key forces), and maybe a shadow."""

    name = "route"

    async def on_request(self, ctx: RequestContext) -> None:
        payload = ctx.payload or {}
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "`model` is required and must be a string.", param="model")
        rt = self.rt
        allowed = rt.allowed.get(ctx.tenant) if ctx.tenant else None
        if model not in rt.public:
            visible = sorted(rt.public if allowed is None else allowed)
            raise GatewayError(
                404,
                f"The model `{model}` does not exist. Available: {', '.join(visible)}.",
                code="model_not_found",
                param="model",
            )
        if allowed is not None and model not in allowed:
            raise GatewayError(
                403,
                f"Tenant `{ctx.tenant}` may not use the model `{model}`. "
                f"Available to it: {', '.join(sorted(allowed)) or 'none'}.",
                code="model_not_allowed",
                param="model",
            )
        ctx.model = model
        exp = rt.policy.experiments.get(model)
        forced = ctx.headers.get(VARIANT_HEADER)
        if forced and forced in rt.candidate_of:
            return self._pin_candidate(ctx, exp, forced)
        if exp is None:
            ctx.target = ctx.variant = model
        elif forced:
            if ctx.role != "admin":
                raise GatewayError(
                    403,
                    f"Only admin keys may choose a variant with {VARIANT_HEADER}.",
                    code="variant_override_not_allowed",
                )
            if forced not in exp.variants:
                raise GatewayError(
                    400,
                    f"`{forced}` is not a variant of `{model}`; variants: {', '.join(exp.variants)}.",
                    code="unknown_variant",
                )
            ctx.target = ctx.variant = forced
        else:
            user = payload.get("user") or ctx.headers.get(exp.user_header) or ctx.key_id or "anonymous"
            ctx.target = ctx.variant = assign_variant(model, ctx.tenant or OPEN_TENANT, str(user), exp.variants)
        split = rt.rollouts.get(ctx.target)
        if split is not None:
            self._split(ctx, split)
        if exp is not None:
            if (
                exp.shadow is not None
                and exp.shadow.variant != ctx.target
                and shadow_selected(model, ctx.request_id, exp.shadow.percent)
            ):
                ctx.shadow = exp.shadow.variant
            payload["model"] = ctx.target  # the engine serves the variant under its own name
            ctx.payload_changed = True
        ctx.response_headers[VARIANT_HEADER] = ctx.variant

    def _pin_candidate(self, ctx: RequestContext, exp, candidate: str) -> None:
        """An admin's request for a rollout's candidate alone, whatever its share (the rollout's
        evaluation gate asks its prompts this way). Only admin keys: the candidate is untested."""
        if ctx.role != "admin" and not self.rt.open:
            raise GatewayError(
                403, f"Only admin keys may choose a variant with {VARIANT_HEADER}.", code="variant_override_not_allowed"
            )
        assert ctx.payload is not None  # it named the model
        rolled = self.rt.candidate_of[candidate]
        if rolled != ctx.model and (exp is None or rolled not in exp.variants):
            raise GatewayError(400, f"`{candidate}` is not a variant of `{ctx.model}`.", code="unknown_variant")
        ctx.target = ctx.variant = candidate
        ctx.payload["model"] = candidate  # the candidate's engines serve under that name
        ctx.payload_changed = True
        ctx.response_headers[VARIANT_HEADER] = candidate

    def _split(self, ctx: RequestContext, split: tuple[str, float]) -> None:
        """A rollout in progress: its share of users goes to the candidate, the same users at every
        step as the share grows (rendezvous hashing moves users only towards the candidate). A
        request that names no user (`user` field, x-keel-user) is split by itself: sticky by key
        would move a whole application at once."""
        candidate, percent = split
        user = (ctx.payload or {}).get("user") or ctx.headers.get(ROLLOUT_USER_HEADER)
        who = f"user:{user}" if user else f"request:{ctx.request_id}"
        baseline = ctx.target
        assert baseline is not None and ctx.payload is not None  # routed: its rollout was found by it
        if (
            assign_variant(
                f"rollout:{baseline}", ctx.tenant or OPEN_TENANT, who, {baseline: 100.0 - percent, candidate: percent}
            )
            == candidate
        ):
            ctx.target = ctx.variant = candidate
            ctx.payload["model"] = candidate  # the candidate's engines serve under that name
            ctx.payload_changed = True


ROLLOUT_USER_HEADER = "x-keel-user"


def allowed_models(tenant: TenantConfig, public: set[str]) -> set[str]:
    return set(public) if ALL_MODELS in tenant.models else set(tenant.models) & public


# Prompts longer than this (request body bytes, ~4 bytes a token) are counted off the event
# loop (serving/gateway/offload.py): the tokenizer releases the GIL, so a long prompt (~1 µs a
# token) does not hold every other request's stream for milliseconds. Shorter ones are counted
# inline: handing work to a thread and back costs more than counting them.
OFFLOAD_COUNT_BYTES = 8192


class CountTokens(_PolicyStage):
    """Prompt tokens with the model's own tokenizer, for tenants whose token quotas or
    max_prompt_tokens guardrail need them before the engine runs (ASCII text for a byte-level
    BPE tokenizer through a per-word cache, serving.policy.tokens._AsciiCounter; other text
    ~1 µs a token; the engine's own count settles the quota and goes to the audit log either way)."""

    name = "count_tokens"

    def __init__(self, rt: PolicyRuntime):
        super().__init__(rt)
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


class Admit(_PolicyStage):
    """Token and request quotas: reserve at admission, settle to the engine's usage at the end."""

    name = "quota"

    def __init__(self, rt: PolicyRuntime):
        super().__init__(rt)
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


class Prepare(_PolicyStage):
    """Last: ask the engine for usage when a policy reads the response; serialise changed bodies."""

    name = "prepare"

    async def on_request(self, ctx: RequestContext) -> None:
        p = ctx.payload
        assert p is not None  # ParseBody, the first stage, set it
        ctx.inspect = self.rt.inspects
        if ctx.inspect and p.get("stream"):
            so = p.get("stream_options")
            ctx.client_wants_usage = isinstance(so, dict) and bool(so.get("include_usage"))
            if not ctx.client_wants_usage:
                p["stream_options"] = {**(so if isinstance(so, dict) else {}), "include_usage": True}
                ctx.payload_changed = True
        if ctx.payload_changed:
            try:
                ctx.body = orjson.dumps(p)
            except TypeError:  # orjson.JSONEncodeError; request_body.parse leaves none: a backstop
                raise _unencodable_field(p) from None


def _unencodable_field(payload: dict) -> GatewayError:
    for key, value in payload.items():
        try:
            orjson.dumps(value)
        except TypeError as e:
            return GatewayError(400, f"`{key}` cannot be sent on as JSON: {e}.", code="invalid_json", param=key)
    return GatewayError(400, "The request body cannot be sent on as JSON.", code="invalid_json")
