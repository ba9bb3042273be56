"""The response inspector against the real engine's bytes: chat and completions, streamed and
whole, n > 1, logprobs, a tool call and the usage chunk, taken straight from vLLM and fed
through StreamInspector / inspect_json under an output redaction rule with audit text; text,
usage and redactions must agree with a full JSON parse of the same bytes, in vLLM's layout and
re-serialised in others (tests/inspect_contract.py).

The engine is vLLM's own server as a replica starts it (benchmarks/compare.py's bare_command),
not a whole stack: only its bytes matter here, and a tool call needs a tool-call parser, which
the demo config does not give the stack's engine (vLLM refuses tool_choice without one).
"""

from __future__ import annotations

import subprocess

import httpx
import pytest

from benchmarks.compare import bare_command, bare_env
from serving.bench.stack import free_port, stop, wait_ready
from serving.config import REPO_ROOT, load_config
from tests.e2e.conftest import STARTUP_TIMEOUT_S
from tests.inspect_contract import check, layouts, output_guard, relayout

pytestmark = pytest.mark.e2e

# The demo model writes gibberish from licence texts: a pattern it writes often, so redaction
# and the logprobs it stops are exercised; the email rule is the default policy's.
GUARD = output_guard(
    [
        {"type": "pii", "entities": ["email"], "action": "redact"},
        {"type": "deny", "patterns": ["(?i)th|ou|ion"], "action": "redact"},
    ]
)
TOOL = {
    "type": "function",
    "function": {
        "name": "send_mail",
        "description": "Send an email.",
        # one value: the arguments the model is held to hold an email for the rule to redact
        "parameters": {
            "type": "object",
            "properties": {"to": {"type": "string", "enum": ["jane.doe@example.com"]}},
            "required": ["to"],
        },
    },
}
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write to the licensor."}]
USAGE = {"stream_options": {"include_usage": True}}
REQUESTS = {
    "chat, streamed, n=2, logprobs": (
        CHAT,
        {"messages": MESSAGES, "n": 2, "logprobs": True, "top_logprobs": 2, "stream": True, **USAGE},
    ),
    "chat, streamed, named tool call": (
        CHAT,
        {"messages": MESSAGES, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "send_mail"}}}
        | {"max_tokens": 160, "stream": True, **USAGE},
    ),
    "chat, n=2, logprobs": (CHAT, {"messages": MESSAGES, "n": 2, "logprobs": True, "top_logprobs": 2}),
    "chat, named tool call": (
        CHAT,
        {"messages": MESSAGES, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "send_mail"}}}
        | {"max_tokens": 160},
    ),
    "completions, streamed, n=2, logprobs": (
        "/v1/completions",
        {"prompt": "Permission is hereby granted", "n": 2, "logprobs": 2, "stream": True, **USAGE},
    ),
    "completions, n=2, logprobs": (
        "/v1/completions",
        {"prompt": "Permission is hereby granted", "n": 2, "logprobs": 2},
    ),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """(url, model): vLLM on the demo model with configs/local.yaml's engine arguments, plus a
    tool-call parser."""
    cfg = load_config(REPO_ROOT / "configs" / "local.yaml")
    model = next(iter(cfg.models))
    port = free_port()
    log = tmp_path_factory.mktemp("engine") / "vllm.log"
    cmd = [*bare_command(cfg, model, port), "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=bare_env(cfg, model), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, proc, STARTUP_TIMEOUT_S)
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"{e}:\n{log.read_text(errors='replace')[-5000:]}")
        yield url, model
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def engine_bytes(engine) -> dict[str, tuple[bytes, dict]]:
    """Each request's response body as the engine sent it (what the gateway's relay decodes)."""
    url, model = engine
    out = {}
    for name, (path, payload) in REQUESTS.items():
        payload = {"model": model, "max_tokens": 32, "seed": 7, **payload}
        with httpx.stream("POST", url + path, json=payload, timeout=120) as r:
            body = r.read()
        assert r.status_code == 200, (name, body[:500])
        out[name] = (body, payload)
    return out


@pytest.mark.parametrize("name", list(REQUESTS))
def test_the_inspector_agrees_with_a_full_parse_of_the_engines_output(engine_bytes, name):
    body, payload = engine_bytes[name]
    chat, stream = "chat" in name, "streamed" in name
    ref, redacted = check(body, chat, stream, payload, GUARD)
    # the response has what the request is about, so the checks above were not vacuous
    assert ref.usage and ref.usage["completion_tokens"] > 0
    if stream:
        assert ref.usage_events == 1
    choices = {idx for idx, _ in ref.fields}
    assert choices == set(range(payload.get("n", 1))), choices
    if "logprobs" in payload:
        assert set(ref.tokens) == choices and all(ref.tokens.values())
    if "tool" in name:
        calls = {f[-1]: t for (_, f), t in ref.fields.items() if isinstance(f, tuple)}
        assert calls.get("name") == "send_mail", body[:3000]
    for layout in layouts(stream):
        check(relayout(body, stream, layout), chat, stream, payload, GUARD)


def test_the_rule_redacted_something_in_the_engines_output(engine_bytes):
    changed = []
    for name, (body, payload) in engine_bytes.items():
        ref, redacted = check(body, "chat" in name, "streamed" in name, payload, GUARD)
        changed += [(name, k) for k, v in ref.fields.items() if redacted[k] != v]
    assert changed  # else the redaction checks compared unchanged text with unchanged text
