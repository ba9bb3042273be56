"""Who is calling: API keys (`Authorization: Bearer <key>`) that belong to tenants.

The config holds only key digests, so a leaked config file leaks no keys. `keel keys create`
makes a key and prints the digest to paste under `tenants.<name>.keys`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serving.errors import GatewayError

KEY_PREFIX = "sk-keel-"
ROLES = ("app", "admin")
_DIGEST_PREFIX = "sha256:"
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")

MISSING_KEY_MESSAGE = "Missing API key: send `Authorization: Bearer <key>`"
NOT_BEARER_MESSAGE = "Unsupported Authorization header: send `Authorization: Bearer <key>`"
INVALID_KEY_MESSAGE = "Invalid API key"


# The key of the demo tenant in configs/local.yaml. Public: for loopback use only.
DEMO_KEY = "sk-keel-demo"


def generate_key() -> str:
    """A new API key: the prefix (so scanners and people recognise it) and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    """What the config stores for a key: "sha256:<hex>"."""
    return _DIGEST_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_digest(s: str) -> str:
    """Return `s` if it is a key digest as `keel keys create` prints it; ValueError otherwise."""
    if isinstance(s, str) and _DIGEST_RE.fullmatch(s):
        return s
    if isinstance(s, str) and s.startswith(KEY_PREFIX):
        # The message must not repeat the value: it is a live key that belongs nowhere in a config.
        raise ValueError(
            "this is an API key, not its digest: never put a key in the config; "
            "run `keel keys digest` and paste its output (then rotate this key)"
        )
    if isinstance(s, str) and s.lower().startswith(_DIGEST_PREFIX) and _DIGEST_RE.fullmatch(s.lower()):
        raise ValueError("the digest must be lowercase: 'sha256:' followed by 64 lowercase hex characters")
    raise ValueError(
        "must be 'sha256:' followed by 64 lowercase hex characters, "
        "as `keel keys create` or `keel keys digest` prints it"
    )


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, as later stages (quotas, audit, routing) see it."""

    tenant: str
    key_id: str
    role: str  # "app" | "admin"


@dataclass(frozen=True)
class KeyEntry:
    digest: str
    tenant: str
    key_id: str
    role: str = "app"


class AuthError(GatewayError):
    """401 for a request without a usable key. The message never contains the presented key."""

    def __init__(self, message: str):
        super().__init__(401, message, code="invalid_api_key", headers={"www-authenticate": 'Bearer realm="keel"'})


class KeyRing:
    """The keys the gateway accepts, looked up by digest."""

    def __init__(self, entries: Iterable[KeyEntry]):
        by_digest: dict[str, KeyEntry] = {}
        for e in entries:
            check_digest(e.digest)
            if e.role not in ROLES:
                raise ValueError(
                    f"key `{e.key_id}` of tenant `{e.tenant}`: role must be one of {', '.join(ROLES)}, not `{e.role}`"
                )
            if e.digest in by_digest:
                other = by_digest[e.digest]
                raise ValueError(
                    f"keys `{other.tenant}/{other.key_id}` and `{e.tenant}/{e.key_id}` "
                    "have the same digest: a key must belong to one tenant only; "
                    "remove one of them"
                )
            by_digest[e.digest] = e
        self._by_digest = by_digest

    @classmethod
    def from_tenants(cls, tenants: Mapping[str, Any]) -> KeyRing:
        """From the config's `tenants:` mapping (objects with `.keys`, each with id, digest, role)."""
        return cls(
            KeyEntry(digest=k.digest, tenant=name, key_id=k.id, role=k.role)
            for name, t in tenants.items()
            for k in t.keys
        )

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an `Authorization` header value; AuthError (401) when there is none."""
        if authorization is None or not authorization.strip():
            raise AuthError(MISSING_KEY_MESSAGE)
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthError(NOT_BEARER_MESSAGE)
        key = key.strip()
        if not key:
            raise AuthError(MISSING_KEY_MESSAGE)
        presented = key_digest(key)
        # Looked up by the key's SHA-256, never by the key: how long the lookup takes depends on
        # the digest, which tells an attacker nothing about which keys exist or how close a guess
        # came, so no separate constant-time comparison is needed.
        entry = self._by_digest.get(presented)
        if entry is None:
            raise AuthError(INVALID_KEY_MESSAGE)
        return Principal(tenant=entry.tenant, key_id=entry.key_id, role=entry.role)
