"""The base of every config model a user writes: unknown keys are errors, not silently ignored."""

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def one_of(value: str, allowed: Iterable[str]) -> str:
    """`value` if it is one of `allowed` (a registry's names); else an error naming the allowed ones."""
    names = list(allowed)
    if value in names:
        return value
    quoted = [repr(n) for n in names]
    expected = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    raise ValueError(f"should be {expected}")
