"""`keel autoscale simulate` end to end in-process, with the real policy: the table, the plot,
the JSON, and the cheapest setting that meets the SLO printed as a block that loads as the
settings simulated; flags and files that cannot work are errors naming the flag, key or line."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from serving.autoscaling.settings import AutoscalingConfig
from serving.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def point(c: int, ttft_ms: float, tpot_ms: float) -> dict:
    return {
        "load": {"kind": "concurrency", "value": c, "burstiness": 1.0},
        "completed": 32,
        "failed": 0,
        "mean_ttft_ms": ttft_ms,
        "mean_tpot_ms": tpot_ms,
        "output_throughput": 100.0 * c,
        "request_throughput": 1.0,
        "mean_e2el_ms": 500.0,
    }


@pytest.fixture
def bench(tmp_path) -> str:
    """One replica runs 8 requests at once; 32 output tokens take about 0.4 s: ~20 req/s each."""
    doc = {
        "keel_bench": 1,
        "hardware": {"name": "cpu-2core", "price_per_replica_hour": 0.05, "currency": "USD"},
        "slo": {"ttft_ms": 1000, "tpot_ms": 40, "e2el_ms": None, "percentile": 90},
        "settings": [
            {
                "name": "max_num_seqs=8",
                "engine": {"max_num_seqs": 8},
                "replicas": 1,
                "startup_s": 10.0,
                "points": [point(1, 40, 8), point(4, 60, 10), point(8, 90, 12)],
            }
        ],
        "recommendation": None,
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    return str(path)


def simulate(*args: str) -> int:
    return main(["autoscale", "simulate", *args])


def pasted_block(out: str) -> dict:
    """The YAML printed after the last line naming the cheapest setting."""
    text = out[out.index("The cheapest setting that meets the SLO") :]
    return yaml.safe_load(text[text.index("autoscaling:") :])["autoscaling"]


def test_the_cheapest_setting_that_meets_the_slo_is_printed_as_a_block_that_loads(bench, tmp_path, capsys):
    png, out_json = tmp_path / "sim.png", tmp_path / "sim.json"
    rc = simulate(
        "--bench",
        bench,
        "--generate",
        "steady",
        "--rate",
        "30",
        "--duration",
        "300",
        "--output-tokens",
        "32",
        "--prompt-tokens",
        "64",
        "--set",
        "max_replicas=1,3,6",
        "--set",
        "target=4",
        "--plot",
        str(png),
        "--json",
        str(out_json),
    )
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out_json.read_text())
    by_name = {r["name"]: r for r in doc["results"]}
    assert set(by_name) == {"max_replicas=1 target=4", "max_replicas=3 target=4", "max_replicas=6 target=4"}
    # one replica carries ~20 req/s: 30 req/s overloads it
    assert not by_name["max_replicas=1 target=4"]["meets_slo"]
    meeting = [r for r in doc["results"] if r["meets_slo"]]
    assert meeting, out
    cheapest = min(meeting, key=lambda r: r["cost"])
    assert doc["cheapest"] == cheapest["name"]
    block = pasted_block(out)
    assert AutoscalingConfig.model_validate(block) == AutoscalingConfig.model_validate(cheapest["settings"])
    assert block["max_replicas"] == cheapest["settings"]["max_replicas"]
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "max_replicas=1 target=4" in out and "missed" in out


def test_named_settings_from_a_file_crossed_with_set(bench, tmp_path, capsys):
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        "calm:\n  max_replicas: 4\n  stable_window_s: 120\nquick:\n  max_replicas: 4\n  panic_window_s: 2\n"
    )
    out_json = tmp_path / "r.json"
    rc = simulate(
        "--bench",
        bench,
        "--generate",
        "bursty",
        "--rate",
        "5",
        "--duration",
        "120",
        "--settings",
        str(settings),
        "--set",
        "target=2,8",
        "--json",
        str(out_json),
        "--events",
        "0",
    )
    assert rc == 0, capsys.readouterr().err
    names = [r["name"] for r in json.loads(out_json.read_text())["results"]]
    assert names == ["calm target=2", "calm target=8", "quick target=2", "quick target=8"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--set", "targte=4"], "'targte' is not an autoscaling key"),
        (["--set", "target"], "write KEY=V1,V2"),
        (
            ["--set", "max_replicas=2", "--set", "min_replicas=3"],
            "setting 'max_replicas=2 min_replicas=3'.*must be >= min_replicas",
        ),
        (["--set", "target_ongoing_requests=4"], "'target_ongoing_requests' is not an autoscaling key"),
        (["--set", "min_replicas=1", "--set", "hold_timeout_s=5"], "hold_timeout_s applies only with min_replicas: 0"),
        (
            [
                "--set",
                "target=" + ",".join(map(str, range(1, 9))),
                "--set",
                "max_replicas=" + ",".join(map(str, range(1, 10))),
            ],
            "72 settings to compare .* at most 64",
        ),
    ],
)
def test_settings_that_cannot_load_are_errors_naming_the_key(bench, capsys, flags, message):
    assert simulate("--bench", bench, "--generate", "steady", "--duration", "10", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("keel autoscale simulate:")
    assert re.search(message, err.replace("\n", " ")), err


def test_a_bad_trace_line_is_named(bench, tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"t": 0, "prompt_tokens": 5, "output_tokens": 3}\n{"t": "soon"}\n')
    assert simulate("--bench", bench, "--trace", str(trace)) == 2
    assert "trace.jsonl:2: t must be a number" in capsys.readouterr().err


def test_a_generated_trace_can_be_written_and_replayed(bench, tmp_path, capsys):
    trace, a, b = tmp_path / "t.jsonl", tmp_path / "a.json", tmp_path / "b.json"
    assert (
        simulate(
            "--bench",
            bench,
            "--generate",
            "diurnal",
            "--rate",
            "3",
            "--duration",
            "200",
            "--period-s",
            "200",
            "--write-trace",
            str(trace),
            "--json",
            str(a),
        )
        == 0
    )
    assert simulate("--bench", bench, "--trace", str(trace), "--json", str(b)) == 0
    ra, rb = (json.loads(p.read_text())["results"][0] for p in (a, b))
    assert ra["requests"] == rb["requests"] > 0
    assert ra["ttft_ms"]["p95"] == pytest.approx(rb["ttft_ms"]["p95"], rel=1e-3)  # arrivals rounded to 1 us


def test_a_bench_file_without_the_setting_says_which_there_are(bench, capsys):
    assert simulate("--bench", bench, "--bench-setting", "nope", "--generate", "steady") == 2
    assert "no setting 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rate", "nan"], "rate and duration must be finite numbers > 0"),
        (["--rate", "inf"], "rate and duration must be finite numbers > 0"),
        (["--rate", "1e9", "--duration", "3600"], "more than 2,000,000 requests"),
        (["--burstiness", "-1"], "burstiness must be a finite number > 0"),
        (["--output-tokens", "nan"], "output tokens: mean must lie in 1..10,000,000"),
        (["--prompt-tokens", "1e12"], "prompt tokens: mean must lie in 1..10,000,000"),
    ],
)
def test_generated_traces_past_their_limits_are_refused_before_any_work(bench, capsys, flags, message):
    assert simulate("--bench", bench, "--generate", "bursty", *flags) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")


def test_a_trace_file_past_the_request_limit_is_refused(bench, tmp_path, capsys, monkeypatch):
    from serving.autoscaling import traces

    monkeypatch.setattr(traces, "MAX_REQUESTS", 3)
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(f'{{"t": {i}, "prompt_tokens": 5, "output_tokens": 3}}\n' for i in range(4)))
    assert simulate("--bench", bench, "--trace", str(trace)) == 2
    assert "more than 3 requests" in capsys.readouterr().err
