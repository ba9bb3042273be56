"""One response's choices as the stages' response watches see them (stages.ResponseWatch).

Every text field of every choice (textfields.choice_texts: content, refusal, reasoning, tool-call
arguments, completion text) goes through the watches, each field on its own, and the choice is
rewritten with what they release. Token-level data needs more care, because a choice's logprob
tokens are its text again, token by token, and their alternatives (top_logprobs) are text the
model did not pick:
- the chosen tokens, concatenated, are one more field of the choice (guard.TOKENS_FIELD), so a
  rule sees them even where they differ from the text (a stop string cut from the text);
- a logprob entry goes out once the watches have released its token's text unchanged: an
  entry whose token is held back waits with it; once a watch changed any text of the choice
  (a redaction), that choice's entries are dropped from then on;
- an alternative goes out only if every watch allows it after the chosen tokens before it.
Logprobs the request did not ask for are dropped (the text is followed for them only when asked,
so streams without them pay nothing per token).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from serving.gateway.guard import TOKENS_FIELD
from serving.gateway.textfields import Endpoint, choice_texts, put_text

_CONTEXT = 64  # chosen-token characters an alternative is checked after


class _Followed:
    """What the watches did with one choice's texts, for its logprobs."""

    __slots__ = ("held", "changed", "given", "released", "queue", "tail")

    def __init__(self):
        self.held: dict = {}  # field name -> text given and not yet released (while unchanged)
        self.changed = False  # a watch changed the choice's text: its logprobs stop
        self.given = 0  # characters of chosen-token text given to the watches
        self.released = 0  # of those, released unchanged
        self.queue: list = []  # (end of its token in the token text, entry), not sent yet
        self.tail = ""  # the last chosen-token characters sent: alternatives' context


class WatchedResponse:
    """The choices of one response (streamed or whole) through ctx.watches."""

    def __init__(self, ctx, endpoint: Endpoint, holder: str | None):
        """holder: where a choice keeps its texts: "delta", "message", or None (the choice)."""
        self.ctx = ctx
        self.watches = ctx.watches
        self.endpoint = endpoint
        self.holder = holder
        self.chat = holder is not None
        self.primary = endpoint.choice_texts[0]  # the text the audit keeps
        self.keep_text = ctx.keep_text
        payload = ctx.payload if isinstance(ctx.payload, dict) else {}
        self.follow = bool(self.watches) and payload.get("logprobs") not in (None, False)
        self.open: dict[int, dict] = {}  # choice -> field name -> its TextWatch of each watch
        self.primary_open: dict[int, list] = {}  # choice -> its primary field's, while open
        self.feeders: dict[int, Callable[[str], str]] = {}  # choice -> primary_feeder(choice)
        self.followed: dict[int, _Followed] = {}

    def primary_feeder(self, idx: int) -> Callable[[str], str]:
        """What takes the next non-empty pieces of a choice's main text (the hot path: merged
        text-only events): with one watch and nothing to follow, its own TextWatch.feed."""
        feed = self.feeders.get(idx)
        if feed is None:
            if len(self.watches) == 1 and not self.follow and not self.keep_text:
                fws = self.primary_open.get(idx)
                if fws is None:
                    fws = self.primary_open[idx] = self._field(idx, self.primary)
                feed = fws[0].feed
            else:
                feed = functools.partial(self.primary_text, idx)
            self.feeders[idx] = feed
        return feed

    def primary_text(self, idx: int, text: str) -> str:
        """A streamed piece of a choice's main text (the hot path: merged text-only events)."""
        if text and self.watches:
            fws = self.primary_open.get(idx)
            if fws is None:
                fws = self.primary_open[idx] = self._field(idx, self.primary)
            given = text
            for fw in fws:
                text = fw.feed(text)
            if self.follow:
                self._follow(idx, self.primary, given, text)
        if text and self.keep_text:
            self.ctx.response_text.append(text)
        return text

    def choice(self, choice: dict, finished: bool) -> tuple[bool, bool]:
        """Rewrite one choice with what the watches release; finished: its last event (or a
        whole response). Returns (changed, shows something)."""
        idx = choice.get("index", 0)
        changed = shown = False
        for holder, key, name in choice_texts(self.endpoint, choice, self.holder):
            text = holder[key]
            out = text
            if self.watches:
                if finished or (name.__class__ is tuple and name[-1] in self.endpoint.whole_texts):
                    out = self._end(idx, name, text)
                elif text:
                    out = self._feed(self._field(idx, name), idx, name, text)
                if out != text:
                    holder[key] = out
                    changed = True
            if out:
                shown = True
                if self.keep_text:
                    self._keep(idx, name, out)
        if not self.watches:
            return changed, shown
        lp = choice.get("logprobs")
        if lp is not None:
            self._queue(idx, lp, finished)
        if finished and self._end_fields(choice, idx):
            changed = shown = True
        if lp is not None or (finished and idx in self.followed):
            changed = True
            shown |= self._send_tokens(choice, idx, lp)
        return changed, shown

    def release_held(self) -> list[dict]:
        """The stream ended without finishing some choices: what the watches still held, as
        choices to send in one last event."""
        out = []
        for idx in list(self.open):
            choice = {"index": idx}
            shown = self._end_fields(choice, idx)
            if idx in self.followed:
                shown |= self._send_tokens(choice, idx, None)
            if shown:
                out.append(choice)
        return out

    def _keep(self, idx: int, name, text: str) -> None:
        """audit_content: the text the client was shown, the main text in ctx.response_text and
        every other field (refusal, reasoning, tool-call arguments) by choice and name."""
        if name == self.primary:
            self.ctx.response_text.append(text)
        else:
            label = f"{idx}." + (".".join(map(str, name)) if isinstance(name, tuple) else name)
            self.ctx.response_fields.setdefault(label, []).append(text)

    def usage(self, usage: dict) -> None:
        for w in self.watches:
            w.usage(usage)

    def close(self) -> None:
        for w in self.watches:
            w.close()

    # -- text fields -------------------------------------------------------------------------

    def _field(self, idx: int, name) -> list:
        """The watches' TextWatch for a field of a choice, made on its first piece."""
        fields = self.open.get(idx)
        if fields is None:
            fields = self.open[idx] = {}
        fws = fields.get(name)
        if fws is None:
            fws = fields[name] = [w.field(idx, name) for w in self.watches]
        return fws

    def _feed(self, fws: list, idx: int, name, text: str, last: bool = False) -> str:
        given = text
        if last:
            for fw in fws:
                text = fw.last(text)
        else:
            for fw in fws:
                text = fw.feed(text)
        if self.follow:
            self._follow(idx, name, given, text)
        return text

    def _end(self, idx: int, name, text: str) -> str:
        """A field's last piece through the watches (nothing to do for an empty unopened one)."""
        fields = self.open.get(idx)
        fws = fields.pop(name, None) if fields else None
        if name == self.primary:
            self.primary_open.pop(idx, None)
            self.feeders.pop(idx, None)
        if fws is None:
            if not text:
                return text
            fws = [w.field(idx, name) for w in self.watches]
        return self._feed(fws, idx, name, text, last=True)

    def _end_fields(self, choice: dict, idx: int) -> bool:
        """End the choice's fields that this event did not carry; put what they release in it."""
        fields = self.open.pop(idx, None)
        self.primary_open.pop(idx, None)
        self.feeders.pop(idx, None)
        if not fields:
            return False
        shown = False
        for name, fws in fields.items():
            text = self._feed(fws, idx, name, "", last=True)
            if text and name != TOKENS_FIELD:
                put_text(choice, self.holder, name, text)
                shown = True
                if self.keep_text:
                    self._keep(idx, name, text)
        return shown

    def _follow(self, idx: int, name, given: str, out: str) -> None:
        """Note what the watches released of a field, while they release it unchanged."""
        f = self.followed.get(idx)
        if f is None:
            f = self.followed[idx] = _Followed()
        if f.changed:
            return
        held = f.held.get(name, "") + given
        if not held.startswith(out):  # a watch rewrote the text
            f.changed = True
            f.queue.clear()
            return
        f.held[name] = held[len(out) :]
        if name == TOKENS_FIELD:
            f.released += len(out)

    # -- logprobs ----------------------------------------------------------------------------

    def _queue(self, idx: int, lp, finished: bool) -> None:
        """The event's logprob entries join the choice's queue; their tokens go to the watches."""
        if not self.follow:
            return  # not asked for: dropped (_send_tokens)
        f = self.followed.get(idx)
        if f is None:
            f = self.followed[idx] = _Followed()
        tokens = []
        for entry in _entries(lp, self.chat):
            token = _token(entry, self.chat)
            tokens.append(token)
            f.given += len(token)
            if not f.changed:
                f.queue.append((f.given, entry))
        text = "".join(tokens)
        if finished:
            self._end(idx, TOKENS_FIELD, text)
        elif text:
            self._feed(self._field(idx, TOKENS_FIELD), idx, TOKENS_FIELD, text)

    def _send_tokens(self, choice: dict, idx: int, lp) -> bool:
        """Put the queued entries whose tokens are released into the choice's logprobs (the
        event's own entries are queued already). Returns whether any went."""
        f = self.followed.get(idx)
        sent: list = []
        if f is not None and not f.changed:
            n = 0
            while n < len(f.queue) and f.queue[n][0] <= f.released:
                n += 1
            sent = [entry for _, entry in f.queue[:n]]
            del f.queue[:n]
            self._judge_alternatives(f, sent)
        choice["logprobs"] = _shape(sent, lp, self.chat)
        return bool(sent)

    def _judge_alternatives(self, f: _Followed, entries: list) -> None:
        """Remove the alternatives a watch would not show after the chosen tokens before them."""
        chat = self.chat
        for e in entries:
            token = _token(e, chat)
            if chat:
                tops = e[1].get("top_logprobs")
                if tops:
                    e[1]["top_logprobs"] = [
                        a
                        for a in tops
                        if isinstance(a, dict) and (a.get("token") == token or self._allowed(f.tail, a.get("token")))
                    ]
            elif isinstance(e[2], dict) and e[2]:
                e[2] = {t: v for t, v in e[2].items() if t == token or self._allowed(f.tail, t)}
            f.tail = (f.tail + token)[-_CONTEXT:]

    def _allowed(self, context: str, token) -> bool:
        if not isinstance(token, str):
            return False
        return all(w.allows_alternative(context, token) for w in self.watches)


def _entries(lp, chat: bool) -> list:
    """A choice's logprob entries: chat (list key, entry); completions [token, logprob,
    top_logprobs, text_offset], one per token."""
    if not isinstance(lp, dict):
        return []
    if chat:
        return [
            (key, e)
            for key in ("content", "refusal")
            if isinstance(lp.get(key), list)
            for e in lp[key]
            if isinstance(e, dict)
        ]
    tokens = lp.get("tokens")
    if not isinstance(tokens, list):
        return []
    n = len(tokens)
    lps, tops, offsets = (_column(lp.get(k), n) for k in ("token_logprobs", "top_logprobs", "text_offset"))
    return [[tokens[i], lps[i], tops[i], offsets[i]] for i in range(n)]


def _column(value, n: int) -> list:
    return value[:n] + [None] * (n - len(value)) if isinstance(value, list) else [None] * n


def _token(entry, chat: bool) -> str:
    token = entry[1].get("token") if chat else entry[0]
    return token if isinstance(token, str) else ""


def _shape(entries: list, lp, chat: bool) -> dict:
    """Logprobs holding only these entries, in the shape the openai client reads."""
    if chat:
        out: dict = {"content": []}
        if isinstance(lp, dict) and isinstance(lp.get("refusal"), list):
            out["refusal"] = []
        for key, e in entries:
            out.setdefault(key, []).append(e)
        return out
    return {
        "text_offset": [e[3] for e in entries],
        "token_logprobs": [e[1] for e in entries],
        "tokens": [e[0] for e in entries],
        "top_logprobs": [e[2] for e in entries],
    }
