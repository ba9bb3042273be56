"""`keel bench run` without Ray: the runner against a stand-in OpenAI server (url mode), and a
sweep in which one setting's stack fails to start (the others are still measured)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import yaml

from serving.bench import runner
from serving.bench.spec import BenchSpec
from tests.unit.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server():
    """A FakeOpenAI on its own loop in a thread (the runner runs its own loops)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    srv = FakeOpenAI(delay=0.002)
    asyncio.run_coroutine_threadsafe(srv.__aenter__(), loop).result(10)
    yield srv
    asyncio.run_coroutine_threadsafe(srv.__aexit__(None, None, None), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def spec(tmp: Path, **over) -> tuple[BenchSpec, Path]:
    doc = {
        "model": "demo",
        "label": "t",
        "dataset": {"kind": "random", "input_len": 8, "output_len": 5},
        "load": {"mode": "concurrency", "levels": [1, 3], "num_requests": 6, "warmup_requests": 1},
        "slo": {"ttft_ms": 60_000, "tpot_ms": 60_000, "percentile": 90},
        "hardware": {"price_per_replica_hour": 3.6, "currency": "USD"},
        "target": {"peak_concurrency": 5},
    }
    doc.update(over)
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return BenchSpec.model_validate(doc), path


def test_url_mode_measures_every_load_point_prices_it_and_recommends(tmp_path, server):
    s, path = spec(tmp_path, url=server.url)
    out = runner.run_spec(s, path, tmp_path / "r.json", progress=False)
    result = json.loads(out.read_text())
    (setting,) = result["settings"]
    assert [p["load"]["value"] for p in setting["points"]] == [1, 3]
    for p in setting["points"]:
        assert p["completed"] == 6 and p["failed"] == 0 and p["meets_slo"]
        assert p["total_output_tokens"] == 6 * 5
        # 3.6 USD/h = 0.001 USD/s: cost per million = 0.001 / tok/s * 1e6
        assert p["cost_per_million_output_tokens"] == pytest.approx(1000 / p["output_throughput"])
    assert setting["slo_max"]["load"]["value"] == 3
    assert setting["startup_s"] is None  # nothing was started
    assert setting["replica_start_s"] is None  # the server's /health lists no replica starts
    rec = result["recommendation"]
    assert rec["replicas"] == 2 and rec["autoscaling"]["target"] == 3  # ceil(5 / 3)
    assert len(server.bodies) == 1 + 6 + 6  # warm-up, then both points


def test_a_setting_whose_stack_cannot_start_is_recorded_and_the_sweep_goes_on(tmp_path, server, monkeypatch):
    port = int(server.url.rsplit(":", 1)[1])
    started = []

    class Proc:
        def __init__(self, doc):
            self.doc = doc

    def fake_start(doc, workdir, log):
        started.append(doc["models"]["demo"]["engine"].get("max_num_seqs"))
        return Proc(doc)

    def fake_ready(url, proc, timeout):
        if proc.doc["models"]["demo"]["engine"]["max_num_seqs"] == 1:
            raise RuntimeError("server exited with 1 before it was ready")

    monkeypatch.setattr(runner, "start_keel", fake_start)
    monkeypatch.setattr(runner, "wait_ready", fake_ready)
    monkeypatch.setattr(runner, "stop", lambda proc: None)
    monkeypatch.setattr(runner, "free_port", lambda: port)  # the "stack" is the stand-in server
    server.health = {"status": "ok", "replicas": {"demo": 2}, "replica_start_s": {"demo": [23.4, 25.1]}}
    s, path = spec(
        tmp_path,
        config=str(REPO / "configs" / "local.yaml"),
        settings=[{"engine": {"max_num_seqs": 1}}, {"engine": {"max_num_seqz": 4}}, {"engine": {"max_num_seqs": 4}}],
    )
    result = json.loads(runner.run_spec(s, path, tmp_path / "r.json", progress=False).read_text())
    failed, misspelt, ok = result["settings"]
    assert started == [1, 4]  # the misspelt setting never started a stack
    assert "max_num_seqz" in misspelt["error"] and misspelt["points"] == []
    assert "server exited with 1" in failed["error"] and failed["points"] == [] and failed["slo_max"] is None
    assert "error" not in ok and len(ok["points"]) == 2
    # the stack's start to ready, kept for keel autoscale simulate's cold start
    assert failed["startup_s"] is None and ok["startup_s"] >= 0
    # and its replicas' own start, the slowest, as the gateway's /health listed them
    assert failed["replica_start_s"] is None and ok["replica_start_s"] == 25.1
    assert result["recommendation"]["setting"] == "max_num_seqs=4"


def test_keel_bench_run_measures_a_running_server_from_flags_alone(tmp_path, server, capsys):
    from serving.cli import main

    out = tmp_path / "adhoc.json"
    rc = main(
        [
            "bench",
            "run",
            "--url",
            server.url,
            "--model",
            "demo",
            "--levels",
            "1,2",
            "--num-requests",
            "4",
            "--input-len",
            "8",
            "--output-len",
            "3",
            "--slo",
            "ttft=60000,p=90",
            "--out",
            str(out),
            "--report",
            str(tmp_path / "report"),
            "--no-progress",
            "--api-key",
            "sk-keel-literal-secret",
        ]
    )
    assert rc == 0
    assert "sk-keel-literal-secret" not in out.read_text()  # results are shared; keys are not
    result = json.loads(out.read_text())
    assert "--api-key '***'" in result["meta"]["command"] and result["spec"]["api_key"] == "***"
    assert [p["load"]["value"] for p in result["settings"][0]["points"]] == [1, 2]
    assert result["slo"]["ttft_ms"] == 60000 and result["slo"]["percentile"] == 90
    assert result["meta"]["command"].startswith(f"keel bench run --url {server.url} --model demo --levels 1,2")
    assert (tmp_path / "report" / "report.html").is_file()


def test_bad_flags_are_a_clear_error(capsys):
    from serving.cli import main

    assert main(["bench", "run", "--url", "http://x", "--model", "m", "--slo", "ttft=5,speed=3"]) == 2
    assert "speed=3" in capsys.readouterr().err
    for flags in (["--levels", "1,a"], ["--slo", "ttft=fast"]):  # not numbers: an error, not a traceback
        assert main(["bench", "run", "--url", "http://x", "--model", "m", *flags]) == 2
        assert "unable to parse string as a number" in capsys.readouterr().err
    assert main(["bench", "run", "--model", "m"]) == 2
