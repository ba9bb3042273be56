"""Prometheus rules for the SLOs, built as data and written with pyyaml: recording rules (error
ratios per window, budget left), multi-window multi-burn-rate alerts, a promtool unit-test file
with synthetic series that must and must not fire each alert, and an example prometheus.yml.

One rule group per SLO (its own objective and windows); every series is per model (and tenant
with `per_tenant`), from the gateway's keel_slo_events_total{slo,model,tenant,good}.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from serving.ops.slo_config import BurnRateAlert, SloConfig, duration_s

EVENTS = "keel_slo_events_total"
ALERT = "KeelSLOBurnRate"
RULES_FILE = "keel-slo-rules.yaml"
TESTS_PREFIX = "keel-slo-rules.test-"  # + the short window + .yaml: one file per evaluation step
PROMETHEUS_FILE = "prometheus.yml"


def errors_rule(window: str) -> str:
    return f"keel:slo_errors:ratio_rate{window}"


BUDGET_RULE = "keel:slo_error_budget_remaining:ratio"
OBJECTIVE_RULE = "keel:slo_objective:ratio"


def _by(slo: SloConfig) -> str:
    return "slo, model, tenant" if slo.per_tenant else "slo, model"


def _budget(slo: SloConfig) -> str:
    return f"(1 - {slo.objective:g})"


def alert_expr(name: str, slo: SloConfig, a: BurnRateAlert) -> str:
    sel = f'{{slo="{name}"}}'
    limit = f"({a.factor:g} * {_budget(slo)})"
    return f"{errors_rule(a.long_window)}{sel} > {limit}\nand\n{errors_rule(a.short_window)}{sel} > {limit}"


def _exhaustion(slo: SloConfig, a: BurnRateAlert) -> str:
    hours = duration_s(slo.window) / a.factor / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} hours"


def _annotations(name: str, slo: SloConfig, a: BurnRateAlert) -> dict[str, str]:
    who = "model {{ $labels.model }}" + (", tenant {{ $labels.tenant }}" if slo.per_tenant else "")
    what = f" ({slo.description})" if slo.description else ""
    return {
        "summary": f"SLO {name} burns its error budget {a.factor:g}x too fast",
        "description": (
            f"{who}: the {slo.kind} error ratio over {a.long_window} and {a.short_window} is above "
            f"{a.factor:g} x {_budget(slo)}{what}; at this rate the {slo.window} budget lasts "
            f"{_exhaustion(slo, a)}. `keel slo status --prometheus URL` shows the budget left."
        ),
    }


def _alert_labels(slo: SloConfig, a: BurnRateAlert) -> dict[str, str]:
    return {"severity": a.severity, "long_window": a.long_window, "short_window": a.short_window}


def rule_group(name: str, slo: SloConfig, interval: str | None = None) -> dict:
    by = _by(slo)
    rules: list[dict] = [
        {
            "record": OBJECTIVE_RULE,
            "expr": f"vector({slo.objective:g})",
            "labels": {"slo": name, "kind": slo.kind, "window": slo.window},
        }
    ]
    own = {"slo": name}  # the same record in every SLO's group: the label tells them apart
    for w in slo.rate_windows():
        rules.append(
            {
                "record": errors_rule(w),
                "expr": (
                    f'sum by ({by}) (rate({EVENTS}{{slo="{name}", good="false"}}[{w}]))\n/\n'
                    f'sum by ({by}) (rate({EVENTS}{{slo="{name}"}}[{w}]))'
                ),
                "labels": own,
            }
        )
    rules.append(
        {
            "record": BUDGET_RULE,
            "expr": f'1 - {errors_rule(slo.window)}{{slo="{name}"}} / {_budget(slo)}',
            "labels": own,
        }
    )
    for a in slo.burn_alerts:
        rules.append(
            {
                "alert": ALERT,
                "expr": alert_expr(name, slo, a),
                "labels": {**own, **_alert_labels(slo, a)},
                "annotations": _annotations(name, slo, a),
            }
        )
    group = {"name": f"keel-slo-{name}", "rules": rules}
    if interval:
        group["interval"] = interval
    return group


def rules_doc(slos: dict[str, SloConfig], interval: str | None = None) -> dict:
    return {"groups": [rule_group(n, s, interval) for n, s in slos.items()]}


# -- promtool unit tests -------------------------------------------------------------------------

_PER_STEP = 1_000_000  # events per synthetic sample step: ratios to a millionth


def _series(name: str, slo: SloConfig, bad_steps: list[int]) -> list[dict]:
    """The two event counters, one sample per step; bad_steps[i] of the step's events are bad."""
    labels = f'slo="{name}", model="demo"' + (', tenant="acme"' if slo.per_tenant else "")
    bad, good, b, g = [0], [0], 0, 0
    for n in bad_steps:
        b, g = b + n, g + _PER_STEP - n
        bad.append(b)
        good.append(g)
    return [
        {"series": f'{EVENTS}{{{labels}, good="false"}}', "values": " ".join(map(str, bad))},
        {"series": f'{EVENTS}{{{labels}, good="true"}}', "values": " ".join(map(str, good))},
    ]


def _step_s(a: BurnRateAlert) -> int:
    return max(1, duration_s(a.short_window) // 5)  # >= 5 samples in the short window


def _fmt_s(s: int) -> str:
    return f"{s}s"


def _limit(slo: SloConfig, a: BurnRateAlert) -> float:
    return a.factor * (1 - slo.objective)


def _firing_cases(name: str, slo: SloConfig, a: BurnRateAlert) -> dict:
    """A steady error ratio 5% over this alert's limit: this alert fires, with every alert whose
    limit is below the ratio (a steady ratio is the same over all windows)."""
    limit = _limit(slo, a)
    ratio = min(1.05 * limit, (1 + limit) / 2)
    bad = round(ratio * _PER_STEP)
    step = _step_s(a)
    steps = duration_s(a.long_window) // step
    labels = {"slo": name, "model": "demo", **({"tenant": "acme"} if slo.per_tenant else {})}
    expected = [
        {
            "exp_labels": {"alertname": ALERT, **labels, **_alert_labels(slo, b)},
            "exp_annotations": {
                k: v.replace("{{ $labels.model }}", "demo").replace("{{ $labels.tenant }}", "acme")
                for k, v in _annotations(name, slo, b).items()
            },
        }
        for b in slo.burn_alerts
        if _limit(slo, b) < bad / _PER_STEP
    ]
    sel = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {
        "interval": _fmt_s(step),
        "input_series": _series(name, slo, [bad] * steps),
        "alert_rule_test": [{"eval_time": _fmt_s(steps * step), "alertname": ALERT, "exp_alerts": expected}],
        "promql_expr_test": [
            {
                # the budget left over the SLO window: 1 - ratio / budget, to a millionth
                "expr": f"abs({BUDGET_RULE}{{{sel}}} - ({1 - (bad / _PER_STEP) / (1 - slo.objective)!r})) < bool 1e-6",
                "eval_time": _fmt_s(steps * step),
                "exp_samples": [{"labels": "{" + sel + "}", "value": 1}],
            }
        ],
    }


def _quiet_cases(name: str, slo: SloConfig, a: BurnRateAlert) -> list[dict]:
    """Two runs this alert must not fire on: a steady ratio 5% under its limit, and a burn that
    stopped (errors over the long window's start, none over the last two short windows)."""
    limit = _limit(slo, a)
    step = _step_s(a)
    steps = duration_s(a.long_window) // step
    quiet_steps = 2 * duration_s(a.short_window) // step
    at = _fmt_s(steps * step)
    under = round(0.95 * limit * _PER_STEP)
    burst = _PER_STEP  # every event bad while it lasted
    long_sel = f'{errors_rule(a.long_window)}{{slo="{name}"}}'
    cases = [
        {
            "interval": _fmt_s(step),
            "input_series": _series(name, slo, [under] * steps),
            "promql_expr_test": [{"expr": alert_expr(name, slo, a), "eval_time": at, "exp_samples": []}],
        }
    ]
    if (steps - quiet_steps) / steps <= limit:
        return cases  # a stopped burn cannot hold the long window over this limit: nothing to show
    return cases + [
        {
            "interval": _fmt_s(step),
            "input_series": _series(name, slo, [burst] * (steps - quiet_steps) + [0] * quiet_steps),
            "promql_expr_test": [
                {"expr": alert_expr(name, slo, a), "eval_time": at, "exp_samples": []},
                # ... though the long window alone is still over the limit: the short one stops it
                {
                    "expr": f"count({long_sel} > {limit!r})",
                    "eval_time": at,
                    "exp_samples": [{"labels": "{}", "value": 1}],
                },
            ],
        },
    ]


def promtool_tests(slos: dict[str, SloConfig], rules_file: str = RULES_FILE) -> dict[str, dict]:
    """File name -> promtool test document. promtool evaluates every rule at each step up to the
    eval time, with one step per file: one file per short window keeps a 3d test at ~70 steps."""
    by_step: dict[str, list[dict]] = {}
    for name, slo in slos.items():
        for a in slo.burn_alerts:
            cases = by_step.setdefault(a.short_window, [])
            cases.append(_firing_cases(name, slo, a))
            cases.extend(_quiet_cases(name, slo, a))
    out = {}
    for short in sorted(by_step, key=duration_s):
        step = _fmt_s(max(1, duration_s(short) // 5))
        out[f"{TESTS_PREFIX}{short}.yaml"] = {
            "rule_files": [rules_file],
            "evaluation_interval": step,
            "tests": by_step[short],
        }
    return out


# -- files -------------------------------------------------------------------------------------


def prometheus_doc(target: str, scrape_interval: str = "15s", rules: str = RULES_FILE) -> dict:
    """An example prometheus.yml: scrape the gateway's metrics listener, load the SLO rules."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [rules],
        "scrape_configs": [{"job_name": "keel-gateway", "static_configs": [{"targets": [target]}]}],
    }


class _Dumper(yaml.SafeDumper):
    """Rules as people write them: multi-line PromQL as a `|` block, no &anchors for shared labels."""

    def ignore_aliases(self, data):
        return True


def _str(dumper: yaml.SafeDumper, text: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def dump(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def write_all(slos: dict[str, SloConfig], out: Path, target: str, interval: str | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {RULES_FILE: rules_doc(slos, interval), PROMETHEUS_FILE: prometheus_doc(target), **promtool_tests(slos)}
    paths = []
    for fname, doc in files.items():
        path = out / fname
        path.write_text(dump(doc))
        paths.append(path)
    return paths
