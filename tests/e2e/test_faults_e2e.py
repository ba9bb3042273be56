"""An engine killed mid-stream on the real stack: the client gets an error event, the audit
record carries the error, no process of the dead engine survives, Ray Serve replaces the replica.

One kill (the module's fixture) and one test per outcome. It breaks the shared stack's engine on
purpose, so it is marked to run after the other e2e tests (tests/e2e/conftest.py), and it waits
for the replacement to serve before it returns. A kill that came after the whole answer had
arrived (a client that read its first chunk seconds late) observed nothing, so it is tried again.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.e2e.conftest import DEMO_KEY, local_config, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.disruptive]

MAX_TOKENS = 480  # about two seconds of generation on the demo model: the kill lands mid-stream
KILL_TRIES = 3
TREE_GONE_S = 30  # generous deadlines (2 shared cores), not timing checks
REPLACED_S = 600
AUDIT_S = 30


@dataclass
class Kill:
    """What was seen around one SIGKILL of the engine's API server during a stream."""

    request_id: str
    engine: list[psutil.Process]  # the dead engine's processes, found before the kill
    chunks_before: int = 0
    chunks_after: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    error: Exception | None = None
    survivors: list[str] = field(default_factory=list)
    replaced_by: int | None = None  # the new engine's API server pid
    replacement_error: str | None = None
    audit: dict | None = None


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {p.name()} ({p.memory_info().rss >> 20} MiB)"
    except psutil.Error:
        return str(p.pid)


def _wait_for_survivors(procs: list[psutil.Process]) -> list[str]:
    deadline = time.monotonic() + TREE_GONE_S
    while (alive := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [_describe(p) for p in alive]


def _wait_for_replacement(stack, client, dead_pid: int) -> tuple[int | None, str | None]:
    """Until a new engine serves a request and the gateway knows one replica; its pid, or why not."""
    deadline = time.monotonic() + REPLACED_S
    why = "no attempt"
    while time.monotonic() < deadline:
        try:
            servers = [p.pid for p in stack.engine_servers() if p.pid != dead_pid]
            replicas = httpx.get(stack.url + "/health", timeout=10).json().get("replicas")
            if servers and replicas == {stack.model: 1}:
                client.completions.create(model=stack.model, prompt="back?", max_tokens=2)
                return servers[0], None
            why = f"engines {servers}, gateway replicas {replicas}"
        except (openai.APIError, httpx.HTTPError) as e:
            why = repr(e)
        time.sleep(2)
    return None, why


def _audit_record(request_id: str) -> dict | None:
    audit_dir = Path(local_config()["audit"]["dir"]).resolve()  # keel serve runs in our directory
    deadline = time.monotonic() + AUDIT_S
    while time.monotonic() < deadline:
        for path in sorted(audit_dir.glob("audit-*.jsonl")):
            for line in path.read_text(errors="replace").splitlines():
                if request_id in line:
                    try:
                        rec = json.loads(line)
                    except ValueError:  # a line half appended: read again
                        continue
                    if rec.get("request_id") == request_id:
                        return rec
        time.sleep(0.5)
    return None


@pytest.fixture(scope="module")
def kill(stack) -> Kill:
    """A kill mid-stream; one that came after the answer had arrived is tried again."""
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=60)
    for _ in range(KILL_TRIES):
        seen = _kill_mid_stream(stack, client)
        if not _came_too_late(seen) or seen.replaced_by is None:  # no engine to try again on
            break
    return seen


def _came_too_late(seen: Kill) -> bool:
    """The stream ended normally: every token had arrived before the engine died."""
    return seen.error is None and "length" in seen.finish_reasons


def _kill_mid_stream(stack, client: openai.OpenAI) -> Kill:
    """Stream a long answer, SIGKILL the engine's API server after the first token, then wait
    for the dead engine's processes to go and for the replacement replica to serve."""

    def engine() -> list[psutil.Process]:  # the one engine's server and its processes, or []
        servers = stack.engine_servers()
        try:
            return [servers[0], *servers[0].children(recursive=True)] if len(servers) == 1 else servers
        except psutil.Error:  # gone since the listing
            return []

    # A replacement from an earlier try may still be starting its EngineCore: wait for it.
    procs = wait_for(engine, lambda ps: any("EngineCore" in _cmdline(p) for p in ps), timeout_s=120, interval_s=1)
    assert any("EngineCore" in _cmdline(p) for p in procs), (
        "expected the stack's one engine with its "
        "EngineCore; found:\n" + "\n".join(f"{p.pid} {_cmdline(p)[:100]}" for p in procs)
    )
    server = procs[0]
    seen = Kill(request_id=f"kill-{uuid.uuid4().hex}", engine=procs)

    stream = client.chat.completions.create(
        model=stack.model,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=MAX_TOKENS,
        stream=True,
        extra_body={"ignore_eos": True},
        extra_headers={"x-request-id": seen.request_id},
    )
    try:
        for chunk in stream:
            if seen.chunks_before == 0 and chunk.choices and chunk.choices[0].delta.content:
                server.send_signal(signal.SIGKILL)  # as the OOM killer would: nothing runs in it after
                seen.chunks_before = 1
            elif seen.chunks_before:
                seen.chunks_after += 1
            seen.finish_reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
    except Exception as e:  # noqa: BLE001 - what the client saw is the observation
        seen.error = e
    assert seen.chunks_before, "the stream ended before its first token: nothing was killed mid-stream"

    seen.survivors = _wait_for_survivors(seen.engine)
    seen.replaced_by, seen.replacement_error = _wait_for_replacement(stack, client, server.pid)
    seen.audit = _audit_record(seen.request_id)
    return seen


def test_the_client_sees_an_error_event_not_a_normal_end(kill):
    assert "length" not in kill.finish_reasons, "the stream ran to the end: the kill came too late"
    assert kill.error is not None, f"the stream ended as if complete after {kill.chunks_after} more chunks"
    # An error event (`data: {"error": ...}`) raises APIError itself; a cut connection or a hang
    # would raise its subclasses APIConnectionError / APITimeoutError.
    assert type(kill.error) is openai.APIError, repr(kill.error)
    assert isinstance(kill.error.body, dict) and kill.error.body.get("message"), kill.error.body


def test_the_audit_record_carries_the_error(kill):
    assert kill.audit is not None, f"no audit record with request_id {kill.request_id}"
    assert kill.audit["status"] >= 500 and kill.audit["error"], kill.audit


def test_no_process_of_the_dead_engine_survives(kill):
    assert kill.survivors == [], f"still running {TREE_GONE_S}s after the kill: {kill.survivors}"


def test_ray_serve_replaces_the_replica(kill, client, stack):
    assert kill.replaced_by is not None, f"no replacement in {REPLACED_S}s: {kill.replacement_error}"
    r = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 4
    assert httpx.get(stack.url + "/health", timeout=10).json()["replicas"] == {stack.model: 1}
