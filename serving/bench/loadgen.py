"""Streaming load against any OpenAI-compatible server: one load point, timed as `vllm bench serve`.

    records, duration = await run_point(url, model, requests, spec.load, level=8)

- concurrency mode: a closed loop, int(level) workers each sending its next request when the
  previous one ends;
- rate mode: an open loop, requests sent at `arrival_times` (gamma gaps, mean 1/level), at most
  max_concurrency in flight. As in vLLM bench, a request held back by max_concurrency is timed
  from when it is actually sent, so the wait is in no TTFT or E2EL (it shows as a lower rate).

Per request (times in seconds): TTFT = send to the first chunk carrying output text, ITL = gaps
between chunks carrying text, E2EL = send to the end of the stream; token counts come from the
usage chunk (stream_options.include_usage). Records come back in the order of `requests`.
A stream cut after a 200, like a timeout or a refused connection, is a transport failure
(status 0).

A stream that ends normally with no text in any chunk but usage.completion_tokens > 0 succeeded:
the model generated only tokens that decode to nothing (the demo model, greedy, can repeat a
lone UTF-8 continuation byte 64 times; vLLM's detokenizer emits no text for bytes that never
form a character and streams empty deltas). As in `vllm bench serve`, its TTFT is then at the
first chunk with choices and its ITL the gaps between such chunks. With neither text nor output
tokens in usage (or no usage at all) the stream fails as "empty stream".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp

from serving.bench.datasets import BenchRequest
from serving.bench.records import RequestRecord
from serving.bench.spec import LoadSpec

WARMUP_CONCURRENCY = 2
WARMUP_TIMEOUT_S = 600.0
_ERROR_CHARS = 200
_READ_BUFSIZE = 10 * 1024**2  # as vLLM bench: large chunks are read whole


def arrival_times(n: int, rate: float, burstiness: float = 1.0, ramp_up_s: float = 0.0, seed: int = 0) -> list[float]:
    """When each of n requests is sent, in seconds from the load point's start (non-decreasing).

    Gaps are gamma-distributed with shape `burstiness` and mean 1/rate, as vLLM bench (1 is a
    Poisson process; lower is burstier; coefficient of variation 1/sqrt(burstiness)). Without a
    ramp-up they are scaled, as vLLM does, so the last request goes at n/rate. With ramp_up_s the
    rate rises linearly from 0 to `rate` over that many seconds, then holds: the same gaps are
    laid on the clock through the inverse of the ramp's cumulative rate.
    """
    if n <= 0:
        return []
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    times = list(itertools.accumulate(rng.gammavariate(burstiness, scale) for _ in range(n)))
    if ramp_up_s <= 0:
        if times[-1] > 0:
            stretch = (n / rate) / times[-1]
            times = [t * stretch for t in times]
        return times
    # At full-rate time s the ramp has delivered rate * s requests: s = t^2 / (2R) up to t = R.
    half = ramp_up_s / 2
    return [math.sqrt(2 * ramp_up_s * s) if s < half else s + half for s in times]


async def run_point(
    url: str,
    model: str,
    requests: list[BenchRequest],
    load: LoadSpec,
    level: float,
    api_key: str | None = None,
    progress: bool = False,
) -> tuple[list[RequestRecord], float]:
    """Send every request at one load level; the records (in request order) and the duration
    from the first send to the last completion, in seconds."""
    if not requests:
        return [], 0.0
    endpoint = endpoint_url(url, load.endpoint)
    headers = _headers(api_key)
    records: list[RequestRecord | None] = [None] * len(requests)
    label = f"{load.mode} {level:g}"
    async with _session(load.request_timeout_s) as session:
        with _progress_bar(progress, label, len(requests)) as advance:
            start = time.perf_counter()

            async def send(i: int) -> None:
                body = request_body(model, requests[i], load.endpoint)
                records[i] = await _send(session, endpoint, body, headers, requests[i], start, load.request_timeout_s)
                advance()

            if load.mode == "concurrency":
                pending = iter(range(len(requests)))

                async def worker() -> None:
                    for i in pending:
                        await send(i)

                workers = min(max(1, int(level)), len(requests))
                await asyncio.gather(*(worker() for _ in range(workers)))
            else:
                times = arrival_times(len(requests), level, load.burstiness, load.ramp_up_s, load.seed)
                limit = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None

                async def arrive(i: int) -> None:
                    delay = start + times[i] - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if limit is None:
                        await send(i)
                        return
                    async with limit:
                        await send(i)

                await asyncio.gather(*(arrive(i) for i in range(len(requests))))
    done = [r for r in records if r is not None]
    duration = max(r.start + r.e2el for r in done) - min(r.start for r in done)
    return done, duration


async def warmup(
    url: str, model: str, requests: list[BenchRequest], n: int, api_key: str | None = None, endpoint: str = "chat"
) -> int:
    """Send n requests (cycling through `requests`), two at a time, recording nothing; returns
    how many failed, so a caller can warn before measuring a server that does not answer."""
    if n <= 0 or not requests:
        return 0
    load = LoadSpec(
        mode="concurrency", levels=[WARMUP_CONCURRENCY], endpoint=endpoint, request_timeout_s=WARMUP_TIMEOUT_S
    )
    records, _ = await run_point(
        url, model, [requests[i % len(requests)] for i in range(n)], load, WARMUP_CONCURRENCY, api_key
    )
    return sum(not r.ok for r in records)


def endpoint_url(url: str, endpoint: str) -> str:
    """{url}/v1/chat/completions or {url}/v1/completions; a url already ending in /v1 is fine."""
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")


def request_body(model: str, request: BenchRequest, endpoint: str) -> dict:
    """The streamed request vLLM bench sends: exactly max_tokens tokens, greedy, usage at the end."""
    body: dict = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": request.max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _session(timeout_s: float) -> aiohttp.ClientSession:
    # limit=0: no connection cap, so the load level alone decides what is in flight.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        read_bufsize=_READ_BUFSIZE,
    )


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    body: dict,
    headers: dict[str, str],
    request: BenchRequest,
    start: float,
    timeout_s: float,
) -> RequestRecord:
    record = RequestRecord(ok=False, prompt_tokens=request.prompt_tokens or 0)
    sent = time.perf_counter()
    record.start = sent - start
    text_chunks = 0
    last = sent
    blank_chunks: list[float] = []  # arrivals of chunks with choices, while none carried text
    usage: dict | None = None
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            record.status = resp.status
            if resp.status != 200:
                record.error = _error_text(await resp.read())
                record.e2el = time.perf_counter() - sent
                return record
            async for arrived, data in _sse_data(resp.content):
                if data == "[DONE]":
                    continue
                try:
                    doc = json.loads(data)
                except ValueError:
                    record.error = f"not JSON in the stream: {data[:80]}"
                    break
                if not isinstance(doc, dict):
                    continue
                if doc.get("error") or doc.get("object") == "error":
                    record.error = _error_message(doc) or "error event in the stream"
                    break
                if _chunk_text(doc):
                    if text_chunks == 0:
                        record.ttft = arrived - sent
                    else:
                        record.itl.append(arrived - last)
                    last = arrived
                    text_chunks += 1
                elif text_chunks == 0 and doc.get("choices"):
                    blank_chunks.append(arrived)
                if isinstance(doc.get("usage"), dict):
                    usage = doc["usage"]
    except asyncio.TimeoutError:
        record.status = 0
        record.error = f"timed out after {timeout_s:g} s"
    except (aiohttp.ClientError, OSError) as e:
        record.status = 0
        record.error = f"{type(e).__name__}: {e}"[:_ERROR_CHARS]
    record.e2el = time.perf_counter() - sent
    if record.error:
        return record
    if usage is not None and isinstance(usage.get("prompt_tokens"), int):
        record.prompt_tokens = usage["prompt_tokens"]
    completion = usage.get("completion_tokens") if usage is not None else None
    if text_chunks == 0:
        if not (isinstance(completion, int) and completion > 0 and blank_chunks):
            record.error = "empty stream"
            return record
        # Tokens that decode to no text: timed by the chunks with choices, as vLLM bench does.
        record.ttft = blank_chunks[0] - sent
        record.itl = [b - a for a, b in itertools.pairwise(blank_chunks)]
    record.output_tokens = completion if isinstance(completion, int) else text_chunks
    record.ok = record.output_tokens > 0
    if not record.ok:
        record.error = "usage reports no output tokens"
    return record


async def _sse_data(stream: aiohttp.StreamReader) -> AsyncIterator[tuple[float, str]]:
    """(arrival time, data) of each server-sent event; comments and data-less events skipped."""
    buffer = b""  # bytes: a read may end inside a multi-byte character
    async for chunk in stream.iter_any():
        arrived = time.perf_counter()
        buffer += chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            data = _event_data(event)
            if data is not None:
                yield arrived, data
    data = _event_data(buffer)
    if data is not None:
        yield time.perf_counter(), data


def _event_data(event: bytes) -> str | None:
    text = event.decode("utf-8", errors="replace")
    lines = [line[5:].removeprefix(" ") for line in text.split("\n") if line.startswith("data:")]
    return "\n".join(lines) if lines else None


def _chunk_text(doc: dict) -> str:
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):  # chat; reasoning models stream their thinking first
        parts = (delta.get("content"), delta.get("reasoning_content"), delta.get("reasoning"))
        return "".join(p for p in parts if isinstance(p, str))
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _error_text(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return text[:_ERROR_CHARS] or "(empty body)"
    message = _error_message(doc) if isinstance(doc, dict) else None
    return (message or text)[:_ERROR_CHARS]


def _error_message(doc: dict) -> str | None:
    """The message of an OpenAI error ({"error": {"message"}}), vLLM's older {"object": "error",
    "message"} or FastAPI's {"detail"}."""
    error = doc.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:_ERROR_CHARS]
    if isinstance(error, str) and error:
        return error[:_ERROR_CHARS]
    for key in ("message", "detail"):
        if doc.get(key):
            return str(doc[key])[:_ERROR_CHARS]
    return None


@contextlib.contextmanager
def _progress_bar(enabled: bool, label: str, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr when asked and stderr is a terminal; else a no-op."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)
