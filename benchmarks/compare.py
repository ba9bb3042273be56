"""Keel vs bare vLLM on the same model and machine, one server at a time, several rounds.

Each round starts bare vLLM's OpenAI server (same engine arguments as the Keel config), runs
the load points, stops it; then does the same with the whole Keel stack (`keel serve`:
gateway -> Ray Serve engine replica -> vLLM). Servers alternate so drift in the machine hits
both. Prints medians over rounds, Keel/bare ratios, and best-of-rounds TTFT p50 at c=1 (with
the tiny model c=1 TTFT is bimodal per run; see benchmarks/README.md).

    python -m benchmarks.compare                      # 3 rounds, c = 1, 16, 64
    python -m benchmarks.compare --rounds 5 --requests 64:48,16:256,64:512
    python -m benchmarks.compare --baseline policies-off  # Keel with the config's policies vs none

With `--baseline policies-off` the two servers are both `keel serve`: the config as it is (its
tenants, quotas, guardrails, audit) and the same stack with every policy key removed and the
audit off (a byte relay), so the table is the cost of the policies end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.loadgen import run_load
from benchmarks.suite.stack import free_port, keel_doc, start_keel, stop, wait_ready
from serving.config import REPO_ROOT, load_config, load_manifest
from serving.engine.args import to_cli_args
from serving.models import ensure_weights
from serving.policy.identity import DEMO_KEY

RESULTS = REPO_ROOT / "benchmarks" / "results"


def start_bare(cfg, model: str, port: int, log) -> subprocess.Popen:
    mc = cfg.models[model]
    _, weights = load_manifest(cfg, mc.weights)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(weights),
           "--served-model-name", model, "--host", "127.0.0.1", "--port", str(port), *to_cli_args(mc.engine)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **mc.env}
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def measure(url: str, model: str, points: list[tuple[int, int]], max_tokens: int,
            api_key: str | None = None) -> dict[int, dict]:
    asyncio.run(run_load(url, model, 4, 8, max_tokens, api_key=api_key))  # warm-up, not recorded
    out = {}
    for c, n in points:
        out[c] = asyncio.run(run_load(url, model, c, n, max_tokens, seed=c, api_key=api_key))
        r = out[c]
        print(f"    c={c:<3} {r['output_throughput']:8.0f} tok/s  ttft p50 {r['median_ttft_ms']:7.1f} ms  "
              f"tpot p50 {r['median_tpot_ms']:6.2f} ms  failed {r['failed']}", flush=True)
    return out


def table(runs: dict[str, list[dict[int, dict]]], points: list[tuple[int, int]],
          names: tuple[str, str] = ("bare", "Keel")) -> str:
    med = lambda server, c, key: statistics.median(r[c][key] for r in runs[server])  # noqa: E731
    best = lambda server, c, key: min(r[c][key] for r in runs[server])  # noqa: E731
    b, k = names
    rows = [
        f"| c | {b} out tok/s | {k} out tok/s | ratio | {b} TTFT p50 | {k} TTFT p50 | Δ TTFT | {b} TPOT p50 | {k} TPOT p50 | failed ({b}/{k}) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, _ in points:
        bt, kt = med("bare", c, "output_throughput"), med("keel", c, "output_throughput")
        bf = sum(r[c]["failed"] for r in runs["bare"])
        kf = sum(r[c]["failed"] for r in runs["keel"])
        b_ttft, k_ttft = med("bare", c, "median_ttft_ms"), med("keel", c, "median_ttft_ms")
        rows.append(
            f"| {c} | {bt:,.0f} | {kt:,.0f} | **{kt / bt:.2f}×** | {b_ttft:.1f} ms | {k_ttft:.1f} ms | "
            f"{k_ttft - b_ttft:+.1f} ms | {med('bare', c, 'median_tpot_ms'):.2f} ms | "
            f"{med('keel', c, 'median_tpot_ms'):.2f} ms | {bf}/{kf} |"
        )
    c1 = points[0][0]
    b1, k1 = best("bare", c1, "median_ttft_ms"), best("keel", c1, "median_ttft_ms")
    rows.append("")
    rows.append(f"Best-of-rounds TTFT p50 at c={c1}: {b} {b1:.1f} ms, {k} {k1:.1f} ms (Δ {k1 - b1:+.1f} ms).")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO_ROOT / "configs" / "local.yaml"))
    ap.add_argument("--model", default=None, help="public model name (default: the config's first)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", default="1:32,16:256,64:384", help="concurrency:requests,...")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--baseline", choices=["bare", "policies-off"], default="bare",
                    help="bare: vLLM's own server; policies-off: the same Keel stack without policies")
    ap.add_argument("--api-key", default=DEMO_KEY, help="key for the config's tenants (demo key)")
    a = ap.parse_args()

    cfg = load_config(a.config)
    model = a.model or next(iter(cfg.models))
    ensure_weights(cfg, cfg.models[model].weights)
    points = [tuple(int(x) for x in p.split(":")) for p in a.requests.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: dict[str, list] = {"bare": [], "keel": []}
    with open(RESULTS / f"compare-{stamp}.log", "wb") as log:
        for rnd in range(a.rounds):
            for server in ("bare", "keel"):
                port = free_port()
                print(f"round {rnd + 1}/{a.rounds}: {server} on :{port}", flush=True)
                t0 = time.monotonic()
                bare = server == "bare" and a.baseline == "bare"
                with_policies = server == "keel"
                if bare:
                    proc = start_bare(cfg, model, port, log)
                else:
                    proc = start_keel(keel_doc(Path(a.config), port, policies=with_policies), RESULTS, log)
                key = a.api_key if with_policies and cfg.tenants else None
                try:
                    wait_ready(f"http://127.0.0.1:{port}", proc, a.startup_timeout)
                    print(f"    ready in {time.monotonic() - t0:.0f}s", flush=True)
                    runs[server].append(measure(f"http://127.0.0.1:{port}", model, points, a.max_tokens, key))
                finally:
                    stop(proc, signal.SIGTERM if bare else signal.SIGINT)
                time.sleep(2)
    names = ("bare", "Keel") if a.baseline == "bare" else ("policies off", "policies on")
    text = table(runs, points, names)
    header = (f"{names[1]} vs {names[0]}: model `{model}` ({cfg.models[model].weights}), {a.rounds} rounds, "
              f"streaming chat, {a.max_tokens} output tokens (ignore_eos), medians over rounds\n")
    print("\n" + header + "\n" + text)
    out = RESULTS / f"compare-{stamp}.json"
    out.write_text(json.dumps({"model": model, "points": points, "runs": runs, "table": text}, indent=2))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
