import pytest

from serving.policy.identity import (
    KEY_PREFIX,
    AuthError,
    KeyEntry,
    KeyRing,
    Principal,
    check_digest,
    generate_key,
    key_digest,
)


def ring_with(*keys: tuple[str, str, str, str]) -> KeyRing:
    return KeyRing([KeyEntry(digest=key_digest(k), tenant=t, key_id=i, role=r) for k, t, i, r in keys])


def test_generated_key_authenticates_as_its_tenant_key_and_role():
    key = generate_key()
    ring = ring_with((key, "acme", "key-1", "admin"))
    assert ring.authenticate(f"Bearer {key}") == Principal(tenant="acme", key_id="key-1", role="admin")


def test_generated_keys_have_the_prefix_and_differ():
    a, b = generate_key(), generate_key()
    assert a.startswith(KEY_PREFIX) and b.startswith(KEY_PREFIX)
    assert a != b


def test_each_key_maps_to_its_own_tenant():
    k1, k2 = generate_key(), generate_key()
    ring = ring_with((k1, "acme", "a", "app"), (k2, "globex", "g", "app"))
    assert ring.authenticate(f"Bearer {k2}").tenant == "globex"
    assert ring.authenticate(f"Bearer {k1}").tenant == "acme"


def test_bearer_scheme_is_case_insensitive_and_spacing_tolerated():
    key = generate_key()
    ring = ring_with((key, "acme", "key-1", "app"))
    assert ring.authenticate(f"bearer   {key}  ").key_id == "key-1"


@pytest.mark.parametrize("header", [None, "", "   ", "Bearer", "Bearer   "])
def test_missing_key_is_401_telling_how_to_send_one(header):
    ring = ring_with((generate_key(), "acme", "key-1", "app"))
    with pytest.raises(AuthError) as e:
        ring.authenticate(header)
    assert e.value.status == 401
    assert "Authorization: Bearer <key>" in e.value.message


def test_unknown_key_is_401_without_echoing_the_key():
    ring = ring_with((generate_key(), "acme", "key-1", "app"))
    stranger = generate_key()
    with pytest.raises(AuthError) as e:
        ring.authenticate(f"Bearer {stranger}")
    assert e.value.status == 401
    assert e.value.message == "Invalid API key"
    assert stranger not in str(e.value) and stranger[len(KEY_PREFIX) :] not in e.value.body().decode()


def test_non_bearer_scheme_is_401_without_echoing_the_credentials():
    key = generate_key()
    ring = ring_with((key, "acme", "key-1", "app"))
    with pytest.raises(AuthError) as e:
        ring.authenticate(f"Basic {key}")
    assert e.value.status == 401
    assert key not in e.value.message
    assert "Bearer" in e.value.message


def test_a_key_that_differs_by_one_character_is_rejected():
    key = generate_key()
    ring = ring_with((key, "acme", "key-1", "app"))
    near = key[:-1] + ("A" if key[-1] != "A" else "B")
    with pytest.raises(AuthError):
        ring.authenticate(f"Bearer {near}")


def test_auth_error_body_is_openai_shaped_authentication_error():
    ring = ring_with((generate_key(), "acme", "key-1", "app"))
    with pytest.raises(AuthError) as e:
        ring.authenticate(None)
    assert b'"type": "authentication_error"' in e.value.body()


def test_duplicate_digest_is_rejected_naming_both_key_ids():
    key = generate_key()
    with pytest.raises(ValueError) as e:
        ring_with((key, "acme", "first-key", "app"), (key, "globex", "second-key", "app"))
    assert "first-key" in str(e.value) and "second-key" in str(e.value)


def test_unknown_role_is_rejected():
    with pytest.raises(ValueError, match="role"):
        ring_with((generate_key(), "acme", "key-1", "owner"))


DIGEST_OF_EXAMPLE = "b72fd17001a0780a27e54d8be3c7942e0daf01e66abeab3b7b6f44e1bda1bf39"  # sha256("sk-keel-example")


def test_key_digest_is_sha256_hex_and_passes_the_format_check():
    d = key_digest("sk-keel-example")
    # a fixed value: SHA-256 of the UTF-8 key, hex, with the scheme prefix
    assert d == "sha256:" + DIGEST_OF_EXAMPLE
    assert check_digest(d) == d


@pytest.mark.parametrize(
    "bad",
    [
        "sha256:" + "a" * 63,  # too short
        "sha256:" + "a" * 65,  # too long
        "sha256:" + "g" * 64,  # not hex
        "md5:" + "a" * 64,  # wrong algorithm
        "a" * 64,  # no prefix
        " sha256:" + "a" * 64,  # stray whitespace
    ],
)
def test_malformed_digest_is_rejected_with_the_expected_format(bad):
    with pytest.raises(ValueError, match="64 lowercase hex"):
        check_digest(bad)


def test_uppercase_digest_is_rejected_saying_lowercase():
    with pytest.raises(ValueError, match="lowercase"):
        check_digest("sha256:" + "A" * 64)


def test_a_raw_key_in_the_digest_field_is_rejected_without_repeating_it():
    key = generate_key()
    with pytest.raises(ValueError) as e:
        check_digest(key)
    assert "keel keys digest" in str(e.value)
    assert key not in str(e.value)


def test_keyring_rejects_a_malformed_digest():
    with pytest.raises(ValueError):
        KeyRing([KeyEntry(digest="sha256:nothex", tenant="acme", key_id="k", role="app")])


def test_keyring_from_tenants_config_shape():
    from types import SimpleNamespace as NS

    key = generate_key()
    tenants = {"acme": NS(keys=[NS(id="k1", digest=key_digest(key), role="app")])}
    ring = KeyRing.from_tenants(tenants)
    assert len(ring) == 1
    assert ring.authenticate(f"Bearer {key}") == Principal("acme", "k1", "app")


# -- CLI -------------------------------------------------------------------------------------------


def run_keys_create(capsys, *args):
    import re

    from serving.cli import main

    assert main(["keys", "create", "--tenant", "acme", *args]) == 0
    out = capsys.readouterr().out
    key = re.search(r"sk-keel-[A-Za-z0-9_-]+", out).group(0)
    snippet = re.search(r"- \{id: (\S+), digest: \"(sha256:[0-9a-f]{64})\", role: (\w+)\}", out)
    return out, key, snippet


def test_cli_keys_create_prints_a_key_and_the_config_line_with_its_digest(capsys):
    out, key, snippet = run_keys_create(capsys)
    assert "shown only once" in out
    assert "tenants.acme.keys" in out
    assert snippet.group(2) == key_digest(key)
    assert snippet.group(3) == "app"
    assert __import__("re").fullmatch(r"key-[0-9a-f]{6}", snippet.group(1))


def test_cli_keys_create_snippet_authenticates_the_printed_key_with_the_chosen_id_and_role(capsys):
    import yaml

    _, key, snippet = run_keys_create(capsys, "--role", "admin", "--id", "ci-bot")
    [entry] = yaml.safe_load(snippet.group(0))
    ring = KeyRing([KeyEntry(digest=entry["digest"], tenant="acme", key_id=entry["id"], role=entry["role"])])
    assert ring.authenticate(f"Bearer {key}") == Principal("acme", "ci-bot", "admin")


def test_cli_keys_create_rejects_an_id_that_would_break_the_yaml(capsys):
    from serving.cli import main

    with pytest.raises(SystemExit) as e:
        main(["keys", "create", "--tenant", "acme", "--id", "a, b}"])
    assert e.value.code == 2


def test_cli_keys_digest_reads_the_key_from_stdin(capsys, monkeypatch):
    import io

    from serving.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("sk-keel-existing\n"))
    assert main(["keys", "digest"]) == 0
    assert capsys.readouterr().out.strip() == key_digest("sk-keel-existing")


def test_cli_keys_digest_fails_on_empty_stdin(capsys, monkeypatch):
    import io

    from serving.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["keys", "digest"]) == 2
