"""`keel history`: the changes made to the stack (`keel apply`, `keel serve`, rollout steps),
numbered oldest first; `keel history show N`: one of them, with its diff. Read from the audit
dir (serving.ops.history), whose files are verified on the way."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

MAX_SUMMARY = 90  # characters of a list line's summary; `show N` has the whole change
MAX_SHOWN_VALUE = 400  # characters of one value in `show N`; --json prints the record whole
MAX_LIST = 10_000  # -n bound


def add_parser(sub) -> None:
    p = sub.add_parser(
        "history",
        help="who changed what, when: every `keel apply`, `keel serve` deploy and "
        "rollout step, from the audit log; `keel history show N` prints one change's diff",
        description="keel history [CONFIG] lists the changes; keel history show N [CONFIG] "
        "prints change N (numbers count from the oldest, as the list shows them).",
    )
    p.add_argument(
        "words",
        nargs="*",
        metavar="[CONFIG] | show N [CONFIG]",
        help="the stack config whose audit dir to read (default: configs/local.yaml)",
    )
    p.add_argument("--audit-dir", metavar="DIR", default=None, help="read this audit dir instead of the config's")
    p.add_argument("-n", type=int, default=20, metavar="COUNT", help="list the last COUNT changes (default 20)")
    p.add_argument("--no-verify", action="store_true", help="skip checking the audit files' hash chains")
    p.add_argument(
        "--hmac-key-file",
        metavar="PATH",
        default=None,
        help="also check the files' MACs with this key (default: the config's audit.hmac_key_file, "
        "else $KEEL_AUDIT_HMAC_KEY_FILE)",
    )
    p.add_argument("--json", action="store_true", help="show N: print the record as JSON")


class _Usage(Exception):
    """A command line that cannot be run; str() is the message."""


def run(args) -> int:
    from serving.ops.history import read_history

    try:
        show, config = _parse_words(args.words)
        if not 1 <= args.n <= MAX_LIST:
            raise _Usage(f"-n must be from 1 to {MAX_LIST}, not {args.n}")
        directory, key = _source(args, config)
    except _Usage as e:
        print(f"keel history: {e}", file=sys.stderr)
        return 2
    try:
        hist = read_history(directory, verify=not args.no_verify, key=key)
    except FileNotFoundError as e:
        print(f"keel history: {e} (`keel apply` and `keel serve` create it with the first change)", file=sys.stderr)
        return 1
    if show is not None:
        if not hist.entries:
            print(f"keel history show {show}: no changes are recorded in {directory}", file=sys.stderr)
            return 2
        if not 1 <= show <= len(hist.entries):
            print(
                f"keel history show {show}: no such change; {directory} holds {len(hist.entries)} "
                f"(1 to {len(hist.entries)})",
                file=sys.stderr,
            )
            return 2
        entry = hist.entries[show - 1]
        print(
            json.dumps(entry.record, indent=2, ensure_ascii=False)
            if args.json
            else render_entry(entry, len(hist.entries))
        )
        if hist.failed.get(entry.file):
            print(_verify_warning(hist, directory), file=sys.stderr)
            return 1
        return 0
    print(render_list(hist, directory, args.n))
    if hist.failed:
        print(_verify_warning(hist, directory), file=sys.stderr)
        return 1
    return 0


def _parse_words(words: list[str]) -> tuple[int | None, str | None]:
    """(N for `show N`, else None; the config named, else None)."""
    if words and words[0] == "show":
        if len(words) < 2:
            raise _Usage("show needs the number of a change: keel history show N [CONFIG]")
        if len(words) > 3:
            raise _Usage(f"too many arguments: {' '.join(words[3:])}")
        try:
            n = int(words[1])
        except ValueError:
            raise _Usage(f"show N: N is a change's number from `keel history`, not {words[1]!r}") from None
        return n, (words[2] if len(words) == 3 else None)
    if len(words) > 1:
        raise _Usage(f"too many arguments: {' '.join(words[1:])} (keel history [CONFIG] | show N [CONFIG])")
    return None, (words[0] if words else None)


def _source(args, config: str | None):
    """(audit dir, audit key or None) from --audit-dir, the config and the key options."""
    from serving.policy.audit import KEY_FILE_ENV, AuditKeyError, load_key

    key_file = args.hmac_key_file
    if args.audit_dir is not None and config is None:
        directory = Path(args.audit_dir)
    else:
        from serving.config import REPO_ROOT, load_config

        cfg = load_config(config or REPO_ROOT / "configs" / "local.yaml", check_engine_args=False)
        directory = Path(args.audit_dir) if args.audit_dir is not None else Path(cfg.audit.dir)
        key_file = key_file or cfg.audit.hmac_key_file
    key_file = key_file or os.environ.get(KEY_FILE_ENV) or None
    if not key_file:
        return directory, None
    try:
        return directory, load_key(key_file)
    except AuditKeyError as e:
        raise _Usage(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Rendering


def render_list(hist, directory, count: int) -> str:
    from serving.ops.history import who_text

    entries = hist.entries[-count:]
    if not hist.entries:
        return f"keel history: no changes recorded in {directory} yet (`keel apply` and `keel serve` record them)"
    rows = [
        (
            f"{e.n}{'!' if e.verified is False else ''}",
            _time(e.record),
            _who(e.record, who_text),
            e.record.get("version") or "-",
            summary(e.record),
        )
        for e in entries
    ]
    head = ("N", "TIME (UTC)", "WHO", "VERSION", "SUMMARY")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = [
        f"{directory}: {len(hist.entries)} change(s)"
        + (f", the last {len(entries)} shown" if len(entries) < len(hist.entries) else "")
        + "; "
        + _verify_note(hist)
    ]
    for r in [head, *rows]:
        lines.append(
            f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}".rstrip()
        )
    return "\n".join(lines)


def summary(rec: dict) -> str:
    """One line: what the change did."""
    if rec.get("event") == "rollout":
        text = (
            f"rollout {rec.get('model')}: {rec.get('action')} (step {rec.get('step')}, "
            f"{rec.get('percent')}% to {rec.get('to_version')})"
        )
    else:
        plan = rec.get("plan") or {}
        models = [f"{m} {k}" for m, k in (plan.get("models") or {}).items() if k != "unchanged"]
        parts = [", ".join(models)] if models else []
        parts += [g for g in plan.get("gateways") or [] if g.startswith("policy:")]
        restart = plan.get("restart")
        parts += [f"restart {', '.join(restart)}"] if restart else []
        n = len(rec.get("changes") or []) + rec.get("changes_omitted", 0)
        if rec.get("error"):  # what went wrong first; the plan is in `show N`
            text = f"{rec.get('command')} {rec.get('outcome')}: {rec['error'].splitlines()[0]}"
        else:
            text = (
                f"{rec.get('command')} {rec.get('outcome')}: "
                + ("; ".join(parts) or "no model changes")
                + f" ({n} change{'s' * (n != 1)})"
            )
    return text if len(text) <= MAX_SUMMARY else text[: MAX_SUMMARY - 3] + "..."


def render_entry(entry, total: int) -> str:
    from serving.ops.history import who_text

    rec = entry.record
    verified = {True: "chain verified", False: "FAILS verification", None: "not verified"}[entry.verified]
    lines = [
        f"change {entry.n} of {total}  {_time(rec)} UTC  "
        + (
            f"rollout {rec.get('model')}"
            if rec.get("event") == "rollout"
            else f"keel {rec.get('command')}: {rec.get('outcome')}"
        )
    ]
    if rec.get("event") == "rollout":
        for k in ("action", "phase", "step", "percent", "from_version", "to_version", "reason"):
            if k in rec:
                lines.append(f"{k:<13} {rec[k]}")
        if rec.get("signals"):
            lines.append(f"{'signals':<13} {_value(rec['signals'])}")
    else:
        before = rec.get("previous_version") or "none"
        against = {"deployed": "as deployed", "recorded": "as last recorded", "nothing": "nothing deployed"}
        lines.append(f"{'who':<9} {who_text(rec.get('who'))}")
        if (rec.get("who") or {}).get("key_note"):
            lines.append(f"{'':<9} ({rec['who']['key_note']})")
        lines.append(
            f"{'version':<9} {rec.get('version')} (before: {before}, "
            f"{against.get(rec.get('diff_against'), rec.get('diff_against'))})"
        )
        if rec.get("error"):
            lines.append(f"{'error':<9} {rec['error']}")
        plan = rec.get("plan") or {}
        lines.append(
            f"{'plan':<9} " + ("; ".join(f"{m} {k}" for m, k in (plan.get("models") or {}).items()) or "no models")
        )
        lines += [f"{'':<9} gateways: {g}" for g in plan.get("gateways") or []]
        lines += [f"{'':<9} restart: {r}" for r in plan.get("restart") or []]
        changes = rec.get("changes") or []
        lines.append(
            f"{'changes':<9} {len(changes) + rec.get('changes_omitted', 0)}"
            + (f" ({rec['changes_omitted']} more not recorded)" if rec.get("changes_omitted") else "")
        )
        lines += ["  " + change_line(c) for c in changes]
    lines.append(f"{'file':<9} {entry.file} (seq {rec.get('seq')}, {verified})")
    return "\n".join(lines)


def change_line(c: dict) -> str:
    path = path_text(c.get("path") or [])
    if c.get("op") == "added":
        return f"+ {path}: {_value(c.get('new'))}"
    if c.get("op") == "removed":
        return f"- {path}: {_value(c.get('old'))}"
    return f"~ {path}: {_value(c.get('old'))} -> {_value(c.get('new'))}"


_PLAIN = re.compile(r"[\w@/*:-]+")


def path_text(path: list) -> str:
    """models.demo.engine.max_model_len; a key with dots or spaces in quotes: models."llama-3.1"."""
    return ".".join(p if _PLAIN.fullmatch(p) else json.dumps(p, ensure_ascii=False) for p in map(str, path)) or "(all)"


def _value(v) -> str:
    text = (
        v
        if isinstance(v, str) and v.startswith(("***", "(masked)"))
        else json.dumps(v, sort_keys=True, ensure_ascii=False, default=str)
    )
    return text if len(text) <= MAX_SHOWN_VALUE else text[: MAX_SHOWN_VALUE - 3] + "..."


def _time(rec: dict) -> str:
    from serving.ops.history import record_time

    return record_time(rec).strftime("%Y-%m-%d %H:%M:%S")


def _who(rec: dict, who_text) -> str:
    return who_text(rec.get("who")) if rec.get("event") != "rollout" else "keel rollout"


def _verify_note(hist) -> str:
    checked = {e.file for e in hist.entries if e.verified is not None}
    if not checked:
        return "audit files not verified"
    if not hist.failed:
        return f"the {len(checked)} audit file(s) holding them verify"
    return f"{len(hist.failed)} of the audit files FAIL verification (entries marked !)"


def _verify_warning(hist, directory) -> str:
    lines = [
        f"keel history: WARNING: {len(hist.failed)} audit file(s) fail verification: the records from "
        f"them (marked !) may have been altered, added or cut. `keel audit verify {directory}` says more:"
    ]
    for path, problems in hist.failed.items():
        lines += [f"  {path.name}: {p}" for p in problems[:3]]
    return "\n".join(lines)
