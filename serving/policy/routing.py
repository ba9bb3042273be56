"""Sticky A/B routing: a public model name maps to weighted variants (configured model names).

A user's variant is decided by weighted rendezvous hashing (highest random weight) over a keyed
hash of (experiment, tenant, user, variant): each variant draws u_v in (0, 1) and scores
-w_v / ln(u_v); the highest score wins. The draw depends only on the inputs, so a user keeps their
variant across requests, replicas and restarts, and changing one variant's weight only moves users
into or out of that variant (the other variants' scores are untouched).

Shadow mirroring picks a share of *requests* (not users), also by a keyed hash, so it is the same
decision on every replica.
"""

from __future__ import annotations

import hashlib
import math
import re

from pydantic import field_validator, model_validator

from serving.schema import Strict as _Strict

_TWO_64 = float(1 << 64)
# Separate hash domains, so a variant draw and a shadow draw never share bits.
_VARIANT_PERSON = b"keel-ab-variant"
_SHADOW_PERSON = b"keel-ab-shadow"
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")


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


class ShadowConfig(_Strict):
    """Mirror a share of an experiment's requests to one more model; its answers are discarded."""

    variant: str
    percent: float  # 0 < percent <= 100: share of requests mirrored to `variant`

    @field_validator("variant")
    @classmethod
    def _variant_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("shadow variant must name a configured model")
        return value

    @field_validator("percent")
    @classmethod
    def _percent_in_range(cls, value: float) -> float:
        if not (0 < value <= 100):
            raise ValueError(f"shadow percent must be > 0 and <= 100, got {value}")
        return value


class Experiment(_Strict):
    """One public model name split across weighted variants, each a configured model name."""

    variants: dict[str, float]  # model (deployment) name -> weight >= 0
    shadow: ShadowConfig | None = None
    user_header: str = "x-keel-user"  # fallback header for the end-user id when the body has no `user`

    @field_validator("variants")
    @classmethod
    def _weights_usable(cls, variants: dict[str, float]) -> dict[str, float]:
        if not variants:
            raise ValueError("give at least one variant: {model name: weight}")
        for name, weight in variants.items():
            if not name.strip():
                raise ValueError("variant names must be configured model names, got an empty name")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(
                    f"variant {name!r} has weight {weight}; weights must be finite and >= 0 "
                    "(0 drains a variant: it gets no new users)"
                )
        if not any(weight > 0 for weight in variants.values()):
            raise ValueError("at least one variant needs a weight > 0, or nobody can be routed")
        return variants

    @field_validator("user_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        # Header names are matched lower-cased, as the gateway stores them.
        name = value.strip().lower()
        if not _HEADER_NAME.match(name):
            raise ValueError(f"user_header {value!r} is not a valid HTTP header name")
        return name

    @model_validator(mode="after")
    def _shadow_is_not_the_live_model(self):
        if self.shadow is None:
            return self
        live = [name for name, weight in self.variants.items() if weight > 0]
        if live == [self.shadow.variant]:
            raise ValueError(
                f"shadow.variant {self.shadow.variant!r} is the only variant with weight > 0, so "
                "every mirrored request would go to the model that already served it; shadow a "
                "different model"
            )
        return self
