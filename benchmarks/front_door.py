"""The front door: Keel's hand-written HTTP server vs well-kept servers, CPU per relayed chunk.

The same job done by each server, each in its own process: accept a client's POST, read its
head and JSON body once, open a connection to an upstream SSE server, relay the upstream's
response to the client, keep the client's connection alive.
- keel: serving.gateway.server.Gateway, default pipeline, no policy. It copies the engine's
  bytes, chunk framing included: one `transport.write` per read from the engine;
- uvicorn: its httptools protocol on uvloop, access log off, a raw ASGI app (no framework):
  one `await send(...)` per upstream chunk;
- aiohttp: its low-level server (`aiohttp.web.Server`) on uvloop, access log off, a
  StreamResponse: one `await resp.write(chunk)` per upstream chunk;
- granian: its RSGI interface on uvloop, one worker, one runtime thread:
  one `await transport.send_bytes(chunk)` per upstream chunk (granian-asgi: the uvicorn app on
  granian's ASGI interface).
These servers frame their own responses, so their apps parse the upstream's framing: they share
one upstream client (`UpstreamResponse`, httptools' response parser, one callback per chunk).

The upstream is gateway_overhead's InstantEngine, in its own process, answering every stream
with --chunks SSE events. This process is the load generator: --concurrency keep-alive
connections, closed loop. Each round runs every server in turn, once per kind of load:
- stream: the upstream writes one event per event-loop turn (flat out: what each front door
  carries when the CPU is the limit);
- paced: the upstream writes each stream's events --pace-ms apart, as an engine does (c=64 at
  20 ms is 3,200 chunks/s, the demo engine's rate on our 2 cores): one event per read;
- json: a non-streamed chat answer (the per-request cost).
The front door's CPU is utime+stime of its process and its children (granian's worker) from
/proc/PID/stat before and after a phase, divided by the chunks (requests, for json) answered.
Processes are not pinned. The table shows medians over rounds and, against keel, the median of
per-round ratios: this machine's speed moves up to 2x within minutes.

    python -m benchmarks.front_door                         # 5 rounds x 3 kinds x 4 servers x 8 s, ~10 min
    python -m benchmarks.front_door --rounds 3 --kinds paced --servers keel,uvicorn

Prints a markdown table and writes benchmarks/results/front_door.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import httptools
import orjson
import uvloop

from benchmarks.gateway_overhead import (
    _HEAD,
    OUTPUT_WORDS,
    REPO_ROOT,
    RESULTS,
    InstantEngine,
    _answer,
    _commands,
    _Pool,
    _proc_cpu_s,
    drain,
    engine_answer,
    request_bytes,
)
from serving.bench.records import git_version
from serving.bench.stack import free_port

SERVERS = {
    "keel": "Keel gateway (asyncio protocol + httptools)",
    "uvicorn": "uvicorn (httptools, uvloop), raw ASGI",
    "aiohttp": "aiohttp low-level server, uvloop",
    "granian": "granian RSGI, uvloop",
    "granian-asgi": "granian ASGI, uvloop",
}
KINDS = {"stream": "streamed, flat out", "paced": "streamed, paced", "json": "non-streamed JSON"}
UPSTREAM_ENV = "KEEL_BENCH_UPSTREAM_PORT"
MODEL = "demo"  # request_bytes("off", ...) asks for it


# ---------------------------------------------------------------------------------------------
# The upstream stand-in (its own process)


@functools.cache
def stream_answer(chunks: int, close: bool) -> list[bytes]:
    """vLLM's stream with `chunks` events (role, tokens, finish, [DONE]), as written pieces."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_764_000_000, "model": MODEL}

    def event(delta: dict, finish=None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": OUTPUT_WORDS[i % len(OUTPUT_WORDS)]}) for i in range(chunks - 3)]
    events += [event({"content": ""}, finish="length"), b"data: [DONE]\n\n"]
    pieces = [b"%x\r\n%b\r\n" % (len(e), e) for e in events]
    pieces[-1] += b"0\r\n\r\n"
    head = _HEAD + b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n"
    return [head + (b"connection: close\r\n" if close else b"") + b"\r\n", *pieces]


class StreamingEngine(InstantEngine):
    chunks = 64

    def answer(self, req: dict, close: bool) -> list[bytes]:
        return stream_answer(self.chunks, close) if req.get("stream") else engine_answer(req, close)


async def serve_upstream(chunks: int) -> None:
    StreamingEngine.chunks = chunks
    server = await asyncio.get_running_loop().create_server(StreamingEngine, "127.0.0.1", 0, backlog=2048)
    _answer({"port": server.sockets[0].getsockname()[1]})
    async for line in _commands():  # "gap SECONDS": between a stream's events, from now on
        StreamingEngine.gap_s = float(line.split()[1])
        _answer({"gap_s": StreamingEngine.gap_s})
    server.close()


# ---------------------------------------------------------------------------------------------
# The apps the well-kept servers run, and their upstream client


class UpstreamResponse(asyncio.Protocol):
    """One request to the upstream and its response, handed over body chunk by body chunk."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.head: asyncio.Future = loop.create_future()
        self.status = 0
        self.content_type = b"application/json"
        self.pending: deque[bytes] = deque()
        self.ended = False
        self.paused = False
        self.waiter: asyncio.Future | None = None

    @classmethod
    async def open(cls, path: bytes, body: bytes) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        port = int(os.environ[UPSTREAM_ENV])
        _, up = await loop.create_connection(lambda: cls(loop), "127.0.0.1", port)
        up.transport.write(
            b"POST %b HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%b" % (path, port, len(body), body)
        )
        await up.head
        return up

    @property
    def streamed(self) -> bool:
        return self.content_type.startswith(b"text/event-stream")

    async def chunks(self):
        while True:
            while self.pending:
                yield self.pending.popleft()
            if self.ended:
                return
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            self.waiter = self.loop.create_future()
            await self.waiter

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    # asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.abort()
        self._wake()

    def connection_lost(self, exc) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionError("the upstream closed before answering"))
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done() and (self.pending or self.ended):
            self.waiter.set_result(None)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.pending.append(body)
        if len(self.pending) > 64 and not self.paused:  # the client reads slower than the upstream writes
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.ended = True
        self.transport.close()


async def asgi_relay(scope, receive, send) -> None:
    if scope["type"] != "http":  # granian's ASGI sends lifespan events; nothing to set up
        return
    body = bytearray()
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        more = message.get("more_body", False)
    json.loads(body)  # read once, as the gateway's ParseBody does
    up = await UpstreamResponse.open(scope["raw_path"], bytes(body))
    if not up.streamed:
        data = await up.read()
        await send(
            {
                "type": "http.response.start",
                "status": up.status,
                "headers": [(b"content-type", up.content_type), (b"content-length", b"%d" % len(data))],
            }
        )
        await send({"type": "http.response.body", "body": data})
        return
    await send({"type": "http.response.start", "status": up.status, "headers": [(b"content-type", up.content_type)]})
    async for chunk in up.chunks():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def aiohttp_relay(request):
    from aiohttp import web

    body = await request.read()
    json.loads(body)
    up = await UpstreamResponse.open(request.raw_path.encode(), body)
    headers = {"content-type": up.content_type.decode()}
    if not up.streamed:
        return web.Response(status=up.status, body=await up.read(), headers=headers)
    resp = web.StreamResponse(status=up.status, headers=headers)
    await resp.prepare(request)
    async for chunk in up.chunks():
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def rsgi_relay(scope, proto) -> None:
    body = await proto()
    json.loads(body)
    up = await UpstreamResponse.open(scope.path.encode(), body)
    headers = [("content-type", up.content_type.decode())]
    if not up.streamed:
        proto.response_bytes(up.status, headers, await up.read())
        return
    transport = proto.response_stream(up.status, headers)
    async for chunk in up.chunks():
        await transport.send_bytes(chunk)


# ---------------------------------------------------------------------------------------------
# The front doors' processes


async def _start_keel():
    from serving.gateway.server import Gateway, GatewaySettings
    from serving.gateway.stages import Pipeline, default_stages

    upstream = int(os.environ[UPSTREAM_ENV])
    gw = Gateway(GatewaySettings(port=0), [MODEL], Pipeline(default_stages([MODEL])))
    gw.update_endpoints({MODEL: [{"model": MODEL, "replica_id": "r1", "host": "127.0.0.1", "port": upstream}]})
    await gw.start()
    return gw.port, gw.stop


async def _start_uvicorn():
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0), backlog=2048)
    # keep-alive 600 s: pools left idle between phases stay open (the default closes them at 5 s)
    config = uvicorn.Config(
        asgi_relay,
        http="httptools",
        loop="uvloop",
        ws="none",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=600,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)

    async def stop():
        server.should_exit = True
        await task

    return sock.getsockname()[1], stop


async def _start_aiohttp():
    from aiohttp import web

    sock = socket.create_server(("127.0.0.1", 0), backlog=2048)
    server = await asyncio.get_running_loop().create_server(web.Server(aiohttp_relay, access_log=None), sock=sock)

    async def stop():
        server.close()

    return sock.getsockname()[1], stop


async def serve_front_door(name: str) -> None:
    """One front door on uvloop: print its port, serve until stdin closes."""
    start = {"keel": _start_keel, "uvicorn": _start_uvicorn, "aiohttp": _start_aiohttp}[name]
    port, stop = await start()
    _answer({"port": port})
    async for _ in _commands():
        pass
    await stop()


class _FrontDoor:
    """A front door's process (and, for granian, its worker): its port and its CPU time."""

    def __init__(self, name: str, upstream_port: int):
        self.name = name
        env = {**os.environ, UPSTREAM_ENV: str(upstream_port), "PYTHONPATH": str(REPO_ROOT)}
        if name.startswith("granian"):
            self.port = free_port()
            interface = "rsgi" if name == "granian" else "asgi"
            target = "benchmarks.front_door:" + ("rsgi_relay" if name == "granian" else "asgi_relay")
            cmd = [
                sys.executable,
                "-m",
                "granian",
                "--interface",
                interface,
                "--loop",
                "uvloop",
                "--http",
                "1",
                "--no-ws",
                "--workers",
                "1",
                "--runtime-threads",
                "1",
                "--log-level",
                "warning",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backlog",
                "2048",
                target,
            ]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env)
            _wait_for_port(self.port, self.proc)
        else:
            cmd = [sys.executable, "-m", "benchmarks.front_door", "--serve", name]
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT, env=env, text=True
            )
            self.port = json.loads(self.proc.stdout.readline())["port"]
        self.pids = [self.proc.pid]

    def find_workers(self) -> None:
        """Add the processes the server spawned (granian's worker) to what is measured."""
        self.pids = [self.proc.pid, *_descendants(self.proc.pid)]

    def cpu_s(self) -> float:
        return sum(_proc_cpu_s(pid) for pid in self.pids)

    def stop(self) -> None:
        if self.proc.poll() is None:
            if self.name.startswith("granian"):
                self.proc.terminate()
            else:
                self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _descendants(pid: int) -> list[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


class _Upstream:
    def __init__(self, chunks: int):
        cmd = [sys.executable, "-m", "benchmarks.front_door", "--serve-upstream", "--chunks", str(chunks)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT, text=True)
        self.port = json.loads(self.proc.stdout.readline())["port"]

    def set_gap(self, seconds: float) -> None:
        self.proc.stdin.write(f"gap {seconds}\n")
        self.proc.stdin.flush()
        json.loads(self.proc.stdout.readline())

    def cpu_s(self) -> float:
        return _proc_cpu_s(self.proc.pid)

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(15)


# ---------------------------------------------------------------------------------------------
# The load (this process): closed loop over keep-alive connections


class _ClosedLoop(_Pool):
    """gateway_overhead's pool, where each answer sends the connection's next request."""

    def __init__(self, port: int, stream: bool, requests: list[bytes]):
        super().__init__(port, stream)
        self.requests = requests
        self.sent = 0
        self.running = False

    def start(self, concurrency: int) -> None:
        self.running = True
        for _ in range(concurrency):
            self._next()

    def _next(self) -> None:
        self.submit(self.requests[self.sent % len(self.requests)])
        self.sent += 1

    def finished(self, conn, latency, error) -> None:
        current = conn is None or conn.phase == self.phase
        super().finished(conn, latency, error)
        if current and self.running:
            self._next()


async def run_phase(pool: _ClosedLoop, door: _FrontDoor, upstream: _Upstream, concurrency: int, seconds: float) -> dict:
    await pool.fill(concurrency)
    pool.reset()
    cpu0 = door.cpu_s(), upstream.cpu_s(), time.process_time()
    start = time.perf_counter()
    pool.start(concurrency)
    await asyncio.sleep(seconds)
    pool.running = False
    await drain(pool, 30)
    wall = max(pool.last_done, start + seconds) - start
    cpu1 = door.cpu_s(), upstream.cpu_s(), time.process_time()
    lat = sorted(pool.latencies)
    return {
        "ok": len(lat),
        "errors": dict(pool.errors),
        "wall_s": wall,
        "front_door_cpu_s": cpu1[0] - cpu0[0],
        "upstream_cpu_s": cpu1[1] - cpu0[1],
        "loadgen_cpu_s": cpu1[2] - cpu0[2],
        "p50_ms": lat[len(lat) // 2] * 1000 if lat else 0.0,
        "new_connections": pool.extra_connections,
    }


async def check_answer(port: int, stream: bool, chunks: int) -> None:
    """One request read whole: a complete answer, with every event of the upstream's stream."""
    from serving.httpraw import decode_chunked, parse_head

    req = request_bytes("off", port, stream, n=1)[0].replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(req)
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    if ("transfer-encoding", "chunked") in headers:
        body = decode_chunked(body)
    events = [e for e in body.split(b"\n\n") if e]
    if (
        status != 200
        or (stream and (len(events) != chunks or events[-1] != b"data: [DONE]"))
        or (not stream and "choices" not in orjson.loads(body))
    ):
        raise RuntimeError(f"port {port}: unexpected answer {status} {body[:300]!r}")


async def benchmark(a) -> list[dict]:
    upstream = _Upstream(a.chunks)
    doors = {}
    try:
        for name in a.servers:
            doors[name] = _FrontDoor(name, upstream.port)
        for door in doors.values():
            for kind in a.kinds:
                await check_answer(door.port, kind != "json", a.chunks)
            door.find_workers()
        pools = {
            (n, k): _ClosedLoop(d.port, k != "json", request_bytes("off", d.port, k != "json"))
            for n, d in doors.items()
            for k in a.kinds
        }
        gap = {"paced": a.pace_ms / 1000}
        for kind in a.kinds:  # warm-up: connections, caches; not recorded
            upstream.set_gap(gap.get(kind, 0.0))
            for name, door in doors.items():
                await run_phase(pools[(name, kind)], door, upstream, a.concurrency, 1.0)
        phases = []
        for rnd in range(a.rounds):
            for kind in a.kinds:
                upstream.set_gap(gap.get(kind, 0.0))
                names = a.servers[rnd % len(a.servers) :] + a.servers[: rnd % len(a.servers)]
                for name in names:
                    await asyncio.sleep(0.3)
                    res = await run_phase(pools[(name, kind)], doors[name], upstream, a.concurrency, a.seconds)
                    res.update(round=rnd, server=name, kind=kind, units=res["ok"] * (a.chunks if kind != "json" else 1))
                    phases.append(res)
                    unit = "chunk" if kind != "json" else "req"
                    print(
                        f"round {rnd + 1}/{a.rounds} {kind:6} {name:12} CPU {_us(res):7.1f} µs/{unit}  "
                        f"{res['units'] / res['wall_s']:8.0f} {unit}s/s  "
                        f"upstream {_us(res, 'upstream_cpu_s'):6.1f} µs  "
                        f"errors {sum(res['errors'].values())}",
                        flush=True,
                    )
        return phases
    finally:
        for door in doors.values():
            door.stop()
        upstream.stop()


# ---------------------------------------------------------------------------------------------
# Report


def _us(p: dict, key: str = "front_door_cpu_s") -> float:
    return p[key] / max(1, p["units"]) * 1e6


def summarize(phases: list[dict], servers: list[str], kind: str) -> list[dict]:
    by = {(p["round"], p["server"]): p for p in phases if p["kind"] == kind}
    rounds = sorted({r for r, _ in by})
    med = statistics.median
    rows = []
    for name in servers:
        mine = [(r, by[(r, name)]) for r in rounds if (r, name) in by]
        if not mine:
            continue
        vs = [(p, by[(r, "keel")]) for r, p in mine if (r, "keel") in by]
        rate = lambda p: p["units"] / p["wall_s"]  # noqa: E731
        rows.append(
            {
                "server": name,
                "label": SERVERS[name],
                "rounds": len(mine),
                "cpu_us": med(_us(p) for _, p in mine),
                "cpu_ratio": med(_us(p) / _us(k) for p, k in vs) if vs else None,
                "cpu_ratios": [round(_us(p) / _us(k), 2) for p, k in vs],
                "cpu_us_per_round": [round(_us(p), 1) for _, p in mine],
                "rate": med(rate(p) for _, p in mine),
                "rate_ratio": med(rate(p) / rate(k) for p, k in vs) if vs else None,
                "upstream_cpu_us": med(_us(p, "upstream_cpu_s") for _, p in mine),
                "loadgen_cpu_us": med(_us(p, "loadgen_cpu_s") for _, p in mine),
                "p50_ms": med(p["p50_ms"] for _, p in mine),
                "errors": sum(sum(p["errors"].values()) for _, p in mine),
                "answered": sum(p["ok"] for _, p in mine),
            }
        )
    return rows


def table(rows: list[dict], kind: str) -> str:
    unit = "request" if kind == "json" else "chunk"
    lines = [
        f"| front door | CPU µs/{unit} | × keel (per-round ratios) | {unit}s/s | × keel | e2e p50 "
        f"| upstream CPU µs/{unit} | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        keel = r["server"] == "keel"
        ratio = "—" if keel else f"**{r['cpu_ratio']:.2f}×** ({', '.join(map(str, r['cpu_ratios']))})"
        lines.append(
            f"| {r['label']} | {r['cpu_us']:.1f} | {ratio} | {r['rate']:,.0f} | "
            f"{'—' if keel else format(r['rate_ratio'], '.2f') + '×'} | {r['p50_ms']:.1f} ms | "
            f"{r['upstream_cpu_us']:.1f} | {r['errors']}/{r['answered'] + r['errors']} |"
        )
    return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=64, help="streams in flight (closed loop)")
    ap.add_argument("--chunks", type=int, default=64, help="SSE events per streamed answer")
    ap.add_argument("--seconds", type=float, default=8, help="per server per kind per round")
    ap.add_argument("--pace-ms", type=float, default=20, help="gap between a stream's events, paced kind")
    ap.add_argument("--kinds", default="stream,paced,json", help="of stream,paced,json")
    ap.add_argument(
        "--servers",
        default="keel,uvicorn,aiohttp,granian",
        help="of " + ",".join(SERVERS) + " (keel, the baseline, is always measured)",
    )
    ap.add_argument("--out", default=str(RESULTS / "front_door.json"))
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # a front door's child process
    ap.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_upstream:
        uvloop.run(serve_upstream(a.chunks))
        return
    if a.serve:
        uvloop.run(serve_front_door(a.serve))
        return
    a.servers = ["keel"] + [s for s in SERVERS if s in a.servers.split(",") and s != "keel"]
    a.kinds = [k for k in KINDS if k in a.kinds.split(",")]
    if a.chunks < 4:
        ap.error("--chunks must be at least 4 (role, a token, finish, [DONE])")
    if any(s.startswith("granian") for s in a.servers) and _version("granian") is None:
        ap.error(
            "granian is not installed (a benchmark-only comparison, not a dependency): "
            "`pip install granian`, or leave it out of --servers"
        )
    load_before = os.getloadavg()
    started = time.time()
    phases = uvloop.run(benchmark(a))
    summary = {k: summarize(phases, a.servers, k) for k in a.kinds}
    print(
        f"\nFront door: c={a.concurrency} closed loop, {a.chunks} events per stream, {a.rounds} rounds x "
        f"{a.seconds:g} s per server and kind, paced = {a.pace_ms:g} ms between a stream's events; "
        f"{os.cpu_count()} CPUs (load average before {load_before[0]:.2f}); medians over rounds, "
        f"× keel = median of per-round ratios"
    )
    for kind, rows in summary.items():
        print(f"\n{KINDS[kind]}:\n\n" + table(rows, kind))
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git": git_version(),
        "command": " ".join(["python", "-m", "benchmarks.front_door", *sys.argv[1:]]),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "python": platform.python_version(),
        "pinned": False,
        "versions": {p: _version(p) for p in ("uvicorn", "aiohttp", "granian", "httptools", "uvloop")},
        "concurrency": a.concurrency,
        "chunks": a.chunks,
        "seconds": a.seconds,
        "rounds": a.rounds,
        "pace_ms": a.pace_ms,
        "wall_s": time.time() - started,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "phases": phases}, indent=2))
    print(f"\nraw results: {out} ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
