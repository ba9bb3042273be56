"""benchmarks/compare.py: the baseline gets what Keel's engine gets, pairs alternate, the ratios."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from benchmarks import compare
from benchmarks.compare import (
    BASE,
    KEEL,
    bare_command,
    bare_env,
    condition_diffs,
    cpu_seconds,
    engine_args,
    engine_conditions,
    point_summary,
    schedule,
    summarize_pairs,
    table,
)
from serving.config import load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "configs" / "local.yaml"


def local(**deployment):
    doc = yaml.safe_load(LOCAL.read_text())
    doc["models"]["demo"]["deployment"].update(deployment)
    return parse_config(doc, check_engine_args=False)


def replica_launch(cfg, monkeypatch, environ: dict | None = None) -> tuple[list[str], dict]:
    """The command and environment serving/engine/replica.py starts the engine with (in a
    process whose environment is `environ`)."""
    from serving.engine import replica as replica_mod

    with warnings.catch_warnings():  # Ray Serve's config models warn on import (pydantic)
        warnings.simplefilter("ignore", DeprecationWarning)
        from serving.app import engine_spec
    from serving.plan import desired

    if environ is not None:
        monkeypatch.setattr(os, "environ", environ)
    seen = {}
    monkeypatch.setattr(replica_mod.subprocess, "Popen", lambda cmd, env, **kw: seen.update(cmd=cmd, env=env))
    r = replica_mod.EngineReplica.__new__(replica_mod.EngineReplica)
    r.spec, r.port, r.engine_tree = engine_spec(desired(cfg).models["demo"].args), 18555, "tree"
    r._start_engine()
    return seen["cmd"], seen["env"]


# --- the baseline ------------------------------------------------------------------------------


def test_bare_vllm_gets_the_flags_the_replica_gives_its_engine(monkeypatch):
    cfg = load_config(LOCAL)
    engine_cmd, _ = replica_launch(cfg, monkeypatch)
    cmd = bare_command(cfg, "demo", 18556)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--disable-uvicorn-access-log" in cmd and "--max-num-seqs" in cmd
    assert engine_args(cmd) == engine_args(engine_cmd)  # same flags, same order, ports aside


def test_bare_vllm_gets_the_engine_environment_with_rays_thread_count(monkeypatch):
    cfg = local(num_cpus=1)
    _, engine_env = replica_launch(cfg, monkeypatch, environ={"PATH": "/bin"})
    env = bare_env(cfg, "demo", environ={"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "1"  # what Ray adds to the replica's environment
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"  # the config's env:
    assert {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"} == {
        k: v for k, v in engine_env.items() if k != "KEEL_ENGINE_TREE"
    }


@pytest.mark.parametrize(("num_cpus", "threads"), [(0, "1"), (0.5, "1"), (1, "1"), (2.5, "2"), (4, "4")])
def test_omp_threads_follow_the_replicas_num_cpus_as_ray_sets_them(num_cpus, threads):
    assert bare_env(local(num_cpus=num_cpus), "demo", environ={})["OMP_NUM_THREADS"] == threads


def test_an_omp_setting_already_in_the_environment_or_the_config_wins():
    assert bare_env(local(num_cpus=2), "demo", environ={"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"
    doc = yaml.safe_load(LOCAL.read_text())
    doc["models"]["demo"]["env"]["OMP_NUM_THREADS"] = "3"
    cfg = parse_config(doc, check_engine_args=False)
    assert bare_env(cfg, "demo", environ={"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "3"


def test_a_vllm_upgrade_is_measured_bare_against_bare_with_the_other_venvs_python(monkeypatch, tmp_path):
    started = {}
    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    monkeypatch.setattr(compare, "vllm_version", lambda py: "0.29.0" if py == "/old/bin/python" else "0.32.0")

    def start_bare(cfg, model, port, log, python):
        started[python] = port
        return subprocess.Popen([sys.executable, "-c", ""])

    monkeypatch.setattr(compare, "start_bare", start_bare)
    a = compare.argparse.Namespace(
        baseline="vllm", vllm_python="/old/bin/python", api_key="k", config=str(LOCAL), keel_code=None, base_code=None
    )
    servers = compare.start_servers(a, load_config(LOCAL), "demo", "t")
    assert set(started) == {sys.executable, "/old/bin/python"}  # both bare: no keel stack
    assert (servers[KEEL]["name"], servers[BASE]["name"]) == ("vLLM 0.32.0", "vLLM 0.29.0")
    assert servers[KEEL]["key"] is None and servers[BASE]["key"] is None
    assert bare_command(load_config(LOCAL), "demo", 1, "/old/bin/python")[0] == "/old/bin/python"


def test_a_keel_change_is_measured_against_the_older_checkout_both_with_policies(monkeypatch, tmp_path):
    started = {}
    monkeypatch.setattr(compare, "RESULTS", tmp_path)

    def start_keel(doc, workdir, log, name, code):
        started[name.rsplit("-", 1)[1]] = (code, doc)
        return subprocess.Popen([sys.executable, "-c", ""])

    monkeypatch.setattr(compare, "start_keel", start_keel)
    a = compare.argparse.Namespace(
        baseline="keel", vllm_python=None, api_key="k", config=str(LOCAL), keel_code=None, base_code=str(tmp_path)
    )
    servers = compare.start_servers(a, load_config(LOCAL), "demo", "t")
    assert started[KEEL][0] is None and started[BASE][0] == tmp_path.resolve()
    assert started[KEEL][1]["tenants"] == started[BASE][1]["tenants"]  # the same policies on both
    assert servers[KEEL]["key"] == servers[BASE]["key"] == "k"


def test_the_vllm_version_is_read_from_the_interpreters_packages():
    assert compare.vllm_version(sys.executable)[0].isdigit()


# --- the engines' conditions -------------------------------------------------------------------


def test_engine_args_drop_only_the_flags_that_differ_by_construction():
    keel = [
        "py",
        "-m",
        "serving.engine.server",
        "--keel-parent",
        "9",
        "--model",
        "/m",
        "--host",
        "0.0.0.0",
        "--port",
        "1",
        "--max-num-seqs",
        "8",
    ]
    bare = [
        "py",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/m",
        "--host=127.0.0.1",
        "--port",
        "2",
        "--max-num-seqs",
        "8",
    ]
    assert engine_args(keel) == engine_args(bare) == ["--model", "/m", "--max-num-seqs", "8"]
    assert engine_args(bare + ["--api-key", "s"]) != engine_args(keel)


def conditions(api=None, worker=None, args=("--model", "/m")):
    """Two engine processes as engine_conditions reads them, with fields changed by api/worker."""
    api_server = {"nice": 0, "affinity": [0, 1], "threads": 10, "env": {"OMP_NUM_THREADS": "1"}}
    vllm_worker = {"nice": 0, "affinity": [0], "threads": 47, "env": {"OMP_NUM_THREADS": "1", "GOMP_CPU_AFFINITY": "0"}}
    return {
        "args": list(args),
        "processes": {"api server": {**api_server, **(api or {})}, "VLLM::Worker": {**vllm_worker, **(worker or {})}},
    }


def test_conditions_differing_in_threads_env_priority_or_cpus_are_reported():
    assert condition_diffs(conditions(), conditions(api={"threads": 12})) == []  # reported, not judged
    assert condition_diffs(conditions(), conditions(api={"env": {}})) == [
        "api server env: Keel {'OMP_NUM_THREADS': '1'} vs baseline {}"
    ]
    [nice] = condition_diffs(conditions(worker={"nice": 15}), conditions())
    assert nice == "VLLM::Worker nice: Keel 15 vs baseline 0"
    assert condition_diffs(conditions(), conditions(api={"affinity": [1]}))
    assert condition_diffs(conditions(args=("--model", "/m", "--api-key", "x")), conditions())
    only = conditions()
    del only["processes"]["VLLM::Worker"]
    assert condition_diffs(conditions(), only) == ["VLLM::Worker: only in Keel"]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")
def test_a_live_processs_conditions_are_read_from_proc():
    child = subprocess.Popen(
        [sys.executable, "-m", "timeit", "-n1", "-r1", "import time; time.sleep(30)"],
        env={"OMP_NUM_THREADS": "3", "GOMP_CPU_AFFINITY": "0", "UNRELATED": "x"},
        preexec_fn=lambda: os.nice(5),
    )
    try:
        import psutil

        found = engine_conditions(psutil.Process(child.pid))
        api = found["processes"]["api server"]
        assert api["env"] == {"OMP_NUM_THREADS": "3", "GOMP_CPU_AFFINITY": "0"}
        assert api["nice"] == os.getpriority(os.PRIO_PROCESS, 0) + 5
        assert api["affinity"] == sorted(os.sched_getaffinity(0)) and api["threads"] >= 1
        assert found["args"] == ["-n1", "-r1", "import time; time.sleep(30)"]  # what follows -m MODULE
    finally:
        child.kill()
        child.wait()


def test_cpu_seconds_count_new_processes_from_zero_and_skip_gone_ones():
    tck = os.sysconf("SC_CLK_TCK")
    assert cpu_seconds({1: 100, 2: 50}, {1: 100 + tck, 3: tck}) == pytest.approx(2.0)


def test_a_tree_that_burns_cpu_shows_it():
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)",
        ]
    )
    try:
        before = compare.tree_cpu_ticks(child.pid)
        import time

        time.sleep(1.0)
        assert cpu_seconds(before, compare.tree_cpu_ticks(child.pid)) > 0.1
    finally:
        child.kill()
        child.wait()


# --- pairs and ratios --------------------------------------------------------------------------


def test_every_round_pairs_each_point_and_swaps_who_goes_first():
    s = schedule(3, [(1, 32), (64, 384)])
    assert [(r, c, n) for r, c, n, _ in s] == [
        (0, 1, 32),
        (0, 64, 384),
        (1, 1, 32),
        (1, 64, 384),
        (2, 1, 32),
        (2, 64, 384),
    ]
    assert [order for *_, order in s] == [(KEEL, BASE)] * 2 + [(BASE, KEEL)] * 2 + [(KEEL, BASE)] * 2


def side(tok_s, ttft=100.0, failed=0, idle=0.01, errors=(), by_status=None, requests=384):
    return {
        "output_throughput": tok_s,
        "median_ttft_ms": ttft,
        "median_tpot_ms": 20.0,
        "completed": requests - failed,
        "failed": failed,
        "failures_by_status": by_status or ({"0": failed} if failed else {}),
        "sample_errors": list(errors),
        "idle_other_cpu_cores": idle,
    }


def pair(c, keel, base, rnd=0, base_side=None, **kw):
    return {"round": rnd, "c": c, KEEL: side(keel, **kw), BASE: base_side or side(base)}


def test_the_judged_figure_is_the_median_of_per_pair_ratios_not_the_ratio_of_medians():
    # A slow round for both sides moves the medians of each side, not the per-pair ratios.
    pairs = [pair(64, 900, 1000), pair(64, 2000, 2000), pair(64, 4400, 4000)]
    s = point_summary(pairs)
    assert s["ratios"] == [0.9, 1.0, 1.1]
    assert s["median_ratio"] == 1.0
    assert (s[KEEL]["output_throughput"], s[BASE]["output_throughput"]) == (2000, 2000)
    lopsided = point_summary([pair(64, 1000, 900), pair(64, 1000, 2000), pair(64, 3000, 2100)])
    assert lopsided["median_ratio"] == pytest.approx(1000 / 900)  # 1.11, 0.50, 1.43
    assert lopsided[KEEL]["output_throughput"] / lopsided[BASE]["output_throughput"] == pytest.approx(1000 / 2000)


def test_a_pair_whose_baseline_had_no_throughput_has_no_ratio_and_does_not_skew_the_median():
    s = point_summary([pair(64, 1000, 0), pair(64, 950, 1000), pair(64, 1050, 1000)])
    assert s["ratios"] == [None, 0.95, 1.05] and s["median_ratio"] == pytest.approx(1.0)
    assert point_summary([pair(64, 1000, 0)])["median_ratio"] is None


RESET = "ClientConnectionResetError: Connection reset by peer"
STALLED = side(1700, ttft=6000.0, failed=38, errors=[RESET], by_status={"0": 38})


def test_a_pair_where_either_side_failed_is_left_out_of_every_median_and_listed_with_its_errors():
    pairs = [
        pair(64, 1000, 1000, rnd=0),
        pair(64, 2000, 0, rnd=1, base_side=STALLED),  # a stalled baseline: 1.18x that is not Keel's
        pair(64, 1100, 1000, rnd=2),
        pair(64, 300, 1000, rnd=3, failed=2, errors=["503 no capacity"], by_status={"503": 2}),
    ]
    s = point_summary(pairs)
    assert (s["pairs"], s["clean_pairs"], s["ratios"]) == (4, 2, [1.0, 1.1])
    assert s["median_ratio"] == pytest.approx(1.05)
    assert s[KEEL]["output_throughput"] == 1050 and s[BASE]["output_throughput"] == 1000
    assert s[BASE]["median_ttft_ms"] == 100.0  # the stalled round's 6 s is not in it
    assert (s[BASE]["failed"], s[KEEL]["failed"]) == (38, 2)  # failures still counted, per side
    assert [(f["round"], f["side"], f["failed"], f["sample_errors"]) for f in s["excluded"]] == [
        (1, BASE, 38, [RESET]),
        (3, KEEL, 2, ["503 no capacity"]),
    ]
    stalled = s["excluded"][0]
    assert stalled["failures_by_status"] == {"0": 38} and stalled["ratio"] == pytest.approx(2000 / 1700)

    text = table({64: s})
    row64 = next(line for line in text.splitlines() if line.startswith("| 64 |"))
    assert "**1.05×**, median of 2 clean pairs" in row64 and "| 1.00, 1.10 |" in row64 and "| 38/2 |" in row64
    listed = text.split("Pairs left out of the medians")[1]
    assert f"- round 2, c=64: bare failed 38 of 384 (no response: 38): `{RESET}`; the pair's ratio 1.18" in listed
    assert "- round 4, c=64: Keel failed 2 of 384 (HTTP 503: 2): `503 no capacity`; the pair's ratio 0.30" in listed


def test_a_point_without_a_clean_pair_has_no_median():
    s = point_summary([pair(64, 1000, 1000, failed=1, errors=["empty stream"], by_status={"200": 1})])
    assert s["clean_pairs"] == 0 and s["ratios"] == [] and s["median_ratio"] is None
    assert s[KEEL]["output_throughput"] is None and s[BASE]["median_ttft_ms"] is None
    row = next(line for line in table({64: s}).splitlines() if line.startswith("| 64 |"))
    assert "**—**, median of 0 clean pairs | — | — | — |" in row and "| 0/1 |" in row


def test_the_table_shows_each_pair_failures_and_the_idle_servers_cpu():
    pairs = [
        pair(1, 180, 200, ttft=30.0),
        pair(1, 190, 200, ttft=25.0),
        pair(1, 190, 200, ttft=5.0, failed=1, errors=["empty stream"]),  # fast, but not clean
        pair(64, 2000, 2100),
        pair(64, 2050, 2000),
    ]
    text = table(summarize_pairs(pairs))
    row64 = next(line for line in text.splitlines() if line.startswith("| 64 |"))
    assert "**0.99×**" in row64 and "0.95, 1.02" in row64 and "| 0/0 |" in row64 and "1.0% / 1.0%" in row64
    row1 = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert "median of 2 clean pairs" in row1 and "| 0/1 |" in row1
    assert "Best-of-rounds TTFT p50 at c=1 (clean pairs): bare 100.0 ms, Keel 25.0 ms" in text


@pytest.mark.parametrize("flags", [["--baseline", "keel", "--base-code", "/nonexistent"], ["--keel-code", "/tmp"]])
def test_a_code_flag_that_is_not_a_keel_checkout_stops_before_anything_starts(monkeypatch, capsys, flags):
    monkeypatch.setattr(sys, "argv", ["compare", *flags])
    monkeypatch.setattr(compare, "start_servers", lambda *a: pytest.fail("servers started"))
    with pytest.raises(SystemExit) as e:
        compare.main()
    assert e.value.code == 2 and "not a Keel checkout" in capsys.readouterr().err
