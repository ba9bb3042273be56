"""`keel bench` end to end: a two-setting sweep on the real stack (keel serve: Ray Serve + vLLM on
the demo model), then the report, as ops would run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.config import parse_config

REPO = Path(__file__).resolve().parents[2]
KEEL = str(Path(sys.executable).with_name("keel"))

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    spec = {
        "config": str(REPO / "configs" / "local.yaml"),
        "model": "demo",
        "label": "e2e-sweep",
        "dataset": {"kind": "random", "input_len": 32, "output_len": 16, "range_ratio": 0.25},
        "load": {"mode": "concurrency", "levels": [1, 4], "num_requests": 12, "warmup_requests": 2},
        # Met by any answer short of a hang, so the frontier and the recommendation below are
        # Keel's arithmetic, not this machine's speed (slo.py and cost.py are unit-tested).
        "slo": {"ttft_ms": 60_000, "tpot_ms": 10_000, "percentile": 90},
        "hardware": "cpu-2core",
        "settings": [{"engine": {"max_num_seqs": 2}}, {"engine": {"max_num_seqs": 8}}],
        "target": {"peak_concurrency": 6},
    }
    spec_path = tmp / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp / "result.json"
    report = tmp / "report"
    proc = subprocess.run(
        [KEEL, "bench", "run", str(spec_path), "--out", str(out), "--report", str(report), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), report, proc.stdout


def test_every_setting_and_load_point_is_measured_with_vllm_field_names(sweep):
    result, _, _ = sweep
    assert [s["name"] for s in result["settings"]] == ["max_num_seqs=2", "max_num_seqs=8"]
    for setting in result["settings"]:
        assert [p["load"]["value"] for p in setting["points"]] == [1, 4]
        for p in setting["points"]:
            assert p["completed"] == 12 and p["failed"] == 0, p.get("failures_by_status")
            assert 12 * 12 <= p["total_output_tokens"] <= 12 * 20  # output_len 16 +- 25%, ignore_eos
            for key in (
                "output_throughput",
                "request_throughput",
                "median_ttft_ms",
                "p90_ttft_ms",
                "p99_tpot_ms",
                "median_e2el_ms",
                "request_goodput",
            ):
                assert p[key] is not None and p[key] > 0, key
            assert p["median_ttft_ms"] <= p["median_e2el_ms"]
            assert p["cost_per_million_output_tokens"] > 0
            # ITL is a gap between two text chunks that arrived apart; the tiny model sometimes
            # sends a whole answer in one read, every gap 0. So: measured, never negative; its
            # positive values where chunks arrive apart are pinned in test_bench_loadgen.py.
            for stat in ("mean", "median", "std", "p50", "p90", "p99"):
                assert p[f"{stat}_itl_ms"] >= 0, stat
            assert p["p50_itl_ms"] <= p["p90_itl_ms"] <= p["p99_itl_ms"]


def test_the_slo_frontier_and_the_recommendation_fit_keels_config(sweep):
    result, _, _ = sweep
    for setting in result["settings"]:
        best = setting["slo_max"]
        assert best is not None and best["meets_slo"] and best["load"]["value"] == 4  # both levels meet it
    rec = result["recommendation"]
    assert rec is not None and rec["setting"] in ("max_num_seqs=2", "max_num_seqs=8")
    assert rec["autoscaling"]["min_replicas"] >= 1
    assert rec["autoscaling"]["max_replicas"] == rec["replicas"] >= 1
    block = yaml.safe_load(rec["config_yaml"])
    cfg = parse_config(block, source="recommendation", check_engine_args=True)
    assert cfg.models["demo"].deployment.autoscaling.max_replicas == rec["replicas"]


def test_the_report_renders_html_plots_and_a_summary(sweep):
    _, report, stdout = sweep
    html = next(report.glob("*.html")).read_text()
    assert "data:image/png;base64," in html
    pngs = list(report.glob("*.png"))
    assert len(pngs) >= 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    md = next(report.glob("*.md")).read_text()
    assert "max_num_seqs=8" in md and "max_num_seqs=2" in md
    assert "results:" in stdout
