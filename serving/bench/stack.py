"""Starting and stopping a whole Keel stack (`keel serve`) for a measurement, from a config
document with changes applied (port, engine arguments, replicas, policies)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from serving.policy.config import POLICY_KEYS


def free_port() -> int:
    """A port free now, outside the kernel's ephemeral range: a port from that range (what
    bind(0) gives) can be taken as the source port of some outgoing connection before the
    server binds it, which happens when other work on the box holds thousands of them."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10_000, 65_536) if not low <= p <= high]
    for port in random.sample(candidates, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free port outside the ephemeral range")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def keel_doc(
    config_path: Path,
    port: int,
    *,
    policies: bool = True,
    model: str | None = None,
    engine: dict | None = None,
    replicas: int | None = None,
) -> dict:
    """The config file's document with the gateway on `port`; optionally without policies, and
    with `model`'s engine arguments overridden and a fixed replica count (autoscaling off)."""
    doc = yaml.safe_load(config_path.read_text())
    doc.setdefault("server", {})["port"] = port
    if doc["server"].get("metrics_port"):  # configs/local.yaml's 8001: one per stack running at once
        doc["server"]["metrics_port"] = free_port()
    if not policies:
        for k in POLICY_KEYS:
            doc.pop(k, None)
        doc["audit"] = {"enabled": False}
    if model is not None:
        mc = doc["models"][model]
        mc["engine"] = {**(mc.get("engine") or {}), **(engine or {})}
        if replicas is not None:
            dep = mc.setdefault("deployment", {})
            dep.pop("autoscaling", None)
            dep["num_replicas"] = replicas
    return doc  # relative paths in it (audit dir, models_dir) stay relative to the working directory


def start_keel(doc: dict, workdir: Path, log, name: str = "bench-keel", code: Path | None = None) -> subprocess.Popen:
    """`keel serve` on a config written from `doc` to workdir/NAME.yaml (one name per stack
    running at once), in its own process group (stop() ends it). code: another checkout of
    Keel to serve from (its `serving` package first on the path), for before/after runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    keel = Path(sys.executable).with_name("keel")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    return subprocess.Popen(
        [str(keel), "serve", str(path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=code
    )


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until GET url/health answers 200; fails early when the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


def replica_start_s(url: str, model: str) -> float | None:
    """The slowest of `model`'s replicas' own start (its Ray worker's start to engine ready), as a Keel
    gateway's /health lists them; None when the server lists none (not Keel, or older)."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            doc = json.loads(r.read())
    except (OSError, ValueError):  # HTTPError is an OSError: a 404 or 503 lists nothing either
        return None
    starts = (doc.get("replica_start_s") or {}).get(model) if isinstance(doc, dict) else None
    return max(starts) if starts else None


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    """Ctrl-C to the whole process group (keel serve then stops Serve and Ray), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
