"""The view of a text the detectors search: disguises undone, so `ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ`,
`ig\u200bnore`, `іgnore` (Cyrillic і) and `4111·1111·1111·1111` read as what they stand for.

The view is made character by character: each character of the text stands for a short string
of its own (often itself, sometimes nothing), and the view is their concatenation. So a stream
can fold each piece as it arrives, and every character of the view knows the character of the
text it came from: a match found in the view masks exactly the original characters it covers,
and what matched nothing is released as it was written.

A character's view:
- ASCII: itself (an ASCII text is its own view and costs one `isascii()`);
- a decimal digit of any script: the ASCII digit;
- a format character (Unicode category Cf: zero-width space, joiners, word joiner, BOM, soft
  hyphen, bidi controls) or a Hangul filler: nothing; a tag character (U+E0020-E007E,
  invisible ASCII that some models read): that ASCII character;
- anything else: its NFKC compatibility form (full-width forms, mathematical letters and digits,
  ligatures, the Unicode spaces become " ") without combining marks (so accents and marks put
  over a word go: é and e + U+0301 both read e), then each character of that folded through
  the Unicode confusables to ASCII (Cyrillic and Greek look-alikes: і -> i, Ρ -> P, and the
  dashes and minus signs -> "-"), and the dash- and dot-like separators below.
"""

from __future__ import annotations

import re
import unicodedata
from itertools import chain, repeat

from confusable_homoglyphs.confusables import confusables_data

# Separators the confusables data does not take to ASCII (it folds the em dash to a katakana
# mark and the dots to the middle dot), but which stand between digit groups and domain labels.
_SEPARATORS = {
    "\u2014": "-",
    "\u2015": "-",  # em dash, horizontal bar
    "\u00b7": ".",
    "\u2022": ".",
    "\u2027": ".",
    "\u2219": ".",
    "\u22c5": ".",
    "\u2e31": ".",
    "\u30fb": ".",  # middle dots and bullets
    "\u3002": ".",  # ideographic full stop: a dot in domain names (IDNA)
}


def _ascii_confusables() -> dict[str, str]:
    """Non-ASCII character -> the ASCII it is confusable with, from the Unicode confusables data.

    Kept: letters that look like ASCII letters, with their case (the data's prototype for a
    capital І or Ι is a lower-case l: case-insensitive rules need I), and punctuation, symbols
    and spaces that look like ASCII punctuation. Dropped: letters that look like digits (Cyrillic
    З, б: folding them would put digits inside words), and whatever has no single ASCII form."""
    raw = {}
    for char, glyphs in confusables_data.items():
        if len(char) == 1 and not char.isascii():
            ascii_forms = {g["c"] for g in glyphs if g["c"].isascii()}
            if len(ascii_forms) == 1:
                raw[char] = ascii_forms.pop()
    table = {}
    for char, target in raw.items():
        kind = unicodedata.category(char)[0]
        if kind == "L":
            if not target.isalpha():
                continue
            if char.isupper() and not target.isupper():
                target = raw.get(char.lower(), "").upper()
            elif char.islower() and not target.islower():
                target = raw.get(char.upper(), "").lower()
            if target.isalpha():
                table[char] = target
        elif kind in "PSZ" and not any(c.isalnum() for c in target):
            table[char] = target
    return table


_CONFUSABLES = _ascii_confusables() | _SEPARATORS
# Default-ignorable letters (the Hangul fillers; U+FFA0 is U+1160 in NFKC): invisible, not Cf
_INVISIBLE_LETTERS = {"\u115f", "\u1160", "\u3164"}
_CACHE_SIZE = 65536  # distinct characters remembered (a text could hold every code point)
_ASCII = {chr(i): chr(i) for i in range(128)}
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def _char_view(c: str) -> str:
    category = unicodedata.category(c)
    if category == "Nd":
        return chr(48 + unicodedata.decimal(c))
    if category == "Cf":
        o = ord(c)
        return chr(o - 0xE0000) if 0xE0020 <= o <= 0xE007E else ""
    if c in _INVISIBLE_LETTERS:
        return ""
    kept = "".join(d for d in unicodedata.normalize("NFKD", c) if unicodedata.category(d) not in ("Mn", "Me"))
    out = []
    for d in unicodedata.normalize("NFC", kept):  # composes what NFKD split apart (Hangul)
        if d.isascii():
            out.append(d)
        elif unicodedata.category(d) == "Nd":
            out.append(chr(48 + unicodedata.decimal(d)))
        else:
            out.append(_CONFUSABLES.get(d, d))
    return "".join(out)


class _Views(dict):
    """Character -> its view, computed the first time the character is met."""

    def __missing__(self, c: str) -> str:
        if len(self) >= _CACHE_SIZE:
            self.clear()
            self.update(_ASCII)
        v = self[c] = _char_view(c)
        return v


_VIEWS = _Views(_ASCII)
_view_of = _VIEWS.__getitem__


def _run_view(m: re.Match) -> str:
    return "".join(map(_view_of, m.group()))


def view(text: str) -> str:
    """The view of text (text itself when nothing in it changes)."""
    if text.isascii():
        return text
    if len(text) - len(text.encode("ascii", "ignore")) < len(text) // 32:
        out = _NON_ASCII.sub(_run_view, text)  # mostly ASCII: only the other runs are looked up
    else:
        out = "".join(map(_view_of, text))
    return text if out == text else out


def fold(text: str) -> tuple[str, list[int] | None]:
    """The view of text, and for each of its characters the offset in text of the character it
    came from; None (no list) when the view is text itself."""
    if text.isascii():
        return text, None
    views = list(map(_view_of, text))
    out = "".join(views)
    if out == text:
        return text, None
    lengths = list(map(len, views))
    if lengths.count(1) == len(text):
        return out, list(range(len(text)))
    return out, list(chain.from_iterable(map(repeat, range(len(text)), lengths)))


_pieces: dict[str, tuple[str, list[int] | None]] = {}


def fold_piece(piece: str) -> tuple[str, list[int] | None]:
    """fold() for a streamed piece, remembered (pieces are tokens, and tokens repeat): the view
    (equal to the piece when nothing changes) and the offsets, None when each character of the
    piece is one character of the view."""
    folded = _pieces.get(piece)
    if folded is None:
        piece_view, src = fold(piece)
        if src is not None and src == list(range(len(piece))):
            src = None
        folded = (piece_view, src)
        if len(piece) <= 32:
            if len(_pieces) >= 8192:
                _pieces.clear()
            _pieces[piece] = folded
    return folded


def marks_end(text: str, i: int) -> int:
    """The end of the combining marks from text[i] on: a mark belongs to the character before it."""
    while i < len(text) and unicodedata.category(text[i]) in ("Mn", "Me"):
        i += 1
    return i
