"""Tenants, quotas (in a real Redis that `keel serve` starts), guardrails, A/B routing, the audit
trail and `keel apply`, on the real stack (Ray Serve + vLLM, two demo-model deployments), driven
by the official openai client."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from serving.bench.stack import free_port
from serving.policy.audit.files import read_head
from serving.policy.identity import key_digest
from tests.e2e.conftest import DEMO_KEY, local_config, running_stack, wait_for

pytestmark = pytest.mark.e2e

LIMITED_KEY = "sk-keel-e2e-limited"
GUARDED_KEY = "sk-keel-e2e-guarded"
ADMIN_KEY = "sk-keel-e2e-admin"
KEEL = Path(sys.executable).with_name("keel")


def policy_config(tmp: Path, limited_rpm: int = 2) -> dict:
    cfg = local_config()
    cfg["models"]["demo-b"] = yaml.safe_load(yaml.safe_dump(cfg["models"]["demo"]))  # a second variant
    cfg["tenants"].update(
        {
            "limited": {
                "keys": [{"id": "lim-1", "digest": key_digest(LIMITED_KEY)}],
                "models": ["demo"],
                "quotas": {"requests_per_minute": limited_rpm, "tokens_per_minute": 50_000},
            },
            "guarded": {
                "keys": [{"id": "g-1", "digest": key_digest(GUARDED_KEY)}],
                "guardrails": "strict",
                "audit_content": True,
            },
            "ops": {"keys": [{"id": "admin-1", "digest": key_digest(ADMIN_KEY), "role": "admin"}]},
        }
    )
    cfg["guardrails"]["strict"] = {
        "input": [
            {"type": "deny", "terms": ["forbidden plan"], "action": "block"},
            {"type": "pii", "entities": ["email"], "action": "redact"},
        ],
        # Every vowel the model writes is masked: whatever the tiny model says, the rule fires.
        "output": [{"type": "deny", "name": "vowels", "patterns": ["[aeiouAEIOU]"], "action": "redact"}],
    }
    cfg["experiments"] = {"chat": {"variants": {"demo": 50, "demo-b": 50}}}
    cfg["quotas"] = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    cfg["audit"] = {"dir": str(tmp / "audit")}
    return cfg


@pytest.fixture(scope="module")
def pstack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("policies")
    cfg = policy_config(tmp)
    with running_stack(cfg, tmp) as s:
        s.cfg = cfg
        s.tmp = tmp
        yield s


def oai(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat(model="demo", content="Tell me about the licence.", **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kw}


def test_missing_or_unknown_key_is_401(pstack):
    r = httpx.post(pstack.url + "/v1/chat/completions", json=chat(), timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        oai(pstack, "sk-keel-wrong").chat.completions.create(**chat())


def test_model_outside_the_tenant_is_403(pstack):
    with pytest.raises(openai.PermissionDeniedError) as e:
        oai(pstack, LIMITED_KEY).chat.completions.create(**chat(model="demo-b"))
    assert e.value.body["code"] == "model_not_allowed"


def test_requests_past_the_quota_get_429_with_headers(pstack):
    client = oai(pstack, LIMITED_KEY)
    ok = client.chat.completions.with_raw_response.create(**chat())
    assert ok.headers["x-ratelimit-limit-requests"] == "2"
    assert ok.headers["x-ratelimit-limit-tokens"] == "50000"
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) < 50_000
    statuses = []
    for _ in range(3):
        try:
            client.chat.completions.create(**chat())
            statuses.append(200)
        except openai.RateLimitError as e:
            statuses.append(429)
            err = e
    assert statuses[-1] == 429
    assert "requests_per_minute" in err.message
    assert int(err.response.headers["retry-after"]) >= 1
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_blocked_prompt_is_400_content_policy_violation(pstack):
    with pytest.raises(openai.BadRequestError) as e:
        oai(pstack, GUARDED_KEY).chat.completions.create(**chat(content="Explain the forbidden plan."))
    assert e.value.body["code"] == "content_policy_violation"
    assert "forbidden plan" not in e.value.message.lower()


def test_streamed_output_is_redacted(pstack):
    stream = oai(pstack, GUARDED_KEY).chat.completions.create(
        **chat(max_tokens=48, stream=True, temperature=0), extra_body={"ignore_eos": True}
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "[REDACTED]" in text
    assert not re.search("[aeiouAEIOU]", text.replace("[REDACTED]", ""))


def test_experiment_variant_is_sticky_per_user_and_named(pstack):
    client = oai(pstack, DEMO_KEY)
    seen = {}
    for i in range(16):
        got = set()
        for _ in range(2):
            r = client.chat.completions.with_raw_response.create(**chat(model="chat", user=f"user-{i}", max_tokens=2))
            got.add((r.headers["x-keel-variant"], r.parse().model))
        assert len(got) == 1, got
        seen[i] = got.pop()
    assert all(variant == served for variant, served in seen.values())  # the header names who answered
    assert {v for v, _ in seen.values()} == {"demo", "demo-b"}  # 16 users: both variants (p fail 2^-15)


def test_audit_chain_verifies_and_detects_a_tampered_line(pstack):
    run = uuid.uuid4().hex[:8]
    login, guarded, plain = (f"audit-{what}-{run}" for what in ("login", "guarded", "plain"))
    r = httpx.post(pstack.url + "/v1/chat/completions", json=chat(), headers={"x-request-id": login}, timeout=30)
    assert r.status_code == 401
    oai(pstack, GUARDED_KEY).chat.completions.create(**chat(max_tokens=2), extra_headers={"x-request-id": guarded})
    oai(pstack, DEMO_KEY).chat.completions.create(**chat(max_tokens=2), extra_headers={"x-request-id": plain})
    audit_dir = pstack.tmp / "audit"
    files = wait_for(lambda: _audit_files_holding(audit_dir, {login, guarded, plain}), bool)
    assert files, f"no settled record of {login}, {guarded} and {plain} in {audit_dir}"
    ok = subprocess.run([str(KEEL), "audit", "verify", *map(str, files)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    [path] = [f for f in files if login in f.read_text()]
    lines = path.read_text().splitlines()
    records = {r.get("request_id"): r for r in map(json.loads, lines)}
    assert records[login]["status"] == 401 and records[guarded]["tenant"] == "guarded"
    assert DEMO_KEY not in path.read_text()
    tampered = pstack.tmp / "tampered.jsonl"
    i = next(i for i, ln in enumerate(lines) if f'"request_id":"{login}"' in ln)
    lines[i] = lines[i].replace('"status":401', '"status":200')  # hide a failed login
    tampered.write_text("\n".join(lines) + "\n")
    Path(str(tampered) + ".head").write_text(Path(str(path) + ".head").read_text())
    bad = subprocess.run([str(KEEL), "audit", "verify", str(tampered)], capture_output=True, text=True)
    assert bad.returncode != 0
    assert f"line {i + 1}: record was altered" in bad.stdout + bad.stderr


def test_keel_apply_changes_the_policy_live_without_restarting_engines(pstack):
    engines_before = _engine_replicas(pstack)
    address = re.search(r"keel apply --address (\S+)", pstack.log.read_text()).group(1)
    cfg = policy_config(pstack.tmp, limited_rpm=1000)
    cfg["server"] = pstack.cfg["server"]  # same stack part (port), only the policy changes
    cfg["quotas"] = pstack.cfg["quotas"]
    path = pstack.tmp / "applied.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [str(KEEL), "apply", "--address", address, str(path)], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "applied live" in out.stdout
    r = oai(pstack, LIMITED_KEY).chat.completions.with_raw_response.create(**chat(max_tokens=2))
    assert r.headers["x-ratelimit-limit-requests"] == "1000"
    assert _engine_replicas(pstack) == engines_before


def _engine_replicas(stack) -> set[str]:
    """The engine replicas serving the two deployments (one each): a replica missing from one
    scrape (the gateway gives each engine 2 s) is asked for again."""

    def scraped() -> set[str]:
        return {
            dict(labels)["replica"]
            for (name, labels), _ in stack.metrics().items()
            if name.startswith("vllm:") and "replica" in dict(labels)
        }

    replicas = wait_for(scraped, lambda seen: len(seen) >= 2)
    assert len(replicas) == 2, replicas
    return replicas


def _audit_files_holding(directory: Path, request_ids: set[str]) -> list[Path]:
    """The audit files once they hold a record of every request id, each with its head moved
    past its last record (the writer appends a batch, then writes the head); else []."""
    files = sorted(directory.glob("audit-*.jsonl"))
    seen = set()
    for path in files:
        lines = path.read_bytes().splitlines()
        try:
            records = [json.loads(ln) for ln in lines]
        except ValueError:  # a batch half appended
            return []
        head = read_head(path)
        if records and (head is None or head.seq != records[-1]["seq"]):
            return []
        seen.update(r.get("request_id") for r in records)
    return files if request_ids <= seen else []
