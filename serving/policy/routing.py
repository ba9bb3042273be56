"""Sticky A/B routing: a public model name maps to weighted variants (configured model names).

A user's variant is decided by weighted rendezvous hashing (highest random weight) over a keyed
hash of (experiment, tenant, user, variant): each variant draws u_v in (0, 1) and scores
-w_v / ln(u_v); the highest score wins. The draw depends only on the inputs, so a user keeps their
variant across requests, replicas and restarts, and changing one variant's weight only moves users
into or out of that variant (the other variants' scores are untouched).

Shadow mirroring picks a share of *requests* (not users), also by a keyed hash, so it is the same
decision on every replica. The experiments' schema (`Experiment`) is in serving.policy.config.
"""

from __future__ import annotations

import hashlib
import math

_TWO_64 = float(1 << 64)
# Separate hash domains, so a variant draw and a shadow draw never share bits.
_VARIANT_PERSON = b"keel-ab-variant"
_SHADOW_PERSON = b"keel-ab-shadow"


def _key(*parts: str) -> bytes:
    # Length-prefixed, so ("ab", "c") and ("a", "bc") differ; surrogatepass so no user id can raise.
    return "".join([f"{len(part)}:{part}" for part in parts]).encode("utf-8", "surrogatepass")


def _unit_interval(digest: bytes) -> float:
    # Midpoint of the 2**-64 bucket: strictly inside (0, 1), so ln(u) is finite and negative.
    return (int.from_bytes(digest, "big") + 0.5) / _TWO_64


def assign_variant(experiment: str, tenant: str, user: str, variants: dict[str, float]) -> str:
    """The variant (model name) this end user of this tenant gets in this experiment.

    Weights need not sum to anything; a weight of 0 gets no users. Raises ValueError when no
    weight is > 0.
    """
    prefix = hashlib.blake2b(_key(experiment, tenant, user), digest_size=8, person=_VARIANT_PERSON)
    best_name: str | None = None
    best_score = -1.0
    for name, weight in variants.items():
        if not weight > 0:
            continue
        draw = prefix.copy()
        draw.update(_key(name))
        score = -weight / math.log(_unit_interval(draw.digest()))
        if score > best_score:
            best_name, best_score = name, score
    if best_name is None:
        raise ValueError(f"experiment {experiment!r} has no variant with weight > 0")
    return best_name


def shadow_selected(experiment: str, request_id: str, percent: float) -> bool:
    """Whether this request is mirrored to the shadow variant; the same answer for the same id."""
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    draw = hashlib.blake2b(_key(experiment, request_id), digest_size=8, person=_SHADOW_PERSON)
    return _unit_interval(draw.digest()) * 100.0 < percent
