"""`keel models register` refuses every directory vLLM could not serve, naming the file and the
problem, and writes nothing; what passes gets an immutable manifest with every file's sha256."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from serving.model_registry.manifest import RegistrationError
from serving.model_registry.store import read_version, register_version, retire_version, verify_version
from tests.unit.model_registry_fixtures import edit_json, shard


def refused(models_base, path, **kw) -> str:
    """Register PATH as m@1; return the refusal's text, after checking nothing was written."""
    with pytest.raises(RegistrationError) as e:
        register_version(models_base, "m", kw.pop("version", "1"), path, **kw)
    assert list(models_base.iterdir()) == [], "a refused registration must write nothing"
    return str(e.value)


# --- what passes ------------------------------------------------------------------------------


def test_register_writes_a_manifest_with_every_files_sha256(models_base, model_dir):
    found, new = register_version(models_base, "m", "1", model_dir)
    assert new
    doc = yaml.safe_load((models_base / "m" / "versions" / "1.yaml").read_text())
    assert doc["name"] == "m" and doc["version"] == "1" and doc["path"] == str(model_dir.resolve())
    assert doc["architectures"] == ["LlamaForCausalLM"] and doc["model_type"] == "llama"
    files = {f["name"]: f for f in doc["files"]}
    weights = (model_dir / "model.safetensors").read_bytes()
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert files["model.safetensors"]["size"] == len(weights)
    assert set(files) >= {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert doc["chat_template"] is True
    # The demo model is 2.2 M float32 parameters; dtype auto serves float32 in 16 bits.
    assert doc["dtypes"] == {"F32": doc["parameter_count"]}
    assert doc["parameter_bytes"] == 4 * doc["parameter_count"] < len(weights)
    assert doc["memory"]["weights_bytes"] == 2 * doc["parameter_count"]
    assert doc["memory"]["served_dtype"] == "16-bit"
    assert doc["created"].endswith("+00:00")


def test_sharded_checkpoint_with_index_registers(models_base, model_dir):
    shards = shard(model_dir)
    found, _ = register_version(models_base, "m", "1", model_dir)
    assert {f.name for f in found.manifest.files} >= set(shards) | {"model.safetensors.index.json"}
    assert found.manifest.parameter_count == 2229504


def test_same_version_same_bytes_is_a_no_op(models_base, model_dir):
    first, new = register_version(models_base, "m", "1", model_dir)
    before = first.file.read_bytes()
    again, new_again = register_version(models_base, "m", "1", model_dir)
    assert new and not new_again
    assert again.file.read_bytes() == before


def test_gpu_memory_check_passes_with_headroom_recorded(models_base, model_dir):
    found, _ = register_version(models_base, "m", "1", model_dir, gpu_memory_gib=1)
    assert found.manifest.memory.headroom_bytes_per_gpu == int(0.9 * (1 << 30)) - 2 * 2229504


# --- refusals: the directory and config.json --------------------------------------------------


def test_missing_directory_is_refused(models_base, tmp_path):
    assert refused(models_base, tmp_path / "nope") == f"{tmp_path / 'nope'}: no such directory"


def test_a_file_instead_of_a_directory_is_refused(models_base, model_dir):
    assert "not a directory" in refused(models_base, model_dir / "config.json")


def test_missing_config_json_is_refused(models_base, model_dir):
    (model_dir / "config.json").unlink()
    assert f"{model_dir / 'config.json'}: missing" in refused(models_base, model_dir)


def test_config_json_that_is_not_json_is_refused(models_base, model_dir):
    (model_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],,}')
    assert f"{model_dir / 'config.json'}: not valid JSON" in refused(models_base, model_dir)


def test_config_json_without_architectures_is_refused(models_base, model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    del config["architectures"]
    (model_dir / "config.json").write_text(json.dumps(config))
    assert "`architectures` must be a non-empty list" in refused(models_base, model_dir)


def test_unknown_architecture_is_refused_with_vllms_close_names(models_base, model_dir):
    edit_json(model_dir / "config.json", architectures=["LlamaForCausalLMX"])
    text = refused(models_base, model_dir)
    assert f"{model_dir / 'config.json'}: architecture LlamaForCausalLMX is not one the installed vLLM" in text
    assert "did you mean LlamaForCausalLM" in text


def test_every_architecture_must_be_supported(models_base, model_dir):
    edit_json(model_dir / "config.json", architectures=["LlamaForCausalLM", "NoSuchModel"])
    assert "architecture NoSuchModel is not one" in refused(models_base, model_dir)


# --- refusals: the tokenizer ------------------------------------------------------------------


def test_no_tokenizer_is_refused(models_base, model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_dir / name).unlink()
    assert f"{model_dir}: the tokenizer does not load" in refused(models_base, model_dir)


def test_tokenizer_without_chat_template_is_refused(models_base, model_dir):
    (model_dir / "chat_template.jinja").unlink()
    text = refused(models_base, model_dir)
    assert f"{model_dir}: the tokenizer has no chat template" in text and "--no-chat" in text


def test_no_chat_registers_a_tokenizer_without_chat_template(models_base, model_dir):
    (model_dir / "chat_template.jinja").unlink()
    found, new = register_version(models_base, "m", "1", model_dir, chat=False)
    assert new and found.manifest.chat_template is False


# --- refusals: the weight files ---------------------------------------------------------------


def test_missing_safetensors_is_refused(models_base, model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    text = refused(models_base, model_dir)
    assert f"{model_dir}: no *.safetensors weight files" in text and "pytorch_model.bin" in text


def test_truncated_safetensors_is_refused_with_the_byte_counts(models_base, model_dir):
    file = model_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-1000])
    text = refused(models_base, model_dir)
    assert f"{file}: truncated: its header describes {len(data):,} bytes, the file has {len(data) - 1000:,}" in text


def test_safetensors_cut_inside_its_header_is_refused(models_base, model_dir):
    file = model_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    assert f"{file}: not a safetensors file" in refused(models_base, model_dir)


def test_safetensors_with_bytes_appended_is_refused(models_base, model_dir):
    file = model_dir / "model.safetensors"
    file.write_bytes(file.read_bytes() + b"\0" * 16)
    assert f"{file}: corrupt: 16 bytes after the tensor data" in refused(models_base, model_dir)


def test_safetensors_header_garbage_is_refused(models_base, model_dir):
    file = model_dir / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"this is not json, it is garbage!"
    file.write_bytes(bytes(data))
    assert f"{file}: not a safetensors file: its header does not parse" in refused(models_base, model_dir)


def test_empty_safetensors_is_refused(models_base, model_dir):
    (model_dir / "model.safetensors").write_bytes(b"")
    assert f"{model_dir / 'model.safetensors'}: empty file" in refused(models_base, model_dir)


def test_index_naming_a_missing_shard_is_refused(models_base, model_dir):
    first, second = shard(model_dir)
    (model_dir / second).unlink()
    index = model_dir / "model.safetensors.index.json"
    assert f"{index}: names shard {second}, which is missing" in refused(models_base, model_dir)


def test_index_mapping_a_tensor_to_the_wrong_shard_is_refused(models_base, model_dir):
    first, second = shard(model_dir)
    index = model_dir / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    tensor = next(t for t, s in doc["weight_map"].items() if s == first)
    doc["weight_map"][tensor] = second
    index.write_text(json.dumps(doc))
    assert f"{index}: maps tensor {tensor} to {second}, which does not hold it" in refused(models_base, model_dir)


def test_index_escaping_the_directory_is_refused(models_base, model_dir):
    shard(model_dir)
    index = model_dir / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"][next(iter(doc["weight_map"]))] = "../outside.safetensors"
    index.write_text(json.dumps(doc))
    assert "'../outside.safetensors' is not a file name in the model directory" in refused(models_base, model_dir)


def test_every_problem_is_listed_at_once(models_base, model_dir):
    edit_json(model_dir / "config.json", architectures=["NoSuchModel"])
    (model_dir / "model.safetensors").write_bytes(b"")
    text = refused(models_base, model_dir)
    assert "architecture NoSuchModel" in text and "model.safetensors: empty file" in text


# --- refusals: names, memory, immutability ----------------------------------------------------


@pytest.mark.parametrize("version", ["1@2", "a/b", "..", "", "-x", "v 1", "1\n"])
def test_bad_version_string_is_refused(models_base, model_dir, version):
    assert f"version {version!r}" in refused(models_base, model_dir, version=version)


def test_weights_larger_than_the_gpu_are_refused(models_base, model_dir):
    text = refused(models_base, model_dir, gpu_memory_gib=0.004)
    assert f"{model_dir}: the weights need 4.3 MiB per GPU" in text and "0.004 GiB GPU" in text


def test_re_register_with_other_bytes_is_refused_naming_the_file(models_base, model_dir):
    found, _ = register_version(models_base, "m", "1", model_dir)
    before = found.file.read_bytes()
    edit_json(model_dir / "generation_config.json", temperature=0.5)
    with pytest.raises(RegistrationError) as e:
        register_version(models_base, "m", "1", model_dir)
    assert "m@1 is already registered with other bytes" in str(e.value)
    assert f"{model_dir / 'generation_config.json'}: differs" in str(e.value)
    assert str(e.value).count("differs") == 1
    assert found.file.read_bytes() == before


def test_re_register_from_another_directory_is_refused(models_base, model_dir, tmp_path, demo_weights):
    register_version(models_base, "m", "1", model_dir)
    other = tmp_path / "copy"
    other.mkdir()
    for f in model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RegistrationError) as e:
        register_version(models_base, "m", "1", other)
    assert f"already registered with the weights at {model_dir}" in str(e.value)


# --- verify and retire ------------------------------------------------------------------------


def test_verify_names_each_file_that_changed_is_missing_or_was_added(models_base, model_dir):
    found, _ = register_version(models_base, "m", "1", model_dir)
    assert verify_version(found) == []
    edit_json(model_dir / "config.json", rms_norm_eps=1e-5)
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "extra.safetensors").write_bytes(b"x")
    problems = verify_version(found)
    assert [p.split(":")[0] for p in problems] == [
        str(model_dir / "config.json"),
        str(model_dir / "extra.safetensors"),
        str(model_dir / "tokenizer.json"),
    ]
    assert "differs" in problems[0] and "not in the manifest" in problems[1] and "missing" in problems[2]


def test_retire_marks_the_version_and_keeps_its_files(models_base, model_dir):
    found, _ = register_version(models_base, "m", "1", model_dir)
    manifest = found.file.read_bytes()
    retired, now = retire_version(models_base, "m", "1", reason="bad eval")
    assert now and retired.state == "retired" and retired.retired.reason == "bad eval"
    assert found.file.read_bytes() == manifest and (model_dir / "model.safetensors").exists()
    again, now_again = retire_version(models_base, "m", "1")
    assert not now_again and read_version(models_base, "m", "1").state == "retired"


def test_retire_of_an_unknown_version_lists_the_known_ones(models_base, model_dir):
    register_version(models_base, "m", "1", model_dir)
    with pytest.raises(RegistrationError, match=r"m@2 is not registered \(versions of m: 1\)"):
        retire_version(models_base, "m", "2")


def test_bad_model_name_is_refused_before_any_file_is_written(models_base, model_dir):
    with pytest.raises(RegistrationError, match=r"model name '\.\./evil'"):
        register_version(models_base, "../evil", "1", model_dir)
    assert list(models_base.iterdir()) == [] and not (models_base.parent / "evil").exists()


def test_a_version_registered_meanwhile_is_compared_not_overwritten(models_base, model_dir, monkeypatch):
    from serving.model_registry import store

    theirs, _ = register_version(models_base, "m", "1", model_dir)
    written = theirs.file.read_bytes()
    edit_json(model_dir / "generation_config.json", temperature=0.1)
    real = store.read_version
    calls = []

    def not_yet_on_first_look(*args):  # the race: our look happens before their write lands
        calls.append(args)
        return None if len(calls) == 1 else real(*args)

    monkeypatch.setattr(store, "read_version", not_yet_on_first_look)
    with pytest.raises(RegistrationError, match="already registered with other bytes"):
        register_version(models_base, "m", "1", model_dir)
    assert theirs.file.read_bytes() == written
    assert [p.name for p in theirs.file.parent.iterdir()] == ["1.yaml"]  # no temporary left behind
