"""Closed-loop streaming load against any OpenAI-compatible server, with vLLM bench's metrics:
a one-load-point front end to the `keel bench` suite (serving/bench/), used by
benchmarks/compare.py and handy from a shell.

Definitions follow `vllm bench serve` (serving/bench/metrics.py): TTFT to the first chunk
carrying output text (to the first chunk with choices when none carries text, as a request
whose tokens all decode to nothing), ITL between such chunks, TPOT = (e2e - TTFT) / (output
tokens - 1), output throughput = output tokens of successful requests / wall time. Token counts
come from the server's `usage`; every request uses `ignore_eos`, so it generates exactly
max_tokens.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --model demo -c 16 -n 256
"""

from __future__ import annotations

import argparse
import asyncio
import json

from serving.bench.datasets import make_requests
from serving.bench.loadgen import run_point
from serving.bench.metrics import summarize
from serving.bench.spec import DatasetSpec, LoadSpec


async def run_load(
    base_url: str,
    model: str,
    concurrency: int,
    num_requests: int,
    max_tokens: int = 64,
    prompt_words: int = 32,
    seed: int = 0,
    api_key: str | None = None,
    endpoint: str = "chat",
) -> dict:
    """One closed-loop load point: `concurrency` workers send `num_requests` random prompts of
    about `prompt_words` tokens (no tokenizer here: one word ~ one token)."""
    dataset = DatasetSpec(kind="random", input_len=prompt_words, output_len=max_tokens)
    load = LoadSpec(
        mode="concurrency",
        levels=[concurrency],
        num_requests=num_requests,
        warmup_requests=0,
        seed=seed,
        endpoint=endpoint,
    )
    requests = make_requests(dataset, num_requests, seed)
    records, duration = await run_point(base_url, model, requests, load, concurrency, api_key)
    summary = summarize(records, duration)
    summary["concurrency"] = concurrency
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="demo")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-n", "--num-requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = asyncio.run(
        run_load(
            a.url, a.model, a.concurrency, a.num_requests, a.max_tokens, a.prompt_words, a.seed, a.api_key, a.endpoint
        )
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
