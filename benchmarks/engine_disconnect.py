"""Does bare vLLM stop generating when its client hangs up? (No Keel in the path.)

Starts vLLM's own OpenAI server on the config's model and engine arguments (as
`benchmarks.compare` does), then, one request at a time: sends a non-streaming chat request
with `ignore_eos` and `max_tokens` tokens to generate, hangs up after a delay, waits until the
engine runs nothing, and records how many tokens the engine generated for it
(`vllm:generation_tokens_total`). A request the engine aborted on the hang-up generated a few
tokens per 100 ms of delay; one that ran to the end generated all `max_tokens`.

    python -m benchmarks.engine_disconnect                  # 40 tries, delays 0.02/0.1/0.3/0.6 s
    python -m benchmarks.engine_disconnect --tries 24 --delays 0.6

Why it exists: Keel's e2e test of the same thing through the gateway
(tests/e2e/test_openai_e2e.py::test_client_disconnect_aborts_generation_in_the_engine) sees
the odd request run to the end although the gateway closed its engine connection. This probe
shows bare vLLM 0.29 (CPU) doing the same with no gateway in front; rerun it after a vLLM
upgrade.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.compare import RESULTS, start_bare
from serving.bench.stack import free_port, stop, wait_ready
from serving.config import REPO_ROOT, load_config
from serving.models import ensure_weights


def metric_sum(url: str, name: str) -> float:
    """The sum of `name`'s samples. A scrape without them is retried, never read as 0: Keel's
    gateway leaves out an engine that did not answer its own scrape within 2 s."""
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        values = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]
        if values:
            return sum(values)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/metrics has had no {name} for a minute")
        time.sleep(0.2)


def hang_up(
    url: str,
    model: str,
    max_tokens: int,
    delay: float,
    headers: dict[str, str] | None = None,
    metrics_url: str | None = None,
) -> float:
    """Tokens the engine generated for one request whose client left after `delay` seconds.

    metrics_url (default: url) serves vLLM's metrics: the engine itself, or Keel's gateway (which
    adds them to its own). Raises RuntimeError if the engine still runs something a minute later."""
    metrics_url = metrics_url or url
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": max_tokens,
            "stream": False,
            "ignore_eos": True,
        }
    ).encode()
    host, port = url.removeprefix("http://").split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode("latin-1")
    before = metric_sum(metrics_url, "vllm:generation_tokens_total")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: keel\r\ncontent-type: application/json\r\n"
            b"%bcontent-length: %d\r\n\r\n%b" % (head, len(body), body)
        )
        time.sleep(delay)
    deadline = time.monotonic() + 60
    while metric_sum(metrics_url, "vllm:num_requests_running") > 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the engine still runs a request a minute after its client left")
        time.sleep(0.2)
    time.sleep(0.5)  # the last iteration's counters
    return metric_sum(metrics_url, "vllm:generation_tokens_total") - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO_ROOT / "configs" / "local.yaml"))
    ap.add_argument("--model", help="the config's model (default: its first)")
    ap.add_argument("--tries", type=int, default=40)
    ap.add_argument("--delays", default="0.02,0.1,0.3,0.6", help="seconds before hanging up, in turn")
    ap.add_argument("--max-tokens", type=int, default=480)
    a = ap.parse_args()
    cfg = load_config(a.config)
    model = a.model or next(iter(cfg.models))
    ensure_weights(cfg, cfg.models[model].weights)
    delays = [float(d) for d in a.delays.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "engine_disconnect.log", "wb") as log:
        proc = start_bare(cfg, model, port, log)
    try:
        wait_ready(url, proc, 600)
        ran_to_end = []
        for i in range(a.tries):
            delay = delays[i % len(delays)]
            generated = hang_up(url, model, a.max_tokens, delay)
            if generated >= a.max_tokens:
                ran_to_end.append(i)
            print(f"try {i:3d}  hang up after {delay:.2f} s  generated {generated:5.0f} of {a.max_tokens}", flush=True)
        print(f"\nran to the end after the hang-up: {len(ran_to_end)} of {a.tries} (tries {ran_to_end})")
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
