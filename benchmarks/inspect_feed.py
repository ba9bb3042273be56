"""µs per streamed chat response in StreamInspector.feed, under configs/local.yaml's policy.

The request goes through the real policy pipeline (so the inspector is set up as the gateway
sets it up), then a vLLM-shaped stream of 64 content events is fed one event per read (the
gateway keeping up with the engine) and all at once (the gateway behind). The time is this
thread's CPU time, best of 9 runs, so other work on a shared machine disturbs it little; compare
two trees by running this in each, alternately, on the same machine.

--compare times the inspector's shortcuts for vLLM's byte layout (a byte search for the usage
chunk, a text template learned from the first text event) against parsing every event, side by
side in one run (alternating, best of each); the shortcuts stay only while they measure faster.

    PYTHONPATH=$PWD python benchmarks/inspect_feed.py [--compare]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson

from serving.config import REPO_ROOT, load_config
from serving.gateway.inspect import StreamInspector
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.policy import ModelInfo, PolicyRuntime
from serving.gateway.stages import RequestContext
from serving.policy.config import PolicyConfig

TOKENS = 64
WORDS = [
    "",
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "model",
    "servers",
    "stream",
    "tokens",
    "to",
    "many",
    "clients",
    "at",
    "once",
][1:]


def stream_events() -> list[bytes]:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_764_000_000, "model": "demo"}

    def chunk(delta: dict, finish=None) -> bytes:
        return (
            b"data: "
            + orjson.dumps(
                {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            )
            + b"\n\n"
        )

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": " " + WORDS[i % len(WORDS)]}) for i in range(TOKENS)]
    out.append(chunk({"content": ""}, finish="length"))
    usage = {"prompt_tokens": 40, "total_tokens": 40 + TOKENS, "completion_tokens": TOKENS}
    out.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def runtime(rules: bool) -> PolicyRuntime:
    cfg = load_config(REPO_ROOT / "configs" / "local.yaml", check_engine_args=False)
    raw = cfg.policy_dict()
    for t in raw["tenants"].values():
        t.pop("quotas", None)  # no quota: the requests admitted here never end
    pol = PolicyConfig.model_validate({**raw, "audit": {"enabled": False}})
    if not rules:
        pol = pol.model_copy(update={"guardrails": {}})
        for t in pol.tenants.values():
            t.guardrails = None
    return PolicyRuntime(pol, {"demo": ModelInfo("demo", None, 512)}, GatewayMetrics())


async def admitted(rt: PolicyRuntime) -> RequestContext:
    body = orjson.dumps(
        {"model": "demo", "stream": True, "max_tokens": TOKENS, "messages": [{"role": "user", "content": "hello"}]}
    )
    ctx = RequestContext("r", "POST", "/v1/chat/completions", {"authorization": "Bearer sk-keel-demo"}, body)
    await rt.pipeline.admit(ctx)
    return ctx


def measure(rt: PolicyRuntime, pieces: list[bytes], n: int = 300, repeats: int = 9, shortcuts: bool = True) -> float:
    async def admit_all() -> list[RequestContext]:
        return [await admitted(rt) for _ in range(n * repeats)]

    ctxs = asyncio.run(admit_all())
    runs = []
    for r in range(repeats):
        batch = ctxs[r * n : (r + 1) * n]
        t0 = time.thread_time()
        for ctx in batch:
            insp = StreamInspector(ctx, chat=True, shortcuts=shortcuts)
            for p in pieces:
                insp.feed(p)
            insp.finish()
        runs.append((time.thread_time() - t0) / n * 1e6)
    return min(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare", action="store_true", help="shortcuts against parsing every event")
    args = ap.parse_args()
    events = stream_events()
    print(f"{TOKENS} content events, python {sys.version.split()[0]}")
    for rules in (False, True):
        rt = runtime(rules)
        label = "default output rules" if rules else "no guardrails"
        for name, pieces in (("one event a read", events), ("whole stream in one read", [b"".join(events)])):
            if not args.compare:
                us = measure(rt, pieces)
                print(f"{label:22} {name:26} {us:8.1f} µs/stream {us / TOKENS:6.2f} µs/event")
                continue
            fast, parsed = float("inf"), float("inf")
            for _ in range(3):  # alternating, so both see the same machine
                fast = min(fast, measure(rt, pieces, repeats=3))
                parsed = min(parsed, measure(rt, pieces, repeats=3, shortcuts=False))
            print(
                f"{label:22} {name:26} shortcuts {fast:8.1f} µs/stream, every event parsed "
                f"{parsed:8.1f} µs/stream: {parsed / fast:5.2f}x"
            )


if __name__ == "__main__":
    main()
