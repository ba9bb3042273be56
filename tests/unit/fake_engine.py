"""A stand-in engine HTTP server for gateway unit tests (the e2e tests use real vLLM)."""

from __future__ import annotations

import asyncio
import json

METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="demo"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="demo"} 3.0
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1.0
"""


class FakeEngine:
    """Streams `chunks` SSE events per request, `delay` apart; or answers `error_status`."""

    def __init__(
        self,
        chunks: int = 3,
        delay: float = 0.0,
        error_status: int | None = None,
        error_body: bytes = b"",
        tokens: list[str] | None = None,
        prompt_tokens: int = 7,
        field: str = "content",
        alternatives: dict[str, list[str]] | None = None,
        die_after: int | None = None,
        keep_alive: bool = False,
        drop_reused: int = 0,
        says_close: bool = False,
    ):
        """tokens: answer like vLLM does, with these as the generated text pieces (role chunk,
        content chunks, a finish_reason chunk, a usage chunk when asked, [DONE]), with logprobs
        when the request asks (alternatives: token -> other tokens its top_logprobs list) and,
        on /v1/completions, the prompt first when it asks for `echo`.
        field: where a chat answer puts the pieces: content, refusal, reasoning,
        reasoning_content, or tool_arguments (the arguments of one tool call).
        keep_alive: serve further requests on a connection, as uvicorn does (otherwise every
        answer says `connection: close` and the connection closes after it).
        drop_reused: close this many connections, without an answer, when a second request
        arrives on them (an engine closing an idle connection as a request goes out).
        says_close: with keep_alive, answer `connection: close` yet go on serving the connection
        (so a gateway that reused it anyway would be seen doing so)."""
        self.says_close = says_close
        self.keep_alive = keep_alive
        self.drop_reused = drop_reused
        self.connections = 0  # connections accepted
        self.dropped = 0
        self.tokens = tokens
        self.field = field
        self.alternatives = alternatives or {}
        self.die_after = die_after  # events sent before the "engine" dies (its connection reset)
        self.prompt_tokens = prompt_tokens
        self.chunks = chunks
        self.delay = delay
        self.error_status = error_status
        self.error_body = error_body
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.disconnects = 0
        self.completed = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as e:
                    if e.partial or not served:
                        self.disconnects += 1  # hung up inside a request (or before sending one)
                    break
                if served and self.drop_reused:
                    self.drop_reused -= 1
                    self.dropped += 1
                    break
                served += 1
                if not await self._serve(raw.decode("latin-1"), reader, writer) or not self.keep_alive:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):  # the gateway hung up first
            self.disconnects += 1
        writer.close()

    def _head(self, head: bytes) -> bytes:
        """A response head as this engine sends it: with `connection: close` unless keep_alive
        (and not says_close)."""
        return head if self.keep_alive and not self.says_close else head[:-2] + b"connection: close\r\n\r\n"

    async def _serve(self, head: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request; False when the connection is done."""
        lines = head.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ":" in ln)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if lines[0].startswith("GET /metrics"):
            text = METRICS.encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(text) + text
            )
            await writer.drain()
            return False
        self.requests.append((lines[0], headers, body))
        if self.error_status:
            writer.write(
                self._head(
                    f"HTTP/1.1 {self.error_status} Err\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(self.error_body)}\r\n\r\n".encode()
                )
                + self.error_body
            )
            await writer.drain()
            return True
        req = json.loads(body)
        try:
            if self.tokens is not None:
                await self._answer_like_vllm(reader, writer, req, lines[0])
            else:
                await self._answer_plain(reader, writer, req.get("stream", False))
            await writer.drain()
            self.completed += 1
            return True
        except (ConnectionResetError, BrokenPipeError):
            self.disconnects += 1
            return False

    async def _answer_plain(self, reader, writer, stream: bool) -> None:
        if not stream:
            payload = json.dumps({"object": "chat.completion", "choices": [{"message": {"content": "ok"}}]}).encode()
            writer.write(
                self._head(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nserver: fake\r\n"
                    b"content-length: %d\r\n\r\n" % len(payload)
                )
                + payload
            )
        else:
            writer.write(
                self._head(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nserver: fake\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
            )
            await self._send_events(
                reader,
                writer,
                [json.dumps({"choices": [{"delta": {"content": f"t{i}"}}]}).encode() for i in range(self.chunks)],
            )

    async def _answer_like_vllm(self, reader, writer, req: dict, line: str) -> None:
        chat = "/chat/" in line
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.tokens),
            "total_tokens": self.prompt_tokens + len(self.tokens),
        }
        base = {
            "id": "cmpl-1",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 1_764_000_000,
            "model": req.get("model"),
        }
        pieces = list(self.tokens)
        if not chat and req.get("echo") and isinstance(req.get("prompt"), str):
            pieces.insert(0, req["prompt"])
        offsets = [sum(map(len, pieces[:i])) for i in range(len(pieces))]
        logprobs = [self._logprobs(req, chat, t, at) for t, at in zip(pieces, offsets)]

        def choice(text=None, finish=None, lp=None, first=False):
            if chat:
                delta = self._delta(text, first) if text or self.field != "tool_arguments" else {}
                return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}

        if not req.get("stream"):
            text = "".join(pieces)
            lp = self._joined(logprobs, chat)
            if chat:
                ch = {
                    "index": 0,
                    "message": {"role": "assistant", "content": None, **self._message(text)},
                    "logprobs": lp,
                    "finish_reason": "stop",
                }
            else:
                ch = {"index": 0, "text": text, "logprobs": lp, "finish_reason": "stop"}
            payload = json.dumps(
                {**base, "object": "chat.completion" if chat else "text_completion", "choices": [ch], "usage": usage},
                separators=(",", ":"),
            ).encode()
            writer.write(
                self._head(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(payload)
                )
                + payload
            )
            return
        writer.write(
            self._head(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
        )
        events = []
        if chat:
            events.append(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        events += [
            {**base, "choices": [choice(t, lp=lp, first=i == 0)]} for i, (t, lp) in enumerate(zip(pieces, logprobs))
        ]
        events.append({**base, "choices": [choice("", finish="stop")]})
        if (req.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": usage})
        await self._send_events(reader, writer, [json.dumps(ev, separators=(",", ":")).encode() for ev in events])

    def _delta(self, text: str, first: bool) -> dict:
        if self.field != "tool_arguments":
            return {self.field: text}
        call = {"index": 0, "function": {"arguments": text}}
        if first:
            call.update(id="call_1", type="function")
            call["function"]["name"] = "lookup"
        return {"tool_calls": [call]}

    def _message(self, text: str) -> dict:
        if self.field != "tool_arguments":
            return {self.field: text}
        return {"tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": text}}]}

    def _logprobs(self, req: dict, chat: bool, token: str, offset: int):
        """One token's logprobs, as vLLM writes them, or None when the request did not ask."""
        if chat:
            if not req.get("logprobs"):
                return None
            k = req.get("top_logprobs") or 0
            tops = [
                {"token": t, "logprob": -1.5, "bytes": list(t.encode())}
                for t in [token, *self.alternatives.get(token, [])][:k]
            ]
            return {"content": [{"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": tops}]}
        if req.get("logprobs") is None:
            return None
        k = req["logprobs"]
        return {
            "text_offset": [offset],
            "token_logprobs": [-0.5],
            "tokens": [token],
            "top_logprobs": [dict.fromkeys([token, *self.alternatives.get(token, [])][: max(k, 1)], -1.5)],
        }

    @staticmethod
    def _joined(logprobs: list, chat: bool):
        if logprobs[0] is None:
            return None
        if chat:
            return {"content": [e for lp in logprobs for e in lp["content"]]}
        return {k: [v for lp in logprobs for v in lp[k]] for k in logprobs[0]}

    async def _send_events(self, reader, writer, payloads: list[bytes]) -> None:
        """SSE events, one HTTP chunk each, `delay` apart, then [DONE]; a hang-up raises."""
        for i, payload in enumerate(payloads):
            if i == self.die_after:
                writer.transport.abort()  # as a killed engine process: no end, no error event
                raise ConnectionResetError
            data = b"data: " + payload + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            if self.delay:
                await asyncio.sleep(self.delay)
            if reader.at_eof():
                raise ConnectionResetError
        done = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
