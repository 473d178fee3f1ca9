"""Mask personal data in training text: e-mail addresses, phone numbers, national ID numbers
(US SSN, Korean RRN) and payment card numbers (Luhn-checked).

Pure functions: text in, masked text and counts out. Kinds are checked in a fixed order
(card and national ID before phone) so that a long digit run is labelled by its most
specific kind and never masked twice.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PLACEHOLDERS = {
    "email": "[EMAIL]",
    "creditCard": "[CARD_NUMBER]",
    "nationalId": "[NATIONAL_ID]",
    "phone": "[PHONE]",
}
ALL_KINDS = ("email", "creditCard", "nationalId", "phone")

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
# 13-19 digits, optionally grouped by single spaces or dashes.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# US SSN 123-45-6789 (not 000/666/9xx area, not 00 group, not 0000 serial).
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
# Korean RRN: YYMMDD-GNNNNNN, G = 1..8 (with or without the dash).
_RRN = re.compile(r"(?<!\d)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])-?[1-8]\d{6}(?!\d)")
# Phones: international (+CC ...), Korean mobile/landline (010-1234-5678, 02-123-4567),
# North American (555) 123-4567 / 555-123-4567 / 555.123.4567.
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|0\d{1,2}[ .-]\d{3,4}[ .-]\d{4}"
    r"|01[016789]\d{7,8}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
    r"|\d{3}[.-]\d{3}[.-]\d{4}"
    r")(?![\w])"
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment card numbers."""
    nums = [int(c) for c in digits if c.isdigit()]
    if not 13 <= len(nums) <= 19:
        return False
    total = 0
    for i, n in enumerate(reversed(nums)):
        if i % 2 == 1:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return total % 10 == 0


def _phone_digits_ok(match: str) -> bool:
    digits = sum(c.isdigit() for c in match)
    return 7 <= digits <= 15


@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    accept: Callable[[str], bool]


_RULES = (
    _Rule("email", _EMAIL, lambda _m: True),
    _Rule("creditCard", _CARD, luhn_valid),
    _Rule("nationalId", _SSN, lambda _m: True),
    _Rule("nationalId", _RRN, lambda _m: True),
    _Rule("phone", _PHONE, _phone_digits_ok),
)


def mask_text(text: str, kinds: Iterable[str] = ALL_KINDS) -> tuple[str, Counter[str]]:
    """Replace each personal-data span of the given kinds with its placeholder.

    Returns the masked text and the number of spans masked per kind.
    """
    wanted = set(kinds)
    unknown = wanted - set(ALL_KINDS)
    if unknown:
        raise ValueError(f"unknown PII kinds {sorted(unknown)}; use {list(ALL_KINDS)}")
    counts: Counter[str] = Counter()
    for rule in _RULES:
        if rule.kind not in wanted:
            continue

        def _replace(m: re.Match[str], rule: _Rule = rule) -> str:
            if not rule.accept(m.group(0)):
                return m.group(0)
            counts[rule.kind] += 1
            return PLACEHOLDERS[rule.kind]

        text = rule.pattern.sub(_replace, text)
    return text, counts
