"""What one benchmark request produced, and the shape of a result file.

A load point runs many requests; each ends as one RequestRecord (times in seconds, relative to
the load point's start). metrics.summarize turns a load point's records into vLLM bench's
field names. A result file (JSON, written by `keel bench run|sweep`) is:

    {
      "keel_bench": 1,                       # format version
      "meta": {"date", "git", "command", "label", "host", "cpus"},
      "spec": {...},                         # the BenchSpec as run (spec.py), for the record
      "hardware": {"name", "price_per_replica_hour", "currency"},
      "slo": {"ttft_ms", "tpot_ms", "e2el_ms", "percentile"},
      "settings": [
        {"name": "max_num_seqs=8", "engine": {...overrides...}, "replicas": 1,
         "points": [LoadPoint, ...],          # in load order
         "slo_max": LoadPoint | null,         # the highest load whose percentile meets the SLO
         "startup_s": float | null,           # s from starting the stack to ready (null with url:)
         "replica_start_s": float | null}     # s the slowest replica took to start, constructor to
                                              # engine ready (the gateway's /health lists them; null
                                              # when the server does not): keel autoscale simulate's
                                              # cold start, startup_s in files without it
      ],
      "recommendation": {...} | null,        # cost.recommend (with a config block to paste)
      "recommendation_note": str | null      # why there is none, when no setting met the SLO
    }

where a LoadPoint is the metrics summary of one load level plus
    "load": {"kind": "concurrency" | "rate", "value": float, "burstiness": float},
    "replicas": int, "cost_per_million_output_tokens": float | null, "meets_slo": bool.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

FORMAT_VERSION = 1


@dataclass
class RequestRecord:
    """One request as the client saw it. `ok` requests have a status of 200 and at least one
    output token; the rest carry an `error` (the HTTP status, 0 for a transport failure)."""

    ok: bool
    status: int = 0  # HTTP status; 0 when no response came (connection refused, timeout)
    start: float = 0.0  # when it was sent, s since the load point began
    ttft: float = 0.0  # s from sending to the first chunk carrying output text (see loadgen.py)
    e2el: float = 0.0  # s from sending to the last byte
    itl: list[float] = field(default_factory=list)  # s between consecutive chunks with text
    prompt_tokens: int = 0  # from the server's usage (else the dataset's count)
    output_tokens: int = 0  # from the server's usage (else the number of text chunks)
    error: str = ""


def load_text(load: dict) -> str:
    """A load point's load as people write it: "c=16" or "2.5 req/s"."""
    v = float(load["value"])
    return f"c={v:g}" if load["kind"] == "concurrency" else f"{v:g} req/s"


def git_version() -> str:
    """The commit measured, with "+changes" when the working tree's serving/ differs from it."""
    from serving.config import REPO_ROOT

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "serving"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+changes" if dirty else "")
