"""PII detectors: the patterns (email, phone, credit card, IBAN, US SSN, IP address, secrets)
and the validators that decide a match (Luhn, IBAN mod-97 and length, the SSA's SSN rules).

Patterns are written so a match cannot start in the middle of a word or number (lookbehinds)
and cannot stop in the middle of one (lookaheads); the stream scanner relies on the first.

Presidio (MIT licence) was the reference for the PII regexes and validators; we do not depend on
it: its analyzer pulls spaCy and a model download, and it cannot match partially on a stream.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Literal

import regex

PII_ENTITIES = ("email", "phone", "credit_card", "iban", "us_ssn", "ip_address", "secret")
PiiEntity = Literal["email", "phone", "credit_card", "iban", "us_ssn", "ip_address", "secret"]

MASKS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "credit_card": "[CREDIT_CARD]",
    "iban": "[IBAN]",
    "us_ssn": "[US_SSN]",
    "ip_address": "[IP_ADDRESS]",
    "secret": "[SECRET]",
}


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _accept_card(m: regex.Match) -> int | None:
    """End of the longest Luhn-valid card (13-19 digits) in the match that ends between groups."""
    text, start = m.group(), m.start()
    ends = []  # (digit count, end offset) at every group boundary
    digits = 0
    for i, ch in enumerate(text):
        if ch.isdigit():
            digits += 1
            if i + 1 == len(text) or not text[i + 1].isdigit():
                ends.append((digits, i + 1))
    compact = "".join(ch for ch in text if ch.isdigit())
    for n, end in reversed(ends):
        if 13 <= n <= 19 and _luhn_ok(compact[:n]):
            return start + end
    return None


# SWIFT IBAN registry: country -> total length.
_IBAN_LENGTH = {
    "AD": 24,
    "AE": 23,
    "AL": 28,
    "AT": 20,
    "AZ": 28,
    "BA": 20,
    "BE": 16,
    "BG": 22,
    "BH": 22,
    "BI": 27,
    "BR": 29,
    "BY": 28,
    "CH": 21,
    "CR": 22,
    "CY": 28,
    "CZ": 24,
    "DE": 22,
    "DJ": 27,
    "DK": 18,
    "DO": 28,
    "EE": 20,
    "EG": 29,
    "ES": 24,
    "FI": 18,
    "FK": 18,
    "FO": 18,
    "FR": 27,
    "GB": 22,
    "GE": 22,
    "GI": 23,
    "GL": 18,
    "GR": 27,
    "GT": 28,
    "HR": 21,
    "HU": 28,
    "IE": 22,
    "IL": 23,
    "IQ": 23,
    "IS": 26,
    "IT": 27,
    "JO": 30,
    "KW": 30,
    "KZ": 20,
    "LB": 28,
    "LC": 32,
    "LI": 21,
    "LT": 20,
    "LU": 20,
    "LV": 21,
    "LY": 25,
    "MC": 27,
    "MD": 24,
    "ME": 22,
    "MK": 19,
    "MN": 20,
    "MR": 27,
    "MT": 31,
    "MU": 30,
    "NI": 28,
    "NL": 18,
    "NO": 15,
    "OM": 23,
    "PK": 24,
    "PL": 28,
    "PS": 29,
    "PT": 25,
    "QA": 29,
    "RO": 24,
    "RS": 22,
    "RU": 33,
    "SA": 24,
    "SC": 31,
    "SD": 18,
    "SE": 24,
    "SI": 19,
    "SK": 24,
    "SM": 27,
    "SO": 23,
    "ST": 25,
    "SV": 28,
    "TL": 23,
    "TN": 24,
    "TR": 26,
    "UA": 29,
    "VA": 22,
    "VG": 24,
    "XK": 20,
    "YE": 30,
}


def _iban_ok(iban: str) -> bool:
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _accept_iban(m: regex.Match) -> int | None:
    """End of the IBAN in the match: exactly its country's length, then a group boundary."""
    text, start = m.group(), m.start()
    length = _IBAN_LENGTH.get(text[:2])
    if length is None:
        return None
    taken = 0
    for i, ch in enumerate(text):
        if ch != " ":
            taken += 1
            if taken == length:
                end = start + i + 1
                after = m.string[end : end + 1]
                if after.isalnum():  # the IBAN would end inside a group
                    return None
                compact = text[: i + 1].replace(" ", "")
                return end if _iban_ok(compact) else None
    return None


def _accept_ssn(m: regex.Match) -> int | None:
    digits = "".join(ch for ch in m.group() if ch.isdigit())
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return None
    return m.end()


def _accept_phone(m: regex.Match) -> int | None:
    digits = sum(ch.isdigit() for ch in m.group())
    return m.end() if 7 <= digits <= 15 else None


def _accept_ipv6(m: regex.Match) -> int | None:
    text = m.group()
    if not any(ch not in ":." for ch in text):  # "::" alone is punctuation, not an address
        return None
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return m.end()


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_HEX4 = r"[0-9A-Fa-f]{1,4}"


def has(*literals: str) -> Callable[[str], bool]:
    return lambda text: any(lit in text for lit in literals)


_has_digit = re.compile(r"\d").search  # the same Unicode digits as the patterns' \d

# entity -> [(pattern, validator, lazy, needs)]. `lazy` patterns (a lazy quantifier up to a
# terminator) are final once they match, so they skip the any-path probe, which would hold them
# to the end. `needs(text)` is false for a text no match can be in (every match holds one of
# those characters or strings): a whole text that fails it is not searched at all.
PII_SOURCES: dict[str, list[tuple[str, Callable[[regex.Match], int | None] | None, bool, Callable[[str], object]]]] = {
    "email": [
        (
            r"(?<![\w.%+-])[\w%+-](?:[\w.%+-]{0,62}[\w%+-])?"
            r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
            r"(?![\w-]|\.[A-Za-z0-9])",
            None,
            False,
            has("@"),
        )
    ],
    # International (E.164: + and 7-15 digits) or NANP with separators. Bare digit runs, dates
    # (2024-01-31), versions (1.2.3) and prices are not phone numbers here.
    "phone": [
        (
            r"(?<![\w+.-])(?:"
            r"\+[1-9](?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){1,7}"
            r"|(?:1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
            r")(?![\w]|[.-]\d)",
            _accept_phone,
            False,
            _has_digit,
        )
    ],
    # Digit groups of cards and SSNs may be separated by a space, a hyphen or a dot (the view
    # reads every Unicode space, dash and middle dot as one of those).
    "credit_card": [(r"(?<![\w+-])(?:\d[ .-]?){12,18}\d(?!\w)", _accept_card, False, _has_digit)],
    "iban": [
        (r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?", _accept_iban, False, _has_digit)
    ],
    "us_ssn": [
        (r"(?<![\w+.-])\d{3}(?P<ssn_sep>[ .-]?)\d{2}(?P=ssn_sep)\d{4}(?!\w|[.-]\d)", _accept_ssn, False, _has_digit)
    ],
    "ip_address": [
        # An IPv4 address right after "hex:" is the tail of an IPv6 one (::ffff:192.0.2.1).
        (rf"(?<![\w.]|[0-9A-Fa-f]:|::){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)", None, False, _has_digit),
        (
            rf"(?<![\w:.])(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}(?:{_HEX4}|{_OCTET}(?:\.{_OCTET}){{3}})?"
            r"(?![\w:]|\.\d)",
            _accept_ipv6,
            False,
            has(":"),
        ),
    ],
    "secret": [
        (
            r"(?<![\w-])(?:"
            r"sk-keel-[A-Za-z0-9_-]{8,}"  # Keel
            r"|sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"  # OpenAI
            r"|(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"  # AWS access key id
            r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
            r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
            r"|AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"  # Google API key
            r"|[sr]k_live_[A-Za-z0-9]{16,}"  # Stripe
            r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*"  # JWT
            r")",
            None,
            False,
            has(
                "sk-",
                "AKIA",
                "ASIA",
                "ghp_",
                "gho_",
                "ghu_",
                "ghs_",
                "ghr_",
                "github_pat_",
                "xox",
                "AIza",
                "k_live_",
                "eyJ",
            ),
        ),
        # A PEM private key through its matching END line; an unterminated one to the end.
        (
            r"-----BEGIN (?P<pem_label>(?:[A-Z0-9]+ )*)PRIVATE KEY-----[\s\S]*?"
            r"(?:-----END (?P=pem_label)PRIVATE KEY-----|\Z)",
            None,
            True,
            has("PRIVATE KEY-----"),
        ),
    ],
}
