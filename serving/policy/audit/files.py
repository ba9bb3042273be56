"""What the writer and `verify` agree on: a record's canonical bytes and hash, file names, heads."""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import orjson

log = logging.getLogger("serving.policy.audit")

GENESIS = "0" * 64
RESERVED_FIELDS = ("seq", "prev", "hash", "mac")
_TAIL_CHUNK = 64 * 1024


class AuditError(RuntimeError):
    """The audit file cannot be continued safely; an operator has to look at it."""


def canonical_json(record: dict) -> bytes:
    """The exact bytes a record's hash covers (the writer and `verify` both use this)."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def record_hash(record: dict) -> str:
    """The hash of a record that carries `seq` and `prev` (and no `hash` or `mac`)."""
    return hashlib.sha256(canonical_json(record)).hexdigest()


def head_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".head")


def fresh_path(path: Path) -> Path:
    """Where a rotation makes the next file before renaming it into place."""
    return path.with_name(path.name + ".new")


# audit-<slot>.jsonl (the current file) or audit-<slot>.<first seq, 12 digits>[-<n>].jsonl (rotated;
# -<n> only if a restarted chain meets an older file that starts at the same seq).
_FILE_NAME = re.compile(r"audit-(\d+)(?:\.(\d{12})(?:-(\d+))?)?\.jsonl")


def _chain_position(m: re.Match) -> tuple:
    """Where a file named by m comes in its slot's chain: rotated ones by first seq, then the current."""
    return (0, int(m.group(2)), int(m.group(3) or 0)) if m.group(2) else (1, 0, 0)


def rotated_files(directory: Path, slot: int) -> list[Path]:
    """A slot's rotated files, in chain order."""
    found = [
        (m, p) for p in directory.glob(f"audit-{slot}.*.jsonl") if (m := _FILE_NAME.fullmatch(p.name)) and m.group(2)
    ]
    return [p for m, p in sorted(found, key=lambda mp: _chain_position(mp[0]))]


def chain_order(paths: list[Path]) -> list[list[Path]]:
    """Audit files grouped into chains: per directory and slot, the rotated files by their first
    seq, then the current file. A file named otherwise is a chain of its own."""
    slots: dict[tuple[str, int], list[tuple[tuple, Path]]] = {}
    alone = []
    for p in dict.fromkeys(Path(p) for p in paths):  # each once, in the order given
        m = _FILE_NAME.fullmatch(p.name)
        if m is None:
            alone.append([p])
        else:
            slots.setdefault((str(p.parent.resolve()), int(m.group(1))), []).append((_chain_position(m), p))
    return [[p for _, p in sorted(files)] for _, files in sorted(slots.items())] + alone


@dataclass(frozen=True)
class Head:
    """`<file>.head`: the last record written (seq -1 and the start's prev before the first), where
    the file's chain starts, and with an HMAC key, the key's id and a MAC over all of it."""

    seq: int
    hash: str
    start: tuple[int, str]
    key_id: str | None = None
    mac: str | None = None

    def signed(self) -> dict:
        """The fields its MAC covers."""
        return {
            "seq": self.seq,
            "hash": self.hash,
            "start_seq": self.start[0],
            "start_prev": self.start[1],
            "key_id": self.key_id,
        }

    def to_json(self) -> bytes:
        doc = {"seq": self.seq, "hash": self.hash, "start_seq": self.start[0], "start_prev": self.start[1]}
        if self.key_id is not None:
            doc.update(key_id=self.key_id, mac=self.mac)
        return orjson.dumps(doc) + b"\n"


def read_head(path: Path) -> Head | None:
    """The head beside a file; None when there is none or it cannot be read (logged). Heads written
    before rotation existed lack the start, which was then always 0 and GENESIS."""
    try:
        doc = orjson.loads(head_path(path).read_bytes())
        head = Head(
            doc["seq"],
            doc["hash"],
            (doc.get("start_seq", 0), doc.get("start_prev", GENESIS)),
            doc.get("key_id"),
            doc.get("mac"),
        )
        if (
            isinstance(head.seq, int)
            and isinstance(head.hash, str)
            and isinstance(head.start[0], int)
            and isinstance(head.start[1], str)
            and isinstance(head.key_id, (str, type(None)))
            and isinstance(head.mac, (str, type(None)))
        ):
            return head
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        pass
    log.warning("audit log %s: ignoring an unreadable head file", path)
    return None


def read_last_line(path: Path) -> tuple[bytes | None, int, int]:
    """(last complete line or None, offset where complete lines end, file size)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        buf = b""
        pos = size
        while pos > 0:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            end = buf.rfind(b"\n")
            if end == -1:
                continue
            start = buf.rfind(b"\n", 0, end)
            if start != -1 or pos == 0:
                return buf[start + 1 : end + 1], pos + end + 1, size
        return None, 0, size


def lines_backward(path: Path):
    """The file's lines, last first (a torn last line included as it is)."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        rest = b""
        while pos > 0:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            f.seek(pos)
            lines = (f.read(step) + rest).split(b"\n")
            rest = lines[0]  # may continue in the chunk before
            for line in reversed(lines[1:]):
                if line:
                    yield line
        if rest:
            yield rest


def tail(path: str | Path, n: int = 10) -> list[dict]:
    """The last `n` records of a file, parsed (lines that are not JSON are skipped)."""
    with open(path, "rb") as f:
        lines = collections.deque(f, maxlen=n)
    out = []
    for line in lines:
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return out
