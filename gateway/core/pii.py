"""Scrub customer identifiers before anything is stored or trained on.

Replaces payment card numbers (Luhn-checked, 13-19 digits with spaces/dashes), IBANs (mod-97
checked), e-mail addresses, phone numbers and other long digit runs (account numbers) with
typed placeholders such as `[CARD]`. Precision over recall where it is cheap (checksums), recall
over precision for bare long digit runs, which in a bank chat are almost always identifiers.

`keep` holds the bank's own published numbers (`pii.keep_numbers`: helplines, branch lines) as
digit strings; a phone/number match with exactly those digits is left alone, whatever its
separators, so answers that tell customers whom to call still say it (and training data does not
teach the model to say "[PHONE]").
"""

from __future__ import annotations

import re

_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_PHONE = re.compile(r"(?<![\w])(?:\+|00)?\d{1,3}?[ .-]?\(?\d{2,4}\)?(?:[ .-]?\d{2,4}){2,4}(?![\w])")
_LONG_DIGITS = re.compile(r"\b\d{8,}\b")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(raw: str) -> bool:
    s = raw.replace(" ", "")
    rearranged = s[4:] + s[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def digits_of(text: str) -> str:
    return re.sub(r"\D", "", text)


def scrub(text: str, keep: frozenset[str] | set[str] = frozenset()) -> str:
    if not text:
        return text
    text = _EMAIL.sub("[EMAIL]", text)
    text = _IBAN.sub(lambda m: "[IBAN]" if _iban_ok(m.group()) else m.group(), text)

    def card(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group())
        return "[CARD]" if 13 <= len(digits) <= 19 and _luhn_ok(digits) else m.group()

    text = _CARD.sub(card, text)

    def phone(m: re.Match[str]) -> str:
        digits = digits_of(m.group())
        return "[PHONE]" if 9 <= len(digits) <= 15 and digits not in keep else m.group()

    text = _LONG_DIGITS.sub(lambda m: m.group() if m.group() in keep else "[NUMBER]", text)
    return _PHONE.sub(phone, text)


def scrub_messages(messages: list[dict[str, str]], keep: frozenset[str] | set[str] = frozenset()) -> list[dict[str, str]]:
    return [{**m, "content": scrub(m.get("content", ""), keep)} for m in messages]
