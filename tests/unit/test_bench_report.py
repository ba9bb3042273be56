"""`keel bench` reports: the plots are valid PNGs, the HTML is one self-contained file with the
results' text escaped, the Markdown carries the numbers, and compare mode gives ratios to the
baseline and lists the points it could not match."""

from __future__ import annotations

import base64
import copy
import json
import re

import matplotlib.image
import pytest

from serving.bench.records import FORMAT_VERSION
from serving.bench.report import load_results, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"


def point(
    c: float,
    out_tps: float,
    ttft: tuple[float, float],
    tpot: tuple[float, float],
    *,
    meets: bool = True,
    failed: int = 0,
    cost: float | None = 1.0,
    goodput: float | None = None,
    kind: str = "concurrency",
) -> dict:
    """A load point with vLLM bench's field names; ttft/tpot are (p50, p99) in ms."""
    req_tps = out_tps / 128
    return {
        "completed": 64 - failed,
        "failed": failed,
        "failures_by_status": {"503": failed} if failed else {},
        "duration": 30.0,
        "request_throughput": req_tps,
        "request_goodput": req_tps if goodput is None else goodput,
        "output_throughput": out_tps,
        "total_token_throughput": out_tps * 3,
        "mean_ttft_ms": ttft[0],
        "median_ttft_ms": ttft[0],
        "p50_ttft_ms": ttft[0],
        "p99_ttft_ms": ttft[1],
        "mean_tpot_ms": tpot[0],
        "median_tpot_ms": tpot[0],
        "p50_tpot_ms": tpot[0],
        "p99_tpot_ms": tpot[1],
        "median_e2el_ms": 900.0,
        "p99_e2el_ms": 1500.0,
        "load": {"kind": kind, "value": c, "burstiness": 1.0},
        "replicas": 1,
        "cost_per_million_output_tokens": cost,
        "meets_slo": meets,
    }


def setting(name: str, points: list[dict], engine: dict | None = None) -> dict:
    best = None
    for p in points:
        if not p["meets_slo"]:
            break
        best = p
    return {"name": name, "engine": engine or {}, "replicas": 1, "points": points, "slo_max": best}


def result(label: str, settings: list[dict], recommendation: dict | None = None) -> dict:
    return {
        "keel_bench": FORMAT_VERSION,
        "meta": {
            "date": "2026-11-26 11:00:00",
            "git": "abc1234",
            "command": "keel bench run demo.yaml",
            "label": label,
            "host": "bench-1",
            "cpus": 2,
            "model": "demo",
        },
        "spec": {
            "model": "demo",
            "dataset": {"kind": "random", "input_len": 256, "output_len": 128},
            "load": {"mode": "concurrency", "levels": [1, 4, 16], "num_requests": 64},
        },
        "hardware": {"name": "h100-80gb", "price_per_replica_hour": 2.5, "currency": "EUR"},
        "slo": {"ttft_ms": 500.0, "tpot_ms": 50.0, "e2el_ms": None, "percentile": 99},
        "settings": settings,
        "recommendation": recommendation,
    }


RECOMMENDATION = {
    "setting": "max_num_seqs=8",
    "engine": {"max_num_seqs": 8},
    "replicas": 3,
    "per_replica": {
        "load": {"kind": "concurrency", "value": 4, "burstiness": 1.0},
        "request_throughput": 2.13,
        "output_throughput": 272.6,
    },
    "cost_per_hour": 7.5,
    "cost_per_million_output_tokens": 2.55,
    "currency": "EUR",
    "reasoning": "max_num_seqs=8 carries 2.13 req/s per replica inside the SLO; 3 replicas carry the peak.",
    "autoscaling": {"min_replicas": 1, "max_replicas": 3},
    "config_yaml": "models:\n  demo:\n    engine:\n      max_num_seqs: 8\n    deployment:\n      num_replicas: 3\n",
}


def baseline() -> dict:
    return result(
        "keel-main",
        [
            setting(
                "max_num_seqs=8",
                [
                    point(1, 175.3, (22.7, 30.1), (5.05, 6.2), cost=3.96),
                    point(4, 272.6, (61.2, 140.5), (9.9, 12.4), cost=2.55),
                    point(16, 410.0, (380.0, 612.3), (30.0, 71.0), meets=False, failed=2, cost=1.69),
                ],
                engine={"max_num_seqs": 8},
            ),
            setting(
                f"big batch {EVIL}",
                [
                    point(1, 160.0, (25.0, 33.0), (5.5, 6.8), cost=4.34),
                    point(4, 250.0, (70.0, 150.0), (10.5, 13.0), cost=2.78),
                    point(16, 520.0, (300.0, 450.0), (25.0, 40.0), cost=1.34),
                ],
            ),
        ],
        RECOMMENDATION,
    )


def candidate() -> dict:
    """The same settings measured again: c=4 of the first setting is the hand-made pair
    (272.6 -> 256.244 tok/s = 0.94x, p99 TTFT 140.5 -> 210.75 ms = 1.50x); c=16 of the second
    setting is missing and c=32 is new."""
    r = baseline()
    r["meta"]["label"] = "keel-branch"
    p = r["settings"][0]["points"][1]
    p["output_throughput"] = 272.6 * 0.94
    p["p99_ttft_ms"] = 140.5 * 1.5
    second = r["settings"][1]
    second["points"] = second["points"][:2] + [point(32, 600.0, (700.0, 900.0), (40.0, 55.0), meets=False, cost=1.16)]
    second["slo_max"] = second["points"][1]
    return r


def row_of(markdown: str, section_start: str, load: str) -> str:
    """The table row for `load` in the first table after `section_start`."""
    rest = markdown[markdown.index(section_start) :]
    return next(line for line in rest.splitlines() if line.startswith(f"| {load} |"))


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return write_report([baseline()], tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> dict:
    return write_report([baseline(), candidate()], tmp_path_factory.mktemp("compare"))


def test_report_writes_markdown_html_and_three_valid_pngs(single):
    assert single["markdown"].is_file() and single["html"].is_file()
    assert len(single["png"]) == 3
    for path in single["png"]:
        assert path.read_bytes()[:8] == PNG_MAGIC
        img = matplotlib.image.imread(path)
        assert img.shape[0] >= 400 and img.shape[1] >= 800
        assert img.std() > 0.05  # drawn on, not a blank canvas


def test_html_embeds_every_plot_and_references_nothing_outside(single):
    text = single["html"].read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == 3
    assert all(base64.b64decode(u)[:8] == PNG_MAGIC for u in uris)
    assert "http://" not in text and "https://" not in text
    assert re.findall(r'(?:src|href)="(?!data:)', text) == []
    assert "<script" not in text.lower()  # no JS, and the setting name's script tag is escaped


def test_text_from_results_is_escaped_in_html(single):
    text = single["html"].read_text()
    assert EVIL not in text
    assert html_escaped(EVIL) in text


def test_html_marks_each_point_in_or_out_of_its_slo(single):
    text = single["html"].read_text()
    rows = re.findall(r'<tr><td class="l">(c=\d+)</td>.*?</tr>', text, re.S)
    assert rows[:3] == ["c=1", "c=4", "c=16"]
    failing = re.findall(r'<tr><td class="l">c=16</td>.*?</tr>', text, re.S)[0]
    assert failing.endswith('<td class="c"><span class="bad">✗</span></td></tr>')
    assert "<strong>612.3</strong>" in failing  # over its threshold
    passing = re.findall(r'<tr><td class="l">c=4</td>.*?</tr>', text, re.S)[0]
    assert passing.endswith('<td class="c"><span class="ok">✓</span></td></tr>')


def html_escaped(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_markdown_shows_a_points_numbers_and_marks_the_failing_point(single):
    md = single["markdown"].read_text()
    assert "keel-main" in md and "h100-80gb" in md and "TTFT p99 ≤ 500 ms, TPOT p99 ≤ 50 ms" in md
    row = row_of(md, "Setting `max_num_seqs=8`", "c=4")
    #             load  req/s  tok/s  TTFT p50 p99    TPOT p50 p99  goodput failed EUR/M  meets
    assert row == "| c=4 | 2.13 | 272.6 | 61.2 | 140.5 | 9.90 | 12.4 | 2.13 | 0 | 2.55 | ✓ |"
    failing = row_of(md, "Setting `max_num_seqs=8`", "c=16")
    assert failing.endswith("| ✗ |")
    assert "**612.3**" in failing and "**71.0**" in failing  # the percentiles over their thresholds
    assert "2 (503: 2)" in failing
    assert "EUR/M output tok" in md


def test_markdown_gives_the_slo_maximum_and_the_recommendation(single):
    md = single["markdown"].read_text()
    first = md[md.index("Setting `max_num_seqs=8`") : md.index("Setting `big batch")]
    assert "**SLO-compliant maximum:** c=4: 2.13 req/s, 272.6 output tok/s" in first
    assert "EUR 2.55 per million output tokens" in first
    assert "3 replicas, EUR 7.50 per hour" in md
    assert RECOMMENDATION["reasoning"] in md
    assert "```yaml\n" + RECOMMENDATION["config_yaml"] + "```" in md


def test_report_says_when_no_setting_met_the_slo(tmp_path):
    r = baseline()
    for st in r["settings"]:
        for p in st["points"]:
            p["meets_slo"] = False
        st["slo_max"] = None
    r["recommendation"] = None
    md = write_report([r], tmp_path)["markdown"].read_text()
    assert "**SLO-compliant maximum:** none" in md
    assert "No recommendation: no setting met the SLO at any load." in md
    assert "```yaml" not in md


def test_compare_table_gives_each_sets_figures_and_the_ratio_to_the_baseline(compared):
    md = compared["markdown"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| `max_num_seqs=8` | c=4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # setting, load, tok/s A, B, ratio, TTFT A, B, ratio, TPOT A, B, ratio, cost A, B, ratio, meets
    assert cells[2:5] == ["272.6", "256.2", "0.94×"]
    assert cells[5:8] == ["140.5", "210.8", "1.50×"]
    assert cells[8:11] == ["12.4", "12.4", "1.00×"]
    assert cells[14] == "✓ / ✓"


def test_compare_lists_the_points_it_could_not_match(compared):
    md = compared["markdown"].read_text()
    assert "**Unmatched load points** (2, not in the table above):" in md
    unmatched = md[md.index("**Unmatched load points**") :]
    assert re.search(r"- only in A: setting `big batch .*`, c=16", unmatched)
    assert re.search(r"- only in B: setting `big batch .*`, c=32", unmatched)


def test_compare_matches_by_setting_position_when_the_names_differ(tmp_path):
    keel = result(
        "keel",
        [
            setting(
                "Keel", [point(1, 180.0, (27.9, 40.0), (4.87, 6.0)), point(16, 1176.0, (133.3, 200.0), (10.62, 14.0))]
            )
        ],
    )
    bare = result(
        "bare",
        [
            setting(
                "bare vLLM",
                [point(1, 175.0, (22.7, 35.0), (5.05, 6.5)), point(16, 1301.0, (117.5, 180.0), (9.99, 13.0))],
            )
        ],
    )
    md = write_report([bare, keel], tmp_path)["markdown"].read_text()
    assert "points matched by setting position and load" in md
    row = next(line for line in md.splitlines() if line.startswith("| `bare vLLM` ↔ `Keel` | c=16 |"))
    assert "| 1,301 | 1,176 | 0.90× |" in row
    assert "Every load point matched." in md


def test_compare_plots_overlay_both_sets(compared):
    """Each plot draws every setting of both sets: a setting keeps its colour across the sets,
    and each set has its own line style and marker."""
    from serving.bench.report.plots import plot_lines
    from serving.bench.report.results import result_sets

    lines = plot_lines(result_sets([baseline(), candidate()]))
    assert [ln.set.label for ln in lines] == ["keel-main"] * 2 + ["keel-branch"] * 2
    main, branch = lines[:2], lines[2:]
    assert [ln.color for ln in main] == [ln.color for ln in branch] and main[0].color != main[1].color
    assert {ln.style for ln in main} != {ln.style for ln in branch}
    assert {ln.marker for ln in main} != {ln.marker for ln in branch}
    assert branch[0].points[1]["output_throughput"] == 272.6 * 0.94  # the candidate's own numbers
    for path in compared["png"]:
        assert matplotlib.image.imread(path).std() > 0.05  # drawn, not blank


def test_same_results_give_the_same_files(tmp_path):
    a = write_report([baseline()], tmp_path / "a")
    b = write_report([baseline()], tmp_path / "b")
    assert [p.read_bytes() for p in a["png"]] == [p.read_bytes() for p in b["png"]]
    assert a["html"].read_bytes() == b["html"].read_bytes()


def test_load_results_reads_result_files_and_labels_them(tmp_path):
    r = baseline()
    del r["meta"]["label"]
    path = tmp_path / "bench-nightly.json"
    path.write_text(json.dumps(r))
    loaded = load_results([path])
    assert loaded[0]["settings"] == json.loads(json.dumps(r["settings"]))
    assert loaded[0]["meta"]["label"] == "bench-nightly"


@pytest.mark.parametrize(
    "content, why",
    [
        ('{"meta": {}, "settings": []}', 'no "keel_bench" key'),
        (json.dumps({**baseline(), "keel_bench": FORMAT_VERSION + 1}), f"format {FORMAT_VERSION + 1}"),
        ("not json at all", "not JSON"),
        ("[1, 2]", 'no "keel_bench" key'),
        (
            json.dumps({**baseline(), "settings": [{"name": "x", "points": [{"completed": 1}]}]}),
            "settings[0].points[0]",
        ),
    ],
)
def test_load_results_names_the_file_that_is_not_a_result(tmp_path, content, why):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(baseline()))
    bad = tmp_path / "vllm-bench-output.json"
    bad.write_text(content)
    with pytest.raises(ValueError) as e:
        load_results([good, bad])
    assert str(bad) in str(e.value) and why in str(e.value)


def test_load_results_names_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.json: no such file"):
        load_results([tmp_path / "nope.json"])


def test_write_report_does_not_change_the_results(tmp_path):
    r = baseline()
    before = copy.deepcopy(r)
    write_report([r, candidate()], tmp_path)
    assert r == before


def test_a_setting_that_failed_to_start_is_reported_with_its_error(tmp_path):
    res = baseline()
    res["settings"].append(
        {
            "name": "max_num_seqs=9999",
            "engine": {"max_num_seqs": 9999},
            "replicas": 1,
            "points": [],
            "slo_max": None,
            "error": "server exited with 1 before it was ready; the end of its log:\nOOM",
        }
    )
    paths = write_report([res], tmp_path)
    md = paths["markdown"].read_text()
    assert "This setting failed:** server exited with 1 before it was ready" in md
    assert "none: the setting was not measured." in md
