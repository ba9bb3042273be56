"""Reading the engine's response on its way to the client, for requests whose policies need it.

With no tenant policy the gateway copies the engine's bytes untouched (server.py). When a
policy needs the response (the quota settles to the engine's real token usage, the audit
records tokens and maybe text, output guardrails must see text before the client does), the
relay decodes the HTTP body and hands it here:

- a stream (text/event-stream) is handled one SSE event at a time. The engine is asked for a
  usage chunk (`stream_options.include_usage`), which is taken out again when the client did
  not ask for it. Without response watches (stages.ResponseWatch: output guardrails) and audit
  text an event is only searched, not parsed, so the cost per token stays a few byte scans; with
  them each event is parsed and every text field of every choice, and its logprobs, go through
  the watches (watched.py), which hold back only what could still be part of a match. When the
  gateway falls behind the engine and reads several token events at once, consecutive events
  that only add text are merged into one: one scan and one event for the lot instead of one
  per token.
- a JSON body is parsed once at the end, checked and re-serialised only if a watch changed it.

The byte searches and the learned text template are shortcuts for the layout vLLM writes today
(one compact `data: {...}` line an event). They only ever decide "this is vLLM's layout and I
know what it says"; an event they do not recognise (keys in another order, spaces, escapes,
extra fields, `data:` without its space, several data lines) is parsed as the SSE spec and
JSON read it, and lines may end in CR LF. tests/inspect_contract.py holds the inspector to a
full parse of the same bytes (the unit tests in other layouts, the e2e test on the engine's).
The shortcuts stay because they measure faster than parsing every event
(`benchmarks/inspect_feed.py --compare`, 64-token chat stream, µs per stream, 2026-12-06):
no rules 101 vs 143 (one event a read) and 74 vs 117 (whole stream in one read); output rules
421 vs 625 and 80 vs 597 (text events merged by the template instead of one parse each).
"""

from __future__ import annotations

from json.decoder import scanstring as _scanstring  # type: ignore[attr-defined]  # CPython's, not in the stubs

import orjson

from serving.errors import error_body
from serving.gateway.textfields import CHAT, COMPLETIONS
from serving.gateway.watched import WatchedResponse
from serving.policy.guardrails import GuardrailBlocked

_DONE = b"data: [DONE]"


class StreamInspector:
    """SSE in (decoded body bytes), SSE out. Raises GuardrailBlocked; the caller cuts the stream."""

    def __init__(self, ctx, chat: bool, shortcuts: bool = True):
        """shortcuts=False parses every event (benchmarks/inspect_feed.py --compare)."""
        self.ctx = ctx
        self.chat = chat
        self.strip_usage = not ctx.client_wants_usage
        self.parse = bool(ctx.watches) or ctx.keep_text  # else events are only searched
        self.watched = WatchedResponse(ctx, CHAT if chat else COMPLETIONS, "delta" if chat else None)
        self.feeders = self.watched.feeders
        self.buf = b""
        # The stream's text events, learned from its first one: the bytes before and after the
        # text. An event with exactly those bytes around a JSON string is that choice's next
        # text and nothing else, found without parsing or re-serialising the event.
        self.tpl: tuple[bytes, bytes, int, dict] | None = None  # prefix, suffix, index, parsed
        self.learned = not shortcuts  # tried: a stream whose text cannot be located is not tried again
        self.shortcuts = shortcuts
        self.cr = False  # the last piece ended in \r: the next may start with its \n

    def feed(self, data: bytes) -> bytes:
        if not self.buf and data.endswith(b"\n\n") and data.find(b"\n\n") == len(data) - 2 and not self.cr:
            events = [data[:-2]]  # the usual piece while the gateway keeps up: one whole event
        else:
            if self.cr or b"\r" in data:
                data = self._newlines(data)
            self.buf += data
            if b"\n\n" not in self.buf:
                return b""
            *events, self.buf = self.buf.split(b"\n\n")
        out: list[bytes] = []
        if self.parse:
            self._events(events, out)
        else:
            for ev in events:
                res = self._event(ev)
                if res is not None:
                    out.append(res)
                    out.append(b"\n\n")
        return b"".join(out)

    def _newlines(self, data: bytes) -> bytes:
        """SSE lines may end in CR LF or CR as well as LF: all read as LF (JSON text holds no
        bare CR, so only line ends change)."""
        if self.cr:
            data = b"\r" + data
        self.cr = data.endswith(b"\r")
        if self.cr:
            data = data[:-1]
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def finish(self) -> bytes:
        """End of the body: whatever an unterminated last event and held-back text amount to."""
        out = self.feed(b"\n\n") if self.buf.strip() else b""
        out += self._release_held()
        self.close()
        return out

    def close(self) -> None:
        """The response is over, however it ended: the watches record what they did."""
        self.watched.close()

    def _events(self, events: list[bytes], out: list[bytes]) -> None:
        """Events read together, in order. Consecutive text events of the stream (several come
        at once when the gateway falls behind the engine) go out as one event, so the guardrails
        scan, and the client gets, that text in one piece instead of one per token; the choice's
        finishing event takes the run it ends. Anything else keeps its own event."""
        run: list[tuple[bytes, str]] = []  # (event, its text)
        tpl = self.tpl
        for ev in events:
            if tpl is not None and ev.startswith(tpl[0]) and ev.endswith(tpl[1]):
                try:
                    text = orjson.loads(ev[len(tpl[0]) : len(ev) - len(tpl[1])])
                except orjson.JSONDecodeError:
                    text = None
                if isinstance(text, str):
                    run.append((ev, text))
                    continue
            obj = _parse(ev)
            if obj is None:  # [DONE], a comment, not JSON
                if run:
                    self._text_run(run, out)
                    run = []
                res = self._event(ev)
            else:
                holder, key, finishing = self._text_only(obj)
                if holder is not None and not finishing and not self.learned:
                    self.learned = True
                    tpl = self.tpl = self._learn(ev, obj, holder[key])
                    if tpl is not None:
                        run.append((ev, holder[key]))
                        continue
                # run is only ever filled once tpl is set (above), which mypy cannot follow
                if run and holder is not None and finishing and _same_stream(tpl[3], obj):  # type: ignore[index]
                    holder[key] = "".join(t for _, t in run) + holder[key]
                    res = self._parsed(b"", obj, len(run) + 1)
                else:
                    if run:
                        self._text_run(run, out)
                    res = self._parsed(ev, obj, 1)
                run = []
            if res is not None:
                out.append(res)
                out.append(b"\n\n")
        if run:
            self._text_run(run, out)

    def _text_run(self, run: list[tuple[bytes, str]], out: list[bytes]) -> None:
        """Consecutive text events of the learned choice, as one event (or none, if held back)."""
        prefix, suffix, idx, _ = self.tpl  # type: ignore[misc]  # a run exists only once tpl is learned
        text = run[0][1] if len(run) == 1 else "".join(t for _, t in run)
        self.ctx.completion_chunks += len(run)
        feed = self.feeders.get(idx) or self.watched.primary_feeder(idx)
        released = feed(text) if text else ""
        if not released:
            return  # nothing else in these events: all of it is held back for now
        out.append(run[0][0] if len(run) == 1 and released == text else prefix + orjson.dumps(released) + suffix)
        out.append(b"\n\n")

    def _learn(self, ev: bytes, obj: dict, text: str) -> tuple | None:
        """The template of a text event (see __init__), or None if its text cannot be located."""
        try:
            s = ev.decode("utf-8")
        except UnicodeDecodeError:
            return None
        key = '"content":' if self.chat else '"text":'
        at = s.find(key)
        if at < 0 or s.find(key, at + 1) >= 0 or s[at + len(key) : at + len(key) + 1] != '"':
            return None  # absent, twice (another object has such a key), or spaced
        start = at + len(key)
        try:
            found, end = _scanstring(s, start + 1)
        except ValueError:
            return None
        if found != text:
            return None
        return s[:start].encode("utf-8"), s[end:].encode("utf-8"), obj["choices"][0].get("index", 0), obj

    def _text_only(self, obj: dict) -> tuple:
        """(text holder, key, finishing) when the event is one choice adding text and nothing
        else but maybe its finish; (None, None, False) otherwise."""
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            return None, None, False
        choice = choices[0]
        holder, key = self._text_slot(choice)
        if holder is None:
            return None, None, False
        if any(v is not None for k, v in choice.items() if k not in _CHOICE_KEYS):
            return None, None, False  # logprobs, ...
        if holder is not choice and any(v is not None for k, v in holder.items() if k != key):
            return None, None, False  # role, tool calls, reasoning, ...
        return holder, key, choice.get("finish_reason") is not None

    def _event(self, ev: bytes) -> bytes | None:
        if self.parse:  # only events that are not JSON objects get here
            if ev.startswith(_DONE) or (b"[DONE]" in ev and _sse_data(ev) == b"[DONE]"):
                return self._release_held() + ev
            return ev
        # Only usage and a count of content chunks are needed. An event without the bytes
        # "usage" has no usage key (JSON text cannot hold a bare quote), and vLLM's content
        # chunks are found by their bytes; anything else, whatever its layout, is parsed.
        if self.shortcuts and b'"usage"' not in ev and b'"choices":[{' in ev:
            self.ctx.completion_chunks += 1
            return ev
        obj = _parse(ev)
        if obj is None:  # a comment, not JSON
            return ev
        if obj.get("choices"):
            self.ctx.completion_chunks += 1
            return ev
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.ctx.usage = usage
            return None if self.strip_usage else ev
        return ev

    def _parsed(self, ev: bytes, obj: dict, events: int) -> bytes | None:
        """One parsed event (ev: its bytes, b"" for a merged one standing for `events` events)."""
        ctx = self.ctx
        choices = obj.get("choices")
        if not choices:
            usage = obj.get("usage")
            if usage:
                ctx.usage = usage
                self.watched.usage(usage)
                return None if self.strip_usage else ev
            return ev
        ctx.completion_chunks += events
        changed = not ev
        keep = False
        for choice in choices:
            if not isinstance(choice, dict):
                keep = True
                continue
            finished = choice.get("finish_reason") is not None
            c, shown = self.watched.choice(choice, finished)
            changed |= c
            if shown or finished or _has_more(choice, self.chat):
                keep = True
        if not keep and ctx.watches:
            return None  # everything in it is held back for now (without watches nothing is)
        return b"data: " + orjson.dumps(obj) if changed else ev

    def _text_slot(self, choice: dict):
        if self.chat:
            delta = choice.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                return delta, "content"
            return None, None
        if isinstance(choice.get("text"), str):
            return choice, "text"
        return None, None

    def _release_held(self) -> bytes:
        """Text still held when the stream ends without a finish_reason: decide on it and send it."""
        choices = self.watched.release_held()
        if not choices:
            return b""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return b"data: " + orjson.dumps({"object": obj, "choices": choices}) + b"\n\n"


# What a choice may carry besides its text and still be merged (the finish comes last in a run).
_CHOICE_KEYS = frozenset({"index", "delta", "text", "finish_reason", "stop_reason"})


def _same_stream(a: dict, b: dict) -> bool:
    """b continues a's choice with nothing else changed (usage may grow: the latest is kept)."""
    ca, cb = a["choices"][0], b["choices"][0]
    return (
        ca.get("index", 0) == cb.get("index", 0)
        and a.keys() == b.keys()
        and all(a[k] == b[k] for k in a if k != "choices" and k != "usage")
    )


def _parse(ev: bytes) -> dict | None:
    """The JSON object an SSE event carries, or None ([DONE], a comment, not an object)."""
    if ev.startswith(b"data: {"):  # vLLM's layout: one data line
        try:
            obj = orjson.loads(ev[6:])
        except orjson.JSONDecodeError:
            obj = _sse_json(ev)  # several data lines, or not JSON
    elif b"{" in ev and (ev.startswith(b"data:") or b"\ndata:" in ev):  # [DONE] is no object
        obj = _sse_json(ev)
    else:
        return None
    return obj if isinstance(obj, dict) else None


def _sse_json(ev: bytes) -> object:
    """An event's data parsed as JSON; None if it is not JSON."""
    try:
        return orjson.loads(_sse_data(ev))
    except orjson.JSONDecodeError:
        return None


def _sse_data(ev: bytes) -> bytes:
    """An event's data as the SSE spec reads it: its data lines, each without the one space
    after the colon, joined by newlines."""
    return b"\n".join(
        line[6:] if line.startswith(b"data: ") else line[5:]
        for line in ev.split(b"\n")
        if line.startswith(b"data:") or line == b"data"
    )


# A choice's keys that are not news by themselves: its index, texts, (held) logprobs, the finish.
_CHOICE_ROUTINE = frozenset({"index", "delta", "message", "text", "logprobs", "finish_reason", "stop_reason"})
_DELTA_TEXTS = frozenset(CHAT.choice_texts) | {"tool_calls"}


def _has_more(choice: dict, chat: bool) -> bool:
    """Does the choice carry something besides text and logprobs (a role, a tool call's id)?"""
    for k, v in choice.items():
        if v is not None and k not in _CHOICE_ROUTINE:
            return True
    delta = choice.get("delta") if chat else None
    if not isinstance(delta, dict):
        return False
    for k, v in delta.items():
        if v is not None and k not in _DELTA_TEXTS:
            return True
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if not isinstance(call, dict):
                return True
            for k, v in call.items():
                if v is not None and k != "index" and k != "function":
                    return True
    return False


def blocked_event(e: GuardrailBlocked, request_id: str) -> bytes:
    """The last event of a stream an output guardrail cut: an OpenAI-shaped error."""
    body = error_body(400, e.message, code="content_policy_violation", request_id=request_id)
    return b"data: " + body + b"\n\n"


def inspect_json(ctx, body: bytes, chat: bool) -> bytes:
    """A whole (non-streamed) response: record usage, let the watches see every text and the
    logprobs; may raise GuardrailBlocked."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(obj, dict):
        return body
    watched = WatchedResponse(ctx, CHAT if chat else COMPLETIONS, "message" if chat else None)
    try:
        if isinstance(obj.get("usage"), dict):
            ctx.usage = obj["usage"]
            watched.usage(ctx.usage)
        changed = False
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict):
                changed |= watched.choice(choice, True)[0]
    finally:
        watched.close()
    return orjson.dumps(obj) if changed else body
