"""The audit log's HMAC key: what someone who can write the log directory, but has no key, can
no longer hide; records past the head; the key file; the writer across key changes."""

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from serving.policy.audit import (
    AuditError,
    AuditKeyError,
    AuditLog,
    chain_order,
    create_key_file,
    head_path,
    load_key,
    record_hash,
    verify,
    verify_chain,
)
from tests.unit.test_audit import problems_text, read_lines, write_lines


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys" / "audit.key"
    path.parent.mkdir()
    create_key_file(path)
    return path


@pytest.fixture
def key(key_file):
    return load_key(key_file)


def write_records(directory, n, key_file=None, start=0, **log_args):
    with AuditLog(directory, flush_interval_s=0.01, hmac_key_file=key_file, **log_args) as log:
        for i in range(start, start + n):
            log.write({"request_id": f"req-{i}", "tenant": "acme", "status": 200})
            log.flush()  # one batch per record: each rotation happens at a known record
        return log.path


# -- what a forger without the key does --------------------------------------------------------------


def forge(record: dict, **changes) -> str:
    """A record line with `changes`, its hash recomputed and its MAC left as it was (no key)."""
    record = dict(record, **changes)
    record.pop("hash")
    mac = record.pop("mac", None)
    record["hash"] = record_hash(record)
    if mac is not None:
        record["mac"] = mac
    return json.dumps(record, separators=(",", ":")) + "\n"


def rechain(lines: list[str], first: int) -> list[str]:
    """Lines from `first` on re-hashed so that the chain is consistent again, as a forger would."""
    out = lines[:first]
    prev = json.loads(out[-1])["hash"] if out else "0" * 64
    for line in lines[first:]:
        out.append(forge(json.loads(line), prev=prev))
        prev = json.loads(out[-1])["hash"]
    return out


def rewrite_head(path: Path, lines: list[str]) -> None:
    """Point the head at the file's last record, keeping its key id and its old MAC."""
    head = json.loads(head_path(path).read_text())
    last = json.loads(lines[-1])
    head.update(seq=last["seq"], hash=last["hash"])
    head_path(path).write_text(json.dumps(head) + "\n")


def appended(lines, n=2, **fields):
    last = json.loads(lines[-1])
    out = list(lines)
    for i in range(n):
        rec = {
            "request_id": f"forged-{i}",
            "tenant": "acme",
            "status": 200,
            **fields,
            "seq": last["seq"] + 1,
            "prev": last["hash"],
            "hash": "",
            "mac": last.get("mac"),
        }
        out.append(forge(rec))
        last = json.loads(out[-1])
    return out


def edit_and_rechain(path):
    lines = rechain(
        read_lines(path)[:1] + [forge(json.loads(read_lines(path)[1]), tenant="globex")] + read_lines(path)[2:], 1
    )
    write_lines(path, lines)
    rewrite_head(path, lines)


def edit_field(path):
    write_lines(
        path,
        [line.replace('"status":200', '"status":201') if i == 1 else line for i, line in enumerate(read_lines(path))],
    )


def remove_middle(path):
    lines = read_lines(path)
    write_lines(path, lines[:1] + lines[2:])


def remove_middle_and_rechain(path):
    lines = read_lines(path)
    lines = rechain(lines[:1] + [forge(json.loads(line), seq=json.loads(line)["seq"] - 1) for line in lines[2:]], 1)
    write_lines(path, lines)
    rewrite_head(path, lines)


def append_after_head(path):
    write_lines(path, appended(read_lines(path)))


def append_and_rewrite_head(path):
    lines = appended(read_lines(path))
    write_lines(path, lines)
    rewrite_head(path, lines)


def forge_head_seq(path):
    head = json.loads(head_path(path).read_text())
    head["seq"] += 5
    head_path(path).write_text(json.dumps(head))


def truncate_keep_head(path):
    write_lines(path, read_lines(path)[:-2])


def truncate_and_rewrite_head(path):
    lines = read_lines(path)[:-2]
    write_lines(path, lines)
    rewrite_head(path, lines)


TAMPERING = [
    # (tamper, what verify says with the key, whether verify without the key sees it)
    (edit_field, ["line 2: record was altered"], True),
    (edit_and_rechain, ["line 2: seq 1 does not carry this key's MAC", "head: its MAC does not match"], False),
    (remove_middle, ["line 2: seq jumps from 0 to 2"], True),
    (remove_middle_and_rechain, ["line 2: seq 1 does not carry this key's MAC", "head: its MAC does not match"], False),
    (
        append_after_head,
        [
            "line 5: 2 record(s) (seq 4 to 5) after the last one its head records (seq 3), "
            "without this key's MAC: added by someone else"
        ],
        True,
    ),
    (append_and_rewrite_head, ["line 5: seq 4 does not carry this key's MAC", "head: its MAC does not match"], False),
    (
        forge_head_seq,
        [
            "head: its MAC does not match (it records seq 8)",
            "line 4: the file ends at seq 3 but its head records seq 8: 5 record(s) removed from the end",
        ],
        True,
    ),
    (
        truncate_keep_head,
        ["line 2: the file ends at seq 1 but its head records seq 3: 2 record(s) removed from the end"],
        True,
    ),
    (truncate_and_rewrite_head, ["head: its MAC does not match (it records seq 1)"], False),
]
IDS = [
    "edited record",
    "edited record, chain and head rewritten",
    "removed record",
    "removed record, chain and head rewritten",
    "records appended after the head",
    "records appended, head rewritten",
    "forged head",
    "truncated tail",
    "truncated tail, head rewritten",
]


@pytest.mark.parametrize("tamper, expected, seen_without_key", TAMPERING, ids=IDS)
def test_verify_with_the_key_detects_tampering_by_someone_without_it(
    tmp_path, key_file, key, tamper, expected, seen_without_key
):
    path = write_records(tmp_path / "audit", 4, key_file)
    assert verify(path, key=key).ok
    tamper(path)
    result = verify(path, key=key)
    assert not result.ok and not result.authenticated
    for text in expected:
        assert text in problems_text(result)
    # Without the key, the chain alone catches only what was not re-hashed consistently.
    assert verify(path).ok is not seen_without_key


@pytest.mark.parametrize("tamper, expected, seen_without_key", TAMPERING, ids=IDS)
def test_cli_verify_with_the_key_exits_1_and_names_the_file_and_the_seq(
    tmp_path, key_file, capsys, tamper, expected, seen_without_key
):
    from serving.cli import main

    path = write_records(tmp_path / "audit", 4, key_file)
    tamper(path)
    assert main(["audit", "verify", "--hmac-key-file", str(key_file), str(tmp_path / "audit")]) == 1
    out = capsys.readouterr().out
    assert f"{path}: FAILED" in out
    for text in expected:
        assert f"{path}: {text}" in out
    assert main(["audit", "verify", str(tmp_path / "audit")]) == (1 if seen_without_key else 0)


def test_an_intact_keyed_log_verifies_with_its_key_and_says_so(tmp_path, key_file, key, capsys):
    from serving.cli import main

    path = write_records(tmp_path / "audit", 3, key_file)
    result = verify(path, key=key)
    assert result.ok and result.authenticated and result.records == 3
    assert all(len(json.loads(line)["mac"]) == 32 for line in read_lines(path))
    assert main(["audit", "verify", "--hmac-key-file", str(key_file), str(path)]) == 0
    assert f"{path}: OK (3 records, chain intact, MACs match)" in capsys.readouterr().out


def test_the_key_file_can_come_from_the_environment(tmp_path, key_file, capsys, monkeypatch):
    from serving.cli import main

    path = write_records(tmp_path / "audit", 3, key_file)
    truncate_and_rewrite_head(path)
    assert main(["audit", "verify", str(path)]) == 0  # no key: the rewrite is consistent
    monkeypatch.setenv("KEEL_AUDIT_HMAC_KEY_FILE", str(key_file))
    assert main(["audit", "verify", str(path)]) == 1
    assert "head: its MAC does not match" in capsys.readouterr().out


def test_a_keyed_log_verified_without_the_key_passes_with_a_warning(tmp_path, key_file):
    path = write_records(tmp_path / "audit", 2, key_file)
    result = verify(path)
    assert result.ok and not result.authenticated
    assert any("MACs were not checked" in w for w in result.warnings)


def test_verify_with_the_key_fails_a_log_written_without_one_or_with_another(tmp_path, key, key_file):
    plain = write_records(tmp_path / "plain", 2)
    result = verify(plain, key=key)
    assert not result.ok and "head: written without an HMAC key" in problems_text(result)
    other_file = tmp_path / "keys" / "other.key"
    create_key_file(other_file)
    other = write_records(tmp_path / "other", 2, other_file)
    result = verify(other, key=key)
    assert not result.ok and f"head: written with another HMAC key (id {load_key(other_file).id}" in problems_text(
        result
    )
    assert problems_text(result).count("\n") == 0  # one problem, not one per record


def test_a_copy_without_its_head_still_has_each_record_checked(tmp_path, key_file, key):
    path = write_records(tmp_path / "audit", 3, key_file)
    edit_and_rechain(path)
    head_path(path).unlink()
    result = verify(path, require_head=False, key=key)
    assert not result.ok and "line 2: seq 1 does not carry this key's MAC" in problems_text(result)


def test_a_file_written_with_no_key_lists_at_most_ten_mac_problems(tmp_path, key_file, key):
    path = write_records(tmp_path / "audit", 15, key_file)
    lines = [json.dumps({k: v for k, v in json.loads(line).items() if k != "mac"}) + "\n" for line in read_lines(path)]
    write_lines(path, lines)
    result = verify(path, key=key)
    assert problems_text(result).count("has no MAC") == 10
    assert "5 more record(s) without this key's MAC" in problems_text(result)


# -- records past the head ---------------------------------------------------------------------------


def test_without_a_key_records_after_the_head_fail_verification(tmp_path):
    path = write_records(tmp_path, 3)
    append_after_head(path)
    result = verify(path)
    assert not result.ok
    assert (
        "line 4: 2 record(s) (seq 3 to 4) after the last one its head records (seq 2): added by "
        "someone else, or written just before a crash" in problems_text(result)
    )


def crash_before_the_head(directory, key_file, n_before, n_after):
    """The writer wrote n_after more records, then died before replacing its head."""
    path = write_records(directory, n_before, key_file)
    saved = head_path(path).read_bytes()
    write_records(directory, n_after, key_file, start=n_before)
    head_path(path).write_bytes(saved)
    return path


def test_records_the_writer_wrote_before_a_crash_fail_with_the_key_as_its_own(tmp_path, key_file, key):
    path = crash_before_the_head(tmp_path / "audit", key_file, 2, 2)
    result = verify(path, key=key)
    assert not result.ok
    assert (
        "line 3: 2 record(s) (seq 2 to 3) after the last one its head records (seq 1); they carry this "
        "key's MAC, so the writer stopped before updating its head" in problems_text(result)
    )


def test_a_restarted_writer_continues_after_its_own_records_past_the_head(tmp_path, key_file, key):
    path = crash_before_the_head(tmp_path / "audit", key_file, 2, 2)
    assert write_records(tmp_path / "audit", 1, key_file, start=4) == path
    result = verify(path, key=key)
    assert result.ok and result.authenticated and result.records == 5


def test_a_writer_with_the_key_leaves_a_file_with_records_added_by_someone_else(tmp_path, key_file, key, caplog):
    path = write_records(tmp_path / "audit", 2, key_file)
    append_after_head(path)
    before = path.read_bytes()
    with caplog.at_level(logging.ERROR):
        other = write_records(tmp_path / "audit", 1, key_file)
    assert other.name == "audit-1.jsonl" and path.read_bytes() == before  # evidence left as it was
    assert "not continuing audit-0" in caplog.text and "appended by someone else" in caplog.text
    assert verify(other, key=key).ok


def test_verify_of_a_log_being_written_does_not_report_the_batch_in_flight(tmp_path, monkeypatch):
    """Between a batch reaching the file and its head being replaced, the file is past the head."""
    from serving.policy.audit import verification as verify_module

    path = write_records(tmp_path, 2)
    stale = verify_module.read_head(path)
    write_records(tmp_path, 2, start=2)
    reads = []

    def read_head(p):
        reads.append(p)
        return stale if len(reads) == 1 else real(p)

    real = verify_module.read_head
    monkeypatch.setattr(verify_module, "read_head", read_head)
    result = verify_module.verify(path)
    assert result.ok, result.problems
    assert len(reads) == 2


# -- the writer across key changes --------------------------------------------------------------------


def test_turning_the_key_on_starts_a_new_chain_and_leaves_the_old_file_as_it_was(tmp_path, key_file, key):
    old = write_records(tmp_path / "audit", 3)
    before = old.read_bytes()
    new = write_records(tmp_path / "audit", 2, key_file)
    assert new.name == "audit-1.jsonl" and old.read_bytes() == before
    assert [json.loads(line)["seq"] for line in read_lines(new)] == [0, 1]
    assert verify(old).ok and verify(new, key=key).ok
    # Verified with the key, the directory fails on the file written before it: archive that one.
    results = dict(
        pr
        for chain in chain_order(sorted((tmp_path / "audit").glob("audit-*.jsonl")))
        for pr in verify_chain(chain, key=key)
    )
    assert not results[old].ok and results[new].ok


def test_a_changed_key_or_a_removed_one_starts_a_new_chain_too(tmp_path, key_file):
    first = write_records(tmp_path / "audit", 2, key_file)
    other = tmp_path / "keys" / "other.key"
    create_key_file(other)
    assert write_records(tmp_path / "audit", 1, other).name == "audit-1.jsonl"
    assert write_records(tmp_path / "audit", 1).name == "audit-2.jsonl"
    assert write_records(tmp_path / "audit", 1, key_file) == first  # its own chain again
    assert verify(first, key=load_key(key_file)).ok


def test_a_writer_does_not_continue_after_a_forged_head(tmp_path, key_file, key):
    path = write_records(tmp_path / "audit", 3, key_file)
    truncate_and_rewrite_head(path)
    assert write_records(tmp_path / "audit", 1, key_file).name == "audit-1.jsonl"
    assert "head: its MAC does not match" in problems_text(verify(path, key=key))


def test_rotation_with_the_key_links_files_that_each_verify(tmp_path, key_file, key):
    write_records(tmp_path / "audit", 30, key_file, max_file_bytes=1500)
    (chain,) = chain_order(sorted((tmp_path / "audit").glob("audit-*.jsonl")))
    assert len(chain) >= 3
    assert all(r.ok and r.authenticated for _, r in verify_chain(chain, key=key))
    # The middle file cut short and its head rewritten: its MAC, and the link to the next file.
    lines = read_lines(chain[1])[:-1]
    write_lines(chain[1], lines)
    rewrite_head(chain[1], lines)
    results = dict(verify_chain(chain, key=key))
    assert "head: its MAC does not match" in problems_text(results[chain[1]])
    assert f"does not continue {chain[1].name}" in problems_text(results[chain[2]])


def test_a_restarted_writer_with_the_key_continues_across_a_rotation(tmp_path, key_file, key):
    write_records(tmp_path / "audit", 20, key_file, max_file_bytes=1500)
    write_records(tmp_path / "audit", 20, key_file, start=20, max_file_bytes=1500)
    (chain,) = chain_order(sorted((tmp_path / "audit").glob("audit-*.jsonl")))
    assert all(r.ok and r.authenticated for _, r in verify_chain(chain, key=key))
    assert [json.loads(line)["request_id"] for p in chain for line in read_lines(p)] == [f"req-{i}" for i in range(40)]


def test_records_may_not_set_the_mac_field(tmp_path):
    with AuditLog(tmp_path) as log, pytest.raises(ValueError, match="mac"):
        log.write({"mac": "x"})


# -- the key file --------------------------------------------------------------------------------------


def test_keygen_writes_a_new_key_only_its_owner_can_read_and_never_overwrites(tmp_path, capsys):
    from serving.cli import main

    path = tmp_path / "audit.key"
    assert main(["audit", "keygen", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(path)
    assert f"key id {key.id}" in capsys.readouterr().out
    before = path.read_bytes()
    assert main(["audit", "keygen", str(path)]) == 1
    assert "already exists" in capsys.readouterr().err and path.read_bytes() == before


def test_a_key_file_others_can_read_short_or_missing_is_refused_with_the_reason(tmp_path, key_file):
    os.chmod(key_file, 0o644)
    with pytest.raises(AuditKeyError, match="chmod 600"):
        load_key(key_file)
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    os.chmod(short, 0o600)
    with pytest.raises(AuditKeyError, match="at least 32"):
        load_key(short)
    with pytest.raises(AuditError, match="No such file"):
        AuditLog(tmp_path / "audit", hmac_key_file=tmp_path / "nope.key")


def test_cli_verify_with_an_unusable_key_file_exits_2(tmp_path, capsys):
    from serving.cli import main

    path = write_records(tmp_path / "audit", 1)
    assert main(["audit", "verify", "--hmac-key-file", str(tmp_path / "nope.key"), str(path)]) == 2
    assert "nope.key: No such file" in capsys.readouterr().err


def test_the_key_is_never_shown_by_repr(key_file, key):
    secret = key_file.read_text().strip()
    assert secret not in repr(key) and key.id in repr(key)


def test_config_rejects_a_key_file_inside_the_audit_dir(tmp_path):
    from pydantic import ValidationError

    from serving.policy.config import AuditConfig

    with pytest.raises(ValidationError, match="is inside the audit dir"):
        AuditConfig(dir=str(tmp_path / "audit"), hmac_key_file=str(tmp_path / "audit" / "sub" / "k.key"))
    (tmp_path / "audit").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "audit")
    with pytest.raises(ValidationError, match="is inside the audit dir"):
        AuditConfig(dir=str(tmp_path / "audit"), hmac_key_file=str(tmp_path / "link" / "k.key"))
    ok = AuditConfig(dir=str(tmp_path / "audit"), hmac_key_file="k.key")
    assert ok.hmac_key_file == str(Path("k.key").absolute())  # the gateways get it absolute


def test_the_policy_audit_block_writes_with_the_key(tmp_path, key_file, key):
    from serving.gateway.metrics import GatewayMetrics
    from serving.gateway.policy import PolicyRuntime
    from serving.policy.config import PolicyConfig

    pol = PolicyConfig.model_validate({"audit": {"dir": str(tmp_path / "audit"), "hmac_key_file": str(key_file)}})
    rt = PolicyRuntime(pol, {}, GatewayMetrics())
    try:
        rt.audit_log.write({"request_id": "r1"})
    finally:
        rt.close()
    result = verify(rt.audit_log.path, key=key)
    assert result.ok and result.authenticated and result.records == 1


def test_keel_serve_fails_fast_on_a_missing_key_file(tmp_path):
    from serving.config import REPO_ROOT, load_config
    from serving.launcher import StartupError, check_audit_key

    cfg = load_config(REPO_ROOT / "configs" / "local.yaml", check_engine_args=False)
    cfg.audit = cfg.audit.model_copy(update={"hmac_key_file": str(tmp_path / "missing.key")})
    with pytest.raises(StartupError, match="audit.hmac_key_file: .*missing.key: No such file"):
        check_audit_key(cfg)
