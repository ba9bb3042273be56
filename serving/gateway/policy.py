"""The policy stages of the request path, built from the policy part of the config.

Order (each a Stage: `on_request` may raise GatewayError, `on_complete` always runs):

  Anomalies -> Audit -> ParseBody -> Authenticate -> Route -> CountTokens -> GuardInput
        -> GuardOutput -> Admit -> Prepare

Anomalies (serving/gateway/anomalies.py) only reads each request as it ends: being first, its
on_complete runs last and sees the final tenant, model, usage and status.

The guard stages live in serving/gateway/guard.py; GuardOutput also reads the response: its
`on_response` watch sees every text field the client is shown. CountTokens and Admit (prompt
counting, context check, quota reservation and settling) live in serving/gateway/admission.py.

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
from datetime import datetime, timezone

import orjson

from serving.errors import GatewayError
from serving.gateway import anomalies
from serving.gateway.admission import Admit, CountTokens, ModelInfo, count_prompt
from serving.gateway.guard import GuardInput, GuardOutput
from serving.gateway.stages import Outcome, ParseBody, Pipeline, RequestContext, Stage
from serving.ops.slo_events import SloJudge
from serving.policy.audit import AuditLog
from serving.policy.config import ALL_MODELS, PolicyConfig, TenantConfig
from serving.policy.guardrails import InputGuard, OutputGuard
from serving.policy.identity import KeyRing
from serving.policy.quotas import QuotaBackend, make_backend
from serving.policy.routing import assign_variant, shadow_selected

VARIANT_HEADER = "x-keel-variant"
OPEN_TENANT = "-"  # tenant label of requests when no tenants are configured


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
