"""The audit trail: one record per request, append-only JSONL with a hash chain.

Each line is the caller's record plus `seq` (0, 1, 2, ... per file), `prev` (the previous
record's hash, "0"*64 for the first) and `hash`: sha256 over the canonical JSON of the record
including `seq` and `prev` but not `hash`. Canonical JSON is orjson with sorted keys: compact,
UTF-8 (no ASCII escaping), floats in shortest round-trip form; the stdlib's `json.dumps(r,
sort_keys=True, separators=(",", ":"), ensure_ascii=False)` gives the same bytes except for floats
it writes with a two-digit exponent (1e-07 vs 1e-7). A line is that canonical body with `"hash"`
appended as its last key. Unserialisable values are written as str(); a field that still fails
(e.g. a dict with int keys) is dropped and named in `audit_error`.

Beside each file the writer keeps `<file>.head` ({"seq", "hash"} of the last record written,
seq -1 before the first), replaced atomically after every batch, so `verify` can tell a file
whose tail was cut off from one that simply ended. A file verified without its head is not OK:
the writer always makes one; `verify(..., require_head=False)` (`keel audit verify --no-head`)
checks a copy shipped without it, and says the tail was not checked.

Several gateway processes share a directory: each holds an exclusive flock on
`audit-<n>.jsonl.lock` for the smallest free n and alone writes `audit-<n>.jsonl`; a restarted
process that gets the same n continues that file's chain.

Rotation (`max_file_bytes`): once `audit-<n>.jsonl` reaches the size, it and its head are
renamed `audit-<n>.<its first seq>.jsonl` (+ `.head`) and a new `audit-<n>.jsonl` continues the
same chain: its first record's seq follows the last one's and its prev is that record's hash.
A head also records where its file's chain starts (`start_seq`, `start_prev`; 0 and "0"*64
for a first file), so records removed from the start of a continuation file show too, and
`verify_chain` checks that each file starts exactly where the one before it ended (a missing,
reordered or replaced file breaks that). Keel never deletes rotated files: ship them off the
host, then remove them there.

The chain makes accidental damage and naive edits visible; it is not a signature: someone who can
rewrite the file and its head can forge a consistent chain. Ship files off the host for that.
"""

from __future__ import annotations

import atexit
import collections
import fcntl
import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

GENESIS = "0" * 64
RESERVED_FIELDS = ("seq", "prev", "hash")
_MAX_SLOTS = 4096
_WAKE_AT_QUEUED = 4096  # a burst this big is written now rather than at the next tick
_TAIL_CHUNK = 64 * 1024


class AuditError(RuntimeError):
    """The audit file cannot be continued safely; an operator has to look at it."""


def canonical_json(record: dict) -> bytes:
    """The exact bytes a record's hash covers (the writer and `verify` both use this)."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def record_hash(record: dict) -> str:
    """The hash of a record that carries `seq` and `prev` (and no `hash`)."""
    return hashlib.sha256(canonical_json(record)).hexdigest()


def head_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".head")


# audit-<slot>.jsonl (the current file) or audit-<slot>.<first seq, 12 digits>[-<n>].jsonl (rotated;
# -<n> only if a restarted chain meets an older file that starts at the same seq).
_FILE_NAME = re.compile(r"audit-(\d+)(?:\.(\d{12})(?:-(\d+))?)?\.jsonl")


def _chain_position(m: re.Match) -> tuple:
    """Where a file named by m comes in its slot's chain: rotated ones by first seq, then the current."""
    return (0, int(m.group(2)), int(m.group(3) or 0)) if m.group(2) else (1, 0, 0)


def rotated_files(directory: Path, slot: int) -> list[Path]:
    """A slot's rotated files, in chain order."""
    found = [(m, p) for p in directory.glob(f"audit-{slot}.*.jsonl")
             if (m := _FILE_NAME.fullmatch(p.name)) and m.group(2)]
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


class AuditLog:
    """The writer. `write` only enqueues; a background thread chains and appends in batches."""

    def __init__(self, directory: str | Path, *, flush_interval_s: float = 0.2, fsync: bool = False,
                 max_file_bytes: int | None = None):
        """max_file_bytes: rotate the file once it is this big (None: never)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._flush_interval_s = flush_interval_s
        self._fsync = fsync
        self._max_file_bytes = self._rotate_at = max_file_bytes
        self._lock_fd, self.slot = _claim_slot(self.directory)
        try:
            self.path = self.directory / f"audit-{self.slot}.jsonl"
            self._head_path = head_path(self.path)
            self._next_seq, self._prev, self._start = _resume(self.directory, self.slot)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._size = os.fstat(self._fd).st_size
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._rotate_at = max_file_bytes
        self._write_head()
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._unwritten = b""  # bytes already chained but not yet on disk (after a write error)
        self._flush_waiters: list[threading.Event] = []
        self._thread = threading.Thread(target=self._run, name=f"keel-audit-{self.slot}", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # -- caller side (the gateway's event loop) --------------------------------------------------

    def write(self, record: dict) -> None:
        """Enqueue one record. Serialisation happens on the writer thread: don't mutate nested
        values of `record` afterwards (the top level is copied)."""
        if self._closed:
            raise RuntimeError(f"audit log {self.path} is closed")
        if "seq" in record or "prev" in record or "hash" in record:
            raise ValueError(f"audit records must not set {', '.join(RESERVED_FIELDS)}: the log adds them")
        q = self._queue
        q.append(dict(record))
        if len(q) == _WAKE_AT_QUEUED:
            self._wake.set()

    def flush(self, timeout: float = 5) -> None:
        """Block until every record enqueued before this call is on disk (and its head written)."""
        if self._closed:
            return
        done = threading.Event()
        self._queue.append(done)
        self._wake.set()
        if not done.wait(timeout):
            raise TimeoutError(f"audit log {self.path}: records not on disk after {timeout}s")

    def close(self) -> None:
        """Write everything enqueued, then release the file. Safe to call twice (atexit does)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._drain()  # a write that raced with close
        if self._unwritten:
            log.error("audit log %s: closing with %d bytes that could not be written",
                      self.path, len(self._unwritten))
        os.close(self._fd)
        os.close(self._lock_fd)  # releases the flock: the slot is free for the next process
        atexit.unregister(self.close)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()
            try:
                self._drain()
            except Exception:  # the thread must survive anything: the next tick retries
                log.exception("audit log %s: writing a batch failed", self.path)
            if self._stopping and not self._queue:
                return

    def _drain(self) -> None:
        q = self._queue
        lines: list[bytes] = []
        while q:
            item = q.popleft()
            if isinstance(item, threading.Event):
                self._flush_waiters.append(item)
            else:
                lines.append(self._chain(item))
        if lines or self._unwritten:
            data = self._unwritten + b"".join(lines) if self._unwritten else b"".join(lines)
            try:
                _write_all(self._fd, data)
            except _PartialWrite as e:
                # Keep the chained bytes, in order, for the next tick; flush() waiters wait for them.
                if not self._unwritten:
                    log.error("audit log %s: cannot write: %s (retrying every tick)", self.path, e.error)
                self._unwritten = data[e.written:]
                return
            if self._unwritten:
                log.warning("audit log %s: writes succeed again", self.path)
                self._unwritten = b""
            if self._fsync:
                os.fsync(self._fd)
            self._size += len(data)
            self._write_head()
            if self._rotate_at is not None and self._size >= self._rotate_at:
                self._rotate()
        for ev in self._flush_waiters:
            ev.set()
        self._flush_waiters.clear()

    def _chain(self, record: dict) -> bytes:
        record["seq"] = self._next_seq
        record["prev"] = self._prev
        body = _serialise(record)
        digest = hashlib.sha256(body).hexdigest()
        self._next_seq += 1
        self._prev = digest
        # `body` is the canonical form; appending "hash" as the last key keeps it recoverable.
        return b"".join((body[:-1], b',"hash":"', digest.encode(), b'"}\n'))

    def resize(self, max_file_bytes: int | None) -> None:
        """A new rotation size for the file being written (a policy reload that changed only it)."""
        self._max_file_bytes = self._rotate_at = max_file_bytes

    def _rotate(self) -> None:
        """The full file and its head are renamed aside; a new file continues the chain.

        A new empty file is made first under a temporary name, then three renames: the full
        file, its head, the new file into place, each undone if a later one fails. A crash in
        between leaves a state `_resume` completes."""
        first = self._start[0]
        rotated = self.directory / f"audit-{self.slot}.{first:012d}.jsonl"
        n = 0
        while rotated.exists() or head_path(rotated).exists():  # a restarted chain met an older file
            n += 1
            rotated = self.directory / f"audit-{self.slot}.{first:012d}-{n}.jsonl"
        fresh = _fresh_path(self.path)
        max_bytes = self._max_file_bytes  # once: a reload may change it from the loop's thread
        try:
            fd = os.open(fresh, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                _rename_all([(self.path, rotated), (self._head_path, head_path(rotated)), (fresh, self.path)])
            except OSError:
                os.close(fd)
                fresh.unlink(missing_ok=True)
                raise
        except OSError as e:
            # Keep writing where we are; try again after another tenth of the size.
            self._rotate_at = None if max_bytes is None else self._size + max(1, max_bytes // 10)
            log.error("audit log %s: cannot rotate (%s); still writing to it", self.path, e)
            return
        os.close(self._fd)
        self._fd, self._size = fd, 0
        self._rotate_at = max_bytes
        self._start = (self._next_seq, self._prev)
        self._write_head()
        log.info("audit log %s: rotated to %s at seq %d", self.path, rotated.name, self._next_seq - 1)

    def _write_head(self) -> None:
        head = orjson.dumps({"seq": self._next_seq - 1, "hash": self._prev,
                             "start_seq": self._start[0], "start_prev": self._start[1]})
        tmp = self._head_path.with_name(self._head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, head + b"\n")  # a few dozen bytes: one write
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._head_path)


class _PartialWrite(Exception):
    def __init__(self, written: int, error: OSError):
        super().__init__(str(error))
        self.written = written
        self.error = error


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    written = 0
    while written < len(view):
        try:
            written += os.write(fd, view[written:])
        except OSError as e:
            raise _PartialWrite(written, e) from e


def _serialise(record: dict) -> bytes:
    """Canonical bytes of a record; a field that cannot be serialised is dropped and named."""
    try:
        return orjson.dumps(record, option=orjson.OPT_SORT_KEYS, default=str)
    except (TypeError, orjson.JSONEncodeError) as first_error:
        kept: dict[str, Any] = {}
        dropped = []
        for k, v in record.items():
            if not isinstance(k, str):
                dropped.append(repr(k))
                continue
            try:
                orjson.dumps(v, option=orjson.OPT_SORT_KEYS, default=str)
            except (TypeError, orjson.JSONEncodeError):
                dropped.append(k)
                continue
            kept[k] = v
        kept["audit_error"] = f"fields dropped, not serialisable: {', '.join(dropped)} ({first_error})"
        return orjson.dumps(kept, option=orjson.OPT_SORT_KEYS, default=str)


def _claim_slot(directory: Path) -> tuple[int, int]:
    """Lock the smallest free `audit-<n>.jsonl.lock`; the lock lives as long as the fd."""
    for n in range(_MAX_SLOTS):
        fd = os.open(directory / f"audit-{n}.jsonl.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for an operator
        return fd, n
    raise AuditError(f"{directory}: all {_MAX_SLOTS} audit slots are locked by other processes")


def _read_last_line(path: Path) -> tuple[bytes | None, int, int]:
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
                return buf[start + 1:end + 1], pos + end + 1, size
        return None, 0, size


def _read_head_doc(path: Path) -> dict | None:
    """The head sidecar: {"seq", "hash", "start_seq", "start_prev"}; heads written before
    rotation existed lack the start, which was then always 0 and GENESIS."""
    try:
        doc = orjson.loads(head_path(path).read_bytes())
        seq, digest = doc["seq"], doc["hash"]
        start = (doc.get("start_seq", 0), doc.get("start_prev", GENESIS))
        if isinstance(seq, int) and isinstance(digest, str) and isinstance(start[0], int) \
                and isinstance(start[1], str):
            return {"seq": seq, "hash": digest, "start": start}
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        pass
    log.warning("audit log %s: ignoring an unreadable head file", path)
    return None


def _rename_all(pairs: list[tuple[Path, Path]]) -> None:
    """Each rename in turn; if one fails, those done are undone (last first) and it raises."""
    done: list[tuple[Path, Path]] = []
    try:
        for src, dst in pairs:
            os.rename(src, dst)
            done.append((src, dst))
    except OSError:
        for src, dst in reversed(done):
            os.rename(dst, src)
        raise


def _fresh_path(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def _resume(directory: Path, slot: int) -> tuple[int, str, tuple[int, str]]:
    """(next seq, prev hash, where the current file's chain starts) for a slot's writer."""
    path = directory / f"audit-{slot}.jsonl"
    _fresh_path(path).unlink(missing_ok=True)  # made by a rotation a crash cut short
    if path.exists() and (path.stat().st_size > 0 or head_path(path).exists()):
        doc = _read_head_doc(path)
        next_seq, prev = _resume_point(path, doc)
        return next_seq, prev, doc["start"] if doc is not None else (0, GENESIS)
    # No current file, or an empty one a rotation put in place just before a crash (its head
    # not yet written): the chain goes on from the newest rotated file.
    rotated = rotated_files(directory, slot)
    if not rotated:
        return 0, GENESIS, (0, GENESIS)
    newest = rotated[-1]
    stale = head_path(path)
    if not head_path(newest).exists() and stale.exists():
        # A rotation stopped between renaming the file and its head: finish it.
        os.rename(stale, head_path(newest))
        log.warning("audit log %s: finished an interrupted rotation (moved its head)", newest)
    next_seq, prev = _resume_point(newest, _read_head_doc(newest))
    return next_seq, prev, (next_seq, prev)


def _resume_point(path: Path, head_doc: dict | None) -> tuple[int, str]:
    """(next seq, prev hash) to continue this file's chain after a restart (head_doc: its head)."""
    head = (head_doc["seq"], head_doc["hash"]) if head_doc is not None else None
    last = None
    if path.exists():
        line, complete_end, size = _read_last_line(path)
        if complete_end < size:
            # A torn write from a crash: never acknowledged by flush(), and it would corrupt
            # the next line, so it goes.
            log.warning("audit log %s: removing an incomplete last line (%d bytes) left by a crash",
                        path, size - complete_end)
            os.truncate(path, complete_end)
        if line is not None:
            try:
                doc = orjson.loads(line)
                last = (doc["seq"], doc["hash"])
                if not isinstance(last[0], int) or not isinstance(last[1], str):
                    raise TypeError
            except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                raise AuditError(f"{path}: the last line is not an audit record, so its chain cannot be "
                                 f"continued; run `keel audit verify {path}` and move the file aside "
                                 f"({type(e).__name__})") from None
    if last is None and head is None:
        return 0, GENESIS
    # The head wins a tie or when ahead: records lost from the tail then show up as a gap in the
    # chain instead of being papered over. A head behind the file is a crash before its update.
    if last is None or (head is not None and head[0] >= last[0]):
        if last is not None and head != last:
            log.warning("audit log %s: the file ends at seq %d but its head says %d; continuing after "
                        "the head, so `keel audit verify` will show the gap", path, last[0], head[0])
        return head[0] + 1, head[1]
    return last[0] + 1, last[1]


# -- verification -------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    ok: bool
    records: int
    problems: list[str]  # each names a line number; any problem makes ok False
    warnings: list[str] = field(default_factory=list)  # worth knowing, but the file still verifies
    start: tuple[int, str] | None = None  # (seq, prev) the file's chain starts from
    end: tuple[int, str] | None = None  # (seq, hash) of its last record (start - 1 and start prev if none)


def verify(path: str | Path, *, require_head: bool = True) -> VerifyResult:
    """Check a file's chain line by line, its start and its last record against the head sidecar."""
    path = Path(path)
    problems: list[str] = []
    warnings: list[str] = []
    records = 0
    head_doc = _read_head_doc(path)
    # Where the chain starts: from the head; without one, from the first record (checked below).
    start = head_doc["start"] if head_doc is not None else None
    next_seq = start[0] if start else 0  # one past the highest seq seen
    last: tuple[int, int, str] | None = None  # (line, seq, hash) of the last record line
    recent: dict[int, tuple[int, str]] = {}  # seq -> (line, hash), for prev checks after a reorder
    try:
        f = open(path, "rb")
    except OSError as e:
        return VerifyResult(False, 0, [f"cannot read: {e.strerror}"])
    with f:
        lineno = 0
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                problems.append(f"line {lineno}: incomplete last line (a write was cut off)")
                break
            if not raw.strip():
                problems.append(f"line {lineno}: empty line")
                continue
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                problems.append(f"line {lineno}: not JSON")
                continue
            if not isinstance(rec, dict):
                problems.append(f"line {lineno}: not a JSON object")
                continue
            stored = rec.pop("hash", None)
            seq, prev = rec.get("seq"), rec.get("prev")
            if not isinstance(stored, str) or not isinstance(seq, int) or not isinstance(prev, str):
                problems.append(f"line {lineno}: not an audit record (needs seq, prev and hash)")
                continue
            records += 1
            if start is None:  # no head: the file's first record says where it starts
                start = (seq, prev)
                next_seq = seq
                if seq != 0:
                    warnings.append(f"starts at seq {seq}, continuing an earlier file: without the head "
                                    "it is not checked whether records were cut from the start")
            try:
                actual = record_hash(rec)
            except (TypeError, orjson.JSONEncodeError):
                actual = None
            if actual != stored:
                problems.append(f"line {lineno}: record was altered (seq {seq}: its hash does not match its content)")
            if seq > next_seq:
                missing = seq - next_seq
                if last is None:
                    problems.append(f"line {lineno}: the file's chain starts at seq {next_seq} but its first "
                                    f"record is seq {seq}: {missing} record(s) removed from the start")
                else:
                    problems.append(f"line {lineno}: seq jumps from {next_seq - 1} to {seq}: "
                                    f"{missing} record(s) missing before this line")
            elif seq < next_seq:
                where = recent.get(seq)
                problems.append(f"line {lineno}: seq {seq} comes after seq {next_seq - 1}: records out of order"
                                + (f" or duplicated (seq {seq} also on line {where[0]})" if where else ""))
            if seq == start[0]:
                expected_prev, prev_line = start[1], None
            elif seq - 1 in recent:
                prev_line, expected_prev = recent[seq - 1]
            else:
                expected_prev = None  # its predecessor is missing: already reported as a gap
            if expected_prev is not None and prev != expected_prev:
                what = f"the hash of seq {seq - 1} (line {prev_line})" if prev_line else "where the file's chain starts"
                problems.append(f"line {lineno}: prev does not match {what}: a record before it was "
                                "altered and re-hashed, or replaced")
            recent[seq] = (lineno, stored)
            if len(recent) > 1024:
                del recent[next(iter(recent))]
            next_seq = max(next_seq, seq + 1)
            last = (lineno, seq, stored)

    if start is None:  # no head, no records
        start = (0, GENESIS)
    head = (head_doc["seq"], head_doc["hash"]) if head_doc is not None else None
    if head is None:
        if head_path(path).exists():
            problems.append(f"head file {head_path(path).name} is unreadable: the tail cannot be checked")
        elif require_head:
            problems.append(f"no head file {head_path(path).name}: cannot tell whether records were cut "
                            "from the end (verify a copy without it with --no-head)")
        else:
            warnings.append("no head file: not checked whether records were cut from the end")
    else:
        head_seq, head_hash = head
        last_line, last_seq, last_hash = last if last else (lineno, start[0] - 1, start[1])
        if head_seq > last_seq:
            problems.append(f"line {last_line}: the file ends at seq {last_seq} but its head records seq "
                            f"{head_seq}: {head_seq - last_seq} record(s) removed from the end")
        elif head_seq == last_seq and head_hash != last_hash:
            problems.append(f"line {last_line}: the last record (seq {last_seq}) is not the one its head "
                            "records: it was replaced")
        elif head_seq < last_seq:
            at = recent.get(head_seq)
            if at is not None and at[1] != head_hash:
                problems.append(f"line {at[0]}: seq {head_seq} is not the record its head records: it was replaced")
            else:
                warnings.append(f"the head is behind the file (seq {head_seq} of {last_seq}): the writer "
                                "stopped before updating it, e.g. a crash")
    end = (last[1], last[2]) if last else (start[0] - 1, start[1])
    return VerifyResult(ok=not problems, records=records, problems=problems, warnings=warnings,
                        start=start, end=end)


def verify_chain(paths: list[Path], *, require_head: bool = True) -> list[tuple[Path, VerifyResult]]:
    """verify() each file of one chain (oldest first, see chain_order), and that each file
    starts exactly where the one before it ended; a break is a problem of the later file."""
    out = []
    before: tuple[Path, VerifyResult] | None = None
    for path in paths:
        result = verify(path, require_head=require_head)
        if before is not None and before[1].end is not None and result.start is not None:
            (end_seq, end_hash), (start_seq, start_prev) = before[1].end, result.start
            if (start_seq, start_prev) != (end_seq + 1, end_hash):
                result.problems.append(
                    f"does not continue {before[0].name}, which ends at seq {end_seq}: this file starts at "
                    f"seq {start_seq}" + ("" if start_seq != end_seq + 1 else " after another hash")
                    + ": a file between them is missing, or one of them was replaced")
                result.ok = False
        out.append((path, result))
        before = (path, result)
    return out


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
