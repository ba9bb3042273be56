"""The gateway's limits: sizes, counts and times, each with a value (`server.limits:`).

Every byte a client sends may come from an attacker, so nothing a client controls is
unbounded: how long a request head or body may take to arrive, how big a head, a header line
or a body may be, how many connections and requests the gateway holds at once, how much
request-body memory it holds in all; and, on the engine side, how long an engine may stay
silent before its request is given up, and how many idle keep-alive connections to it are
kept, for how long. The defaults follow the well-kept servers (uvicorn,
aiohttp, nginx) where they agree; `benchmarks/hostile_load.py` measures a gateway under the
attacks they stop.
"""

from __future__ import annotations

from pydantic import Field

from serving.schema import Strict

MIB = 1024 * 1024


class HttpLimits(Strict):
    max_body_bytes: int = Field(
        8 * MIB, ge=1024, description="A request body larger than this gets 413, before it is read."
    )
    max_request_line_bytes: int = Field(
        8192, ge=256, description="A request line (method, target, version) longer than this gets 414."
    )
    max_header_bytes: int = Field(
        32768, ge=1024, description="Header names and values of one request, summed; more gets 431."
    )
    max_headers: int = Field(100, ge=8, description="Header lines per request; more gets 431.")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request head must arrive whole within this from its first byte (a slow sender gets 408).",
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="A request body must arrive whole within this from the end of its head (408)."
    )
    keepalive_timeout_s: float = Field(
        5.0,
        gt=0,
        description="A connection with no request in progress is closed after this idle "
        "time (also a new connection that sends nothing).",
    )
    max_connections: int = Field(
        8192,
        ge=1,
        description="Client connections held at once; the next one gets 503 + "
        "retry-after and is closed. Capped at start below the process's open-file limit.",
    )
    max_requests_in_flight: int = Field(
        4096,
        ge=1,
        description="Requests accepted and not yet answered, all connections together; "
        "the next gets 503 + retry-after without its body being read.",
    )
    max_buffered_body_bytes: int = Field(
        256 * MIB,
        ge=MIB,
        description="Request-body bytes held in memory at once, all requests "
        "together (a body counts from its head to its end); a request that would pass it gets 503 "
        "+ retry-after without its body being read.",
    )
    engine_idle_timeout_s: float = Field(
        600.0,
        gt=0,
        description="An engine that sends nothing for this long (no response head, no "
        "token) has its request ended: 504, or an error event if the stream had begun. A "
        "non-streamed answer arrives whole at the end, so allow for the longest generation.",
    )
    engine_keepalive_connections: int = Field(
        64,
        ge=0,
        le=4096,
        description="Idle keep-alive connections kept per engine replica, for the next "
        "requests (vLLM's server pays dearly for a new connection under load); 0: a new "
        "connection per request, closed after it.",
    )
    engine_keepalive_s: float = Field(
        3.0,
        gt=0,
        le=60,
        description="An idle engine connection is used only this long after its last "
        "response; keep it below the engine's own keep-alive timeout (vLLM: 5 s, "
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE), so no request goes out on a connection the engine is closing.",
    )
