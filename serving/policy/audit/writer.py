"""The writer: `AuditLog` chains records, appends them in batches, rotates, resumes after restarts."""

from __future__ import annotations

import atexit
import collections
import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import orjson

from serving.policy.audit.files import (
    GENESIS,
    RESERVED_FIELDS,
    AuditError,
    Head,
    fresh_path,
    head_path,
    lines_backward,
    read_head,
    read_last_line,
    record_hash,
    rotated_files,
)
from serving.policy.audit.mac import AuditKey, AuditKeyError, load_key

log = logging.getLogger("serving.policy.audit")

_MAX_SLOTS = 4096
_WAKE_AT_QUEUED = 4096  # a burst this big is written now rather than at the next tick
_MAX_ADOPTED = 100_000  # records past a head a restarted writer checks before giving up on the file


class AuditLog:
    """The writer. `write` only enqueues; a background thread chains and appends in batches."""

    def __init__(
        self,
        directory: str | Path,
        *,
        flush_interval_s: float = 0.2,
        fsync: bool = False,
        max_file_bytes: int | None = None,
        hmac_key_file: str | Path | None = None,
    ):
        """max_file_bytes: rotate the file once it is this big (None: never). hmac_key_file: MAC
        every record and head with this key (see serving.policy.audit.mac)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._flush_interval_s = flush_interval_s
        self._fsync = fsync
        self._max_file_bytes = self._rotate_at = max_file_bytes
        try:
            self._key: AuditKey | None = load_key(hmac_key_file) if hmac_key_file is not None else None
        except AuditKeyError as e:
            raise AuditError(str(e)) from None
        self._lock_fd, self.slot, (self._next_seq, self._prev, self._start) = _claim_slot(self.directory, self._key)
        try:
            self.path = self.directory / f"audit-{self.slot}.jsonl"
            self._head_path = head_path(self.path)
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
        if "seq" in record or "prev" in record or "hash" in record or "mac" in record:
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
            log.error("audit log %s: closing with %d bytes that could not be written", self.path, len(self._unwritten))
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
                self._unwritten = data[e.written :]
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
        # `body` is the canonical form; appending "hash" (and "mac") as the last keys keeps it recoverable.
        if self._key is None:
            return b"".join((body[:-1], b',"hash":"', digest.encode(), b'"}\n'))
        mac = self._key.record_mac(digest)
        return b"".join((body[:-1], b',"hash":"', digest.encode(), b'","mac":"', mac.encode(), b'"}\n'))

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
        fresh = fresh_path(self.path)
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
        head = Head(self._next_seq - 1, self._prev, self._start)
        if self._key is not None:
            head = Head(head.seq, head.hash, head.start, self._key.id)
            head = Head(head.seq, head.hash, head.start, head.key_id, self._key.head_mac(head))
        tmp = self._head_path.with_name(self._head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, head.to_json())  # a few dozen bytes: one write
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


class _ForeignChain(Exception):
    """A slot's files this writer must not continue; str() says why."""


def _claim_slot(directory: Path, key: AuditKey | None) -> tuple[int, int, tuple[int, str, tuple[int, str]]]:
    """Lock the smallest free `audit-<n>.jsonl.lock` whose chain this writer may continue, and
    where to continue it. The lock lives as long as the fd."""
    for n in range(_MAX_SLOTS):
        fd = os.open(directory / f"audit-{n}.jsonl.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            position = _resume(directory, n, key)
        except _ForeignChain as e:
            # Left exactly as it is, for `keel audit verify` and an operator; this writer starts
            # or continues a chain in another slot.
            log.error("audit log %s: not continuing audit-%d (%s); writing to the next free slot", directory, n, e)
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for an operator
        return fd, n, position
    raise AuditError(
        f"{directory}: all {_MAX_SLOTS} audit slots are locked by other processes "
        "or hold chains this writer may not continue"
    )


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


def _resume(directory: Path, slot: int, key: AuditKey | None) -> tuple[int, str, tuple[int, str]]:
    """(next seq, prev hash, where the current file's chain starts) for a slot's writer;
    _ForeignChain if it was written with another key (or none), or fails its MACs."""
    path = directory / f"audit-{slot}.jsonl"
    fresh_path(path).unlink(missing_ok=True)  # made by a rotation a crash cut short
    if path.exists() and (path.stat().st_size > 0 or head_path(path).exists()):
        head = _trusted_head(path, key)
        next_seq, prev = _resume_point(path, head, key)
        return next_seq, prev, head.start if head is not None else (0, GENESIS)
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
    next_seq, prev = _resume_point(newest, _trusted_head(newest, key), key)
    return next_seq, prev, (next_seq, prev)


def _trusted_head(path: Path, key: AuditKey | None) -> Head | None:
    """The file's head if this writer may continue after it (None: no head, and no key)."""
    head = read_head(path)
    if key is None:
        if head is not None and head.key_id is not None:
            raise _ForeignChain(f"{path.name} was written with an HMAC key (id {head.key_id}) and none is configured")
        return head
    if head is None:
        raise _ForeignChain(f"{path.name} has no readable head, so where it ends cannot be authenticated")
    if head.key_id != key.id:
        raise _ForeignChain(
            f"{path.name} was written "
            + ("without an HMAC key" if head.key_id is None else f"with another HMAC key (id {head.key_id})")
            + f"; the configured key is {key.id}"
        )
    if not key.head_ok(head):
        raise _ForeignChain(f"the MAC of {head_path(path).name} does not match: it was forged or altered")
    return head


def _resume_point(path: Path, head: Head | None, key: AuditKey | None) -> tuple[int, str]:
    """(next seq, prev hash) to continue this file's chain after a restart."""
    last = None
    if path.exists():
        line, complete_end, size = read_last_line(path)
        if complete_end < size:
            # A torn write from a crash: never acknowledged by flush(), and it would corrupt
            # the next line, so it goes.
            log.warning(
                "audit log %s: removing an incomplete last line (%d bytes) left by a crash", path, size - complete_end
            )
            os.truncate(path, complete_end)
        if line is not None:
            try:
                doc = orjson.loads(line)
                last = (doc["seq"], doc["hash"])
                if not isinstance(last[0], int) or not isinstance(last[1], str):
                    raise TypeError
            except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                if key is not None:
                    raise _ForeignChain(f"{path.name}: its last line is not an audit record") from None
                raise AuditError(
                    f"{path}: the last line is not an audit record, so its chain cannot be "
                    f"continued; run `keel audit verify {path}` and move the file aside "
                    f"({type(e).__name__})"
                ) from None
    if last is None and head is None:
        return 0, GENESIS
    # The head wins a tie or when ahead: records lost from the tail then show up as a gap in the
    # chain instead of being papered over.
    if last is None or (head is not None and head.seq >= last[0]):
        assert head is not None  # last is None here only with a head (neither: returned above)
        if last is not None and (head.seq, head.hash) != last:
            log.warning(
                "audit log %s: the file ends at seq %d but its head says %d; continuing after "
                "the head, so `keel audit verify` will show the gap",
                path,
                last[0],
                head.seq,
            )
        return head.seq + 1, head.hash
    # Records past the head: a crash between writing a batch and its head, or someone else's.
    # With a key only the writer's own (MACs that match, chained from the head) are continued.
    if head is not None:
        if key is not None:
            _check_past_head(path, head, key)
        log.warning(
            "audit log %s: records %d to %d are past the head (a crash before it was updated); continuing after them",
            path,
            head.seq + 1,
            last[0],
        )
    return last[0] + 1, last[1]


def _check_past_head(path: Path, head: Head, key: AuditKey) -> None:
    """_ForeignChain unless the records after the head follow it and carry this key's MACs."""
    past: list[dict] = []
    for raw in lines_backward(path):
        try:
            rec = orjson.loads(raw)
            seq = rec["seq"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise _ForeignChain(f"{path.name}: a line past its head is not an audit record") from None
        if not isinstance(seq, int) or seq <= head.seq:
            break
        past.append(rec)
        if len(past) > _MAX_ADOPTED:
            raise _ForeignChain(f"{path.name}: more than {_MAX_ADOPTED} records past its head")
    seq, digest = head.seq, head.hash
    for rec in reversed(past):
        stored, mac = rec.pop("hash", None), rec.pop("mac", None)
        if (
            rec.get("seq") != seq + 1
            or rec.get("prev") != digest
            or not isinstance(stored, str)
            or record_hash(rec) != stored
            or not key.record_ok(stored, mac)
        ):
            raise _ForeignChain(
                f"{path.name}: seq {rec.get('seq')} past its head does not carry this key's "
                "MAC or does not follow the head: appended by someone else"
            )
        seq, digest = seq + 1, stored
