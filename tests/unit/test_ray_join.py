"""`keel serve` joining a Ray cluster by address sends this machine's Ray token, as `ray start`
would have used it: ray.init(address=...) alone never turns token auth on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os; from serving.launcher import use_ray_token_if_any; use_ray_token_if_any(); "
    "print(os.environ.get('RAY_AUTH_MODE'))"
)


def mode_after_join(home, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, "HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def home_with_token(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 64)
    return tmp_path


def test_a_machine_with_a_ray_token_joins_with_token_auth(home_with_token):
    assert mode_after_join(home_with_token) == "token"


def test_a_machine_without_a_token_joins_without_auth(tmp_path):
    assert mode_after_join(tmp_path) == "None"


def test_an_explicit_auth_mode_is_kept(home_with_token):
    assert mode_after_join(home_with_token, RAY_AUTH_MODE="disabled") == "disabled"
