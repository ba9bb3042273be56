"""Engine arguments: a config's `engine:` mapping, checked by vLLM's own `vllm serve` parser.

The mapping uses the parser's destinations (snake_case flag names). Turning it into command
line flags and parsing them with vLLM's parser validates names, types and choices exactly as
vLLM will when the replica starts the engine.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from typing import Any


class EngineArgsError(ValueError):
    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key


def to_cli_args(engine: dict[str, Any]) -> list[str]:
    """{'max_model_len': 512, 'enforce_eager': True} -> ['--max-model-len', '512', '--enforce-eager']."""
    out: list[str] = []
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (dict, list)) and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            out += [flag, json.dumps(value)]
        elif isinstance(value, list):
            out += [flag, *value]
        else:
            out += [flag, str(value)]
    return out


class _RaisingParserMixin:
    def error(self, message):  # argparse would print usage and exit the process
        raise EngineArgsError(message)


@lru_cache(maxsize=1)
def _parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cls = type("RaisingParser", (_RaisingParserMixin, FlexibleArgumentParser), {})
    return make_arg_parser(cls(add_help=False))


def engine_arg_names() -> list[str]:
    return sorted({a.dest for a in _parser()._actions if a.dest and a.dest != "help"})


def validate_engine_args(engine: dict[str, Any]) -> None:
    names = set(engine_arg_names())
    for key in engine:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise EngineArgsError(f"not a vLLM engine argument{hint} (see `vllm serve --help`)", key)
    try:
        _parser().parse_args(["placeholder-model", *to_cli_args(engine)])
    except EngineArgsError as e:
        named = next((k for k in engine if "--" + k.replace("_", "-") in e.message), None)
        raise EngineArgsError(e.message, named) from None
