"""Personal-data masking: each kind is found, look-alikes are left alone, kinds are configurable."""

from __future__ import annotations

import pytest
from finetune_trainer.pii import luhn_valid, mask_text

CASES = [
    ("write to jane.doe+news@example.co.kr today", "write to [EMAIL] today", {"email": 1}),
    ("mobile 010-1234-5678", "mobile [PHONE]", {"phone": 1}),
    ("call +1 (555) 123-4567 now", "call [PHONE] now", {"phone": 1}),
    ("office 555.123.4567", "office [PHONE]", {"phone": 1}),
    ("국번 +82 10 1234 5678 입니다", "국번 [PHONE] 입니다", {"phone": 1}),
    ("SSN 123-45-6789.", "SSN [NATIONAL_ID].", {"nationalId": 1}),
    ("주민번호 900101-1234567", "주민번호 [NATIONAL_ID]", {"nationalId": 1}),
    ("card 4111 1111 1111 1111 exp 12/29", "card [CARD_NUMBER] exp 12/29", {"creditCard": 1}),
    ("card 5500-0000-0000-0004", "card [CARD_NUMBER]", {"creditCard": 1}),
    # Luhn fails: not a card, and too long to be a phone number.
    ("ref 4111 1111 1111 1112", "ref 4111 1111 1111 1112", {}),
    # Dates, versions, amounts and order numbers are not personal data.
    ("order 12345 on 2024-01-15, v1.2.3, total 1000000", None, {}),
    ("SSN with a 000 area 000-12-3456 is invalid", None, {}),
    (
        "a@b.io and 010-9999-8888 and 4012888888881881",
        "[EMAIL] and [PHONE] and [CARD_NUMBER]",
        {"email": 1, "phone": 1, "creditCard": 1},
    ),
]


@pytest.mark.parametrize(("text", "expected", "counts"), CASES)
def test_masking_cases(text: str, expected: str | None, counts: dict[str, int]) -> None:
    masked, found = mask_text(text)
    assert masked == (expected if expected is not None else text)
    assert dict(found) == counts


def test_only_configured_kinds_are_masked() -> None:
    text = "mail a@b.io, phone 010-1234-5678"
    masked, found = mask_text(text, ["phone"])
    assert masked == "mail a@b.io, phone [PHONE]"
    assert dict(found) == {"phone": 1}


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown PII kinds"):
        mask_text("x", ["passport"])


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("1234")
