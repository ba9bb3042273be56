"""The bench spec: what `keel bench` loads, sweeps, judges and prices. YAML, validated strictly.

    keel bench run configs/bench/demo.yaml

A spec names the stack (a Keel config started once per setting, or the URL of a server that is
already running), the dataset, the load levels, the SLO, the hardware price and the settings to
sweep. See configs/bench/demo.yaml and benchmarks/README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from serving.config import REPO_ROOT, ConfigError, format_validation_error, read_yaml
from serving.schema import Strict

DEFAULT_HARDWARE_FILE = REPO_ROOT / "configs" / "bench" / "hardware.yaml"


class DatasetSpec(Strict):
    kind: Literal["random", "sharegpt", "shared_prefix"] = Field(
        "random",
        description="random: prompts of input_len tokens; sharegpt: conversations from a "
        "ShareGPT-format JSON file; shared_prefix: num_prefixes common prefixes of prefix_len "
        "tokens, each followed by a random input_len-token suffix.",
    )
    input_len: int = Field(256, ge=1, description="Prompt tokens (random, shared_prefix: the suffix).")
    output_len: int = Field(
        128,
        ge=1,
        description="Output tokens per request (sent as max_tokens "
        "with ignore_eos, so every request generates exactly that many).",
    )
    range_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Lengths are drawn uniformly from "
        "[len * (1 - r), len * (1 + r)], as vLLM bench's --random-range-ratio.",
    )
    path: str | None = Field(
        None, description="sharegpt: the JSON file (a list of {conversations: [{from, value}, ...]})."
    )
    output_len_from_dataset: bool = Field(
        False, description="sharegpt: use each conversation's answer length as max_tokens instead of output_len."
    )
    prefix_len: int = Field(0, ge=0, description="shared_prefix: tokens in each common prefix.")
    num_prefixes: int = Field(1, ge=1, description="shared_prefix: how many distinct prefixes.")

    @model_validator(mode="after")
    def _kind_fields(self):
        if self.kind == "sharegpt" and not self.path:
            raise ValueError("a sharegpt dataset needs `path` (a ShareGPT-format JSON file)")
        if self.kind == "shared_prefix" and self.prefix_len < 1:
            raise ValueError("a shared_prefix dataset needs `prefix_len` >= 1")
        return self


class LoadSpec(Strict):
    mode: Literal["concurrency", "rate"] = Field(
        "concurrency",
        description="concurrency: closed loop, `levels` are in-flight requests; "
        "rate: open loop, `levels` are requests per second.",
    )
    levels: list[float] = Field(description="The load points, lowest first.", min_length=1)
    num_requests: int = Field(64, ge=1, description="Requests measured per load point.")
    burstiness: float = Field(
        1.0,
        gt=0,
        description="rate: gamma-distributed gaps with this shape (1 = Poisson; lower is burstier), as vLLM bench.",
    )
    ramp_up_s: float = Field(
        0.0, ge=0, description="rate: the rate rises linearly from 0 over the first seconds of each load point."
    )
    max_concurrency: int | None = Field(None, ge=1, description="rate: cap on requests in flight.")
    warmup_requests: int = Field(4, ge=0, description="Sent before each setting's first load point and not recorded.")
    seed: int = 0
    endpoint: Literal["chat", "completions"] = "chat"
    request_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _levels(self):
        if any(v <= 0 for v in self.levels):
            raise ValueError("load levels must be > 0")
        if self.mode == "concurrency" and any(v != int(v) for v in self.levels):
            raise ValueError("concurrency levels must be whole numbers")
        if list(self.levels) != sorted(self.levels):
            raise ValueError("list load levels lowest first")
        return self


class SLOSpec(Strict):
    """Per-request thresholds (goodput counts the requests meeting all of them) and the
    percentile at which a load point must meet each one to count as compliant."""

    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    e2el_ms: float | None = Field(None, gt=0)
    percentile: float = Field(99, gt=0, le=100, description="e.g. 99: p99 TTFT <= ttft_ms, ...")

    @model_validator(mode="after")
    def _some(self):
        if self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None:
            raise ValueError("give at least one of ttft_ms, tpot_ms, e2el_ms")
        return self


class HardwareProfile(Strict):
    price_per_replica_hour: float = Field(gt=0, description="What one engine replica costs per hour.")
    currency: str = "USD"
    description: str = ""


class SettingSpec(Strict):
    """One deployment to measure: engine-argument overrides and a replica count."""

    name: str | None = Field(None, description="Label in results and plots; default from the overrides.")
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments merged over the model's (e.g. max_num_seqs, max_num_batched_tokens).",
    )
    replicas: int = Field(1, ge=1, description="Engine replicas (fixed; autoscaling off while measured).")

    def label(self) -> str:
        if self.name:
            return self.name
        parts = [f"{k}={v}" for k, v in self.engine.items()]
        if self.replicas != 1 or not parts:
            parts.append(f"replicas={self.replicas}")
        return ", ".join(parts)


class TargetSpec(Strict):
    """The peak the recommendation must carry inside the SLO (one of the two)."""

    peak_rps: float | None = Field(None, gt=0, description="Requests per second at peak.")
    peak_concurrency: int | None = Field(None, ge=1, description="Requests in flight at peak.")

    @model_validator(mode="after")
    def _one(self):
        if (self.peak_rps is None) == (self.peak_concurrency is None):
            raise ValueError("give exactly one of peak_rps, peak_concurrency")
        return self


class BenchSpec(Strict):
    config: str | None = Field(
        None, description="Keel config to start once per setting (relative to this file). Either this or url."
    )
    url: str | None = Field(
        None,
        description="An OpenAI-compatible server already running "
        "(Keel, bare vLLM, anything): measured as it is, no settings.",
    )
    model: str | None = Field(None, description="Model name to request; default: the config's first.")
    api_key: str | None = Field(
        None,
        description="Bearer key; default: the demo key when the "
        "config has tenants. $NAME reads the environment variable.",
    )
    label: str | None = Field(None, description="Name of this result set in reports.")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    load: LoadSpec
    slo: SLOSpec
    hardware: str | HardwareProfile = Field(description="A profile name from hardware_file, or a profile inline.")
    hardware_file: str | None = Field(None, description="Profiles file; default configs/bench/hardware.yaml.")
    settings: list[SettingSpec] = Field(default_factory=lambda: [SettingSpec()], min_length=1)
    target: TargetSpec | None = Field(None, description="Peak load for the recommendation.")
    startup_timeout_s: float = Field(900.0, gt=0)

    @model_validator(mode="after")
    def _stack(self):
        if (self.config is None) == (self.url is None):
            raise ValueError("give exactly one of `config` (a Keel config to start) or `url`")
        if self.url is not None and (
            len(self.settings) > 1 or self.settings[0].engine or self.settings[0].replicas != 1
        ):
            raise ValueError("settings need a `config` to start; a `url` is measured as it is")
        labels = [s.label() for s in self.settings]
        if len(set(labels)) != len(labels):
            raise ValueError("two settings have the same name")
        return self


def load_hardware(spec: BenchSpec, base: Path) -> tuple[str, HardwareProfile]:
    if isinstance(spec.hardware, HardwareProfile):
        return "inline", spec.hardware
    path = Path(spec.hardware_file) if spec.hardware_file else DEFAULT_HARDWARE_FILE
    if not path.is_absolute() and spec.hardware_file:
        path = base / path
    profiles = read_yaml(path)
    if not isinstance(profiles, dict) or spec.hardware not in profiles:
        known = ", ".join(sorted(profiles)) if isinstance(profiles, dict) else "none"
        raise ConfigError(f"{path}: no hardware profile `{spec.hardware}`; profiles: {known}")
    try:
        return spec.hardware, HardwareProfile.model_validate(profiles[spec.hardware])
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"{path} ({spec.hardware})", HardwareProfile)) from None


def load_spec(path: str | Path) -> BenchSpec:
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        return BenchSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), BenchSpec)) from None
