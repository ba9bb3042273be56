"""A synthetic 60-day audit log for `keel cost report` and `keel cost forecast` to read.

    python benchmarks/cost_demo.py OUT_DIR [--days 60] [--seed 7]
    keel cost report OUT_DIR/keel.yaml --since 30d
    keel cost forecast OUT_DIR/keel.yaml --horizon 30d

SYNTHETIC: no request here was served. Written with the real AuditLog writer by two "gateways"
(two slots, as two gateway processes write), request records as serving.gateway.policy.Audit
writes them and replica records as serving.ops.replica_time.ReplicaCensus does (on a change and
every 10 minutes). Tenants: acme (steady, busy on weekdays), globex (growing every day), initech
(small), umbrella (started 9 days ago: too little history for a weekly season), and shadow copies
of acme's traffic to a candidate. Models: `chat` (h100-80gb, autoscaled: one replica per 60
requests an hour, 1 to 8), its candidate `chat-v2` (h100-80gb, 1 replica) and `demo`
(cpu-2core, 1 replica). OUT_DIR/keel.yaml is a config
with those models, tenants, quotas and budgets.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import time
from pathlib import Path

import numpy as np

from serving.ops.replica_time import REFRESH_S, ReplicaCensus
from serving.policy.audit import AuditLog

DAY = 86_400
CONFIG = """\
# Written by benchmarks/cost_demo.py: the config its synthetic audit log goes with.
models:
  chat: {{weights: demo-tiny, deployment: {{autoscaling: {{min_replicas: 1, max_replicas: 8}}}}}}
  demo: {{weights: demo-tiny}}
tenants:
  acme: {{quotas: {{tokens_per_day: 3000000}}}}
  globex: {{quotas: {{tokens_per_day: 1800000}}}}
  initech: {{}}
  umbrella: {{}}
audit:
  dir: {audit}
costs:
  hardware: {{chat: h100-80gb, chat-v2: h100-80gb, demo: cpu-2core}}
  token_weights: {{prompt: 0.25, completion: 1.0}}
  idle: unallocated
  budgets: {{acme: 2000, globex: 2500}}
"""

# tenant -> (model, requests on a weekday at day d of the run, weekend factor)
TENANTS = {
    "acme": ("chat", lambda d: 1800.0, 0.3),
    "globex": ("chat", lambda d: 150.0 + 25.0 * d, 0.6),
    "initech": ("demo", lambda d: 300.0, 1.0),
    "umbrella": ("chat", lambda d: 400.0, 0.5),
}
UMBRELLA_DAYS = 9
SHADOW_SHARE = 0.05  # of acme's chat requests, copied to chat-v2


def hour_shape(hour: int) -> float:
    """Traffic through the day (UTC): business hours high, nights low; mean 1."""
    return 0.3 + 1.4 * max(0.0, math.sin(math.pi * (hour - 6) / 14)) if 6 <= hour <= 20 else 0.3


REQUESTS_PER_REPLICA_HOUR = 60  # what one chat replica carries: the autoscaler's target


def rate(tenant: str, day: int, when: dt.datetime, shape: np.ndarray) -> float:
    """Expected requests of a tenant in the hour starting at `when`."""
    _, per_day, weekend = TENANTS[tenant]
    return per_day(day) * (weekend if when.weekday() >= 5 else 1.0) * shape[when.hour] / 24


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    audit = (args.out / "audit").resolve()
    if audit.exists() and any(audit.iterdir()):
        raise SystemExit(f"{audit} is not empty: give a new OUT_DIR")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "keel.yaml").write_text(CONFIG.format(audit=audit))
    rng = np.random.default_rng(args.seed)
    end = time.time()
    start = end - args.days * DAY
    gateways = [AuditLog(audit, flush_interval_s=0.05), AuditLog(audit, flush_interval_s=0.05)]
    censuses = [ReplicaCensus(), ReplicaCensus()]
    shape = np.array([hour_shape(h) for h in range(24)])
    shape /= shape.mean()
    written = 0
    t = start
    n_hours = int(args.days * 24)
    for h in range(n_hours):
        t = start + h * 3600
        when = dt.datetime.fromtimestamp(t, dt.timezone.utc)
        day = h // 24
        active = [n for n in TENANTS if n != "umbrella" or day >= args.days - UMBRELLA_DAYS]
        chat_rate = sum(rate(n, day, when, shape) for n in active if TENANTS[n][0] == "chat")
        replicas = min(8, max(1, math.ceil(chat_rate / REQUESTS_PER_REPLICA_HOUR)))
        # replicas: what each gateway's census writes at each registry poll (every 5 minutes here)
        for step in range(0, 3600, 300):
            counts = {"chat": replicas, "demo": 1, "chat-v2": 1}
            for g, (log, census) in enumerate(zip(gateways, censuses)):
                for rec in census.observe(counts, t + step + 0.3 * g):
                    log.write(rec)
                    written += 1
        requests = []
        for tenant in active:
            model = TENANTS[tenant][0]
            for _ in range(rng.poisson(rate(tenant, day, when, shape))):
                requests.append((t + rng.uniform(0, 3600), tenant, model, False))
                if tenant == "acme" and rng.random() < SHADOW_SHARE:
                    requests.append((t + rng.uniform(0, 3600), tenant, "chat-v2", True))
        for at, tenant, model, shadow in sorted(requests):
            prompt = int(rng.lognormal(math.log(500), 0.6))
            completion = int(rng.lognormal(math.log(200), 0.5))
            rec = {
                "time": dt.datetime.fromtimestamp(at, dt.timezone.utc).isoformat(timespec="milliseconds"),
                "request_id": f"req-{written}",
                "method": "POST",
                "path": "/v1/chat/completions",
                "tenant": tenant,
                "key_id": f"{tenant}-app",
                "model": "chat" if shadow else model,
                "variant": model,
                "shadow": shadow,
                "status": 200,
                "error": None,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "latency_ms": round(float(rng.gamma(4, 300)), 3),
                "guardrails": [],
            }
            gateways[int(rng.integers(2))].write(rec)
            written += 1
    for log in gateways:
        log.close()
    print(
        f"wrote {written:,} synthetic audit records ({args.days} days, refresh every {REFRESH_S:g}s) to "
        f"{audit}; config {args.out / 'keel.yaml'}"
    )


if __name__ == "__main__":
    main()
