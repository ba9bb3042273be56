"""Keel vs bare vLLM on the same model and machine: both up at once, rounds alternating.

Both servers run for the whole measurement: bare vLLM's OpenAI server, given what the Keel
replica gives its engine (the config's engine flags, `--disable-uvicorn-access-log`, the
config's `env:`, HF_HUB_OFFLINE=1, OMP_NUM_THREADS as Ray sets it from the replica's
`num_cpus`, nice 0), and `keel serve` on the same config (gateway -> Ray Serve engine replica
-> vLLM). Before measuring, the two engines' process trees are compared (engine flags, thread
and priority settings per process); a difference stops the run. Then each round runs every
load point on both servers back to back (Keel first in odd rounds, the baseline first in
even ones), so the two measurements of a pair are seconds apart (a load point takes 5-15 s
here) on a box whose speed moves 2x within minutes. An idle vLLM is quiet once its worker stops busy-polling, 1 s
after its last request, so each measurement starts after a 2 s pause; the idle server's CPU
during each measurement is read from /proc and reported.

Prints, per concurrency, the per-pair Keel/baseline ratios of output tok/s and their median
(the figure to judge), the medians of each side, and best-of-rounds TTFT p50 at the lowest
concurrency (bimodal per run with the tiny model; see benchmarks/README.md). All of them are
over clean pairs only: a pair where either side failed a request (a stalled server flatters
the other) is left out, and listed under the table with the side, how many failed, by status,
and the sample errors; each row says how many clean pairs its medians are of ("—" for none)
and the total failed per side. The JSON keeps every pair and, per concurrency, the left-out
sides (`summary[c]["excluded"]`).

    python -m benchmarks.compare                      # 6 rounds, c = 1, 16, 64
    python -m benchmarks.compare --rounds 8 --requests 64:512
    python -m benchmarks.compare --baseline policies-off  # Keel with the config's policies vs none
    python -m benchmarks.compare --baseline vllm --vllm-python OLD/.venv/bin/python  # vLLM vs vLLM
    python -m benchmarks.compare --baseline keel --base-code OLD  # this Keel vs an older checkout

With `--baseline policies-off` both servers are `keel serve` stacks: the config as it is (its
tenants, quotas, guardrails, audit) and the same stack with every policy key removed and the
audit off (a byte relay), so the table is the cost of the policies end to end.

With `--baseline vllm` both servers are bare vLLM, the same flags and environment: this
environment's vLLM against the one installed beside `--vllm-python` (another venv), which is
how a vLLM upgrade is measured (the ratio is new / old).

With `--baseline keel` both servers are `keel serve` stacks on the same config, policies on:
this checkout against the one at `--base-code` (e.g. a git worktree of the commit before a
change), which is how a change to Keel itself is measured (the ratio is new / old).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.loadgen import run_load
from serving.bench.stack import free_port, keel_doc, start_keel, stop, wait_ready
from serving.config import REPO_ROOT, load_config, load_manifest
from serving.engine.args import to_cli_args
from serving.models import ensure_weights
from serving.policy.identity import DEMO_KEY

RESULTS = REPO_ROOT / "benchmarks" / "results"
KEEL, BASE = "keel", "base"
# Environment that sets a thread count, a binding or a CPU list: compared between the engines.
# TORCHINDUCTOR_COMPILE_THREADS is left out: vLLM sets it in os.environ on import in both.
THREAD_ENV = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "NUMEXPR_", "VLLM_CPU_")
# vLLM's engine worker busy-polls its input queue for 1 s after its last request (SpinCondition
# in shm_broadcast.py), on the core the other engine's worker is pinned to: wait that out.
SETTLE_S = 2.0
# Flags that differ between two engines by construction, not by how they run. --middleware is
# Keel's engine auth (serving/engine/auth.py): a cost Keel pays per request, the baseline not.
_OWN_FLAGS = ("--keel-parent", "--host", "--port", "--middleware")


# --- the baseline: bare vLLM as the replica starts its engine ---------------------------------


def replica_omp_threads(num_cpus: float) -> int:
    """OMP_NUM_THREADS Ray gives a replica that reserves num_cpus CPUs (when it is unset): the
    floor, at least 1 (ray._private.utils.set_omp_num_threads_if_unset)."""
    return max(math.floor(num_cpus), 1)


def bare_command(cfg, model: str, port: int, python: str = sys.executable) -> list[str]:
    """vLLM's own OpenAI server with the flags serving/engine/replica.py gives the engine."""
    mc = cfg.models[model]
    _, weights = load_manifest(cfg, mc.weights)
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(weights),
        "--served-model-name",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
        *to_cli_args(mc.engine),
    ]


def bare_env(cfg, model: str, environ=os.environ) -> dict[str, str]:
    """The engine's environment in a replica: Ray's OMP_NUM_THREADS (it keeps one already
    set), then what the replica adds (HF_HUB_OFFLINE, the config's env:, which wins)."""
    mc = cfg.models[model]
    env = dict(environ)
    env.setdefault("OMP_NUM_THREADS", str(replica_omp_threads(mc.deployment.num_cpus)))
    return {**env, "HF_HUB_OFFLINE": "1", **mc.env}


def _normal_priority() -> None:
    """Nice 0 for the bare engine, as serving/priority.py gives Keel's engine (Ray starts at 15)."""
    if os.getpriority(os.PRIO_PROCESS, 0) > 0:
        os.setpriority(os.PRIO_PROCESS, 0, 0)


def start_bare(cfg, model: str, port: int, log, python: str = sys.executable) -> subprocess.Popen:
    return subprocess.Popen(
        bare_command(cfg, model, port, python),
        env=bare_env(cfg, model),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_normal_priority,
    )


def vllm_version(python: str) -> str:
    """The vLLM release installed beside an interpreter (the CPU build is named vllm-cpu)."""
    code = (
        "from importlib.metadata import version, PackageNotFoundError\n"
        "for d in ('vllm', 'vllm-cpu'):\n"
        "    try:\n        print(version(d)); break\n"
        "    except PackageNotFoundError:\n        pass"
    )
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip() or "?"


# --- the engines' process trees ----------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on: field N is at index N - 3."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def tree_cpu_ticks(root: int) -> dict[int, int]:
    """utime + stime, in clock ticks, of root and every descendant."""
    try:
        procs = [root, *(p.pid for p in psutil.Process(root).children(recursive=True))]
    except psutil.Error:
        return {}
    ticks = {}
    for pid in procs:
        try:
            s = _stat(pid)
        except OSError:  # exited since
            continue
        ticks[pid] = int(s[11]) + int(s[12])
    return ticks


def cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU time a process tree used between two snapshots (a process new since counts from 0;
    one gone since is not counted)."""
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
    return ticks / os.sysconf("SC_CLK_TCK")


def engine_roots(server_pid: int) -> list[psutil.Process]:
    """The engines' API server processes under a server: Keel's (`serving.engine.server`) or,
    when there are none, the server itself (bare vLLM)."""
    top = psutil.Process(server_pid)
    found = [p for p in top.children(recursive=True) if "serving.engine.server" in " ".join(_cmdline(p))]
    return found or [top]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def engine_args(cmdline: list[str]) -> list[str]:
    """The vLLM flags of an engine's command line: after `-m MODULE`, without the flags that
    differ by construction (_OWN_FLAGS)."""
    args = cmdline[cmdline.index("-m") + 2 :] if "-m" in cmdline else list(cmdline)
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in _OWN_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in _OWN_FLAGS)):
            out.append(a)
    return out


def process_conditions(pid: int) -> dict:
    """What a process runs with: nice, CPU affinity, threads, and its THREAD_ENV variables
    (/proc/PID/environ: the environment it started with)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = (kv.decode(errors="replace").partition("=") for kv in f.read().split(b"\0") if kv)
        env = {k: v for k, _, v in pairs if k.startswith(THREAD_ENV)}
    stat = _stat(pid)
    return {"nice": int(stat[16]), "affinity": sorted(os.sched_getaffinity(pid)), "threads": int(stat[17]), "env": env}


def engine_conditions(root: psutil.Process) -> dict:
    """An engine's flags and, per process role (the API server and vLLM's named processes such
    as VLLM::EngineCore and VLLM::Worker), its conditions."""
    roles = {"api server": process_conditions(root.pid)}
    for child in root.children(recursive=True):
        try:
            name = child.name()
            if name.startswith("VLLM::"):
                roles.setdefault(name, process_conditions(child.pid))
        except (psutil.Error, OSError):
            continue
    return {"args": engine_args(_cmdline(root)), "processes": roles}


def condition_diffs(keel: dict, base: dict) -> list[str]:
    """What differs between two engines' conditions, except thread counts (those vary with the
    server's own pools; they are reported, not judged)."""
    out = []
    if keel["args"] != base["args"]:
        out.append(f"engine flags: Keel {keel['args']} vs baseline {base['args']}")
    for role in sorted(set(keel["processes"]) | set(base["processes"])):
        k, b = keel["processes"].get(role), base["processes"].get(role)
        if k is None or b is None:
            out.append(f"{role}: only in {'the baseline' if k is None else 'Keel'}")
            continue
        for key in ("nice", "affinity", "env"):
            if k[key] != b[key]:
                out.append(f"{role} {key}: Keel {k[key]} vs baseline {b[key]}")
    return out


# --- the rounds --------------------------------------------------------------------------------


def schedule(rounds: int, points: list[tuple[int, int]]) -> list[tuple[int, int, int, tuple[str, str]]]:
    """(round, concurrency, requests, order) for each pair: Keel first in even rounds (0-based),
    the baseline first in odd ones, so neither side always runs right after the other's load."""
    return [(r, c, n, (KEEL, BASE) if r % 2 == 0 else (BASE, KEEL)) for r in range(rounds) for c, n in points]


def measure_pair(
    servers: dict[str, dict],
    model: str,
    c: int,
    n: int,
    order: tuple[str, str],
    max_tokens: int,
    seed: int,
    settle_s: float = SETTLE_S,
) -> dict:
    """One load point on each server in `order`; with each side's own CPU and the idle one's."""
    pair: dict = {"order": list(order)}
    for side in order:
        other = BASE if side == KEEL else KEEL
        s, o = servers[side], servers[other]
        time.sleep(settle_s)  # the last load's busy-poll ends before this one starts
        before = {side: tree_cpu_ticks(s["pid"]), other: tree_cpu_ticks(o["pid"])}
        t0 = time.monotonic()
        result = asyncio.run(run_load(s["url"], model, c, n, max_tokens, seed=seed, api_key=s["key"]))
        wall = time.monotonic() - t0
        result["server_cpu_cores"] = cpu_seconds(before[side], tree_cpu_ticks(s["pid"])) / wall
        result["idle_other_cpu_cores"] = cpu_seconds(before[other], tree_cpu_ticks(o["pid"])) / wall
        pair[side] = result
        print(
            f"    c={c:<3} {s['name']:>12}: {result['output_throughput']:7.0f} tok/s  "
            f"ttft p50 {result['median_ttft_ms']:7.1f} ms  tpot p50 {result['median_tpot_ms']:6.2f} ms  "
            f"failed {result['failed']}  server CPU {result['server_cpu_cores']:.2f} cores, "
            f"idle {o['name']} {100 * result['idle_other_cpu_cores']:.1f}% of a core",
            flush=True,
        )
        if result["failed"]:
            print(f"      {s['name']} failed {result['failures_by_status']}: {result['sample_errors']}", flush=True)
    return pair


# --- the table ---------------------------------------------------------------------------------


def pair_ratio(pair: dict, key: str = "output_throughput") -> float | None:
    """Keel / baseline for one pair; None when the baseline has no throughput to divide by."""
    b = pair[BASE][key]
    return pair[KEEL][key] / b if b else None


def pair_failures(pair: dict) -> list[dict]:
    """Each side of a pair that failed requests: which, how many of how many, by status, and the
    sample errors. A pair with any is left out of the medians (a stalled side flatters the other)."""
    return [
        {
            "round": pair.get("round"),
            "c": pair["c"],
            "side": side,
            "failed": r["failed"],
            "requests": r.get("completed", 0) + r["failed"],
            "failures_by_status": r.get("failures_by_status", {}),
            "sample_errors": r.get("sample_errors", []),
            "ratio": pair_ratio(pair),
        }
        for side in (KEEL, BASE)
        if (r := pair[side])["failed"] > 0
    ]


def point_summary(pairs: list[dict]) -> dict:
    """One concurrency's pairs: the clean pairs' ratios (neither side failed a request), their
    median and each side's medians over them; every side that failed, listed in `excluded`."""
    failures = [pair_failures(p) for p in pairs]
    excluded = [f for fs in failures for f in fs]
    clean = [p for p, fs in zip(pairs, failures, strict=True) if not fs]
    ratios = [pair_ratio(p) for p in clean]
    valid = [r for r in ratios if r is not None]

    def med(side: str, key: str) -> float | None:
        return statistics.median(p[side][key] for p in clean) if clean else None

    out = {
        "pairs": len(pairs),
        "clean_pairs": len(clean),
        "ratios": ratios,
        "median_ratio": statistics.median(valid) if valid else None,
        "excluded": excluded,
    }
    for side in (KEEL, BASE):
        out[side] = {
            "output_throughput": med(side, "output_throughput"),
            "median_ttft_ms": med(side, "median_ttft_ms"),
            "best_ttft_ms": min((p[side]["median_ttft_ms"] for p in clean), default=None),
            "median_tpot_ms": med(side, "median_tpot_ms"),
            "failed": sum(p[side]["failed"] for p in pairs),
            "idle_other_cpu_cores": med(side, "idle_other_cpu_cores"),
        }
    return out


def summarize_pairs(pairs: list[dict]) -> dict[int, dict]:
    by_c: dict[int, list[dict]] = {}
    for p in pairs:
        by_c.setdefault(p["c"], []).append(p)
    return {c: point_summary(ps) for c, ps in by_c.items()}


def _num(x: float | None, spec: str, unit: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{unit}"


def _share(cores: float | None) -> str:
    return _num(None if cores is None else 100 * cores, ".1f", "%")


def _failure_line(f: dict, side_name: dict[str, str]) -> str:
    """One failed side of a left-out pair: the round (1-based, as printed while running), how
    many failed, by status (0: no response), the sample errors and the ratio left out."""
    statuses = ", ".join(
        f"{'no response' if st == '0' else 'HTTP ' + st}: {n}" for st, n in sorted(f["failures_by_status"].items())
    )
    errors = "; ".join(f"`{' '.join(e.split())}`" for e in f["sample_errors"]) or "no error text"
    rnd = "?" if f["round"] is None else f["round"] + 1
    return (
        f"- round {rnd}, c={f['c']}: {side_name[f['side']]} failed {f['failed']} of {f['requests']} "
        f"({statuses or 'no status'}): {errors}; the pair's ratio {_num(f['ratio'], '.2f')}, left out"
    )


def table(summary: dict[int, dict], names: tuple[str, str] = ("bare", "Keel")) -> str:
    """The markdown table over clean pairs, then the pairs left out, one line per failed side."""
    b, k = names
    side_name = {BASE: b, KEEL: k}
    rows = [
        f"| c | {b} tok/s | {k} tok/s | {k}/{b}, median of clean pairs | per-pair ratios | {b} TTFT p50 | "
        f"{k} TTFT p50 | {b} TPOT p50 | {k} TPOT p50 | failed ({b}/{k}) | idle {k} / idle {b} CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, s in sorted(summary.items()):
        kb, bb = s[KEEL], s[BASE]
        rows.append(
            f"| {c} | {_num(bb['output_throughput'], ',.0f')} | {_num(kb['output_throughput'], ',.0f')} | "
            f"**{_num(s['median_ratio'], '.2f', '×')}**, median of {s['clean_pairs']} clean pairs | "
            f"{', '.join(_num(r, '.2f') for r in s['ratios']) or '—'} | "
            f"{_num(bb['median_ttft_ms'], '.1f', ' ms')} | {_num(kb['median_ttft_ms'], '.1f', ' ms')} | "
            f"{_num(bb['median_tpot_ms'], '.2f', ' ms')} | {_num(kb['median_tpot_ms'], '.2f', ' ms')} | "
            f"{bb['failed']}/{kb['failed']} | "
            f"{_share(bb['idle_other_cpu_cores'])} / {_share(kb['idle_other_cpu_cores'])} |"
        )
    c1 = min(summary)
    b1, k1 = summary[c1][BASE]["best_ttft_ms"], summary[c1][KEEL]["best_ttft_ms"]
    best = (
        f"{b} {b1:.1f} ms, {k} {k1:.1f} ms (Δ {k1 - b1:+.1f} ms)"
        if b1 is not None and k1 is not None
        else "no clean pair"
    )
    rows += [
        "",
        f"Best-of-rounds TTFT p50 at c={c1} (clean pairs): {best}. "
        f"Idle CPU: the server not being measured, median over clean pairs, % of one core.",
    ]
    excluded = [f for _, s in sorted(summary.items()) for f in s["excluded"]]
    if excluded:
        rows += ["", "Pairs left out of the medians (a side failed requests):"]
        rows += [_failure_line(f, side_name) for f in excluded]
    return "\n".join(rows)


# --- the run -----------------------------------------------------------------------------------


def start_servers(a, cfg, model: str, stamp: str) -> dict[str, dict]:
    """Both servers, started together; each with its URL, key, process and log."""
    names = {KEEL: "Keel", BASE: "bare" if a.baseline == "bare" else "policies off"}
    if a.baseline == "policies-off":
        names[KEEL] = "policies on"
    if a.baseline == "keel":
        names = {KEEL: "Keel (this)", BASE: f"Keel ({Path(a.base_code).name})"}
    codes = {
        KEEL: Path(a.keel_code).resolve() if a.keel_code else None,
        BASE: Path(a.base_code).resolve() if a.base_code else None,
    }
    # --baseline vllm: both sides bare vLLM, this environment's (in the "Keel" slot) vs another's.
    pythons = {KEEL: sys.executable, BASE: a.vllm_python or sys.executable}
    if a.baseline == "vllm":
        names = {side: f"vLLM {vllm_version(py)}" for side, py in pythons.items()}
        if names[KEEL] == names[BASE]:
            names = {KEEL: f"{names[KEEL]} (this)", BASE: f"{names[BASE]} (other)"}
    servers = {}
    for side in (KEEL, BASE):
        port = free_port()
        log = open(RESULTS / f"compare-{stamp}-{side}.log", "wb")  # noqa: SIM115 - closed when its server stops
        with_policies = (side == KEEL and a.baseline != "vllm") or a.baseline == "keel"
        bare = (side == BASE and a.baseline == "bare") or a.baseline == "vllm"
        if bare:
            proc = start_bare(cfg, model, port, log, pythons[side])
        else:
            doc = keel_doc(Path(a.config), port, policies=with_policies)
            proc = start_keel(
                doc,
                RESULTS,
                log,
                name=f"compare-{stamp}-{side}",
                code=codes[side],
            )
        servers[side] = {
            "name": names[side],
            "url": f"http://127.0.0.1:{port}",
            "proc": proc,
            "pid": proc.pid,
            "log": log,
            "stop": signal.SIGTERM if bare else signal.SIGINT,
            "key": a.api_key if with_policies and cfg.tenants else None,
        }
        print(f"starting {names[side]} on :{port}", flush=True)
    return servers


def check_conditions(servers: dict[str, dict]) -> dict:
    """Both engines' conditions; exits when they differ (the ratio would measure the difference)."""
    found = {}
    for side, s in servers.items():
        roots = engine_roots(s["pid"])
        found[side] = engine_conditions(roots[0])
        for role, c in found[side]["processes"].items():
            print(
                f"  {s['name']:>12} {role:<17} nice {c['nice']}  CPUs {c['affinity']}  threads {c['threads']:<3} "
                f"{' '.join(f'{k}={v}' for k, v in sorted(c['env'].items()))}",
                flush=True,
            )
    diffs = condition_diffs(found[KEEL], found[BASE])
    if diffs:
        raise SystemExit("the engines do not run alike; the ratio would measure that:\n  " + "\n  ".join(diffs))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO_ROOT / "configs" / "local.yaml"))
    ap.add_argument("--model", default=None, help="public model name (default: the config's first)")
    ap.add_argument("--rounds", type=int, default=6, help="an even count: each side goes first as often")
    ap.add_argument("--requests", default="1:32,16:256,64:384", help="concurrency:requests,...")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument(
        "--settle-s",
        type=float,
        default=SETTLE_S,
        help="pause before each measurement, for the previous one's busy-polling to end",
    )
    ap.add_argument(
        "--baseline",
        choices=["bare", "policies-off", "vllm", "keel"],
        default="bare",
        help="bare: vLLM's own server; policies-off: the same Keel stack without policies; "
        "vllm: bare vLLM of this environment vs bare vLLM of --vllm-python; "
        "keel: this Keel vs the Keel checkout at --base-code",
    )
    ap.add_argument("--base-code", help="with --baseline keel: the other Keel checkout (e.g. a git worktree)")
    ap.add_argument("--vllm-python", help="with --baseline vllm: the interpreter of the other vLLM's venv")
    ap.add_argument("--api-key", default=DEMO_KEY, help="key for the config's tenants (demo key)")
    ap.add_argument(
        "--keel-code",
        help="serve Keel from this checkout (e.g. a git worktree of an older "
        "commit), to compare versions against the same baseline",
    )
    a = ap.parse_args()
    if (a.baseline == "vllm") != bool(a.vllm_python):
        ap.error("--baseline vllm and --vllm-python go together")
    if (a.baseline == "keel") != bool(a.base_code):
        ap.error("--baseline keel and --base-code go together")
    for flag, code in (("--keel-code", a.keel_code), ("--base-code", a.base_code)):
        if code and not (Path(code) / "serving" / "__init__.py").is_file():
            ap.error(f"{flag} {code}: not a Keel checkout (no serving/__init__.py)")

    cfg = load_config(a.config)
    model = a.model or next(iter(cfg.models))
    ensure_weights(cfg, cfg.models[model].weights)
    points = [tuple(int(x) for x in p.split(":")) for p in a.requests.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    servers = start_servers(a, cfg, model, stamp)
    pairs = []
    try:
        t0 = time.monotonic()
        for s in servers.values():
            wait_ready(s["url"], s["proc"], a.startup_timeout)
        print(f"both ready in {time.monotonic() - t0:.0f}s", flush=True)
        for s in servers.values():  # warm-up, not recorded
            asyncio.run(run_load(s["url"], model, 4, 16, a.max_tokens, api_key=s["key"]))
        conditions = check_conditions(servers)
        for rnd, c, n, order in schedule(a.rounds, points):
            if c == points[0][0]:
                print(f"round {rnd + 1}/{a.rounds}: {servers[order[0]]['name']} first", flush=True)
            pair = measure_pair(servers, model, c, n, order, a.max_tokens, seed=c, settle_s=a.settle_s)
            pairs.append({"round": rnd, "c": c, **pair})
    finally:
        for s in servers.values():
            stop(s["proc"], s["stop"])
            s["log"].close()
    names = (servers[BASE]["name"], servers[KEEL]["name"])
    summary = summarize_pairs(pairs)
    text = table(summary, names)
    header = (
        f"{names[1]} vs {names[0]}: model `{model}` ({cfg.models[model].weights}), both up at once, "
        f"{a.rounds} alternating rounds, streaming chat, {a.max_tokens} output tokens (ignore_eos)\n"
    )
    print("\n" + header + "\n" + text)
    out = RESULTS / f"compare-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "model": model,
                "baseline": a.baseline,
                "points": points,
                "conditions": conditions,
                "pairs": pairs,
                "summary": summary,
                "table": text,
            },
            indent=2,
        )
    )
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
