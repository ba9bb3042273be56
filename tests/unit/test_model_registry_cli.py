"""`keel models register|list|show|verify|retire` through `keel`'s entry point: exit status,
what is printed, and that a refusal writes nothing."""

from __future__ import annotations

import json

import pytest

from serving.cli import main
from serving.config import ConfigError, parse_config
from serving.model_registry.store import register_version
from tests.unit.model_registry_fixtures import edit_json


def config(models_base, weights: str):
    return parse_config(
        {"models": {"chat": {"weights": weights}}, "models_dir": str(models_base)}, check_engine_args=False
    )


def keel(capsys, *argv) -> tuple[int, str, str]:
    code = main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_register_then_list_show_verify(capsys, models_base, model_dir):
    code, out, _ = keel(
        capsys, "register", "m", "--version", "1", "--path", str(model_dir), "--models-dir", str(models_base)
    )
    assert code == 0 and out.startswith("registered m@1: LlamaForCausalLM, 2,229,504 parameters")
    assert "`weights: m@1`" in out
    code, out, _ = keel(
        capsys, "register", "m", "--version", "1", "--path", str(model_dir), "--models-dir", str(models_base)
    )
    assert code == 0 and "m@1 is already registered with these bytes" in out
    code, out, _ = keel(capsys, "list", "--models-dir", str(models_base))
    row = out.splitlines()[1].split()
    assert code == 0 and row[:5] == ["m", "1*", "registered", "8.6", "MiB"] and row[5] == "LlamaForCausalLM"
    code, out, _ = keel(capsys, "show", "m", "--models-dir", str(models_base))
    assert code == 0 and out.startswith("# m@1: registered") and "sha256:" in out
    code, out, _ = keel(capsys, "verify", "m@1", "--models-dir", str(models_base))
    assert code == 0 and out.startswith("m@1: OK (7 files match")


def test_cli_register_refusal_exits_1_naming_the_file(capsys, models_base, model_dir):
    file = model_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    code, out, err = keel(
        capsys, "register", "m", "--version", "1", "--path", str(model_dir), "--models-dir", str(models_base)
    )
    assert code == 1 and out == ""
    assert err.startswith("keel: refused to register m@1:\n") and f"{file}: truncated" in err
    assert list(models_base.iterdir()) == []


def test_cli_bad_version_exits_1(capsys, models_base, model_dir):
    code, _, err = keel(
        capsys, "register", "m", "--version", "1/2", "--path", str(model_dir), "--models-dir", str(models_base)
    )
    assert code == 1 and "version '1/2': use letters, digits" in err


def test_cli_verify_exits_1_naming_each_changed_file(capsys, models_base, model_dir):
    register_version(models_base, "m", "1", model_dir)
    edit_json(model_dir / "config.json", vocab_size=4096)
    (model_dir / "tokenizer.json").unlink()
    code, out, _ = keel(capsys, "verify", "m@1", "--models-dir", str(models_base))
    assert code == 1
    assert f"{model_dir / 'config.json'}: differs" in out and f"{model_dir / 'tokenizer.json'}: missing" in out
    assert out.splitlines()[-1] == "m@1: FAILED (2 of 7 files changed or missing)"


def test_cli_retire_then_config_refuses_it_show_still_works(capsys, models_base, two_versions):
    code, out, _ = keel(capsys, "retire", "m@2", "--reason", "p99 too high", "--models-dir", str(models_base))
    assert code == 0 and "retired m@2" in out and "`weights: m` now means m@1" in out
    code, out, _ = keel(capsys, "retire", "m@2", "--models-dir", str(models_base))
    assert code == 0 and "already retired" in out
    code, out, _ = keel(capsys, "show", "m@2", "--models-dir", str(models_base))
    assert code == 0 and out.startswith("# m@2: retired")
    code, out, _ = keel(capsys, "list", "--models-dir", str(models_base))
    assert [line.split()[:3] for line in out.splitlines()[1:3]] == [["m", "1*", "registered"], ["m", "2", "retired"]]
    with pytest.raises(ConfigError, match="m@2 was retired"):
        config(models_base, "m@2")


def test_cli_retire_needs_a_version(capsys, models_base, two_versions):
    code, _, err = keel(capsys, "retire", "m", "--models-dir", str(models_base))
    assert code == 1 and "retire needs NAME@VERSION" in err


def test_cli_show_unknown_version_exits_1_listing_versions(capsys, models_base, two_versions):
    code, _, err = keel(capsys, "show", "m@7", "--models-dir", str(models_base))
    assert code == 1 and "m has no version 7; registered: 1, 2" in err


def test_cli_verify_of_a_plain_manifest_says_there_is_nothing_to_verify(capsys, models_base, demo_weights):
    (models_base / "p").mkdir()
    (models_base / "p" / "manifest.yaml").write_text(f"name: p\npath: {demo_weights}\n")
    code, _, err = keel(capsys, "verify", "p", "--models-dir", str(models_base))
    assert code == 1 and "no registered versions" in err


def test_cli_list_shows_plain_manifests_beside_versions(capsys, models_base, two_versions, demo_weights):
    (models_base / "p").mkdir()
    (models_base / "p" / "manifest.yaml").write_text(f"name: p\npath: {demo_weights}\n")
    code, out, _ = keel(capsys, "list", "--models-dir", str(models_base))
    names = [line.split()[:3] for line in out.splitlines()[1:4]]
    assert names == [["m", "1", "registered"], ["m", "2*", "registered"], ["p", "-", "present"]]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tensor-parallel-size", "0"], "tensor parallel size must be at least 1"),
        (["--gpu-memory-gib", "-1"], "GPU memory must be more than 0 GiB"),
        (["--gpu-memory-utilization", "1.5"], "GPU memory utilization must be in (0, 1]"),
    ],
)
def test_cli_nonsense_memory_flags_exit_1(capsys, models_base, model_dir, flags, message):
    code, _, err = keel(
        capsys, "register", "m", "--version", "1", "--path", str(model_dir), "--models-dir", str(models_base), *flags
    )
    assert code == 1 and message in err and list(models_base.iterdir()) == []


def test_cli_list_json_holds_what_the_table_shows(capsys, models_base, two_versions, demo_weights):
    from serving.model_registry.store import retire_version

    retire_version(models_base, "m", "1", reason="bad evals")
    code, out, _ = keel(capsys, "list", "--json", "--models-dir", str(models_base))
    [m] = json.loads(out)
    assert code == 0 and m["name"] == "m" and m["latest"] == "2" and m["manifest"] is None
    assert [(v["ref"], v["state"], v["latest"]) for v in m["versions"]] == [
        ("m@1", "retired", False),
        ("m@2", "registered", True),
    ]
    v1 = m["versions"][0]
    assert v1["retired_reason"] == "bad evals" and v1["bytes"] > 4_000_000 and v1["path"] == str(two_versions[0])
    assert v1["architectures"] == ["LlamaForCausalLM"] and v1["registered_at"].startswith("20")
