"""Config validation: a bad config fails at start naming the file, the key path and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from serving.cli import main as keel
from serving.config import ConfigError, config_json_schema, load_config, parse_config
from serving.engine.args import EngineArgsError, to_cli_args, validate_engine_args

REPO = Path(__file__).resolve().parents[2]
GOOD = {"models": {"demo": {"weights": "demo-tiny", "engine": {"dtype": "float32", "max_model_len": 512}}}}


def write(tmp_path, doc) -> Path:
    p = tmp_path / "stack.yaml"
    p.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return p


def err(tmp_path, doc, check_engine_args=False) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, doc), check_engine_args=check_engine_args)
    return str(e.value)


def test_shipped_configs_are_valid():
    for name in ("local.yaml", "gpu.example.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.models


def test_unknown_key_names_file_path_and_allowed_keys(tmp_path):
    msg = err(tmp_path, {**GOOD, "server": {"prot": 8000}})
    assert str(tmp_path / "stack.yaml") in msg
    assert "server.prot: unknown key; did you mean 'port'?" in msg
    assert "Allowed: " in msg and "host" in msg


def test_unknown_key_inside_a_named_model(tmp_path):
    doc = {"models": {"demo": {"weights": "demo-tiny", "deployment": {"replicas": 2}}}}
    msg = err(tmp_path, doc)
    assert "models.demo.deployment.replicas: unknown key" in msg
    assert "num_replicas" in msg


def test_wrong_type_shows_the_value(tmp_path):
    msg = err(tmp_path, {**GOOD, "server": {"port": "eighty"}})
    assert "server.port:" in msg and '"eighty"' in msg


def test_missing_models_and_empty_models(tmp_path):
    assert "models: required key is missing" in err(tmp_path, {"server": {}})
    assert "at least one model" in err(tmp_path, {"models": {}})


def test_unregistered_weights_list_the_registered_ones(tmp_path):
    msg = err(tmp_path, {"models": {"demo": {"weights": "gpt-17"}}})
    assert "models.demo.weights" in msg and "demo-tiny" in msg


def test_replicas_and_autoscaling_are_exclusive(tmp_path):
    doc = {
        "models": {
            "demo": {
                "weights": "demo-tiny",
                "deployment": {"num_replicas": 2, "autoscaling": {"min_replicas": 1, "max_replicas": 3}},
            }
        }
    }
    assert "either num_replicas or autoscaling" in err(tmp_path, doc)


def test_engine_args_that_keel_sets_are_rejected(tmp_path):
    doc = {"models": {"demo": {"weights": "demo-tiny", "engine": {"port": 9000}}}}
    assert "port is set by Keel" in err(tmp_path, doc)


def test_engine_args_are_checked_by_vllm(tmp_path):
    typo = {"models": {"demo": {"weights": "demo-tiny", "engine": {"max_model_lenn": 512}}}}
    msg = err(tmp_path, typo, check_engine_args=True)
    assert "models.demo.engine.max_model_lenn: not a vLLM engine argument; did you mean max_model_len" in msg
    bad_choice = {"models": {"demo": {"weights": "demo-tiny", "engine": {"dtype": "float33"}}}}
    msg = err(tmp_path, bad_choice, check_engine_args=True)
    assert "models.demo.engine.dtype" in msg and "float32" in msg  # lists the allowed values


def test_invalid_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in err(tmp_path, "models: [unclosed")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


def test_engine_mapping_becomes_vllm_flags():
    flags = to_cli_args(
        {
            "max_model_len": 512,
            "enforce_eager": True,
            "enable_prefix_caching": False,
            "served_extra": None,
            "override_generation_config": {"temperature": 0.5},
        }
    )
    assert flags == [
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--override-generation-config",
        '{"temperature": 0.5}',
    ]
    validate_engine_args({"max_model_len": 512, "enforce_eager": True, "enable_prefix_caching": False})
    with pytest.raises(EngineArgsError):
        validate_engine_args({"max_model_len": "lots"})


def test_json_schema_forbids_unknown_keys_and_documents_fields():
    schema = config_json_schema()
    assert schema["additionalProperties"] is False
    assert "models" in schema["required"]
    server = schema["$defs"]["ServerConfig"]
    assert server["additionalProperties"] is False and "port" in server["properties"]


def test_cli_validate_and_schema(tmp_path, capsys):
    assert keel(["config", "validate", str(REPO / "configs" / "local.yaml")]) == 0
    assert "ok" in capsys.readouterr().out
    assert keel(["config", "validate", str(write(tmp_path, {**GOOD, "extra": 1}))]) == 2
    assert "extra: unknown key" in capsys.readouterr().err
    out = tmp_path / "schema.json"
    assert keel(["config", "schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["title"] == "Keel stack config"


def test_parse_config_rejects_non_mapping():
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(["models"], check_engine_args=False)


def test_serve_fails_fast_when_the_port_is_taken():
    import socket

    from serving.launcher import StartupError, check_port_free

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(StartupError, match=f"127.0.0.1:{port} is not available.*server.port"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again


def test_the_metrics_listener_needs_its_own_free_port():
    import socket

    from serving.launcher import StartupError, check_port_free

    with pytest.raises(ConfigError, match="server: .*metrics_port must differ from port"):
        parse_config(
            {"server": {"port": 9000, "metrics_port": 9000}, "models": {"demo": {"weights": "demo-tiny"}}},
            check_engine_args=False,
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(StartupError, match=f"127.0.0.1:{port} .*server.metrics_port"):
            check_port_free("127.0.0.1", port, "server.metrics_port")


def test_the_ready_message_names_the_demo_key_only_when_the_config_holds_it():
    """`keel serve` prints how to call it; the demo key only for a config that accepts it."""
    from serving.launcher import ready_message
    from serving.policy.identity import DEMO_KEY, key_digest

    local = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    assert f"KEEL_API_KEY={DEMO_KEY}" in ready_message(
        parse_config(local, check_engine_args=False), "http://127.0.0.1:8000"
    )
    local["tenants"]["demo"]["keys"][0]["digest"] = key_digest("sk-keel-another-key")  # same id, other key
    message = ready_message(parse_config(local, check_engine_args=False), "http://127.0.0.1:8000")
    assert DEMO_KEY not in message and "Bearer $KEEL_API_KEY" in message


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "keel.internal"])
def test_a_gateway_beyond_loopback_without_keys_is_refused_with_how_to_make_one(tmp_path, host):
    msg = err(tmp_path, {**GOOD, "server": {"host": host}})
    assert f"server.host: {host} is reachable beyond this machine" in msg
    assert "keel keys create --tenant NAME" in msg and "server.allow_unauthenticated: true" in msg


@pytest.mark.parametrize(
    "server, tenants",
    [
        ({"host": "127.0.0.1"}, None),
        ({"host": "localhost"}, None),
        ({"host": "::1"}, None),
        ({"host": "0.0.0.0", "allow_unauthenticated": True}, None),
        ({"host": "0.0.0.0"}, {"acme": {"keys": [{"id": "k1", "digest": "sha256:" + "0" * 64}]}}),
    ],
)
def test_loopback_keys_or_an_explicit_opt_out_may_start(tmp_path, server, tenants):
    doc = {**GOOD, "server": server, **({"tenants": tenants} if tenants else {})}
    cfg = load_config(write(tmp_path, doc), check_engine_args=False)
    assert cfg.server.host == server["host"]


def test_each_policy_schema_module_imports_first_without_a_cycle():
    """Whichever schema module is imported first, it loads: no import cycle, no import-order workaround."""
    import importlib
    import sys

    saved = {name: mod for name, mod in sys.modules.items() if name == "serving" or name.startswith("serving.")}
    try:
        for target in (
            "serving.policy.guardrails.config",
            "serving.policy.quotas.config",
            "serving.policy.quotas.gcra",
            "serving.policy.config",
            "serving.config",
        ):
            for name in [n for n in sys.modules if n == "serving" or n.startswith("serving.")]:
                del sys.modules[name]
            importlib.import_module(target)
    finally:
        for name in [n for n in sys.modules if n == "serving" or n.startswith("serving.")]:
            del sys.modules[name]
        sys.modules.update(saved)
