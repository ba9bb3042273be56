"""`keel bench run SPEC`: for each setting, start the stack, run the load points, tear down;
judge each point against the SLO, price it, recommend a deployment, write one result file.

With `url:` instead of `config:` the server is measured as it is (one setting)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shlex
import time
from pathlib import Path
from typing import Any

from serving.bench.cost import cost_per_million_output_tokens, no_recommendation_reason, recommend
from serving.bench.datasets import make_requests
from serving.bench.loadgen import run_point, warmup
from serving.bench.metrics import percentile_key, percentile_word, summarize
from serving.bench.records import FORMAT_VERSION, git_version, load_text
from serving.bench.slo import meets_slo, slo_max
from serving.bench.spec import BenchSpec, load_hardware
from serving.bench.stack import free_port, keel_doc, replica_start_s, start_keel, stop, wait_ready
from serving.config import REPO_ROOT, ConfigError, load_config, load_manifest, parse_config
from serving.models import ensure_weights
from serving.policy.identity import DEMO_KEY

RESULTS = REPO_ROOT / "benchmarks" / "results"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _hidden(key: str) -> str:
    """A key as results record it: a $NAME reference as written, a literal key never."""
    return key if key.startswith("$") else "***"


def _without_key(command: str) -> str:
    """The command line with the value of --api-key hidden (results are shared, keys are not)."""
    words = shlex.split(command)
    for i, w in enumerate(words):
        if w == "--api-key" and i + 1 < len(words):
            words[i + 1] = _hidden(words[i + 1])
        elif w.startswith("--api-key="):
            words[i] = "--api-key=" + _hidden(w.split("=", 1)[1])
    return shlex.join(words)


def _api_key(spec: BenchSpec, has_tenants: bool) -> str | None:
    key = spec.api_key
    if key and key.startswith("$"):
        name = key[1:]
        key = os.environ.get(name)
        if not key:
            raise ValueError(f"api_key: the environment variable {name} is not set")
    if key is None and has_tenants:
        key = DEMO_KEY
    return key


def _tokenizer(weights: Path | None):
    if weights is None or not (weights / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(weights / "tokenizer.json"))


def run_spec(
    spec: BenchSpec, spec_path: Path, out: Path | None = None, progress: bool = True, command: str = ""
) -> Path:
    """Runs the whole spec; returns the path of the result file."""
    base = spec_path.parent
    hw_name, hardware = load_hardware(spec, base)
    weights = None
    if spec.config is not None:
        config_path = (base / spec.config) if not Path(spec.config).is_absolute() else Path(spec.config)
        if not config_path.is_file() and Path(spec.config).is_file():
            config_path = Path(spec.config)  # relative to the working directory, like keel serve
        cfg = load_config(config_path)
        model = spec.model or next(iter(cfg.models))
        if model not in cfg.models:
            raise ValueError(f"model `{model}` is not in {config_path} (models: {', '.join(cfg.models)})")
        mc = cfg.models[model]
        ensure_weights(cfg, mc.weights)
        _, weights = load_manifest(cfg, mc.weights)
        key = _api_key(spec, bool(cfg.tenants))
        weights_name, base_engine = mc.weights, dict(mc.engine)
        base_model = mc.model_dump(mode="json", exclude_unset=True)  # the entry as the file wrote it
    else:
        config_path = None
        if not spec.model:
            raise ValueError("with `url`, give `model`: the name the server serves")
        model, key, weights_name, base_engine = spec.model, _api_key(spec, False), spec.model, {}
        base_model = None
    tokenizer = _tokenizer(weights)
    load = spec.load
    dataset = spec.dataset
    if dataset.path and not Path(dataset.path).is_absolute() and (base / dataset.path).is_file():
        dataset = dataset.model_copy(update={"path": str(base / dataset.path)})  # relative to the spec
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label = spec.label or spec_path.stem
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = out or RESULTS / f"bench-{label}-{stamp}.json"
    log_path = out.with_suffix(".log")
    settings = []
    with open(log_path, "wb") as log:
        for setting in spec.settings:
            name = setting.label()
            _say(f"setting {name}")
            proc = None
            url = spec.url
            points: list[dict] = []
            error = None
            startup_s = replica_s = None
            try:
                if config_path is not None:
                    port = free_port()
                    doc = keel_doc(config_path, port, model=model, engine=setting.engine, replicas=setting.replicas)
                    # vLLM's own check of the setting's engine arguments, before a stack starts
                    parse_config(doc, source=f"{spec_path}: setting `{name}`")
                    t0 = time.monotonic()
                    log.flush()
                    log_start = log.tell()
                    proc = start_keel(doc, out.parent / f"{out.stem}-stack", log)
                    url = f"http://127.0.0.1:{port}"
                    try:
                        wait_ready(url, proc, spec.startup_timeout_s)
                    except (RuntimeError, TimeoutError) as e:
                        raise RuntimeError(f"{e}; the end of its log:\n{_log_tail(log_path, log_start)}") from None
                    startup_s = round(time.monotonic() - t0, 1)
                    _say(f"  stack ready in {startup_s:.0f}s at {url} (log: {log_path})")
                assert url is not None  # BenchSpec holds exactly one of config and url
                if load.warmup_requests:
                    warm = make_requests(dataset, load.warmup_requests, load.seed + 10_000, tokenizer)
                    failed = asyncio.run(warmup(url, model, warm, load.warmup_requests, key, load.endpoint))
                    if failed:
                        _say(f"  warning: {failed} of {load.warmup_requests} warm-up requests failed")
                for i, level in enumerate(load.levels):
                    reqs = make_requests(dataset, load.num_requests, load.seed + i, tokenizer)
                    records, duration = asyncio.run(run_point(url, model, reqs, load, level, key, progress))
                    point = summarize(records, duration, spec.slo)  # 50, 90, 99 and the SLO's
                    point["load"] = {"kind": load.mode, "value": level, "burstiness": load.burstiness}
                    point["replicas"] = setting.replicas
                    point["cost_per_million_output_tokens"] = cost_per_million_output_tokens(
                        point["output_throughput"], setting.replicas, hardware.price_per_replica_hour
                    )
                    point["meets_slo"] = meets_slo(point, spec.slo)
                    points.append(point)
                    _say(_point_line(point, spec.slo.percentile, hardware.currency))
                # Read after the load, when every replica of the setting has started and registered.
                replica_s = replica_start_s(url, model)
                if replica_s is not None:
                    _say(f"  replicas started in {replica_s:.1f}s each at most (worker start to engine ready)")
            except (RuntimeError, ConfigError, OSError) as e:
                # One setting that cannot start (bad engine arguments, out of memory) does not
                # lose the others: it is recorded with its error and the sweep goes on.
                error = str(e)
                _say(f"  setting `{name}` failed: {error}")
            finally:
                if proc is not None:
                    stop(proc)
            entry: dict[str, Any] = {
                "name": name,
                "engine": setting.engine,
                "replicas": setting.replicas,
                "points": points,
                "slo_max": slo_max(points),
                "startup_s": startup_s,
                "replica_start_s": replica_s,
            }
            if error is not None:
                entry["error"] = error
            settings.append(entry)
            best = entry["slo_max"]
            _say(f"  SLO-compliant maximum: {load_text(best['load']) if best else 'none'}")
    rec, note = None, None
    if spec.target is not None:
        rec = recommend(
            settings, spec.target, spec.slo, hw_name, hardware, model, weights_name, base_engine, base_model=base_model
        )
        if rec is None:
            note = no_recommendation_reason(settings, spec.slo)
            _say(f"no recommendation: {note}")
    result = {
        "keel_bench": FORMAT_VERSION,
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "git": git_version(),
            "command": _without_key(command),
            "label": label,
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "model": model,
            "url": spec.url,
            "config": str(config_path) if config_path else None,
        },
        "spec": {**spec.model_dump(mode="json"), "api_key": None if spec.api_key is None else _hidden(spec.api_key)},
        "hardware": {
            "name": hw_name,
            "price_per_replica_hour": hardware.price_per_replica_hour,
            "currency": hardware.currency,
        },
        "slo": spec.slo.model_dump(mode="json"),
        "settings": settings,
        "recommendation": rec,
        "recommendation_note": note,
    }
    out.write_text(json.dumps(result, indent=2))
    return out


def _log_tail(path: Path, start: int, lines: int = 15) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.strip().splitlines()[-lines:])


def _point_line(p: dict, pct: float, currency: str) -> str:
    q = percentile_word(pct)
    cost = p.get("cost_per_million_output_tokens")
    return (
        f"  {load_text(p['load']):>10}  {p['output_throughput']:8.1f} tok/s  {p['request_throughput']:6.2f} req/s  "
        f"TTFT {q} {p.get(percentile_key(pct, 'ttft')) or 0:8.1f} ms  "
        f"TPOT {q} {p.get(percentile_key(pct, 'tpot')) or 0:6.2f} ms  "
        f"failed {p['failed']}  {'' if cost is None else f'{cost:.3f} {currency}/M out'}  "
        f"{'meets SLO' if p['meets_slo'] else 'misses SLO'}"
    )
