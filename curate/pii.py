"""Personal data in captions: e-mail addresses, phone numbers, street addresses and ID numbers.

Pure functions over strings, no model: ``find(text)`` returns non-overlapping spans with their kind,
``scrub(text, spans)`` replaces each by a placeholder (``[EMAIL]``, ``[PHONE]``, ...).

Web captions are full of digits that are not personal (years, sizes, prices, product codes,
resolutions), so numbers are only reported where their structure says what they are:
  - card numbers: 13-19 digits in groups, passing the Luhn checksum;
  - IBANs: country code, two check digits, 11-30 alphanumerics, passing the ISO 13616 mod-97 check;
  - SSN-like ids: ``AAA-GG-SSSS`` with the US rules on impossible areas/groups/serials;
  - phone numbers: an international ``+CC`` prefix, a NANP ``(555) 123-4567`` / ``555-123-4567`` shape,
    or a digit run of 7-15 digits right after a word like ``tel``, ``phone``, ``call``, ``whatsapp``;
  - street addresses: a house number followed by one to four words and a street suffix
    (``221B Baker Street``, ``1600 Pennsylvania Ave``), or German/Dutch-style ``Hauptstraße 5``.
Spans are resolved by that priority: a card number is not also reported as a phone number.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

KINDS = ("email", "card", "iban", "ssn", "phone", "address")
PLACEHOLDER = {"email": "[EMAIL]", "card": "[CARD]", "iban": "[IBAN]", "ssn": "[ID]", "phone": "[PHONE]",
               "address": "[ADDRESS]"}


@dataclasses.dataclass(frozen=True)
class Span:
    kind: str
    start: int
    end: int


_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\d)")
_PHONE_NANP = re.compile(r"(?<![\d-])(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}(?![\d-])")
_PHONE_CUE = re.compile(
    r"\b(?:tel|telephone|phone|ph|mobile|mob|cell|call|fax|whatsapp|text|sms)\b\.?:?\s*"
    r"(\(?\d[\d ().-]{5,20}\d)", re.IGNORECASE)
_SUFFIXES = (
    "street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|"
    "parkway|pkwy|highway|hwy|square|sq|crescent|close|circle|cir"
)
_ADDRESS = re.compile(
    rf"\b\d{{1,5}}[A-Za-z]?\s+(?:[A-Z][\w'-]*\.?\s+){{1,4}}(?:{_SUFFIXES})\b\.?", re.IGNORECASE)
# The words before the suffix must start upper case (names), checked after the case-insensitive match.
_ADDRESS_DE = re.compile(r"\b[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|str\.|weg|gasse|platz|allee|laan|straat)"
                         r"\s+\d{1,4}[a-z]?\b")

_IBAN_LENGTHS = {  # ISO 13616 registry lengths of the common countries; others: any 15-34
    "AT": 20, "BE": 16, "CH": 21, "CZ": 24, "DE": 22, "DK": 18, "ES": 24, "FI": 18, "FR": 27, "GB": 22,
    "GR": 27, "HU": 28, "IE": 22, "IT": 27, "LU": 20, "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24,
    "SE": 24, "SK": 24,
}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "").upper()
    want = _IBAN_LENGTHS.get(s[:2])
    if (want is not None and len(s) != want) or not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return int(number) % 97 == 1


def _candidates(text: str, kinds: Iterable[str]) -> list[Span]:
    kinds = set(kinds)
    out: list[Span] = []
    if "email" in kinds:
        out += [Span("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
    if "card" in kinds:
        for m in _CARD.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1:
                out.append(Span("card", m.start(), m.end()))
    if "iban" in kinds:
        out += [Span("iban", m.start(), m.end()) for m in _IBAN.finditer(text) if iban_ok(m.group())]
    if "ssn" in kinds:
        out += [Span("ssn", m.start(), m.end()) for m in _SSN.finditer(text)]
    if "phone" in kinds:
        for rx in (_PHONE_INTL, _PHONE_NANP):
            for m in rx.finditer(text):
                n = sum(c.isdigit() for c in m.group())
                if 7 <= n <= 15:
                    out.append(Span("phone", m.start(), m.end()))
        for m in _PHONE_CUE.finditer(text):
            n = sum(c.isdigit() for c in m.group(1))
            if 7 <= n <= 15:
                out.append(Span("phone", m.start(1), m.end(1)))
    if "address" in kinds:
        for m in _ADDRESS.finditer(text):
            words = m.group().split()[1:-1]
            if all(w[0].isupper() for w in words):
                out.append(Span("address", m.start(), m.end()))
        out += [Span("address", m.start(), m.end()) for m in _ADDRESS_DE.finditer(text)]
    return out


def find(text: str | None, kinds: Sequence[str] = KINDS) -> list[Span]:
    """Non-overlapping spans of personal data in ``text``, in text order; earlier kinds in ``KINDS``
    win an overlap, then the longer span."""
    if not text:
        return []
    rank = {k: i for i, k in enumerate(KINDS)}
    chosen: list[Span] = []
    for s in sorted(_candidates(text, kinds), key=lambda s: (rank[s.kind], -(s.end - s.start), s.start)):
        if all(s.end <= c.start or s.start >= c.end for c in chosen):
            chosen.append(s)
    return sorted(chosen, key=lambda s: s.start)


def scrub(text: str, spans: Sequence[Span]) -> str:
    """``text`` with each span replaced by its kind's placeholder."""
    out, last = [], 0
    for s in sorted(spans, key=lambda s: s.start):
        out.append(text[last:s.start])
        out.append(PLACEHOLDER[s.kind])
        last = s.end
    out.append(text[last:])
    return "".join(out)
