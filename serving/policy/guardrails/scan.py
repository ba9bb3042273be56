"""The scan: every detector of a guard over one text, whole or arriving in pieces.

How a text is scanned
---------------------
Every detector is a regex (plus, for some PII, a validator: Luhn, IBAN mod-97, SSN rules).
- block and flag detectors are independent: every validated match of a block detector blocks,
  every one of a flag detector is counted, whatever else matched around it.
- redact detectors share the text: scanning left to right, the next redaction is the validated
  match that starts first (then the longest, then the earliest rule); scanning resumes after it.
A complete match that fails its validator is plain text, and the search goes on one character
after its start (so `1 4111 1111 1111 1111` still finds the card inside).

Streams
-------
`Scan.feed` runs the same scan on text that arrives in pieces and releases only what is
decided. It uses the `regex` module's partial matching: `P.search(text, partial=True)` reports a
match that could still be forming at the end of the buffer, and the probe `(?:P)(?!)`, which can
never match, reports the leftmost position from which *any* path of P reaches the end of the
buffer. A decision at a position is final once no path from it reaches the end, so text before
the earliest such position is released (redacted) at once and the rest is held. Plain prose is
held by at most a word (a word may still become an email's local part). So, for every split of a
text into chunks, what `feed`/`finish` release adds up to `whole(text)`; the one exception is
a candidate longer than `MAX_HOLD` characters, which is decided on what has arrived.

Per token, only the detectors that are holding text back, or that a character of the new piece
could begin a match of (a precomputed table), are searched again; the rest stay idle. Only the
unreleased text (and a little context for lookbehinds) is kept and searched.

The view
--------
Detectors search the view of the text (normalise.py: compatibility forms, invisible characters
dropped, look-alikes folded), and what is released is the text as written: what matched nothing
as it came, a redaction in place of exactly the original characters its match came from (the
invisible ones inside it and the combining marks on its last character too). Every offset above
is an offset of the view; the original is kept beside it, with each view character's offset in
it, only once the two differ: an ASCII text is its own view, and costs one `isascii()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import regex

from serving.policy.guardrails.config import GuardrailRule
from serving.policy.guardrails.detectors import Detector
from serving.policy.guardrails.normalise import fold, fold_piece, marks_end, view

MAX_HOLD = 8192  # longest text a stream holds back undecided (a 4096-bit RSA PEM key is ~3.3k)
_CONTEXT = 64  # released characters kept so lookbehinds and \b see what precedes the buffer

# What a block message says was found: never the matched text itself.
_FOUND = {
    "email": "an email address",
    "phone": "a phone number",
    "credit_card": "a credit card number",
    "iban": "an IBAN",
    "us_ssn": "a US social security number",
    "ip_address": "an IP address",
    "secret": "a secret (an API key or a private key)",
    "term": "text on the deny-list",
    "pattern": "text on the deny-list",
    None: "what looks like a prompt injection",
}


@dataclass
class GuardrailAction:
    guardrail: str  # the rule's name
    action: str  # "block" | "redact" | "flag"
    direction: str  # "input" | "output"
    entity: str | None  # "email", ... for pii; "term"/"pattern" for deny; None otherwise
    count: int = 1


class GuardrailBlocked(Exception):
    """A block rule matched. `message` is safe to show the user: it never repeats the match."""

    def __init__(self, guardrail: str, direction: str, entity: str | None, message: str):
        super().__init__(message)
        self.guardrail = guardrail
        self.direction = direction
        self.entity = entity
        self.message = message


def blocked(guardrail: str, direction: str, entity: str | None) -> GuardrailBlocked:
    what = "prompt" if direction == "input" else "response"
    return GuardrailBlocked(
        guardrail, direction, entity, f"Blocked by guardrail `{guardrail}`: the {what} contains {_FOUND[entity]}."
    )


_MATCH, _PENDING, _IDLE = 0, 1, 2


class _Cursor:
    """One detector's place in one text, in absolute offsets.

    IDLE: nothing can start before the end of the text seen so far; it is searched again only
    when new text holds a character a match can begin with. PENDING: a match could still be
    forming from `start`. MATCH (redact only): a decided, validated match at [start, end)."""

    __slots__ = ("det", "bit", "kind", "start", "end", "run")

    def __init__(self, det: Detector, bit: int):
        self.det = det
        self.bit = bit
        self.kind = _IDLE
        self.start = 0
        self.end = 0
        self.run = -1  # the run whose text this decision was made on


def _decide(det: Detector, s: str, pos: int, final: bool) -> tuple[int, int, int, regex.Match | None]:
    """The next decision for det in s from pos: (kind, start, end, match)."""
    n = len(s)
    partial = not final
    probe_at = -1  # leftmost position >= pos from which some path reaches the end (cached)
    while True:
        m = det.pattern.search(s, pos, partial=partial)
        if m is None:
            return _IDLE, n, n, None
        a, b = m.span()
        if m.partial:
            return (_PENDING, a, a, None) if a < n else (_IDLE, n, n, None)
        if partial:
            # search() prefers a complete match to an earlier partial one; the probe finds those,
            # and paths of this match's start that more text would take instead.
            if det.probe is not None:
                if probe_at < pos:
                    q = det.probe.search(s, pos, partial=True)
                    probe_at = q.start() if q is not None else n
                if probe_at <= a:
                    return _PENDING, probe_at, probe_at, None
            if b >= n:  # touches the end: more text could extend it
                return _PENDING, a, a, None
        end = det.accept(m) if det.accept is not None else b
        if end is None or end == a:
            pos = a + 1  # not a match after all: plain text; a match may start inside it
            continue
        return _MATCH, a, end, m


class Tally:
    """The actions of one check (merged per guardrail, action and entity) and injection scores."""

    def __init__(self, direction: str):
        self.direction = direction
        self.actions: list[GuardrailAction] = []
        self._index: dict[tuple, GuardrailAction] = {}
        self.injection_groups: dict[int, dict[str, float]] = {}  # id(rule) -> phrase -> weight
        self.injection_fired: set[int] = set()

    def add(self, guardrail: str, action: str, entity: str | None) -> None:
        key = (guardrail, action, entity)
        found = self._index.get(key)
        if found is None:
            found = self._index[key] = GuardrailAction(guardrail, action, self.direction, entity, 0)
            self.actions.append(found)
        found.count += 1


class Plan:
    """A guard's compiled detectors, split by what their matches do to the text."""

    def __init__(self, rules: list[GuardrailRule]):
        dets = [d for rule in rules for d in rule.detectors()]
        self.block = [d for d in dets if d.action == "block"]
        self.redact = [d for d in dets if d.action == "redact"]
        self.flag = [d for d in dets if d.action == "flag"]
        self.dets = self.block + self.redact + self.flag
        self.empty = not dets
        self.all_bits = (1 << len(self.dets)) - 1
        # ASCII character -> the detectors a match of which can begin with it; any other
        # character may begin anything. Detectors with no known start set are always searched.
        always = sum(1 << i for i, d in enumerate(self.dets) if d.starts is None)
        self.starts_with = {chr(c): always for c in range(128)}
        self.after = [always] * (128 * 128)  # prev << 7 | char -> detectors that can start there
        for i, d in enumerate(self.dets):
            for ch in d.starts or ():
                self.starts_with[ch] |= 1 << i
            for pair in d.pairs or ():
                self.after[pair] |= 1 << i
        # A whole text lacking what every match of a detector holds skips that detector.
        self.needs = [(1 << i, d.needs) for i, d in enumerate(self.dets) if d.needs is not None]
        self._piece_bits: dict[tuple[str, str], int] = {}

    def bits_for(self, text: str, prev: str) -> int:
        """The detectors a match of which could begin somewhere in text (a streamed piece that
        follows the character prev, "" at the very start)."""
        first, after, bits = self.starts_with, self.after, 0
        p = ord(prev) if prev else 128
        for ch in text:
            c = ord(ch)
            if c >= 128:
                return self.all_bits
            bits |= after[p << 7 | c] if p < 128 else first[ch]
            p = c
        return bits

    def bits_for_piece(self, piece: str, prev: str) -> int:
        """The detectors a match of which could begin in a streamed piece, remembered per
        (previous character, piece): pieces are tokens, and tokens repeat.

        Of our own detectors, only those that the piece itself could begin (a partial search of
        prev + piece; one character of context, which can only let more through) are woken: a
        token such as " the" wakes none of them, though "t" may begin a phrase."""
        key = (prev, piece)
        bits = self._piece_bits.get(key)
        if bits is None:
            if len(self._piece_bits) >= 8192:
                self._piece_bits.clear()
            bits = self.bits_for(piece, prev)
            if len(piece) <= 32:
                text, at = prev + piece, len(prev)
                for i, det in enumerate(self.dets):
                    bit = 1 << i
                    if bits & bit and det.starts is not None:
                        m = det.pattern.search(text, at, partial=True)
                        # a partial match at the very end starts in the next piece, which is checked then
                        if m is None or m.start() >= len(text):
                            bits &= ~bit
            self._piece_bits[key] = bits
        return bits

    def possible(self, text: str) -> int:
        """The detectors that could match somewhere in a whole text."""
        bits = self.all_bits
        for bit, needs in self.needs:
            if not needs(text):
                bits &= ~bit
        return bits


class Scan:
    """One text, scanned as it arrives. `feed` and `finish` return the text that is decided."""

    def __init__(self, plan: Plan, tally: Tally, mask: int = -1):
        """mask: the detectors to run (a whole text need not run those that cannot match it)."""
        self.plan = plan
        self.tally = tally
        self.mask = mask
        n_block, n_redact = len(plan.block), len(plan.redact)
        cursors = [_Cursor(d, 1 << i) if (1 << i) & mask else None for i, d in enumerate(plan.dets)]
        self.block = [c for c in cursors[:n_block] if c is not None]
        self.redact = [c for c in cursors[n_block : n_block + n_redact] if c is not None]
        self.flag = [c for c in cursors[n_block + n_redact :] if c is not None]
        # The view the detectors search (normalise.py), in offsets of the view
        self.text = ""  # what is kept: _CONTEXT released characters, then the undecided rest
        self.base = 0  # absolute offset of text[0]
        self.released = 0  # absolute offset up to which text has been released
        self.scanned = 0  # absolute end of the text at the previous run
        self.runs = 0
        # The text as written, kept while what is left to release does not read as itself
        self.orig: str | None = None  # the original from obase: what is released is cut from here
        self.obase = 0
        self.oreleased = 0  # offset in the original up to which it has been released
        # For each character of the view from offset sbase on, its offset in the original (a
        # whole text: made when a redaction needs it; most texts have none)
        self.src: list[int] | None = None
        self.sbase = 0

    def feed(self, piece: str) -> str:
        ascii_piece = piece.isascii()
        if self.orig is None and ascii_piece:
            self.text += piece  # ASCII is its own view
        else:
            self._add(piece)
        out = self._run(final=False)
        oldest = self._oldest_pending()
        if self.base + len(self.text) - oldest > MAX_HOLD:
            out += self._run(final=True)  # held too long: decide on what has arrived
            oldest = self._oldest_pending()
        self._trim(oldest)
        if self.orig is not None and ascii_piece:
            self._drop_original_if_same()
        return out

    def finish(self) -> str:
        out = self._run(final=True)
        self._trim()
        return out

    def whole(self, text: str, text_view: str) -> str:
        """A text that is complete, and its view: the same decisions as feeding it in pieces, in
        one pass. (Construct the scan with mask=plan.possible(text_view) to skip what cannot match.)"""
        self.text = text_view
        if text_view is not text:
            self.orig = text
        return self.finish()

    # -- internals ----------------------------------------------------------------------------

    def _add(self, piece: str) -> None:
        piece_view, src = fold_piece(piece)
        if self.orig is None:
            if piece_view == piece:
                self.text += piece
                return
            # A character whose view differs: from here on the original is kept beside the view.
            # What is left to release reads as itself, and counts in the view's offsets.
            end = self.base + len(self.text)
            self.orig = self.text[self.released - self.base :]
            self.obase = self.oreleased = self.sbase = self.released
            self.src = list(range(self.released, end))
        assert self.orig is not None and self.src is not None  # kept from the first piece that differs
        at = self.obase + len(self.orig)
        self.orig += piece
        self.text += piece_view
        self.src.extend(range(at, at + len(piece)) if src is None else [at + i for i in src])

    def _original(self, upto: int) -> str:
        """The text as written from the release point to offset upto of the view: the
        characters before the one upto came from, invisible ones included."""
        assert self.orig is not None  # called only while an original is kept
        if upto < self.base + len(self.text):
            end = self._offsets()[upto - self.sbase]
        else:  # the end: with the invisible characters after the last one of the view
            end = self.obase + len(self.orig)
        if end <= self.oreleased:
            return ""
        piece = self.orig[self.oreleased - self.obase : end - self.obase]
        self.oreleased = end
        return piece

    def _offsets(self) -> list[int]:
        src = self.src
        if src is None:  # a whole text (a stream keeps them as it goes)
            assert self.orig is not None  # called only while an original is kept
            src = fold(self.orig)[1]
            assert src is not None  # the original differs from its view
            self.src = src
        return src

    def _masked(self, end: int) -> None:
        """A mask replaced the view up to end: the original characters it came from are gone,
        with the combining marks on the last one (all here: a match is decided only once a
        character of the view follows it, or at the end of the text)."""
        last = self._offsets()[end - 1 - self.sbase] + 1 - self.obase
        assert self.orig is not None  # _offsets needs it too
        self.oreleased = max(self.oreleased, self.obase + marks_end(self.orig, last))

    def _run(self, final: bool) -> str:
        s, base = self.text, self.base
        new_from = self.scanned
        end = base + len(s)
        self.scanned = end
        self.runs += 1
        at = new_from - base
        if end - new_from <= 64:
            woken = self.plan.bits_for_piece(s[at:], s[at - 1] if at > 0 else "")
        elif not final and end - new_from <= 512:  # several tokens read at once: cheaper than searching
            woken = self.plan.bits_for(s[at:], s[at - 1] if at > 0 else "")
        else:
            woken = self.plan.all_bits
        hold = end
        for c in self.block:
            if c.kind == _PENDING or c.bit & woken:
                self._independent(c, s, base, new_from, final)
            if c.kind == _PENDING:
                hold = min(hold, c.start)
        for c in self.flag:
            if c.kind == _PENDING or c.bit & woken:
                self._independent(c, s, base, new_from, final)
        return self._redact(s, base, new_from, woken, final, hold)

    def _independent(self, c: _Cursor, s: str, base: int, new_from: int, final: bool) -> None:
        """Advance a block or flag detector to its next undecided position, acting on matches."""
        det = c.det
        pos = (c.start if c.kind == _PENDING else new_from) - base
        while True:
            kind, a, b, m = _decide(det, s, pos, final)
            if kind != _MATCH:
                c.kind, c.start = kind, base + a
                return
            pos = b
            if det.weights is None or self._injection_fires(det, m):
                self._act(det)

    def _injection_fires(self, det: Detector, m: regex.Match) -> bool:
        """Adds the phrase to its rule's score; True the first time the score reaches the threshold."""
        key = id(det.score_key)
        tally = self.tally
        if key in tally.injection_fired:
            return False
        groups = tally.injection_groups.setdefault(key, {})
        assert det.weights is not None  # an injection detector has its phrase weights
        groups[m.lastgroup] = det.weights[m.lastgroup]
        if sum(groups.values()) >= det.threshold:
            tally.injection_fired.add(key)
            return True
        return False

    def _act(self, det: Detector) -> None:
        if det.action == "block":
            raise blocked(det.guardrail, self.tally.direction, det.entity)
        self.tally.add(det.guardrail, det.action, det.entity)

    def _redact(self, s: str, base: int, new_from: int, woken: int, final: bool, block_hold: int) -> str:
        """Release text up to the first undecided position, masking redact matches: the next
        redaction is the match that starts first (then the longest, then the earliest rule)."""
        run = self.runs
        pos = self.released
        out = []
        # An idle detector that no character of the new text could begin a match of stays idle.
        cursors = [c for c in self.redact if c.kind != _IDLE or c.bit & woken]
        while True:
            best = None
            hold = block_hold
            for c in cursors:
                kind = c.kind
                if kind == _IDLE:
                    if c.run == run or not c.bit & woken:
                        continue
                    frm = max(new_from, pos)
                elif c.start < pos or (kind == _PENDING and c.run != run):
                    frm = max(c.start, pos)  # overtaken by a redaction, or more text arrived
                else:
                    frm = -1
                if frm >= 0:
                    kind, a, b, _ = _decide(c.det, s, frm - base, final)
                    c.kind, c.start, c.end, c.run = kind, base + a, base + b, run
                if kind == _PENDING:
                    if c.start < hold:
                        hold = c.start
                elif kind == _MATCH and (
                    best is None or c.start < best.start or c.start == best.start and c.end > best.end
                ):
                    best = c
            if best is not None and best.start < hold:
                out.append(s[pos - base : best.start - base] if self.orig is None else self._original(best.start))
                out.append(best.det.mask)
                if self.orig is not None:
                    self._masked(best.end)
                self.tally.add(best.det.guardrail, "redact", best.det.entity)
                pos = best.end
                continue
            if hold > pos:
                out.append(s[pos - base : hold - base] if self.orig is None else self._original(hold))
                pos = hold
            elif hold == pos and self.orig is not None:
                out.append(self._original(hold))  # invisible characters between a mask and hold
            break
        self.released = pos
        return "".join(out)

    def _oldest_pending(self) -> int:
        oldest = self.released
        for c in self.block:
            if c.kind == _PENDING and c.start < oldest:
                oldest = c.start
        for c in self.flag:
            if c.kind == _PENDING and c.start < oldest:
                oldest = c.start
        return oldest

    def _trim(self, oldest: int | None = None) -> None:
        cut = (self._oldest_pending() if oldest is None else oldest) - _CONTEXT - self.base
        if cut > 256:  # trim in steps: slicing the kept text on every piece would cost more
            self.text = self.text[cut:]
            self.base += cut
        if self.orig is not None and self.oreleased - self.obase > 256:
            self.orig = self.orig[self.oreleased - self.obase :]
            self.obase = self.oreleased
            if self.src is not None:  # only what is left to release needs its offsets
                del self.src[: self.released - self.sbase]
                self.sbase = self.released

    def _drop_original_if_same(self) -> None:
        """Back to the view alone once all that is left to release reads as itself (a curly
        quote has been released): what is kept from before the release point is only searched,
        never released, so it may differ."""
        i = self.released - self.base
        o = self.oreleased - self.obase
        n = len(self.text) - i
        assert self.orig is not None and self.src is not None  # called only while an original is kept
        if (
            n == len(self.orig) - o
            and self.orig[o:] == self.text[i:]
            and self.src[self.released - self.sbase :] == list(range(self.oreleased, self.oreleased + n))
        ):
            self.orig = self.src = None


def whole(plan: Plan, tally: Tally, text: str) -> str:
    text_view = view(text)
    return Scan(plan, tally, plan.possible(text_view)).whole(text, text_view)
