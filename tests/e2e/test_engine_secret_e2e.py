"""Engines answer only the gateway: a local process that finds an engine's port gets 401 on every
generation route without the stack's secret, while the gateway path works."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.conftest import AUTH

pytestmark = pytest.mark.e2e

KEY_ENV = "VLLM_API_KEY"


def ray_logs_dir(proc: psutil.Process) -> Path:
    """The Ray session's log directory, where the engine's output goes (its replica's worker log)."""
    out = Path(os.readlink(f"/proc/{proc.pid}/fd/1"))
    if out.parent.name != "logs" or not out.parent.parent.name.startswith("session_"):
        pytest.fail(f"the engine {proc.pid} writes to {out}, not to a Ray session's logs")
    return out.parent


@pytest.fixture(scope="module")
def engine(stack):
    (proc,) = stack.engine_servers()  # configs/local.yaml: one model, one replica
    cmd = proc.cmdline()
    return f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}", cmd, proc.environ()[KEY_ENV], ray_logs_dir(proc)


def chat(stack) -> dict:
    return {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/invocations", "/tokenize"])
@pytest.mark.parametrize("headers", [{}, AUTH], ids=["no key", "a tenant key"])
def test_a_request_straight_to_the_engine_without_the_secret_is_refused(stack, engine, path, headers):
    url, *_ = engine
    body = chat(stack) if "chat" in path or path == "/invocations" else {"model": stack.model, "prompt": "hi"}
    r = httpx.post(url + path, json=body, headers=headers, timeout=30)
    assert r.status_code == 401


def test_the_gateway_path_works_and_the_engine_still_serves_health_and_metrics(stack, engine):
    url, _, secret, _ = engine
    assert httpx.post(stack.url + "/v1/chat/completions", json=chat(stack), headers=AUTH, timeout=60).status_code == 200
    assert httpx.get(url + "/health", timeout=10).status_code == 200  # the replica's health check
    assert "vllm:" in httpx.get(url + "/metrics", timeout=10).text  # the gateway's scrape
    # The secret the engine holds is the one that opens it, which is what the gateway sends.
    r = httpx.post(
        url + "/v1/chat/completions", json=chat(stack), headers={"authorization": f"Bearer {secret}"}, timeout=60
    )
    assert r.status_code == 200


def test_the_secret_is_in_the_engines_environment_and_on_no_command_line_or_log(stack, engine):
    _, cmd, secret, logs_dir = engine
    assert len(secret) >= 40
    for p in psutil.process_iter(["cmdline"]):
        assert secret not in " ".join(p.info["cmdline"] or [])
    logs = {p: text for p in [stack.log, *logs_dir.rglob("*")] if (text := _read_log(p)) is not None}
    assert any(b"vLLM" in text for text in logs.values())  # the engine's own log is among them
    for log, text in logs.items():
        assert secret.encode() not in text, log


def _read_log(path: Path) -> bytes | None:
    """A log file's bytes; None for what is no file, too big to read, or gone since the listing."""
    try:
        return path.read_bytes() if path.is_file() and path.stat().st_size < 200 * 2**20 else None
    except FileNotFoundError:
        return None
