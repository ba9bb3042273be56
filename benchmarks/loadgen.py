"""Closed-loop streaming load against any OpenAI-compatible server, with vLLM bench's metrics.

Definitions follow `vllm bench serve` so numbers compare:
- TTFT: request sent -> first chunk carrying output text;
- ITL: gaps between consecutive chunks carrying output text;
- TPOT: (e2e - TTFT) / (output tokens - 1), for requests with more than one output token;
- output throughput: output tokens of successful requests / wall time of the run.
Output token counts come from the server's `usage` (stream_options.include_usage).

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --model demo -c 16 -n 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import aiohttp

WORDS = (
    "the quick brown fox jumps over a lazy dog while model servers stream tokens to many "
    "clients across replicas and regions under load with quotas guardrails and routing"
).split()


@dataclass
class RequestResult:
    ok: bool
    status: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one_request(session: aiohttp.ClientSession, url: str, payload: dict, headers: dict) -> RequestResult:
    res = RequestResult(ok=False)
    start = time.perf_counter()
    last = start
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            res.status = resp.status
            if resp.status != 200:
                res.error = (await resp.text())[:300]
                return res
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    if not event.startswith(b"data: "):
                        continue
                    data = event[6:]
                    if data == b"[DONE]":
                        continue
                    now = time.perf_counter()
                    doc = json.loads(data)
                    if "error" in doc:
                        res.error = json.dumps(doc["error"])[:300]
                        return res
                    choices = doc.get("choices") or []
                    if choices:
                        c = choices[0]
                        text = (c.get("delta") or {}).get("content") if "delta" in c else c.get("text")
                        if text:
                            if res.ttft == 0.0:
                                res.ttft = now - start
                            else:
                                res.itl.append(now - last)
                            last = now
                    if doc.get("usage"):
                        res.output_tokens = doc["usage"].get("completion_tokens", 0)
                        res.prompt_tokens = doc["usage"].get("prompt_tokens", 0)
            res.e2e = time.perf_counter() - start
            res.ok = res.output_tokens > 0
            if not res.ok:
                res.error = "no usage / no output"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


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
    rng = random.Random(seed)
    prompts = [make_prompt(rng, prompt_words) for _ in range(num_requests)]
    url = base_url.rstrip("/") + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[RequestResult] = []
    queue = list(range(num_requests))

    def payload(i: int) -> dict:
        body = {
            "model": model,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.0,
        }
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompts[i]}]
        else:
            body["prompt"] = prompts[i]
        return body

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker():
            while queue:
                i = queue.pop()
                results.append(await one_request(session, url, payload(i), headers))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return summarize(results, duration, concurrency)


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[RequestResult], duration: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft * 1000 for r in ok]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) * 1000 for r in ok if r.output_tokens > 1]
    itls = [x * 1000 for r in ok for x in r.itl]
    e2es = [r.e2e * 1000 for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    failures: dict[str, int] = {}
    for r in results:
        if not r.ok:
            failures[str(r.status)] = failures.get(str(r.status), 0) + 1
    summary = {
        "concurrency": concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "failures_by_status": failures,
        "duration": duration,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
    }
    for name, vals in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2es)):
        summary[f"mean_{name}_ms"] = statistics.fmean(vals) if vals else 0.0
        summary[f"median_{name}_ms"] = _pct(vals, 50)
        summary[f"p99_{name}_ms"] = _pct(vals, 99)
    errors = [r.error for r in results if not r.ok][:3]
    if errors:
        summary["sample_errors"] = errors
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
        run_load(a.url, a.model, a.concurrency, a.num_requests, a.max_tokens, a.prompt_words, a.seed, a.api_key, a.endpoint)
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
