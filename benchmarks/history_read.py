"""How long `keel history` takes to read an audit dir full of request records.

An audit dir of N gateway request records (audit-0.jsonl) and M config changes, either in a
file of their own (audit-1.jsonl: what `keel apply` does, it claims a free slot) or interleaved
with the requests in one file (a slot a gateway took over later): read_history with and without
verifying the chains. The byte search skips request records; verification reads only the
files that hold a change, so it costs nothing in the first layout and reads everything in the
second.

    python -m benchmarks.history_read --requests 200000 --changes 50
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import yaml


def request_record(i: int) -> dict:
    return {
        "time": "2026-12-06T13:00:00.000+00:00",
        "request_id": f"req-{i:012x}",
        "tenant": f"t{i % 7}",
        "key_id": "key-1",
        "model": "demo",
        "variant": "demo",
        "status": 200,
        "error": None,
        "prompt_tokens": 120 + i % 50,
        "completion_tokens": 64,
        "latency_ms": 812.5,
        "ttfb_ms": 91.2,
        "guardrails": [{"name": "pii", "action": "redact", "direction": "output"}],
    }


def change_records(m: int) -> list[dict]:
    from serving.config import REPO_ROOT, parse_config
    from serving.ops import history
    from serving.plan import desired

    doc = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
    out, before = [], history.config_view(desired(parse_config(copy.deepcopy(doc), check_engine_args=False)))
    for i in range(m):
        doc["tenants"]["demo"]["quotas"]["requests_per_minute"] = 1000 + i
        after = history.config_view(desired(parse_config(copy.deepcopy(doc), check_engine_args=False)))
        rec = history.change_record(
            command="apply",
            who={"user": "bench", "host": "bench"},
            old_view=before,
            new_view=after,
            plan={"models": {"demo": "unchanged"}},
        )
        out.append({**rec, "time": f"2026-12-06T13:{i // 60 % 60:02d}:{i % 60:02d}.000+00:00", "outcome": "applied"})
        before = after
    return out


def build(directory: Path, n: int, changes: list[dict], together: bool) -> None:
    from serving.policy.audit import AuditLog

    with AuditLog(directory, flush_interval_s=0.05) as requests:
        every = max(1, n // max(1, len(changes)))
        pending = list(changes)
        if together:
            for i in range(n):
                requests.write(request_record(i))
                if pending and i % every == every - 1:
                    requests.write(pending.pop(0))
            for rec in pending:
                requests.write(rec)
        else:
            with AuditLog(directory) as own:
                for i in range(n):
                    requests.write(request_record(i))
                for rec in changes:
                    own.write(rec)


def timed(directory: Path, verify: bool, repeat: int = 3) -> tuple[float, int]:
    from serving.ops.history import read_history

    best, found = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        hist = read_history(directory, verify=verify)
        best = min(best, time.perf_counter() - start)
        found = len(hist.entries)
        assert not hist.failed, hist.failed
    return best, found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--changes", type=int, default=50)
    args = ap.parse_args(argv)
    changes = change_records(args.changes)
    print(f"{args.requests} request records, {args.changes} changes; best of 3 (s)\n")
    print("| layout | audit dir MB | read, no verify | read + verify | changes found |")
    print("|---|---|---|---|---|")
    for together in (False, True):
        with tempfile.TemporaryDirectory(prefix="keel-history-bench-") as tmp:
            d = Path(tmp)
            build(d, args.requests, changes, together)
            size = sum(p.stat().st_size for p in d.glob("audit-*.jsonl")) / 1e6
            plain, found = timed(d, verify=False)
            verified, _ = timed(d, verify=True)
            layout = "changes in the request file" if together else "changes in their own file"
            print(f"| {layout} | {size:.0f} | {plain:.3f} | {verified:.3f} | {found} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
