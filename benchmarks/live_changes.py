"""Config changes applied live under steady streaming load: what a client notices.

    python -m benchmarks.live_changes [--clients 4] [--settle-s 10] [--out FILE.md]

Starts `keel serve` on configs/local.yaml (Ray given room for three engine replicas), keeps
`--clients` clients streaming chat completions without pause, and applies one change after
another with `keel apply`, as an operator would from a second shell. For each change it reports
how long `keel apply` took, the requests that failed (an error status, a refused connection, a
stream cut before its end), the longest time no client received a byte, and which engines were
restarted (engine API server processes that ended, per model). The issue 12 table.

`tests/e2e/test_live_changes_e2e.py` uses the same load and counts, on fewer changes.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import yaml

from serving.config import REPO_ROOT
from serving.policy.identity import DEMO_KEY

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}


@dataclass
class LoadStats:
    requests: int = 0
    failed: list[str] = field(default_factory=list)  # one reason per failed request
    longest_silence_s: float = 0.0  # the longest time no client received a byte


class StreamingLoad:
    """`clients` threads streaming chat completions back to back until stop()."""

    def __init__(self, url: str, model: str, clients: int = 4, max_tokens: int = 48, headers=AUTH):
        self.url, self.model, self.clients, self.max_tokens, self.headers = url, model, clients, max_tokens, headers
        self.stats = LoadStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_byte = time.monotonic()
        self._threads: list[threading.Thread] = []

    def __enter__(self):
        self._last_byte = time.monotonic()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)
        self._saw_bytes()

    def snapshot(self) -> LoadStats:
        """The counts so far (and resets them), for one change at a time."""
        with self._lock:
            self._saw_bytes(locked=True)
            stats, self.stats = self.stats, LoadStats()
            return stats

    def _saw_bytes(self, locked: bool = False) -> None:
        if not locked:
            self._lock.acquire()
        try:
            now = time.monotonic()
            self.stats.longest_silence_s = max(self.stats.longest_silence_s, now - self._last_byte)
            self._last_byte = now
        finally:
            if not locked:
                self._lock.release()

    def _client(self) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "Tell me about licences."}],
            "max_tokens": self.max_tokens,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=120) as client:
            while not self._stop.is_set():
                failure = self._one(client, body)
                with self._lock:
                    self.stats.requests += 1
                    if failure:
                        self.stats.failed.append(failure)
                if failure:
                    time.sleep(0.2)  # a client that was refused retries, as an app would, not in a spin

    def _one(self, client: httpx.Client, body: dict) -> str | None:
        """None if the whole stream arrived; else why not."""
        try:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return f"{r.status_code} {r.read()[:200]!r}"
                done = False
                for chunk in r.iter_bytes():
                    self._saw_bytes()
                    done = done or b"data: [DONE]" in chunk
                return None if done else "stream cut before [DONE]"
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"


def engine_pids(config_path: Path) -> dict[str, set[int]]:
    """model -> pids of its engines' API servers, among the descendants of `keel serve CONFIG`."""
    keel = [p for p in psutil.process_iter(["cmdline"]) if str(config_path) in (p.info["cmdline"] or [])]
    out: dict[str, set[int]] = {}
    for k in keel:
        for p in k.children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "serving.engine.server" in cmd and "--served-model-name" in cmd:
                out.setdefault(cmd[cmd.index("--served-model-name") + 1], set()).add(p.pid)
    return out


def keel_apply(config_path: Path, doc: dict, *extra: str) -> tuple[int, float, str]:
    """Write doc to config_path and run `keel apply` on it: (exit status, seconds, output).
    extra: e.g. `--address` of the stack's Ray cluster when several run on the machine."""
    config_path.write_text(yaml.safe_dump(doc))
    keel = Path(sys.executable).with_name("keel")
    start = time.monotonic()
    r = subprocess.run([str(keel), "apply", str(config_path), *extra], capture_output=True, text=True, timeout=1500)
    return r.returncode, time.monotonic() - start, r.stdout + r.stderr


def wait_engines(config_path: Path, want: dict[str, int], timeout_s: float = 120) -> dict[str, set[int]]:
    """Until each model has `want` engines (a replaced or removed one's drain ends its process)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = engine_pids(config_path)
        if {m: len(p) for m, p in pids.items() if p} == want or time.monotonic() > deadline:
            return pids
        time.sleep(1)


def restarted(before: dict[str, set[int]], after: dict[str, set[int]]) -> dict[str, int]:
    """model -> how many of its engines from before are gone."""
    return {m: len(p - after.get(m, set())) for m, p in before.items() if p - after.get(m, set())}


# The changes, in order, each a function of the config document (issue 12's table, and more).
def _autoscaling(doc):
    doc["models"]["demo"]["deployment"] = {
        "num_cpus": 1,
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target": 64, "scale_down_cooldown_s": 600},
    }


def _add_model(doc):
    doc["models"]["demo-b"] = copy.deepcopy(doc["models"]["demo"])
    doc["models"]["demo-b"]["deployment"] = {"num_replicas": 1, "num_cpus": 1}


def _engine_args(doc):
    doc["models"]["demo"]["engine"]["max_num_seqs"] = 64


def _scale_to_2(doc):
    doc["models"]["demo"]["deployment"] = {"num_replicas": 2, "num_cpus": 1}


def _scale_to_1(doc):
    doc["models"]["demo"]["deployment"] = {"num_replicas": 1, "num_cpus": 1}


def _remove_model(doc):
    del doc["models"]["demo-b"]


CHANGES = [
    ("only `demo`'s `autoscaling:` block", _autoscaling, {"demo": 1}),
    ("add a second model `demo-b`", _add_model, {"demo": 1, "demo-b": 1}),
    ("`demo`'s engine arguments (max_num_seqs)", _engine_args, {"demo": 1, "demo-b": 1}),
    ("scale `demo` 1 -> 2", _scale_to_2, {"demo": 2, "demo-b": 1}),
    ("scale `demo` 2 -> 1", _scale_to_1, {"demo": 1, "demo-b": 1}),
    ("remove `demo-b`", _remove_model, {"demo": 1}),
]


def base_doc(port: int, metrics_port: int) -> dict:
    doc = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
    doc["server"].update(port=port, metrics_port=metrics_port)
    doc["ray"]["num_cpus"] = 6  # logical: two replicas of demo while one is replaced, and demo-b
    # vLLM's auto binding pins every engine's compute to the first core (each is local rank 0):
    # a second engine starting beside a busy one then gets almost none of it. Let them float.
    doc["models"]["demo"]["env"]["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return doc


def main(argv=None) -> int:
    from serving.bench.stack import free_port, start_keel, stop, wait_ready

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--settle-s", type=float, default=10, help="load kept on after each change")
    ap.add_argument("--out", default=None, help="also write the table here (Markdown)")
    args = ap.parse_args(argv)

    port = free_port()
    doc = base_doc(port, free_port())
    work = Path(tempfile.mkdtemp(prefix="keel-live-"))
    config = work / "live.yaml"
    url = f"http://127.0.0.1:{port}"
    with open(work / "keel-serve.log", "wb") as log:
        proc = start_keel(doc, work, log, name="live")
        rows = []
        try:
            wait_ready(url, proc, 900)
            # Its own Ray cluster, not `auto`'s pick when other stacks run on the machine.
            address = re.search(r"keel apply --address (\S+) CONFIG", (work / "keel-serve.log").read_text()).group(1)
            with StreamingLoad(url, "demo", args.clients) as load:
                time.sleep(args.settle_s)
                warmup = load.snapshot()
                print(f"warm-up: {warmup.requests} requests, {len(warmup.failed)} failed", flush=True)
                for title, change, engines in CHANGES:
                    change(doc)
                    before = engine_pids(config)
                    rc, took, out = keel_apply(config, doc, "--address", address)
                    time.sleep(args.settle_s)
                    after = wait_engines(config, engines)
                    stats = load.snapshot()
                    gone = restarted(before, after)
                    row = {
                        "change": title,
                        "apply_s": round(took, 1),
                        "rc": rc,
                        "requests": stats.requests,
                        "failed": len(stats.failed),
                        "longest_silence_s": round(stats.longest_silence_s, 1),
                        "engines_restarted": gone,
                        "failures": stats.failed[:5],
                    }
                    rows.append(row)
                    print(out.rstrip(), flush=True)
                    print(json.dumps(row), flush=True)
                    if rc != 0:
                        break
        finally:
            stop(proc)
    table = [
        "| change | `keel apply` took | exit | requests | failed | longest time with no answer | engines restarted |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gone = ", ".join(f"{m}: {n}" for m, n in r["engines_restarted"].items()) or "none"
        table.append(
            f"| {r['change']} | {r['apply_s']} s | {r['rc']} | {r['requests']} | {r['failed']} | "
            f"{r['longest_silence_s']} s | {gone} |"
        )
    text = "\n".join(table)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if rows and all(r["rc"] == 0 and r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
