"""The few pieces of HTTP/1.1 the gateway handles itself: a response head, a chunked body, a GET.

Off the hot path only: used for error bodies, health checks and metrics scrapes.
"""

from __future__ import annotations

import asyncio


def parse_head(head: bytes) -> tuple[int, list[tuple[str, str]]]:
    """Status and headers (names lower-cased, order kept) of a response head without its CRLFCRLF."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip().lower(), value.strip()))
    return int(parts[1]), headers


def decode_chunked(body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(body[pos:eol].split(b";", 1)[0] or b"0", 16)
        if size == 0:
            break
        out += body[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2
    return bytes(out)


async def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET with Connection: close; returns (status, body). Raises OSError / TimeoutError."""

    async def _get() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n\r\n".encode())
            data = await reader.read(-1)
        finally:
            writer.close()
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            raise OSError("incomplete HTTP response")
        status, headers = parse_head(head)
        if any(k == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
            body = decode_chunked(body)
        return status, body

    return await asyncio.wait_for(_get(), timeout)
