"""Judging a finished request against the SLOs: which objectives it counts for, good or bad.

Plain Python over what the gateway knows when a request ends (status, whether it streamed, the
time to its first token, its completion tokens): O(number of SLOs) per request, nothing per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.ops.slo_config import SloConfig

CLIENT_GONE = 499  # the client closed first: its doing, not the service's (docs/ops/slo.md)


@dataclass(frozen=True)
class RequestTiming:
    """A finished request as the SLOs see it."""

    status: int
    ttft_s: float | None = None  # streamed and a first token reached the client
    tpot_s: float | None = None  # streamed, one choice, >= 2 completion tokens


def timing_of(ctx, outcome) -> RequestTiming:
    """The timing of a gateway request (serving.gateway.stages RequestContext and Outcome).

    The first body byte of a stream is its first token event: vLLM sends the first event (the
    role delta for chat) with the first generated token, after prefill."""
    payload = ctx.payload if isinstance(ctx.payload, dict) else {}
    if not (payload.get("stream") is True and outcome.status < 400 and outcome.first_byte_at is not None):
        return RequestTiming(outcome.status)
    ttft = outcome.first_byte_at - ctx.received_at
    tokens = (ctx.usage or {}).get("completion_tokens")
    one_choice = payload.get("n", 1) in (1, None)  # usage sums the choices: per-token time needs one
    tpot = None
    if one_choice and isinstance(tokens, int) and tokens >= 2 and outcome.error is None:
        tpot = (outcome.finished_at - outcome.first_byte_at) / (tokens - 1)
    return RequestTiming(outcome.status, ttft, tpot)


class _Compiled:
    __slots__ = ("name", "kind", "models", "tenants", "threshold_s")

    def __init__(self, name: str, slo: SloConfig):
        self.name = name
        self.kind = slo.kind
        self.models = None if "*" in slo.models else frozenset(slo.models)
        self.tenants = None if slo.tenants is None else frozenset(slo.tenants)
        self.threshold_s = slo.threshold_s


class SloJudge:
    """The policy's SLOs, ready to judge requests (built once per policy version)."""

    def __init__(self, slos: dict[str, SloConfig]):
        self.slos = [_Compiled(n, s) for n, s in slos.items()]

    def thresholds_s(self) -> dict[str, list[float]]:
        """kind -> the thresholds (seconds) of the SLOs of that kind: histogram bounds to have."""
        out: dict[str, list[float]] = {"ttft": [], "tpot": []}
        for s in self.slos:
            if s.threshold_s is not None:
                out[s.kind].append(s.threshold_s)
        return out

    def judge(self, model: str | None, tenant: str | None, t: RequestTiming) -> list[tuple[str, bool]]:
        """(slo name, good) for each SLO this request counts for."""
        if model is None or t.status == CLIENT_GONE:
            return []
        out = []
        for s in self.slos:
            if s.models is not None and model not in s.models:
                continue
            if s.tenants is not None and tenant not in s.tenants:
                continue
            if s.kind == "availability":
                out.append((s.name, t.status < 500))
            elif s.kind == "ttft":
                if t.ttft_s is not None:
                    assert s.threshold_s is not None  # a latency SLO has its threshold
                    out.append((s.name, t.ttft_s <= s.threshold_s))
            elif t.tpot_s is not None:
                assert s.threshold_s is not None
                out.append((s.name, t.tpot_s <= s.threshold_s))
        return out
