"""The request body, parsed once into JSON that every later stage can read and write back.

Parsing is orjson's: it refuses in C what would fail later when a stage re-serialises the body
(lone surrogates such as `"\\ud800"`, NaN, Infinity, numbers that overflow a double, invalid
UTF-8), stops at 1024 levels instead of recursing until RecursionError, and reads integers
beyond 64 bits as floats, which it can write back. Keel's own limit is MAX_JSON_DEPTH levels:
orjson.dumps stops at 255, and guardrails, templates and the audit log walk the body too.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from serving.errors import GatewayError

MAX_JSON_DEPTH = 64  # objects and arrays inside each other, the body itself counted
_COUNT_BRACKETS_UP_TO = 65536  # bytes
_BOM = b"\xef\xbb\xbf"  # tolerated, as json.loads (and so the engine) tolerates it


def parse(body: bytes) -> dict:
    """The body as a JSON object; GatewayError 400 otherwise."""
    if not body:
        raise GatewayError(400, "The request body is empty; send a JSON object.")
    if body.startswith(_BOM):
        body = body[3:]
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise _why_not_json(body, e) from None
    if type(payload) is not dict:
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
    # Few brackets cannot nest deeply: counting them (in C) spares most bodies the walk. A large
    # body is walked instead: the walk costs per object and array, the count per byte.
    if len(body) > _COUNT_BRACKETS_UP_TO or body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:
        field = _too_deep(payload)
        if field is not None:
            raise _depth_error(field)
    return payload


def _too_deep(payload: dict) -> str | None:
    """The top-level field whose value nests past MAX_JSON_DEPTH, if one does."""
    stack = [(v, 2, k) for k, v in payload.items() if type(v) is dict or type(v) is list]
    while stack:
        node, depth, field = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return field
        for child in node.values() if type(node) is dict else node:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1, field))
    return None


def _depth_error(field: str | None) -> GatewayError:
    where = f"`{_printable(field)}` nests" if field else "The request body nests"
    return GatewayError(
        400,
        f"{where} JSON more than {MAX_JSON_DEPTH} levels deep.",
        code="invalid_json",
        param=_printable(field) if field else None,
    )


class _NonFinite:
    """What the stdlib parser makes of NaN and Infinity here, so the walk can find them."""


def _why_not_json(body: bytes, e: orjson.JSONDecodeError) -> GatewayError:
    """The 400 for a body orjson refused: the field at fault when the body is otherwise JSON (a
    lone surrogate, NaN, an overflowing number, nesting), else the parser's message.
    Only refused bodies come here, so its cost is theirs."""
    if "depth limit" in str(e):
        return _depth_error(_deep_member(body))
    try:
        doc = json.loads(body, parse_constant=lambda _: _NonFinite())
    except RecursionError:
        return _depth_error(_deep_member(body))
    except ValueError:  # UnicodeDecodeError included
        return GatewayError(400, f"The request body is not valid JSON: {e}", code="invalid_json")
    found = _unencodable(doc)
    if found is None:
        return GatewayError(400, f"The request body is not valid JSON: {e}", code="invalid_json")
    path, what = found
    return GatewayError(400, f"`{path}` {what}.", code="invalid_json", param=path)


def _unencodable(doc: Any) -> tuple[str, str] | None:
    """(path, what is wrong) of the first value JSON for a model cannot hold."""
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                sub = f"{path}.{k}" if path else str(k)
                if not _valid_unicode(k):
                    return _printable(
                        sub
                    ), "has a key with a lone surrogate (a \\ud800-\\udfff escape without its pair)"
                stack.append((v, sub))
        elif isinstance(node, list):
            stack.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node))
        elif isinstance(node, str) and not _valid_unicode(node):
            return _printable(
                path
            ), "holds a lone surrogate (a \\ud800-\\udfff escape without its pair); send valid Unicode"
        elif isinstance(node, _NonFinite) or (isinstance(node, float) and not math.isfinite(node)):
            return _printable(path), "is not a finite number (NaN, Infinity or beyond a double's range)"
    return None


def _deep_member(body: bytes) -> str | None:
    """The first top-level member of a body too deep for the parsers, read one member at a time."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    decoder = json.JSONDecoder()
    ws = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]  # in CPython's json, not in its stubs
    i = ws(text, 0).end()
    if text[i : i + 1] != "{":
        return None
    i += 1
    try:
        while True:
            i = ws(text, i).end()
            if text[i : i + 1] != '"':
                return None
            key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]  # as WHITESPACE
            i = ws(text, i).end()
            if text[i : i + 1] != ":":
                return None
            try:
                _, i = decoder.raw_decode(text, ws(text, i + 1).end())
            except RecursionError:
                return key
            i = ws(text, i).end()
            if text[i : i + 1] != ",":
                return None
            i += 1
    except ValueError:
        return None


def _valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(s: str) -> str:
    """Text safe to put in an error body and the audit log (lone surrogates escaped)."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")
