"""The history of changes: every `keel apply` and `keel serve` deploy as an audit record.

A record is {"event": "config_change", ...} in the config's audit dir, written through the audit
writer (its own slot file beside the gateways', same chain and HMAC key): who made the change,
a structured diff of the stack and policy, the config version before and after, the plan per
model and the outcome. Rollout steps (serving.rollout, {"event": "rollout"}) are read back with
them, so `keel history` shows both.

The diff is between what Serve runs (serving.app.deployed_state, read by `keel apply` anyway)
and what the new config asks: the running stack is the truth, whatever changed it last (a
rollout promotion, a `kubectl apply` of the same serve config, an edited audit dir). Each record
also keeps the new config, masked, so `keel serve` (a fresh cluster: nothing deployed to diff
against) diffs against the last recorded one, and `keel history show` can print it.

Masked (never written): key digests (a short fingerprint of the digest instead, so a rotation
shows), secret-looking env variables, config keys named like secrets, passwords in URLs, values
shaped like API keys. A secret that changed shows as "(masked) changed". Plain Python: no Ray.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import mmap
import os
import re
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

EVENT = "config_change"
HISTORY_EVENTS = (EVENT, "rollout")
APPLIED, FAILED = "applied", "failed"
MASK = "***"
MASKED_CHANGE = "(masked) changed"

MAX_DEPTH = 16  # config nesting the diff descends into; deeper values compare whole
MAX_CHANGES = 500  # diff entries kept per record; the rest are counted in `changes_omitted`
MAX_VALUE_CHARS = 2000  # a longer old/new value (as JSON) is cut, with its full length noted
MAX_SNAPSHOT_BYTES = 256 * 1024  # the masked config kept in a record; a bigger one is left out

# A config key whose value is a secret: `password`, `redis_password`, `api_key`, `hf_token`, ...
# (anchored at the end, so `tokens_per_day` and `max_tokens` are not).
_SECRET_KEY = re.compile(r"(^|_)(password|passwd|secret|token|api_?key|credentials?|private_key)$", re.I)
# An environment variable that looks secret: HF_TOKEN, OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY, ...
_SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASS|CREDENTIAL|AUTH|COOKIE|SESSION", re.I)
# A value shaped like an API key whatever its key: Keel's, OpenAI's, Hugging Face's, GitHub's, Slack's.
_SECRET_VALUE = re.compile(r"(sk-|hf_|ghp_|gho_|github_pat_|xox[bpas]-)[A-Za-z0-9_\-]{8,}")


# ---------------------------------------------------------------------------------------------
# What a stack runs, as a config reads


def config_view(state) -> dict:
    """A StackState (serving.plan) shaped as the config that asked for it: server, policy, and
    per model its weights, engine arguments, env, resources and deployment settings. Rollout
    candidates are left out: their steps are records of their own."""
    from serving.plan import CANDIDATE_SUFFIX, _readable  # a config's view of a model's overrides

    gateway_models = state.gateway.get("models") or {}
    models = {}
    for name, m in sorted(state.models.items()):
        if name.endswith(CANDIDATE_SUFFIX):
            continue
        args = m.args
        models[name] = {
            "weights": args.get("weights"),
            "engine": args.get("engine") or {},
            "env": args.get("env") or {},
            "resources": args.get("ray_actor_options") or {},
            "startup_timeout_s": args.get("startup_timeout_s"),
            "deployment": _readable(m.overrides, (gateway_models.get(name) or {}).get("autoscaling")),
        }
    view = {"server": state.server, "policy": state.gateway.get("policy") or {}, "models": models}
    if state.gateway.get("models_dir"):
        view["models_dir"] = state.gateway["models_dir"]
    return view


def version(masked_view: dict) -> str:
    """The config's version: 12 hex characters of the sha256 of its masked view (canonical JSON).
    Masked, so the version is no oracle for guessing a secret; a change of a secret alone keeps
    the version (the diff still says it changed), a changed key digest does not."""
    return hashlib.sha256(orjson.dumps(masked_view, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# The structured diff


def diff(old, new) -> list[dict]:
    """Every path whose value differs: {"path": [keys], "op": added|removed|changed, "old", "new"}.
    Mappings are compared key by key; a list of mappings that each have a distinct "id" (a
    tenant's keys) by id; other lists whole."""
    out: list[dict] = []
    _diff(_keyed(old), _keyed(new), [], out, MAX_DEPTH)
    return out


def _diff(old, new, path: list, out: list, depth: int) -> None:
    if isinstance(old, dict) and isinstance(new, dict) and depth > 0:
        for k in sorted(set(old) | set(new), key=str):
            here = path + [str(k)]
            if k not in old:
                out.append({"path": here, "op": "added", "new": _unkeyed(new[k])})
            elif k not in new:
                out.append({"path": here, "op": "removed", "old": _unkeyed(old[k])})
            elif old[k] != new[k]:
                _diff(old[k], new[k], here, out, depth - 1)
    elif old != new:
        out.append({"path": path, "op": "changed", "old": _unkeyed(old), "new": _unkeyed(new)})


class _ById(dict):
    """A list of mappings with distinct ids, as a mapping by id (turned back into a list on output)."""


def _keyed(v):
    if isinstance(v, dict):
        return {k: _keyed(x) for k, x in v.items()}
    if (
        isinstance(v, list)
        and v
        and all(isinstance(x, dict) and isinstance(x.get("id"), str) for x in v)
        and len({x["id"] for x in v}) == len(v)
    ):
        return _ById((x["id"], _keyed(x)) for x in v)
    return v


def _unkeyed(v):
    if isinstance(v, _ById):
        return [_unkeyed(x) for x in v.values()]
    if isinstance(v, dict):
        return {k: _unkeyed(x) for k, x in v.items()}
    return v


# ---------------------------------------------------------------------------------------------
# Masking


def mask(value, path: tuple = ()):
    """A copy of `value` (found at `path` in a config view) with every secret masked."""
    if isinstance(value, dict):
        return {k: mask(v, path + (str(k),)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, path) for v in value]
    name = path[-1] if path else ""
    if name == "digest" and isinstance(value, str):
        # A key digest: a fingerprint of it (not of the key), so a rotated key shows as a change.
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:8] + "..."
    if _SECRET_KEY.search(name) or (len(path) >= 2 and path[-2] == "env" and _SECRET_ENV.search(name)):
        return MASK
    if isinstance(value, str):
        if _SECRET_VALUE.search(value):
            return MASK
        return _url_without_password(value)
    return value


def _url_without_password(value: str) -> str:
    if "://" not in value or "@" not in value:
        return value
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return MASK  # unparseable but URL-ish with userinfo: keep nothing
    if not password:
        return value
    netloc = parts.netloc.replace(":" + password + "@", ":" + MASK + "@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def masked_changes(changes: list[dict]) -> list[dict]:
    """The diff's entries with their values masked; a change whose values both mask to the same
    text says only that the secret changed."""
    out = []
    for c in changes:
        path = tuple(c["path"])
        m = {"path": c["path"], "op": c["op"]}
        for side in ("old", "new"):
            if side in c:
                m[side] = mask(c[side], path)
        if c["op"] == "changed" and m["old"] == m["new"]:
            m["new"] = MASKED_CHANGE
        out.append(m)
    return out


def _bounded(changes: list[dict]) -> tuple[list[dict], int]:
    """At most MAX_CHANGES entries, each value at most MAX_VALUE_CHARS of JSON."""
    kept = []
    for c in changes[:MAX_CHANGES]:
        c = dict(c)
        for side in ("old", "new"):
            if side in c:
                text = json.dumps(c[side], sort_keys=True, default=str)
                if len(text) > MAX_VALUE_CHARS:
                    c[side] = text[:MAX_VALUE_CHARS] + f"... ({len(text)} characters)"
        kept.append(c)
    return kept, max(0, len(changes) - MAX_CHANGES)


# ---------------------------------------------------------------------------------------------
# Who


def identify(admin_key: str | None, policies: list[dict]) -> dict:
    """Who makes the change: the OS user and host always, and the admin key's id and tenant when
    `admin_key` is an admin key of one of `policies` (policy dicts: the deployed one, the new one).
    The key itself is never kept; only its digest is compared."""
    from serving.policy.identity import key_digest

    who = {"user": _os_user(), "host": socket.gethostname()}
    if not admin_key:
        return who
    digest = key_digest(admin_key)
    for policy in policies:
        for tenant, t in (policy.get("tenants") or {}).items():
            for k in t.get("keys") or []:
                if k.get("digest") == digest:
                    if k.get("role") == "admin":
                        return {**who, "key_id": k.get("id"), "tenant": tenant}
                    return {**who, "key_note": f"the key given is {tenant}/{k.get('id')}, an app key, not an admin key"}
    return {**who, "key_note": "the key given is not a key of this stack"}


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        return f"uid {os.getuid()}"


def who_text(who: dict | None) -> str:
    if not who:
        return "-"
    where = f"{who.get('user', '?')}@{who.get('host', '?')}"
    if who.get("key_id"):
        return f"{who.get('tenant')}/{who['key_id']} ({where})"
    return where


# ---------------------------------------------------------------------------------------------
# Writing


def plan_summary(plan) -> dict:
    """serving.plan.Plan as data: each model's kind, what the gateways learn, what restarts."""
    return {
        "models": {m.model: m.kind for m in plan.models},
        "gateways": list(plan.gateway),
        "restart": list(plan.restart),
    }


def first_deploy(state) -> dict:
    """The plan of a first deploy (`keel serve`): every model added, no rollout candidates."""
    from serving.plan import ADDED, CANDIDATE_SUFFIX

    return {
        "models": {m: ADDED for m in sorted(state.models) if not m.endswith(CANDIDATE_SUFFIX)},
        "gateways": [],
        "restart": [],
    }


def change_record(
    *, command: str, who: dict, old_view: dict | None, new_view: dict, plan: dict, previous: dict | None = None
) -> dict:
    """The record of one change (outcome not yet set). old_view: the deployed config, unmasked
    (None: nothing deployed); previous: else the last recorded change, whose config is masked."""
    new_masked = mask(new_view)
    prev_version: str | None
    if old_view is not None:
        changes, prev_version = masked_changes(diff(old_view, new_view)), version(mask(old_view))
        against = "deployed"
    elif previous is not None and isinstance(previous.get("config"), dict):
        changes, prev_version = diff(previous["config"], new_masked), previous.get("version")
        against = "recorded"
    else:
        changes, prev_version = diff({}, new_masked), None
        against = "nothing"
    changes, omitted = _bounded(changes)
    rec: dict[str, Any] = {
        "event": EVENT,
        "command": command,
        "who": who,
        "version": version(new_masked),
        "previous_version": prev_version,
        "diff_against": against,
        "changes": changes,
        "plan": plan,
    }
    if omitted:
        rec["changes_omitted"] = omitted
    snapshot = orjson.dumps(new_masked)
    if len(snapshot) <= MAX_SNAPSHOT_BYTES:
        rec["config"] = new_masked
    else:
        rec["config_omitted"] = f"{len(snapshot)} bytes, over {MAX_SNAPSHOT_BYTES}"
    return rec


class ChangeRecorder:
    """Records one change: opened before anything is deployed (so an audit dir that cannot be
    written stops the change, not the record), written once the change ends.

        with ChangeRecorder(cfg, record):   # record: change_record(...)
            deploy()                        # an exception: outcome failed, with its message
    """

    def __init__(self, cfg, record: dict, say=print):
        from serving.rollout.driver import AuditRecords  # the rollout's writer: same dir, chain, key

        self.record = record
        self.outcome: tuple[str, str | None] | None = None
        self._say = say
        self._log = AuditRecords(cfg)
        self._start = time.monotonic()

    def fail(self, error: str) -> None:
        self.outcome = (FAILED, error)

    def __enter__(self) -> ChangeRecorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        outcome: tuple[str, str | None]
        if exc is not None:
            outcome = (FAILED, "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__)
        else:
            outcome = self.outcome or (APPLIED, None)
        rec = {
            **self.record,
            "time": time.time(),
            "duration_s": round(time.monotonic() - self._start, 3),
            "outcome": outcome[0],
        }
        if outcome[1]:
            rec["error"] = outcome[1]
        try:
            self._log(rec)
        except Exception as e:  # noqa: BLE001 - the change happened (or failed) either way: say so, don't hide it
            self._say(
                f"keel {rec.get('command')}: WARNING: the change {outcome[0]}, but its history record "
                f"could not be written to {self._log.log.directory}: {e}"
            )
        finally:
            self._log.close()


# ---------------------------------------------------------------------------------------------
# Reading


_NEEDLES = tuple(b'"event":"%s"' % e.encode() for e in HISTORY_EVENTS)  # canonical JSON: exact bytes


@dataclass
class Entry:
    n: int  # 1 = the oldest record found
    record: dict
    file: Path
    verified: bool | None  # None: not checked


@dataclass
class History:
    entries: list[Entry]
    files: list[Path]  # every audit file read
    failed: dict[Path, list[str]] = field(default_factory=dict)  # verified files with problems

    def last_change(self) -> dict | None:
        """The newest config change that was applied (and kept its config)."""
        for e in reversed(self.entries):
            if e.record.get("event") == EVENT and e.record.get("outcome") == APPLIED and "config" in e.record:
                return e.record
        return None


def read_history(directory: str | Path, *, verify: bool = True, key=None) -> History:
    """Every config change and rollout record in an audit dir (rotated files included), oldest
    first. Only lines that hold the event are parsed: request records are skipped at the speed
    of a byte search. With `verify`, the chains of the files that hold any are checked
    (serving.policy.audit.verify_chain, with `key`'s MACs when given)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such audit directory")
    files = sorted(directory.glob("audit-*.jsonl"))
    found: list[tuple[datetime, str, int, dict, Path]] = []
    for path in files:
        for rec in _history_lines(path):
            found.append((record_time(rec), str(path), rec.get("seq", 0), rec, path))
    found.sort(key=lambda f: f[:3])
    failed: dict[Path, list[str]] = {}
    checked: dict[Path, bool] = {}
    if verify and found:
        from serving.policy.audit import chain_order, verify_chain

        holding = {p for *_, p in found}
        chains = [c for c in chain_order(files) if holding & set(c)]
        for chain in chains:
            for path, result in verify_chain(chain, key=key):
                checked[path] = result.ok
                if not result.ok:
                    failed[path] = result.problems
    entries = [Entry(i + 1, rec, path, checked.get(path)) for i, (_, _, _, rec, path) in enumerate(found)]
    return History(entries, files, failed)


def _history_lines(path: Path):
    try:
        with open(path, "rb") as f:
            # Mapped, not read: a 1 GiB request log is searched without holding it in memory.
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # gone, unreadable, or empty (which cannot be mapped)
        return
    with data:
        yield from _records_at_needles(data)


def _records_at_needles(data):
    starts = set()
    for needle in _NEEDLES:
        i = data.find(needle)
        while i != -1:
            starts.add(data.rfind(b"\n", 0, i) + 1)
            i = data.find(needle, i + len(needle))
    for start in sorted(starts):
        end = data.find(b"\n", start)
        try:
            rec = orjson.loads(data[start : end if end != -1 else len(data)])
        except orjson.JSONDecodeError:
            continue  # a torn line: `keel audit verify` names it
        if isinstance(rec, dict) and rec.get("event") in HISTORY_EVENTS:
            yield rec


def record_time(rec: dict) -> datetime:
    t = rec.get("time")
    try:
        if isinstance(t, (int, float)):
            return datetime.fromtimestamp(t, timezone.utc)
        when = datetime.fromisoformat(str(t))
        return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError, OSError):
        return datetime.min.replace(tzinfo=timezone.utc)
