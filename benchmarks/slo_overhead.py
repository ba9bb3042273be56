"""What judging a request against the SLOs costs the gateway, per request, in one process.

    python -m benchmarks.slo_overhead [CONFIG]

Times GatewayMetrics' per-request work for one streamed request (best of 9 x 20,000 calls):
the metrics that existed before the SLOs (`observe`), and the SLI part (`_observe_slis`: the
TTFT/TPOT histograms and one event per SLO) with no SLOs and with the config's.
"""

from __future__ import annotations

import sys
import timeit
from types import SimpleNamespace

from serving.config import REPO_ROOT, load_config
from serving.gateway.metrics import GatewayMetrics
from serving.ops.slo_events import SloJudge

CALLS, REPEATS = 20_000, 9


def best_us(fn) -> float:
    return min(timeit.repeat(fn, number=CALLS, repeat=REPEATS)) / CALLS * 1e6


def main(config: str) -> None:
    slos = load_config(config, check_engine_args=False).slos
    ctx = SimpleNamespace(
        model="demo",
        tenant="demo",
        variant=None,
        payload={"stream": True},
        received_at=0.0,
        usage={"prompt_tokens": 5, "completion_tokens": 16},
        guardrail_actions=[],
    )
    out = SimpleNamespace(status=200, error=None, first_byte_at=0.05, finished_at=0.5)
    none, some = GatewayMetrics(), GatewayMetrics()
    none.use_slos(SloJudge({}))
    some.use_slos(SloJudge(slos))
    print(f"per streamed request, best of {REPEATS} x {CALLS:,} calls:")
    print(f"  metrics before SLOs (observe):     {best_us(lambda: some.observe('demo', 0.0, out, 'demo')):6.1f} us")
    print(f"  SLI part, no SLOs (histograms):     {best_us(lambda: none._observe_slis(ctx, out, 'demo')):6.1f} us")
    sli_us = best_us(lambda: some._observe_slis(ctx, out, "demo"))
    print(f"  SLI part, {len(slos)} SLOs:                  {sli_us:6.1f} us")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(REPO_ROOT / "configs" / "local.yaml"))
