"""The optional HMAC key: without it nobody can append, edit or cut an audit file undetected.

The key is a file outside the log directory (`audit.hmac_key_file`; `keel audit keygen PATH`
makes one). Its bytes, surrounding whitespace removed, are the HMAC-SHA256 key. Each record
gets `mac` = HMAC(key, "keel-audit-record" NUL + its hash), the first 16 bytes in hex (the
hash already covers the record, its seq and the hash before it), and each head gets `mac` over
its seq, hash, chain start and the key's id. `key_id` (an HMAC of a fixed string, so it tells
nothing about the key) names which key wrote a file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from serving.policy.audit.files import Head, canonical_json

KEY_FILE_ENV = "KEEL_AUDIT_HMAC_KEY_FILE"
MIN_KEY_BYTES = 32
RECORD_MAC_BYTES = 16  # 128-bit tags: one per line, so they are kept short
_RECORD = b"keel-audit-record\x00"
_HEAD = b"keel-audit-head\x00"
_KEY_ID = b"keel-audit-key-id"


class AuditKeyError(ValueError):
    """The key file cannot be used; str() names the file and what to do."""


class AuditKey:
    __slots__ = ("_keyed", "id")

    def __init__(self, secret: bytes):
        if len(secret) < MIN_KEY_BYTES:
            raise AuditKeyError(f"an audit HMAC key needs at least {MIN_KEY_BYTES} bytes, got {len(secret)}")
        # Keyed once; each MAC copies it: 2.2 us a record here, against 4.4 for hmac.digest(),
        # which sets the key up again on every call (OpenSSL 3).
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)
        self.id = self._mac(_KEY_ID)[:8].hex()

    def _mac(self, msg: bytes) -> bytes:
        h = self._keyed.copy()
        h.update(msg)
        return h.digest()

    def record_mac(self, digest: str) -> str:
        return self._mac(_RECORD + digest.encode())[:RECORD_MAC_BYTES].hex()

    def head_mac(self, head: Head) -> str:
        return self._mac(_HEAD + canonical_json(head.signed())).hex()

    def record_ok(self, digest: str, mac: object) -> bool:
        return isinstance(mac, str) and hmac.compare_digest(self.record_mac(digest), mac)

    def head_ok(self, head: Head) -> bool:
        return (
            head.key_id == self.id and isinstance(head.mac, str) and hmac.compare_digest(self.head_mac(head), head.mac)
        )

    def __repr__(self) -> str:
        return f"AuditKey(id={self.id})"  # never the secret


def load_key(path: str | Path) -> AuditKey:
    """The key in `path`; AuditKeyError if it is missing, short, or others may read or change it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as e:
        raise AuditKeyError(f"audit HMAC key file {path}: {e.strerror}") from None
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise AuditKeyError(
            f"audit HMAC key file {path}: mode {stat.filemode(mode)} lets other users read "
            f"or change it; run `chmod 600 {path}`"
        )
    secret = data.strip()
    if len(secret) < MIN_KEY_BYTES:
        raise AuditKeyError(
            f"audit HMAC key file {path}: {len(secret)} bytes, at least {MIN_KEY_BYTES} "
            "needed; make one with `keel audit keygen PATH`"
        )
    return AuditKey(secret)


def create_key_file(path: str | Path) -> AuditKey:
    """A new random key (256 bits, written as hex) in a new file only its owner can read."""
    path = Path(path)
    secret = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AuditKeyError(
            f"{path} already exists; a key is never overwritten (logs written with it could no longer be verified)"
        ) from None
    except OSError as e:
        raise AuditKeyError(f"{path}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, secret + b"\n")
    finally:
        os.close(fd)
    return AuditKey(secret)


def key_inside(key_file: str | Path, directory: str | Path) -> bool:
    """Whether the key file is (or resolves to a file) inside the log directory."""
    key, d = Path(key_file).expanduser().resolve(), Path(directory).expanduser().resolve()
    return key == d or d in key.parents
