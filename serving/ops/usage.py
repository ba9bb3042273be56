"""What `keel cost` reads from the audit log: tokens per tenant, model and hour, and replica counts.

Every audit file in the directory is read (all slots, rotated files in chain order, via
serving.policy.audit.chain_order). A request record counts when the engine reported usage
(`completion_tokens` is set): a request refused before an engine (401, 429, ...) or one that
failed without usage put no tokens on a replica and is skipped (and counted in `skipped`).
The model is the deployment that answered (`variant`, else `model`): a rollout candidate or an
experiment's variant has its own replicas and its own price. Shadow copies are the platform's
experiment, not the tenant's traffic: they count under the tenant SHADOW. Records without a
tenant (a gateway with no tenants) count under NO_TENANT.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from serving.ops.replica_time import BUCKET_S
from serving.policy.audit import chain_order

SHADOW = "(shadow)"
NO_TENANT = "(no tenant)"
MAX_RECORDS = 50_000_000  # ~4 min of reading at ~200k records/s; a larger log is refused


class UsageError(ValueError):
    """The audit log cannot be read as asked; str() is the message a user reads."""


@dataclass
class Usage:
    # (tenant, model, hour start) -> [requests, prompt tokens, completion tokens]
    tokens: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)
    replica_events: list[tuple[float, str, int]] = field(default_factory=list)  # (time, model, ready)
    since: float = 0.0
    until: float = 0.0
    files: int = 0
    first: float | None = None  # earliest request counted
    last: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # why -> records

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def audit_files(directory: str | Path) -> list[Path]:
    """The audit files of a directory in chain order; UsageError if there are none."""
    d = Path(directory)
    if not d.is_dir():
        raise UsageError(f"{d}: no such audit directory (give --audit-dir, or the config's audit.dir)")
    files = [p for chain in chain_order(sorted(d.glob("audit-*.jsonl"))) for p in chain]
    if not files:
        raise UsageError(f"{d}: no audit files (audit-*.jsonl); is audit.enabled and has a gateway run?")
    return files


def _time(value) -> float | None:
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except (TypeError, ValueError):
        return None


def read_usage(directory: str | Path, since: float, until: float) -> Usage:
    """Tokens of requests that ended in [since, until) and every replica record before until."""
    usage = Usage(since=since, until=until)
    files = audit_files(directory)
    usage.files = len(files)
    seen = 0
    for path in files:
        try:
            f = open(path, "rb")  # noqa: SIM115 - outside `with`: only open()'s OSError becomes a UsageError
        except OSError as e:
            raise UsageError(f"{path}: cannot read: {e.strerror or e}") from None
        with f:
            for line in f:
                seen += 1
                if seen > MAX_RECORDS:
                    raise UsageError(
                        f"{directory}: more than {MAX_RECORDS:,} audit records; give a "
                        "directory holding only the files of the period (ship older ones off)"
                    )
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    usage.skip("not JSON (a torn last line?)")
                    continue
                if isinstance(rec, dict):
                    _count(usage, rec)
    return usage


def _count(usage: Usage, rec: dict) -> None:
    t = _time(rec.get("time"))
    if t is None:
        usage.skip("no time")
        return
    event = rec.get("event")
    if event == "replicas":
        ready, model = rec.get("ready"), rec.get("model")
        if t < usage.until and isinstance(model, str) and isinstance(ready, int) and ready >= 0:
            usage.replica_events.append((t, model, ready))
        return
    if event is not None or not usage.since <= t < usage.until:
        return
    model = rec.get("variant") or rec.get("model")
    prompt, completion = rec.get("prompt_tokens"), rec.get("completion_tokens")
    if not isinstance(completion, int) or not isinstance(model, str):
        usage.skip("no usage from an engine (refused or failed before one)")
        return
    tenant = SHADOW if rec.get("shadow") else (rec.get("tenant") or NO_TENANT)
    key = (tenant, model, int(t // BUCKET_S) * BUCKET_S)
    row = usage.tokens.get(key)
    if row is None:
        row = usage.tokens[key] = [0, 0, 0]
    row[0] += 1
    row[1] += prompt if isinstance(prompt, int) else 0
    row[2] += completion
    usage.first = t if usage.first is None else min(usage.first, t)
    usage.last = t if usage.last is None else max(usage.last, t)
