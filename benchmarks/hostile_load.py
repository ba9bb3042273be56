"""The gateway's memory and connections under two attacks that need no valid key.

- idle flood: open many connections (20,000 by default) as fast as possible and send nothing;
  how many does the gateway hold, how much memory does it take, does a well-behaved client
  still get answered meanwhile, and what is left once the attacker lets go;
- pipelined bodies: a few connections each pipeline many large request bodies (3 x 60 x
  8 MiB by default) as fast as the socket takes them; the gateway's peak and final RSS.

The gateway runs in a child process, in front of the instant responder of
benchmarks/gateway_overhead.py, with a tenant with one key (keys are checked, no other policy:
no guardrail scanning of 8 MiB prompts, which would measure the guardrails instead). The
attacker sends the tenant's key, so the bodies are accepted ones: the worst case for memory.

    python -m benchmarks.hostile_load                       # both attacks, ~1 minute
    python -m benchmarks.hostile_load --code /tmp/keel-old  # the same against another checkout

`--code DIR` runs the gateway child from another checkout of Keel (e.g. a `git worktree` of an
older commit), so before/after figures come from the same script, machine and minute.
Writes benchmarks/results/hostile_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
API_KEY = "sk-keel-hostile-load-bench"
GOOD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: keel\r\nauthorization: Bearer "
    + API_KEY.encode()
    + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
)


# -- the gateway child -------------------------------------------------------------------------


async def serve() -> None:
    """Runs in the child: a gateway (whatever checkout PYTHONPATH points at) + instant engine."""
    import logging

    from benchmarks.gateway_overhead import MODELS, _start_engine
    from serving.gateway.policy import ModelInfo, PolicyRuntime
    from serving.gateway.server import Gateway, GatewaySettings
    from serving.gateway.stages import Pipeline, default_stages
    from serving.policy.config import PolicyConfig
    from serving.policy.identity import key_digest

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    engine, engine_port = await _start_engine(False)
    gw = Gateway(GatewaySettings(port=0), MODELS, Pipeline(default_stages(MODELS)))
    gw.update_endpoints(
        {m: [{"model": m, "replica_id": f"{m}-r1", "host": "127.0.0.1", "port": engine_port}] for m in MODELS}
    )
    pol = {"tenants": {"t": {"keys": [{"id": "k", "digest": key_digest(API_KEY)}]}}, "audit": {"enabled": False}}
    infos = {m: ModelInfo(m, None, None) for m in MODELS}
    gw.set_policy(PolicyRuntime(PolicyConfig.model_validate(pol), infos, gw.metrics))
    await gw.start()
    print(json.dumps({"port": gw.port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes it
    await gw.stop()
    engine.close()


def memory(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "peak_rss_mib": int(fields["VmHWM"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


# -- the attacks (this process) --------------------------------------------------------------


def chat_body(size: int = 0) -> bytes:
    """A valid chat request; size pads it (in the `user` field) to about that many bytes."""
    base = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "user": ""}
    body = json.dumps(base).encode()
    if size > len(body):
        base["user"] = "x" * (size - len(body))
        body = json.dumps(base).encode()
    return body


async def good_request(port: int, timeout: float = 10) -> dict:
    """One well-behaved request on a new connection: its status and latency (or what failed)."""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        body = chat_body()
        writer.write(GOOD % len(body) + body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        writer.close()
        return {"status": int(head.split()[1]), "latency_ms": round((time.perf_counter() - started) * 1000, 1)}
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        return {"status": None, "error": type(e).__name__}


async def flood(port: int, n: int) -> None:
    """Runs in a flooder child: open n connections, say how it went, hold them until stdin closes."""
    started = time.perf_counter()
    held, failed = [], 0
    sem = asyncio.Semaphore(512)

    async def one():
        nonlocal failed
        async with sem:
            try:
                held.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10))
            except (OSError, asyncio.TimeoutError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(n)))
    print(json.dumps({"opened": len(held), "failed": failed, "seconds": time.perf_counter() - started}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for _, w in held:
        w.close()


async def idle_flood(port: int, pid: int, n: int, hold_s: float) -> dict:
    """n idle connections from flooder children (one process cannot hold 20,000 sockets under
    the usual open-file limit of 20,000), held for hold_s while the gateway is watched."""
    per_child = 9000
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "flood",
                "--port",
                str(port),
                "--idle",
                str(min(per_child, n - i)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(0, n, per_child)
    ]
    reports = [json.loads(c.stdout.readline()) for c in children]
    at_peak = memory(pid)
    during = await good_request(port)
    samples = []
    for _ in range(int(hold_s / 0.5)):
        await asyncio.sleep(0.5)
        samples.append(memory(pid))
    later = await good_request(port)
    for c in children:
        c.stdin.close()
        c.wait(timeout=60)
    await asyncio.sleep(2)
    return {
        "connections": n,
        "opened_s": round(max(r["seconds"] for r in reports), 1),
        "connect_failures": sum(r["failed"] for r in reports),
        "gateway_after_open": at_peak,
        "good_request_during": during,
        "peak_fds": max(s["fds"] for s in samples + [at_peak]),
        "peak_rss_mib": max(s["rss_mib"] for s in samples + [at_peak]),
        f"gateway_after_{hold_s:g}s": samples[-1],
        "good_request_later": later,
        "gateway_after_close": memory(pid),
    }


async def pipelined_bodies(port: int, pid: int, conns: int, per_conn: int, body_mib: float, timeout_s: float) -> dict:
    body = chat_body(int(body_mib * 1024 * 1024) - 1024)
    request = GOOD % len(body) + body
    peak = {"rss_mib": 0.0}
    answered = []

    async def attacker():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got = 0

        async def read_answers():
            nonlocal got
            try:
                while got < per_conn:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                    got += 1
            except (OSError, asyncio.IncompleteReadError):
                pass

        reading = asyncio.ensure_future(read_answers())
        try:
            for _ in range(per_conn):
                writer.write(request)
                await writer.drain()
        except OSError:
            pass
        await asyncio.wait([reading], timeout=timeout_s)
        reading.cancel()
        answered.append(got)
        writer.close()

    async def sample():
        while True:
            m = memory(pid)
            peak["rss_mib"] = max(peak["rss_mib"], m["rss_mib"])
            await asyncio.sleep(0.2)

    sampler = asyncio.ensure_future(sample())
    started = time.perf_counter()
    await asyncio.gather(*(attacker() for _ in range(conns)))
    took = time.perf_counter() - started
    await asyncio.sleep(2)
    sampler.cancel()
    return {
        "connections": conns,
        "requests_each": per_conn,
        "body_mib": body_mib,
        "answered": answered,
        "seconds": round(took, 1),
        "peak_rss_mib": peak["rss_mib"],
        "gateway_after_close": memory(pid),
    }


async def attack(a, port: int, pid: int) -> dict:
    out = {"gateway_at_start": memory(pid)}
    if a.idle:
        out["idle_flood"] = await idle_flood(port, pid, a.idle, a.hold)
    if a.pipelines:
        out["pipelined_bodies"] = await pipelined_bodies(port, pid, a.pipelines, a.bodies, a.body_mib, a.timeout)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="attack", choices=["attack", "serve", "flood"])
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)  # flood: the gateway's port
    ap.add_argument("--code", help="a Keel checkout to run the gateway from (default: this one)")
    ap.add_argument("--idle", type=int, default=20_000, help="idle connections to open (0: skip)")
    ap.add_argument("--hold", type=float, default=8.0, help="seconds to hold them")
    ap.add_argument("--pipelines", type=int, default=3, help="connections pipelining bodies (0: skip)")
    ap.add_argument("--bodies", type=int, default=60, help="requests each pipelines")
    ap.add_argument("--body-mib", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a connection's answers")
    a = ap.parse_args()
    import uvloop

    if a.mode == "serve":
        uvloop.run(serve())
        return
    if a.mode == "flood":
        uvloop.run(flood(a.port, a.idle))
        return
    code = Path(a.code).resolve() if a.code else REPO_ROOT
    env = {**os.environ, "PYTHONPATH": str(code)}
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "serve"],
        cwd=code,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    gateway_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        port = json.loads(child.stdout.readline())["port"]
        result = uvloop.run(attack(a, port, child.pid))
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True)
    result["code"] = {"dir": str(code), "commit": commit.stdout.strip()}
    result["gateway_nofile_limit"] = gateway_nofile
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hostile_load.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
