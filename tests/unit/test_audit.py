import json
import os
from pathlib import Path

import pytest

from serving.policy.audit import GENESIS, AuditLog, chain_order, head_path, record_hash, verify, verify_chain


def write_records(directory, n, **fields):
    with AuditLog(directory, flush_interval_s=0.01) as log:
        for i in range(n):
            log.write({"request_id": f"req-{i}", "tenant": "acme", "status": 200, **fields})
        path = log.path
    return path


def read_lines(path):
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def write_lines(path, lines):
    path.write_text("".join(lines), encoding="utf-8")


def problems_text(result):
    return "\n".join(result.problems)


# -- writing ---------------------------------------------------------------------------------------


def test_records_round_trip_with_seq_prev_and_hash(tmp_path):
    path = write_records(tmp_path, 3, note="héllo ✓")
    records = [json.loads(line) for line in read_lines(path)]
    assert [r["request_id"] for r in records] == ["req-0", "req-1", "req-2"]
    assert [r["seq"] for r in records] == [0, 1, 2]
    assert records[0]["note"] == "héllo ✓"
    assert records[0]["prev"] == GENESIS
    assert records[1]["prev"] == records[0]["hash"] and records[2]["prev"] == records[1]["hash"]


def test_hash_covers_the_record_with_seq_and_prev_but_not_hash(tmp_path):
    path = write_records(tmp_path, 1)
    record = json.loads(read_lines(path)[0])
    stored = record.pop("hash")
    assert stored == record_hash(record)


def test_flush_puts_records_on_disk_while_the_log_stays_open(tmp_path):
    log = AuditLog(tmp_path, flush_interval_s=60)
    try:
        log.write({"request_id": "r1"})
        log.flush()
        assert json.loads(read_lines(log.path)[0])["request_id"] == "r1"
    finally:
        log.close()


def test_close_writes_everything_enqueued(tmp_path):
    log = AuditLog(tmp_path, flush_interval_s=60)
    for i in range(500):
        log.write({"i": i})
    log.close()
    assert len(read_lines(log.path)) == 500
    assert verify(log.path).ok


def test_records_of_a_process_that_exits_without_close_are_on_disk(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from serving.policy.audit import AuditLog\n"
        "log = AuditLog(sys.argv[1], flush_interval_s=60)\n"
        "for i in range(100): log.write({'i': i})\n"
    )
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60, cwd=repo)
    path = tmp_path / "audit-0.jsonl"
    assert len(read_lines(path)) == 100
    assert verify(path).ok


def test_caller_mutating_its_dict_after_write_does_not_change_the_record(tmp_path):
    with AuditLog(tmp_path, flush_interval_s=60) as log:
        record = {"status": 200}
        log.write(record)
        record["status"] = 500
    assert json.loads(read_lines(log.path)[0])["status"] == 200


def test_records_may_not_set_chain_fields(tmp_path):
    with AuditLog(tmp_path) as log, pytest.raises(ValueError, match="seq"):
        log.write({"seq": 7})


def test_unserialisable_field_is_dropped_and_named_but_the_record_is_kept(tmp_path):
    with AuditLog(tmp_path, flush_interval_s=60) as log:
        log.write({"request_id": "r1", "weird": {1: "int key"}})
    record = json.loads(read_lines(log.path)[0])
    assert record["request_id"] == "r1"
    assert "weird" not in record and "weird" in record["audit_error"]
    assert verify(log.path).ok


def test_two_logs_on_one_directory_write_different_files(tmp_path):
    a, b = AuditLog(tmp_path), AuditLog(tmp_path)
    try:
        a.write({"from": "a"})
        b.write({"from": "b"})
    finally:
        a.close()
        b.close()
    assert a.path != b.path
    assert [json.loads(x)["from"] for x in read_lines(a.path)] == ["a"]
    assert [json.loads(x)["from"] for x in read_lines(b.path)] == ["b"]
    assert verify(a.path).ok and verify(b.path).ok


def test_a_closed_log_frees_its_file_for_the_next_process(tmp_path):
    first = AuditLog(tmp_path)
    first.close()
    second = AuditLog(tmp_path)
    second.close()
    assert first.path == second.path


def test_reopening_continues_the_chain_and_the_file_still_verifies(tmp_path):
    write_records(tmp_path, 2)
    path = write_records(tmp_path, 2)
    records = [json.loads(line) for line in read_lines(path)]
    assert [r["seq"] for r in records] == [0, 1, 2, 3]
    assert records[2]["prev"] == records[1]["hash"]
    assert verify(path).ok


def test_torn_last_line_from_a_crash_is_dropped_on_reopen_and_the_chain_continues(tmp_path):
    path = write_records(tmp_path, 2)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"request_id": "half-writ')
    path = write_records(tmp_path, 1)
    assert [json.loads(x)["seq"] for x in read_lines(path)] == [0, 1, 2]
    assert verify(path).ok


def test_records_cut_from_the_tail_while_stopped_stay_visible_after_reopen(tmp_path):
    path = write_records(tmp_path, 3)
    write_lines(path, read_lines(path)[:2])
    write_records(tmp_path, 1)
    result = verify(path)
    assert not result.ok
    assert "line 3" in problems_text(result) and "missing" in problems_text(result)


# -- verify ----------------------------------------------------------------------------------------


def test_verify_passes_an_intact_file(tmp_path):
    path = write_records(tmp_path, 5)
    result = verify(path)
    assert result.ok and result.records == 5 and result.problems == []


def test_verify_passes_an_empty_log(tmp_path):
    with AuditLog(tmp_path) as log:
        pass
    assert verify(log.path).ok


def _rehashed(line: str, **changes) -> str:
    """The record of `line` with `changes`, its hash recomputed as a forger would."""
    record = json.loads(line)
    record.pop("hash")
    record.update(changes)
    record["hash"] = record_hash(record)
    return json.dumps(record) + "\n"


def _edit_field(lines):
    lines[1] = lines[1].replace('"status":200', '"status":201')
    return lines


def _edit_and_rehash(lines):
    lines[1] = _rehashed(lines[1], tenant="globex")
    return lines


def _swap(lines):
    lines[1], lines[2] = lines[2], lines[1]
    return lines


def _replace_last(lines):
    lines[-1] = _rehashed(lines[-1], status=500)
    return lines


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (_edit_field, ["line 2", "altered"]),
        (_edit_and_rehash, ["line 3", "prev does not match"]),  # the next record's prev gives it away
        (lambda lines: lines[:1] + lines[2:], ["line 2: seq jumps from 0 to 2: 1 record(s) missing"]),
        (
            lambda lines: lines[1:],
            [
                "line 1: the file's chain starts at seq 0 but its first record is seq 1: "
                "1 record(s) removed from the start"
            ],
        ),
        (_swap, ["out of order", "line 2", "line 3"]),
        (lambda lines: lines[:-1], ["1 record(s) removed from the end"]),
        (_replace_last, ["replaced"]),
        (lambda lines: lines[:2] + ["this is not json\n"] + lines[2:], ["line 3: not JSON"]),
    ],
    ids=[
        "edited field",
        "edited and re-hashed",
        "removed middle record",
        "removed first record",
        "swapped records",
        "removed last record",
        "replaced last record",
        "garbage line",
    ],
)
def test_verify_detects_tampering(tmp_path, tamper, expected):
    path = write_records(tmp_path, 4)
    write_lines(path, tamper(read_lines(path)))
    result = verify(path)
    assert not result.ok
    for text in expected:
        assert text in problems_text(result)


def test_verify_without_head_fails_unless_told_the_copy_has_none(tmp_path):
    path = write_records(tmp_path, 2)
    head_path(path).unlink()
    assert not verify(path).ok
    relaxed = verify(path, require_head=False)
    assert relaxed.ok and relaxed.warnings


def test_verify_reports_an_unreadable_file(tmp_path):
    result = verify(tmp_path / "nope.jsonl")
    assert not result.ok and "cannot read" in result.problems[0]


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_audit_verify_exits_0_when_every_file_verifies(tmp_path, capsys):
    from serving.cli import main

    a = write_records(tmp_path / "a", 3)
    b = write_records(tmp_path / "b", 2)
    assert main(["audit", "verify", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert f"{a}: OK (3 records, chain intact)" in out and f"{b}: OK (2 records, chain intact)" in out


def test_cli_audit_verify_exits_1_and_names_the_line_when_one_file_is_broken(tmp_path, capsys):
    from serving.cli import main

    good = write_records(tmp_path / "good", 2)
    bad = write_records(tmp_path / "bad", 3)
    lines = read_lines(bad)
    write_lines(bad, lines[:1] + lines[2:])
    assert main(["audit", "verify", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{good}: OK" in out
    assert f"{bad}: line 2: seq jumps" in out


def test_cli_audit_tail_prints_the_last_records(tmp_path, capsys):
    from serving.cli import main

    path = write_records(tmp_path, 5)
    assert main(["audit", "tail", str(path), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert '"request_id": "req-4"' in out and '"request_id": "req-3"' in out
    assert "req-2" not in out


# -- rotation --------------------------------------------------------------------------------------


def write_rotating(directory, n, max_file_bytes=1500, start=0):
    """n records through a log that rotates at max_file_bytes, each batch flushed (so each
    rotation happens at a known record)."""
    with AuditLog(directory, flush_interval_s=0.01, max_file_bytes=max_file_bytes) as log:
        for i in range(start, start + n):
            log.write({"request_id": f"req-{i}", "tenant": "acme", "status": 200})
            log.flush()
        return log.path


def chain_results(directory):
    (chain,) = chain_order(sorted(Path(directory).glob("audit-*.jsonl")))
    return chain, verify_chain(chain)


def test_a_full_file_is_rotated_and_the_next_file_continues_its_chain(tmp_path):
    current = write_rotating(tmp_path, 40)
    chain, results = chain_results(tmp_path)
    assert len(chain) >= 3 and chain[-1] == current  # rotated ones first, oldest first
    assert all(p.stat().st_size < 1500 + 200 for p in chain)  # each closed right after passing the size
    assert all(r.ok for _, r in results), [r.problems for _, r in results]
    seqs = [json.loads(line)["seq"] for p in chain for line in read_lines(p)]
    assert seqs == list(range(40))  # one chain across the files, in order, nothing lost
    for (_, before), (_, after) in zip(results, results[1:]):
        assert after.start == (before.end[0] + 1, before.end[1])
    for p in chain[:-1]:
        assert head_path(p).exists()


def test_a_restarted_writer_continues_the_chain_across_a_rotation(tmp_path):
    write_rotating(tmp_path, 25)
    write_rotating(tmp_path, 25, start=25)
    chain, results = chain_results(tmp_path)
    assert all(r.ok for _, r in results), [r.problems for _, r in results]
    assert [json.loads(line)["request_id"] for p in chain for line in read_lines(p)] == [f"req-{i}" for i in range(50)]


def test_verify_chain_detects_a_missing_rotated_file(tmp_path):
    write_rotating(tmp_path, 40)
    chain, _ = chain_results(tmp_path)
    chain[1].unlink()
    head_path(chain[1]).unlink()
    _, results = chain_results(tmp_path)
    broken = [(p, r) for p, r in results if not r.ok]
    assert [p for p, _ in broken] == [chain[2]]
    assert f"does not continue {chain[0].name}" in problems_text(broken[0][1])


def test_verify_detects_records_removed_from_the_start_of_a_continuation_file(tmp_path):
    write_rotating(tmp_path, 40)
    chain, _ = chain_results(tmp_path)
    lines = read_lines(chain[1])
    write_lines(chain[1], lines[2:])  # the rest of the chain is intact
    result = verify(chain[1])
    assert not result.ok
    assert "line 1: the file's chain starts at seq" in problems_text(result)
    assert "2 record(s) removed from the start" in problems_text(result)


def test_a_continuation_file_copied_without_its_head_verifies_with_a_warning(tmp_path):
    write_rotating(tmp_path, 40)
    chain, _ = chain_results(tmp_path)
    head_path(chain[1]).unlink()
    result = verify(chain[1], require_head=False)
    assert result.ok
    assert any("continuing an earlier file" in w for w in result.warnings)


def test_a_rotation_cut_short_by_a_crash_is_finished_on_restart(tmp_path):
    """The file was renamed but its head was not, and no new file was made."""
    current = write_rotating(tmp_path, 5, max_file_bytes=10**9)
    os_rename = os.rename
    os_rename(current, current.with_name("audit-0.000000000000.jsonl"))
    write_rotating(tmp_path, 5, max_file_bytes=10**9, start=5)
    chain, results = chain_results(tmp_path)
    assert len(chain) == 2
    assert all(r.ok for _, r in results), [r.problems for _, r in results]
    assert [json.loads(line)["seq"] for p in chain for line in read_lines(p)] == list(range(10))


def test_a_crash_right_after_the_new_file_was_put_in_place_continues_the_chain(tmp_path):
    """The rotation's last step: an empty current file whose head was not written yet."""
    current = write_rotating(tmp_path, 40)
    before = chain_results(tmp_path)[0]
    os.rename(current, current.with_name("audit-0.999999999999.jsonl"))
    os.rename(head_path(current), head_path(current.with_name("audit-0.999999999999.jsonl")))
    current.write_bytes(b"")  # in place, no head: the crash came here
    write_rotating(tmp_path, 3, start=40, max_file_bytes=10**9)
    chain, results = chain_results(tmp_path)
    assert len(chain) == len(before) + 1
    assert all(r.ok for _, r in results), [r.problems for _, r in results]
    assert [json.loads(line)["seq"] for p in chain for line in read_lines(p)] == list(range(43))


def test_a_rotation_that_fails_part_way_is_undone_and_writing_goes_on(tmp_path, monkeypatch):
    """The head cannot be renamed: the full file gets its name back, and is still written."""

    from serving.policy.audit import writer

    real = os.rename

    def rename(src, dst):
        if str(src).endswith(".head"):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(writer.os, "rename", rename)
    current = write_rotating(tmp_path, 20)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "audit-0.jsonl",
        "audit-0.jsonl.head",
    ]
    result = verify(current)
    assert result.ok and result.records == 20


def test_cli_audit_verify_checks_a_directory_and_the_links_between_rotated_files(tmp_path, capsys):
    from serving.cli import main

    write_rotating(tmp_path, 40)
    assert main(["audit", "verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count(": OK (") == len(list(tmp_path.glob("audit-*.jsonl"))) >= 3
    chain, _ = chain_results(tmp_path)
    chain[1].unlink()
    head_path(chain[1]).unlink()
    assert main(["audit", "verify", str(tmp_path)]) == 1
    assert f"{chain[2]}: does not continue {chain[0].name}" in capsys.readouterr().out


def _write_past_a_mebibyte(log) -> None:
    for i in range(3):  # three batches of ~0.6 MiB: the file passes 1 MiB in the second
        for j in range(3000):
            log.write({"request_id": f"req-{i}-{j}", "note": "x" * 150})
        log.flush()


def _rotated_once_at_a_mebibyte(directory) -> bool:
    (chain,) = chain_order(sorted(directory.glob("audit-*.jsonl")))
    return (
        len(chain) == 2 and 2**20 <= chain[0].stat().st_size < 2 * 2**20 and all(r.ok for _, r in verify_chain(chain))
    )


def test_the_policy_audit_block_sets_the_rotation_size(tmp_path):
    from serving.gateway.metrics import GatewayMetrics
    from serving.gateway.policy import PolicyRuntime
    from serving.policy.config import AuditConfig, PolicyConfig

    assert AuditConfig().max_file_mb == 1024 and AuditConfig(max_file_mb=None).max_file_mb is None
    pol = PolicyConfig.model_validate({"audit": {"dir": str(tmp_path), "max_file_mb": 1}})
    rt = PolicyRuntime(pol, {}, GatewayMetrics())
    try:
        _write_past_a_mebibyte(rt.audit_log)
    finally:
        rt.close()
    assert _rotated_once_at_a_mebibyte(tmp_path)


def test_a_reload_that_changes_only_the_rotation_size_keeps_the_file_and_its_chain(tmp_path):
    from serving.gateway.metrics import GatewayMetrics
    from serving.gateway.policy import PolicyRuntime
    from serving.policy.config import PolicyConfig

    metrics = GatewayMetrics()
    first = PolicyRuntime(PolicyConfig.model_validate({"audit": {"dir": str(tmp_path)}}), {}, metrics)
    second = PolicyRuntime(
        PolicyConfig.model_validate({"audit": {"dir": str(tmp_path), "max_file_mb": 1}}), {}, metrics, previous=first
    )
    try:
        assert second.audit_log is first.audit_log and second.audit_log.path.name == "audit-0.jsonl"
        _write_past_a_mebibyte(second.audit_log)  # the new size applies to the file as it is
    finally:
        second.close()
    assert _rotated_once_at_a_mebibyte(tmp_path)
