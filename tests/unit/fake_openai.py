"""A stand-in OpenAI-compatible streaming server (aiohttp) for keel bench's unit tests."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

CHUNKS = 5  # text chunks the fake server streams per request
USAGE_PROMPT_TOKENS = 11


class FakeOpenAI:
    """Streams CHUNKS text chunks, each `delay` s after the last, then usage (completion_tokens =
    max_tokens); a marker in the prompt picks a failure: #429, #500, #error, #empty, #drop,
    #refuse, #slow, #nousage; #onewrite: the whole answer in one write, as a busy engine
    that fell behind its reader sends it; or #blank: every chunk's text empty, as vLLM streams
    tokens that decode to nothing (lone bytes of a UTF-8 character)."""

    def __init__(self, delay: float = 0.01):
        self.delay = delay
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.url = ""
        self.release = asyncio.Event()  # ends #slow requests when the server stops
        self.health: dict | None = None  # what GET /health answers (404 while None)

    async def __aenter__(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_get("/health", self.answer_health)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.release.set()
        await self.runner.cleanup()

    async def answer_health(self, request: web.Request) -> web.Response:
        return web.json_response(self.health) if self.health is not None else web.Response(status=404)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        chat = "messages" in body
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        if "#429" in prompt:
            return web.json_response(
                {"error": {"message": "quota exceeded for tenant t1", "type": "rate_limit_error", "code": 429}},
                status=429,
            )
        if "#500" in prompt:
            return web.Response(status=500, text="Internal Server Error")
        if "#refuse" in prompt:
            request.transport.close()
            return web.Response()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        left = False

        def leave() -> None:  # before the last bytes, so the client cannot have moved on yet
            nonlocal left
            if not left:
                left = True
                self.in_flight -= 1

        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def send(doc) -> None:
                data = doc if isinstance(doc, str) else json.dumps(doc)
                await resp.write(f"data: {data}\n\n".encode())

            def chunk(text: str) -> dict:
                choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                return {"id": "x", "choices": [choice]}

            if chat:  # vLLM's first chunk: the role, no text
                role = {"role": "assistant", "content": ""}
                await send({"id": "x", "choices": [{"index": 0, "delta": role}]})
            if "#error" in prompt:
                await send(chunk("partial"))
                leave()
                await send({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}})
            elif "#empty" in prompt:
                leave()
                await send({"id": "x", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 0}})
            elif "#drop" in prompt:
                await send(chunk("tok"))
                leave()
                request.transport.close()
                return resp
            elif "#slow" in prompt:
                await self.release.wait()
                return resp
            elif "#onewrite" in prompt:
                usage = {"prompt_tokens": USAGE_PROMPT_TOKENS, "completion_tokens": body["max_tokens"]}
                events = [chunk(f"t{i} ") for i in range(CHUNKS)] + [{"id": "x", "choices": [], "usage": usage}]
                leave()
                await resp.write(b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events))
            else:
                for i in range(CHUNKS):
                    await asyncio.sleep(self.delay)
                    await send(chunk("" if "#blank" in prompt else f"t{i} "))
                leave()
                if "#nousage" not in prompt:
                    await send(
                        {
                            "id": "x",
                            "choices": [],
                            "usage": {"prompt_tokens": USAGE_PROMPT_TOKENS, "completion_tokens": body["max_tokens"]},
                        }
                    )
            await send("[DONE]")
            await resp.write_eof()
            return resp
        finally:
            leave()
