"""`keel audit verify`: each file's chain, its ends against its head, the links between rotated
files, and with the HMAC key every record's and head's MAC."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from serving.policy.audit.files import GENESIS, Head, head_path, read_head, record_hash
from serving.policy.audit.mac import AuditKey

_MAC_PROBLEMS_SHOWN = 10  # a file written with no key or another one would fail on every line
_LIVE_ROUNDS = 10  # re-reads of the head of a file a writer is appending to
_LIVE_WAIT_S = 0.05
_LIVE_IF_WRITTEN_WITHIN_S = 5.0


@dataclass
class VerifyResult:
    ok: bool
    records: int
    problems: list[str]  # each names a line number or the head; any problem makes ok False
    warnings: list[str] = field(default_factory=list)  # worth knowing, but the file still verifies
    start: tuple[int, str] | None = None  # (seq, prev) the file's chain starts from
    end: tuple[int, str] | None = None  # (seq, hash) of its last record (start - 1 and start prev if none)
    authenticated: bool = False  # a key was given, and the head and every record carry its MACs


class _Records:
    """Reads a file's records line by line, checking each one and its place in the chain."""

    def __init__(self, start: tuple[int, str] | None, key: AuditKey | None, problems: list, warnings: list):
        self.start = start  # where the chain starts: from the head, else from the first record
        self.key = key  # check each record's MAC with it (None: don't)
        self.problems, self.warnings = problems, warnings
        self.next_seq = start[0] if start else 0  # one past the highest seq seen
        self.records = 0
        self.lineno = 0
        self.last: tuple[int, int, str] | None = None  # (line, seq, hash) of the last record line
        self.recent: dict[int, tuple[int, str]] = {}  # seq -> (line, hash), for prev checks after a reorder
        self.partial: int | None = None  # line number of an incomplete last line
        self.bad_macs = 0
        self.last_bad_mac = -1  # the highest seq whose MAC does not match

    @property
    def last_seq(self) -> int:
        return self.last[1] if self.last else (self.start[0] - 1 if self.start else -1)

    def read(self, f) -> None:
        """Every complete line from where the last call stopped; an incomplete one is left unread."""
        while True:
            pos = f.tell()
            raw = f.readline()
            if not raw:
                return
            if not raw.endswith(b"\n"):
                f.seek(pos)  # a writer may still be finishing it
                self.partial = self.lineno + 1
                return
            self.partial = None
            self.lineno += 1
            self._line(self.lineno, raw)

    def _line(self, lineno: int, raw: bytes) -> None:
        problems = self.problems
        if not raw.strip():
            problems.append(f"line {lineno}: empty line")
            return
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError:
            problems.append(f"line {lineno}: not JSON")
            return
        if not isinstance(rec, dict):
            problems.append(f"line {lineno}: not a JSON object")
            return
        stored, mac = rec.pop("hash", None), rec.pop("mac", None)
        seq, prev = rec.get("seq"), rec.get("prev")
        if not isinstance(stored, str) or not isinstance(seq, int) or not isinstance(prev, str):
            problems.append(f"line {lineno}: not an audit record (needs seq, prev and hash)")
            return
        self.records += 1
        if self.start is None:  # no head: the file's first record says where it starts
            self.start = (seq, prev)
            self.next_seq = seq
            if seq != 0:
                self.warnings.append(
                    f"starts at seq {seq}, continuing an earlier file: without the head "
                    "it is not checked whether records were cut from the start"
                )
        try:
            actual = record_hash(rec)
        except (TypeError, orjson.JSONEncodeError):
            actual = None
        if actual != stored:
            problems.append(f"line {lineno}: record was altered (seq {seq}: its hash does not match its content)")
        if self.key is not None and not self.key.record_ok(stored, mac):
            self.bad_macs += 1
            self.last_bad_mac = max(self.last_bad_mac, seq)
            if self.bad_macs <= _MAC_PROBLEMS_SHOWN:
                problems.append(
                    f"line {lineno}: seq {seq} "
                    + ("has no MAC" if mac is None else "does not carry this key's MAC")
                    + ": forged, or altered and re-hashed, "
                    "by someone without the key"
                )
        next_seq = self.next_seq
        if seq > next_seq:
            missing = seq - next_seq
            if self.last is None:
                problems.append(
                    f"line {lineno}: the file's chain starts at seq {next_seq} but its first "
                    f"record is seq {seq}: {missing} record(s) removed from the start"
                )
            else:
                problems.append(
                    f"line {lineno}: seq jumps from {next_seq - 1} to {seq}: "
                    f"{missing} record(s) missing before this line"
                )
        elif seq < next_seq:
            where = self.recent.get(seq)
            problems.append(
                f"line {lineno}: seq {seq} comes after seq {next_seq - 1}: records out of order"
                + (f" or duplicated (seq {seq} also on line {where[0]})" if where else "")
            )
        if seq == self.start[0]:
            expected_prev, prev_line = self.start[1], None
        elif seq - 1 in self.recent:
            prev_line, expected_prev = self.recent[seq - 1]
        else:
            expected_prev = None  # its predecessor is missing: already reported as a gap
        if expected_prev is not None and prev != expected_prev:
            what = f"the hash of seq {seq - 1} (line {prev_line})" if prev_line else "where the file's chain starts"
            problems.append(
                f"line {lineno}: prev does not match {what}: a record before it was altered and re-hashed, or replaced"
            )
        self.recent[seq] = (lineno, stored)
        if len(self.recent) > 1024:
            del self.recent[next(iter(self.recent))]
        self.next_seq = max(next_seq, seq + 1)
        self.last = (lineno, seq, stored)


def verify(path: str | Path, *, require_head: bool = True, key: AuditKey | None = None) -> VerifyResult:
    """Check a file's chain line by line, its start and its last record against its head, and
    with `key` the MAC of the head and of every record."""
    path = Path(path)
    problems: list[str] = []
    warnings: list[str] = []
    try:
        f = open(path, "rb")  # noqa: SIM115 - outside `with`: only open()'s OSError is caught
    except OSError as e:
        return VerifyResult(False, 0, [f"cannot read: {e.strerror}"])
    with f:
        head = _head_of(path, f)
        foreign = key is not None and head is not None and head.key_id != key.id
        check = _Records(head.start if head is not None else None, None if foreign else key, problems, warnings)
        check.read(f)
        # A live writer appends a batch, then replaces the head: records read past the head, or a
        # line still being written, may be covered by the head now; a file a rotation has just
        # put in place has no head for a moment. (A rotation moves the head with the file:
        # _head_of follows it.)
        for _ in range(_LIVE_ROUNDS):
            if head is not None and check.last_seq <= head.seq and check.partial is None:
                break
            newer = _head_of(path, f)
            if newer is not None and head is not None and (newer.start, newer.key_id) != (head.start, head.key_id):
                break
            if newer == head:
                if time.time() - os.fstat(f.fileno()).st_mtime > _LIVE_IF_WRITTEN_WITHIN_S:
                    break  # nobody is writing it
                time.sleep(_LIVE_WAIT_S)
                continue
            if check.start is None:
                assert newer is not None  # a start is missing only while there was no head: newer differs
                check.start, check.next_seq = newer.start, newer.start[0]
            head = newer
            check.read(f)
    if check.partial is not None:
        problems.append(f"line {check.partial}: incomplete last line (a write was cut off)")
    if check.bad_macs > _MAC_PROBLEMS_SHOWN:
        problems.append(f"{check.bad_macs - _MAC_PROBLEMS_SHOWN} more record(s) without this key's MAC")
    start = check.start or (0, GENESIS)  # no head, no records
    if head is None:
        if head_path(path).exists():
            problems.append(f"head file {head_path(path).name} is unreadable: the tail cannot be checked")
        elif require_head:
            problems.append(
                f"no head file {head_path(path).name}: cannot tell whether records were cut "
                "from the end (verify a copy without it with --no-head)"
            )
        else:
            warnings.append("no head file: not checked whether records were cut from the end")
    else:
        _check_head(head, check, key, problems, warnings)
    end = (check.last[1], check.last[2]) if check.last else (start[0] - 1, start[1])
    authenticated = key is not None and head is not None and not problems
    return VerifyResult(
        ok=not problems,
        records=check.records,
        problems=problems,
        warnings=warnings,
        start=start,
        end=end,
        authenticated=authenticated,
    )


def _head_of(path: Path, f) -> Head | None:
    """The head of the file open as f, wherever it is now (a rotation renames both)."""
    st = os.fstat(f.fileno())
    try:
        here = os.stat(path)
    except FileNotFoundError:
        here = None
    if here is None or (here.st_ino, here.st_dev) != (st.st_ino, st.st_dev):
        for other in path.parent.glob("audit-*.jsonl"):
            o = other.stat()
            if (o.st_ino, o.st_dev) == (st.st_ino, st.st_dev):
                return read_head(other)
    return read_head(path)


def _check_head(head: Head, check: _Records, key: AuditKey | None, problems: list, warnings: list) -> None:
    """The head against the file's last record, and with a key its MAC."""
    if key is not None:
        if head.key_id is None:
            problems.append(
                "head: written without an HMAC key, so nothing in this file is authenticated "
                "(written before audit.hmac_key_file was set?)"
            )
        elif head.key_id != key.id:
            problems.append(
                f"head: written with another HMAC key (id {head.key_id}; the key given is "
                f"{key.id}): its records' MACs were not checked"
            )
        elif not key.head_ok(head):
            problems.append(
                f"head: its MAC does not match (it records seq {head.seq}): it was forged or "
                "altered, e.g. to hide records cut from the end or added after it"
            )
    elif head.key_id is not None:
        warnings.append(
            f"written with an HMAC key (id {head.key_id}): its MACs were not checked (give "
            "--hmac-key-file); the chain alone catches accidents, not forgery"
        )
    if check.last:
        last_line, last_seq, last_hash = check.last
    else:
        assert check.start is not None  # with a head the chain starts from it
        last_line, last_seq, last_hash = check.lineno, check.last_seq, check.start[1]
    if head.seq > last_seq:
        problems.append(
            f"line {last_line}: the file ends at seq {last_seq} but its head records seq "
            f"{head.seq}: {head.seq - last_seq} record(s) removed from the end"
        )
    elif head.seq == last_seq and head.hash != last_hash:
        problems.append(
            f"line {last_line}: the last record (seq {last_seq}) is not the one its head records: it was replaced"
        )
    elif head.seq < last_seq:
        at = check.recent.get(head.seq)
        if at is not None and at[1] != head.hash:
            problems.append(f"line {at[0]}: seq {head.seq} is not the record its head records: it was replaced")
            return
        first = check.recent.get(head.seq + 1)
        where = f"line {first[0]}: " if first else ""
        past = (
            f"{where}{last_seq - head.seq} record(s) (seq {head.seq + 1} to {last_seq}) after the last "
            f"one its head records (seq {head.seq})"
        )
        if check.key is None:
            problems.append(
                f"{past}: added by someone else, or written just before a crash (a restarted "
                "gateway continues after them); only the HMAC key tells these apart"
            )
        elif check.last_bad_mac > head.seq:
            problems.append(f"{past}, without this key's MAC: added by someone else")
        else:
            problems.append(
                f"{past}; they carry this key's MAC, so the writer stopped before updating its "
                "head (a crash): a restarted gateway continues after them"
            )


def verify_chain(
    paths: list[Path], *, require_head: bool = True, key: AuditKey | None = None
) -> list[tuple[Path, VerifyResult]]:
    """verify() each file of one chain (oldest first, see chain_order), and that each file
    starts exactly where the one before it ended; a break is a problem of the later file."""
    out = []
    before: tuple[Path, VerifyResult] | None = None
    for path in paths:
        result = verify(path, require_head=require_head, key=key)
        if before is not None and before[1].end is not None and result.start is not None:
            (end_seq, end_hash), (start_seq, start_prev) = before[1].end, result.start
            if (start_seq, start_prev) != (end_seq + 1, end_hash):
                result.problems.append(
                    f"does not continue {before[0].name}, which ends at seq {end_seq}: this file starts at "
                    f"seq {start_seq}"
                    + ("" if start_seq != end_seq + 1 else " after another hash")
                    + ": a file between them is missing, or one of them was replaced"
                )
                result.ok = result.authenticated = False
        out.append((path, result))
        before = (path, result)
    return out
