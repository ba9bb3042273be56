"""What a rollout is asked to do: steps, hold time, gates. A config's `rollouts:` section gives
the defaults; `keel rollout start` flags override them per rollout."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from serving.rollout.evaluate import EvalSet
from serving.schema import Strict

DEFAULT_STEPS: tuple[float, ...] = (5, 25, 50, 100)
DEFAULT_STATE_DIR = ".keel/rollouts"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds from `90`, `90s`, `10m`, `1.5h`, `500ms`; ValueError naming the text otherwise."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"`{text}` is not a duration: use e.g. 90s, 10m, 1h")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


class Gates(Strict):
    """When the candidate is worse than the baseline, each compared over the same step."""

    max_error_rate_increase: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Rollback when the candidate's share of 5xx answers exceeds the "
        "baseline's by more than this (0.01: one percentage point).",
    )
    max_ttft_p95_ratio: float = Field(
        1.25,
        gt=0,
        description="Rollback when the candidate's p95 time to first token exceeds this "
        "multiple of the baseline's (from the engines' vllm:time_to_first_token_seconds).",
    )
    max_tpot_p95_ratio: float = Field(
        1.25,
        gt=0,
        description="Rollback when the candidate's p95 time per output token exceeds this "
        "multiple of the baseline's (vllm:request_time_per_output_token_seconds).",
    )
    warmup_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="At the start of each step, how long latency is not judged (errors "
        "are): a candidate's first requests include its engines' warm-up. On the demo CPU path a healthy "
        "candidate's TTFT p95 read 16x the baseline's in its first 17 s, 0.3x after. The hold counts from "
        "the end of the warm-up.",
    )
    min_requests: int = Field(
        20,
        ge=1,
        description="Candidate requests a step needs before any gate is judged; below it "
        "the step holds (a p95 of three requests decides nothing).",
    )


class RolloutDefaults(Strict):
    steps: list[float] = Field(
        default_factory=lambda: list(DEFAULT_STEPS),
        description="Candidate's share of traffic per step, in percent, increasing, ending at 100.",
    )
    hold_s: float = Field(600.0, gt=0, description="How long each step must hold every gate before the next.")
    gates: Gates = Field(default_factory=Gates)
    ready_timeout_s: float = Field(
        900.0,
        gt=0,
        description="How long the candidate's engines may take to serve before the rollout is abandoned (rolled back).",
    )
    eval_file: str | None = Field(
        None,
        description="An evaluation set (serving.rollout.evaluate): its "
        "prompts are asked of the candidate alone before it gets any traffic, and the "
        "rollout is rolled back unless enough of them pass. Relative paths are from "
        "the current directory.",
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        return check_steps(steps)


def check_steps(steps: list[float]) -> list[float]:
    if len(steps) < 2:
        # The gates compare with the baseline, which gets no traffic at 100%: a first, smaller
        # step measures it.
        raise ValueError(f"give at least two steps, the last 100 (e.g. 5,25,50,100), got {steps}")
    if any(not (0 < s <= 100) for s in steps):
        raise ValueError(f"steps are percentages > 0 and <= 100, got {steps}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must increase, got {steps}")
    if steps[-1] != 100:
        raise ValueError(
            f"the last step must be 100 (the candidate takes all traffic before it is promoted), got {steps}"
        )
    return steps


class RolloutsConfig(Strict):
    """The stack config's top-level `rollouts:` section (serving.config.KeelConfig)."""

    state_dir: str = Field(
        DEFAULT_STATE_DIR,
        description="Where each rollout's state lives "
        "(<model>.json): `keel rollout start` resumes from it after a crash.",
    )
    defaults: RolloutDefaults = Field(default_factory=RolloutDefaults)


class RolloutSpec(RolloutDefaults):
    """One rollout: `keel rollout start MODEL --to VERSION`."""

    model: str = Field(description="The configured model whose version changes.")
    to_version: str = Field(description="The candidate's weights: a `weights:` value (NAME or NAME@VERSION).")
    evaluation: EvalSet | None = Field(
        None, description="The eval_file's cases, read when the rollout starts (a resume does not read the file again)."
    )

    @field_validator("model", "to_version")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v or any(c.isspace() for c in v):
            raise ValueError(f"{v!r} must be non-empty with no whitespace")
        return v


class TrafficSplit(Strict):
    """One model's rollout as the gateways see it: the gateway user_config's `rollouts.MODEL`."""

    candidate: str = Field(description="The internal model name the candidate's engines serve under.")
    percent: float = Field(ge=0, le=100, description="The candidate's share of the model's users.")
    weights_path: str | None = Field(None, description="The candidate's weights (its tokenizer counts prompts).")
    max_model_len: int | None = None


def check_splits(splits: dict[str, TrafficSplit], models: list[str]) -> list[str]:
    problems = []
    for model, s in splits.items():
        if model not in models:
            problems.append(f"rollouts.{model}: no such model; configured: {', '.join(models)}")
        if s.candidate in models:
            problems.append(f"rollouts.{model}.candidate: `{s.candidate}` is a public model name")
    return problems
