"""The audit trail: one record per request, append-only JSONL with a hash chain, and with an
optional HMAC key, records and heads nobody without the key can forge.

Each line is the caller's record plus `seq` (0, 1, 2, ... per file), `prev` (the previous
record's hash, "0"*64 for the first) and `hash`: sha256 over the canonical JSON of the record
including `seq` and `prev` but not `hash` (or `mac`). Canonical JSON is orjson with sorted keys:
compact, UTF-8 (no ASCII escaping), floats in shortest round-trip form; the stdlib's
`json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` gives the same bytes
except for floats it writes with a two-digit exponent (1e-07 vs 1e-7). A line is that canonical
body with `"hash"` (then `"mac"`, with a key) appended as its last keys. Unserialisable values
are written as str(); a field that still fails (e.g. a dict with int keys) is dropped and named
in `audit_error`.

Beside each file the writer keeps `<file>.head` ({"seq", "hash"} of the last record written,
seq -1 before the first), replaced atomically after every batch, so `verify` can tell a file
whose tail was cut off from one that simply ended, and records added after the writer's last
one. A file verified without its head is not OK: the writer always makes one;
`verify(..., require_head=False)` (`keel audit verify --no-head`) checks a copy shipped without
it, and says the tail was not checked.

Several gateway processes share a directory: each holds an exclusive flock on
`audit-<n>.jsonl.lock` for the smallest free n whose chain it may continue (below) and alone
writes `audit-<n>.jsonl`; a restarted process that gets the same n continues that file's chain.

Rotation (`max_file_bytes`): once `audit-<n>.jsonl` reaches the size, it and its head are
renamed `audit-<n>.<its first seq>.jsonl` (+ `.head`) and a new `audit-<n>.jsonl` continues the
same chain: its first record's seq follows the last one's and its prev is that record's hash.
A head also records where its file's chain starts (`start_seq`, `start_prev`; 0 and "0"*64
for a first file), so records removed from the start of a continuation file show too, and
`verify_chain` checks that each file starts exactly where the one before it ended (a missing,
reordered or replaced file breaks that). Keel never deletes rotated files: ship them off the
host, then remove them there.

Without a key the chain makes accidental damage and naive edits visible; someone who can write
the directory can forge a consistent chain and head. With `hmac_key_file` (mac.py) each record
carries `mac` (over its hash, so over the whole chain up to it) and each head carries `key_id`
and `mac` (over its seq, hash and start): an edit, a removed record, an added one or a cut tail
then needs the key to hide, whatever is rewritten. A writer continues only a chain written with
its own key (or with none when it has none) whose head's MAC matches; records past the head
only when they carry its MACs (a crash between a batch and its head). Anything else (a key
added, changed or removed, a forged head) is left as it is and the writer takes the next free
slot: a new chain, in a new file, from seq 0. What no key catches: a file cut back to an
earlier state together with a saved copy of that state's head (a rollback), or whole chains
deleted; ship files off the host for that.
"""

from serving.policy.audit.files import (
    GENESIS,
    RESERVED_FIELDS,
    AuditError,
    Head,
    canonical_json,
    chain_order,
    head_path,
    read_head,
    record_hash,
    rotated_files,
    tail,
)
from serving.policy.audit.mac import KEY_FILE_ENV, AuditKey, AuditKeyError, create_key_file, key_inside, load_key
from serving.policy.audit.verification import VerifyResult, verify, verify_chain
from serving.policy.audit.writer import AuditLog

__all__ = [
    "GENESIS",
    "RESERVED_FIELDS",
    "KEY_FILE_ENV",
    "AuditError",
    "AuditKey",
    "AuditKeyError",
    "AuditLog",
    "Head",
    "VerifyResult",
    "canonical_json",
    "chain_order",
    "create_key_file",
    "head_path",
    "key_inside",
    "load_key",
    "read_head",
    "record_hash",
    "rotated_files",
    "tail",
    "verify",
    "verify_chain",
]
