"""Prompt token counting, side by side: this tree's TokenCounter against an older commit's.

Two things are measured on the demo model:
- what importing the counter adds to a fresh gateway process (seconds, MiB of RSS), with the
  heavier ways of rendering a chat as vLLM does beside it: transformers' AutoTokenizer (which
  imports torch) and vLLM's own renderer module (when vLLM is installed). Median of 3 fresh
  processes each.
- µs per count for typical chat payloads and a completion: the baseline commit's counter,
  this tree's, and this tree's with its ASCII per-word cache turned off (plain tokenizer
  encode). Thread CPU time per count, the best of 7 interleaved rounds of 200 counts each.

    PYTHONPATH=$PWD python benchmarks/token_count.py [--baseline REV]

The baseline's tokens.py is read with `git show REV:serving/policy/tokens.py` and imported
under another name, so both counters run in the same process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving.config import REPO_ROOT

DEMO_DIR = REPO_ROOT / ".keel" / "models" / "demo-tiny"
CORPUS = REPO_ROOT / "models" / "demo-tiny" / "corpus.txt"
# The commit before counting went through transformers' apply_chat_template.
DEFAULT_BASELINE = "8cf6894"
ROUNDS = 7
COUNTS_PER_ROUND = 200

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def payloads() -> dict[str, tuple[str, dict]]:
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    long_user = " ".join(lines[:30])[:2000]
    return {
        "chat system+user": (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                    {"role": "user", "content": "What does the licence say about redistribution?"},
                ]
            },
        ),
        "chat 4 turns": (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello! how can I help?"},
                    {"role": "user", "content": "tell me a joke about cats"},
                ]
            },
        ),
        "chat non-ASCII": (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Grüße aus München, héllo 🙂 — ¿qué tal?"}]},
        ),
        "chat multi-part": (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}],
                    }
                ]
            },
        ),
        "chat tools": (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS},
        ),
        "chat 2 KB user": ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_user}]}),
        "completion": ("/v1/completions", {"prompt": "Once upon a time, in a land far away, there lived"}),
    }


def load_baseline(rev: str, into: Path):
    source = subprocess.run(
        ["git", "show", f"{rev}:serving/policy/tokens.py"], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = into / "keel_tokens_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("keel_tokens_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_IMPORT_PROBE = """
import sys, time
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
before, t = rss(), time.perf_counter()
{stmt}
print(time.perf_counter() - t, rss() - before)
"""


def import_cost(stmt: str, extra_path: Path | None = None) -> tuple[float, float] | None:
    """Median (seconds, MiB) over 3 fresh processes; None when the import fails (not installed)."""
    env_path = [str(REPO_ROOT)] + ([str(extra_path)] if extra_path else [])
    runs = []
    for _ in range(3):
        probe = subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path[:0] = {env_path!r}\n" + _IMPORT_PROBE.format(stmt=stmt)],
            capture_output=True,
            text=True,
            cwd="/",
        )
        if probe.returncode != 0:
            return None
        seconds, mib = probe.stdout.split()[-2:]
        runs.append((float(seconds), float(mib)))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def us_per_count(counter, path: str, payload: dict) -> float:
    start = time.thread_time()
    for _ in range(COUNTS_PER_ROUND):
        counter.count_each(path, payload)
    return (time.thread_time() - start) / COUNTS_PER_ROUND * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision of the old counter")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()

    from serving.policy.tokens import TokenCounter

    with tempfile.TemporaryDirectory() as tmp:
        old_module = load_baseline(args.baseline, Path(tmp))
        imports = {
            f"baseline {args.baseline} (tokenizers + jinja2)": import_cost("import keel_tokens_baseline", Path(tmp)),
            "this tree (transformers' PreTrainedTokenizerFast)": import_cost("import serving.policy.tokens"),
            "transformers AutoTokenizer": import_cost("from transformers import AutoTokenizer"),
            "vLLM renderer (vllm.renderers.hf)": import_cost("import vllm.renderers.hf"),
        }

    old = old_module.TokenCounter.from_model_dir(DEMO_DIR)
    new = TokenCounter.from_model_dir(DEMO_DIR)
    plain = TokenCounter.from_model_dir(DEMO_DIR)
    plain._ascii = None
    counters = {"baseline": old, "new": new, "new, no ASCII cache": plain}

    results: dict[str, dict[str, float]] = {}
    for name, (path, payload) in payloads().items():
        counts = {label: c.count_each(path, payload) for label, c in counters.items()}
        if len({json.dumps(v) for v in counts.values()}) != 1:
            print(f"counts differ for {name}: {counts}", file=sys.stderr)
        rounds: dict[str, list[float]] = {label: [] for label in counters}
        for _ in range(ROUNDS):
            for label, counter in counters.items():
                rounds[label].append(us_per_count(counter, path, payload))
        results[name] = {label: min(times) for label, times in rounds.items()}

    if args.json:
        print(json.dumps({"imports": imports, "us_per_count": results}, indent=2))
        return
    print("Import into a fresh process (median of 3):")
    for label, cost in imports.items():
        print(f"  {label:52s} " + ("not installed" if cost is None else f"{cost[0]:6.2f} s  {cost[1]:+7.1f} MiB"))
    print(f"\nµs per count (thread CPU, best of {ROUNDS} rounds of {COUNTS_PER_ROUND}):")
    labels = list(counters)
    print(f"  {'payload':20s}" + "".join(f"{label:>22s}" for label in labels))
    for name, row in results.items():
        print(f"  {name:20s}" + "".join(f"{row[label]:22.1f}" for label in labels))


if __name__ == "__main__":
    main()
