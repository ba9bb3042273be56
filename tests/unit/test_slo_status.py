"""`keel slo status` against a stand-in Prometheus HTTP API (canned query answers), and against
nothing at all."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from serving.bench.stack import free_port
from serving.cli import main as keel
from serving.config import REPO_ROOT
from serving.ops.slo_status import PrometheusError, collect, query, table_rows


def sample(value: float, **labels) -> dict:
    return {"metric": labels, "value": [1_700_000_000, str(value)]}


ANSWERS = {
    "keel:slo_objective:ratio": [
        sample(0.99, __name__="keel:slo_objective:ratio", slo="avail", kind="availability", window="28d")
    ],
    '{__name__=~"keel:slo_errors:ratio_rate.+"}': [
        sample(0.002, __name__="keel:slo_errors:ratio_rate28d", slo="avail", model="demo"),
        sample(0.2, __name__="keel:slo_errors:ratio_rate5m", slo="avail", model="demo"),
        sample(0.15, __name__="keel:slo_errors:ratio_rate1h", slo="avail", model="demo"),
        sample(float("nan"), __name__="keel:slo_errors:ratio_rate5m", slo="avail", model="idle"),
        sample(0.5, __name__="keel:slo_errors:ratio_rate5m", slo="other", model="demo"),  # not in the config
    ],
    "keel:slo_error_budget_remaining:ratio": [sample(0.8, slo="avail", model="demo")],
    'ALERTS{alertname="KeelSLOBurnRate"}': [
        sample(
            1,
            __name__="ALERTS",
            alertname="KeelSLOBurnRate",
            slo="avail",
            model="demo",
            severity="page",
            long_window="1h",
            short_window="5m",
            alertstate="firing",
        )
    ],
}


@pytest.fixture
def prometheus():
    class Api(BaseHTTPRequestHandler):
        def do_GET(self):
            q = parse_qs(urlparse(self.path).query)["query"][0]
            if q in ANSWERS:
                body = {"status": "success", "data": {"resultType": "vector", "result": ANSWERS[q]}}
            else:
                body = {"status": "error", "errorType": "bad_data", "error": f"unexpected query {q}"}
            data = json.dumps(body).encode()
            self.send_response(200 if q in ANSWERS else 400)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_rows_show_sli_budget_burn_rates_and_firing_alerts(prometheus):
    rows = collect(prometheus)
    assert [(r.slo, r.model) for r in rows] == [("avail", "demo"), ("avail", "idle")]
    demo = rows[0]
    assert demo.sli == pytest.approx(0.998) and demo.budget_left == 0.8
    assert demo.burn == {"5m": pytest.approx(20), "1h": pytest.approx(15)}
    assert demo.alerts == ["page 1h/5m firing"]
    header, cells = table_rows(rows)
    assert header == [
        "slo",
        "model",
        "kind",
        "objective",
        "window",
        "SLI",
        "budget left",
        "burn 5m",
        "burn 1h",
        "alerts",
    ]
    assert cells[0] == [
        "avail",
        "demo",
        "availability",
        "99.000%",
        "28d",
        "99.800%",
        "80.0%",
        "20.00x",
        "15.00x",
        "page 1h/5m firing",
    ]
    assert cells[1][7] == "-"  # no traffic in 5m: no burn rate, not 0


def test_config_names_slos_without_series_yet(prometheus):
    from serving.config import load_config

    cfg = load_config(REPO_ROOT / "configs" / "local.yaml", check_engine_args=False)
    rows = collect(prometheus, cfg.slos)
    assert {r.slo for r in rows} == {"demo-availability", "demo-ttft", "demo-tpot"}
    assert all(r.model == "-" and r.sli is None for r in rows)


def test_status_command_prints_a_table(prometheus, capsys):
    assert keel(["slo", "status", "--prometheus", prometheus]) == 0
    out = capsys.readouterr().out
    assert "avail" in out and "page 1h/5m firing" in out and "20.00x" in out


def test_unreachable_prometheus_is_a_clear_error(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert keel(["slo", "status", "--prometheus", url]) == 2
    assert f"keel slo status: cannot reach Prometheus at {url}" in capsys.readouterr().err


def test_a_refused_query_names_the_query(prometheus):
    with pytest.raises(PrometheusError, match="refused `up`: unexpected query up"):
        query(prometheus, "up")
