"""Scrub customer data before anything is stored, logged, exported or trained on.

Detection rests on validators, not on the look of a number alone: payment cards must pass Luhn
(`stdnum.luhn`), IBANs their mod-97 check and country length (`stdnum.iban`), Indian PANs and US SSNs
their format rules (`stdnum.in_.pan`, `stdnum.us.ssn`), phone numbers the numbering plans of
`phonenumbers` (region `pii.phone_region` for numbers written without a country code), UK National
Insurance numbers HMRC's prefix rules. Around them, context rules catch what only the words around
it make secret: a CVV/CVC, PIN, one-time code or password typed after its name, a date of birth,
a sort code, an account number, a card expiry date.

Numbers are found whatever separates their digits — spaces (several, no-break, thin), newlines,
dots, slashes, dashes, underscores or nothing — and whether or not they are glued to a word
("card4111111111111111"); letters in IBANs, NINOs and PANs in any case. Each finding becomes a
typed placeholder (`[CARD]`, `[IBAN]`, `[EMAIL]`, `[PHONE]`, `[ACCOUNT]`, `[SORT_CODE]`, `[NINO]`,
`[PAN]`, `[SSN]`, `[DOB]`, `[EXPIRY]`, `[CVV]`, `[PIN]`, `[OTP]`, `[PASSWORD]`); for a secret after
its name the name stays ("my PIN is [PIN]") so the conversation still reads.

Kept on purpose (docs/security.md has the list and the measured false-positive rate):
- the bank's own published numbers (`pii.keep_numbers`: helplines), whatever their separators, so
  answers that say whom to call still say it and training data does not teach "[PHONE]";
- amounts ("£1,250.00", "2500 GBP"), times, percentages, short numbers;
- dates that are not a date of birth (a transaction on 12/03/2024 must stay reviewable);
- references with a letter prefix or after the word reference/case/ticket/order/transaction
  ("REF-20240312-88", "FT2314567890", "case 00123456"): the bank needs them to find the transaction.
Any other run of 8 or more digits becomes `[NUMBER]` (in a bank chat it is almost always an
identifier). Names and street addresses are NOT detected: that needs a named-entity model, and
none is downloaded at run time.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.in_ import pan as stdnum_pan
from stdnum.us import ssn as stdnum_ssn

# Whatever customers put between digits (brackets too: "(020) 7946 0958"). Commas and colons are
# not separators: they make amounts ("1,250") and times ("10:30").
SEP = r"[\s.\-/_\\()]"
_RUN = re.compile(rf"(?<!\d)\d(?:{SEP}*\d)*(?!\d)")  # digits with any separators; glued words allowed
_GROUP = re.compile(r"\d+")
_EMAIL = re.compile(r"[\w.+%-]+@[\w-]+(?:\.[\w-]+)+", re.UNICODE)
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}")
_NINO = re.compile(
    rf"(?<![A-Za-z0-9])([A-CEGHJ-PR-TW-Za-ceghj-pr-tw-z][A-CEGHJ-NPR-TW-Za-ceghj-npr-tw-z]){SEP}*"
    rf"(\d{{2}}){SEP}*(\d{{2}}){SEP}*(\d{{2}}){SEP}*([A-Da-d])(?![A-Za-z0-9])")
_NINO_BAD_PREFIX = {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}
_PAN = re.compile(r"(?<![A-Za-z0-9])([A-Za-z]{5}\d{4}[A-Za-z])(?![A-Za-z0-9])")
_SSN = re.compile(r"(?<![\d-])(\d{3})[ -](\d{2})[ -](\d{4})(?![\d-])")

_MONTHS = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
           r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")
_NUMERIC_DATE = r"(?:\d{1,2}[./\-\s]\d{1,2}[./\-\s](?:\d{4}|\d{2})|\d{4}[./\-]\d{1,2}[./\-]\d{1,2})"
_TEXT_DATE = (rf"(?:\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTHS},?\s+\d{{2,4}}|"
              rf"{_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{2,4}})")
_DATE = re.compile(rf"(?<![\d/.\-])(?:{_NUMERIC_DATE}|{_TEXT_DATE})(?![\d/.\-]?\d)", re.I)
_DOB = re.compile(rf"(?i)\b(date\s+of\s+birth|birth\s*date|d\.?\s?o\.?\s?b\.?|born(?:\s+on)?|birthday)"
                  rf"([^\d\n]{{0,30}}?)({_NUMERIC_DATE}|{_TEXT_DATE}|\d{{6,8}})(?!\d)")
_EXPIRY = re.compile(r"(?i)\b(exp(?:iry|ires|iration|\.)?(?:\s+date)?|valid\s+(?:thru|through|until|to))(?![a-z])"
                     r"([^\d\n]{0,12}?)(\d{1,2}\s*[/\-.]\s*\d{2,4})(?!\d)")

# A secret typed after its name: "cvv 123", "CVC:123", "pin1234", "my PIN is 4321", "OTP - 839201", or a
# few words later in the same line ("the otp i got was 583920", "my pin, its 4829"): the first number of
# the secret's length within 40 characters that is not part of a date, time, amount or longer number.
_NEAR = r"([^\d\n]{0,40}?)(?<![£$€₹¥])"  # up to the first number after the name; an amount is not one
_DIGIT_SECRETS = [
    ("CVV", re.compile(rf"(?i)(?<![a-z])(cvv2?|cvc2?|cv2|csc|card\s+security\s+code|security\s+code)(?![a-z])"
                       rf"{_NEAR}(\d{{3,4}})(?![\d/.\-,:]?\d)")),
    ("OTP", re.compile(rf"(?i)(?<![a-z])(otp|one[\s-]?time\s+(?:pass(?:word|code)?|code|pin)|verification\s+code|"
                       rf"auth(?:entication)?\s+code|passcode)(?![a-z]){_NEAR}(\d{{4,8}})(?![\d/.\-,:]?\d)")),
    ("PIN", re.compile(rf"(?i)(?<![a-z])(pin)(?![a-z]){_NEAR}(\d{{4,6}})(?![\d/.\-,:]?\d)")),
]
# A password has no shape: it is the token after its name when it looks like one — after ':' or '=',
# or after "is"/"was" with a digit or a symbol inside, or right after the name with letters and
# digits — so "my password is not working" and "I forgot my password." stay as they are. A few words
# later in the same line ("the password I set was 'Bluebird_77'"), only a token of 6+ characters
# with letters and digits counts.
_PASSWORD = re.compile(r"(?i)(?<![a-z])(password|passwd|pwd|pass\s*word|memorable\s+(?:word|information))"
                       r"(\s*(?:is|was)\b\s*|\s*[:=]\s*|\s+)(\S+)")
_PASSWORD_NEAR = re.compile(r"(?i)(?<![a-z])(password|passwd|pwd|memorable\s+word)(?![a-z])([^\n]{0,40}?)"
                            r"(?<![\w\[])([\"'`(]?)((?=[^\s\"'`)\[\]]*[a-z])(?=[^\s\"'`)\[\]]*\d)"
                            r"[^\s\"'`)\[\]]{6,})")
_SORT_CODE = re.compile(rf"(?i)\b(sort\s*-?\s*code)([^\d\n]{{0,15}}?)(\d{{2}}{SEP}?\d{{2}}{SEP}?\d{{2}})(?!\d)")
_SORT_CODE_SHAPE = re.compile(r"(?<![\d\-])(\d{2})-(\d{2})-(\d{2})(?![\d\-])")
_ACCOUNT = re.compile(rf"(?i)(?<![a-z])(account|acct|acc|a/c)(\s*(?:number|num|no\.?|#)?\s*(?:is|:|=|-)?\s*)"
                      rf"(\d(?:{SEP}{{0,3}}\d){{5,17}})(?!\d)")
_CARD_WORD = re.compile(r"(?i)(card|visa|mastercard|amex|debit|credit)")
_REFERENCE = re.compile(rf"(?i)(?<![a-z])(?:ref(?:erence)?|case|ticket|order|invoice|transaction|txn|trn|claim|"
                        rf"complaint)(?:\s*(?:id|no\.?|number|#))?\s*[:#-]?\s*([A-Za-z0-9](?:[A-Za-z0-9]|{SEP}(?=\w))*)")
_LETTER_PREFIXED = re.compile(r"[A-Za-z]{2,}[.\-_/#]?$")
_CURRENCY_BEFORE = re.compile(r"[£$€¥₹]\s*$")
_CURRENCY_AFTER = re.compile(r"\s*(?:gbp|usd|eur|inr|pounds?|dollars?|euros?)\b", re.I)


def digits_of(text: str) -> str:
    """The decimal digits of `text` as ASCII (any script's digits count)."""
    return "".join(str(unicodedata.decimal(ch)) for ch in text if ch.isdecimal())


def _nino_ok(prefix: str, suffix: str) -> bool:
    return prefix.upper() not in _NINO_BAD_PREFIX and suffix.upper() in "ABCD"


def _is_reference(token: str) -> bool:
    """A reference the bank needs: it has a letter, or at most 12 digits (13-19 could be a card)."""
    return any(c.isalpha() for c in token) or len(digits_of(token)) <= 12


def _plausible_date(text: str) -> bool:
    nums = [int(n) for n in re.findall(r"\d+", text)]
    if len(nums) < 3:
        return True  # a month name carries it
    if nums[0] > 31:  # year first
        return 1 <= nums[1] <= 12 and 1 <= nums[2] <= 31
    return 1 <= nums[0] <= 31 and 1 <= nums[1] <= 31 and (nums[0] <= 12 or nums[1] <= 12)


class Scrubber:
    """One configured scrubber (kept numbers, phone region); `scrub` is pure and thread-safe."""

    def __init__(self, keep: frozenset[str] | set[str] = frozenset(), phone_region: str = "GB") -> None:
        self.keep = frozenset(keep)
        self.region = phone_region
        self._keep_e164 = set()  # the kept numbers as phonenumbers reads them, so +44 20 ... = 020 ...
        for number in self.keep:
            try:
                parsed = phonenumbers.parse(number if not number.startswith("00") else "+" + number[2:], phone_region)
                self._keep_e164.add(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))
            except phonenumbers.NumberParseException:
                pass

    # ---- the passes, in order: each replaces what it finds, later ones see placeholders --------
    def scrub(self, text: str | None) -> str | None:
        if not text:
            return text
        protected: list[str] = []

        def protect(value: str) -> str:
            protected.append(value)
            return f"\x00{len(protected) - 1}\x00"

        if self.keep:  # the bank's own numbers first, so no later pass reads them as part of something else
            text = _RUN.sub(lambda m: self._kept(m.group(), protect), text)
        text = _EMAIL.sub("[EMAIL]", text)
        for kind, pattern in _DIGIT_SECRETS:
            text = pattern.sub(lambda m, k=kind: f"{m.group(1)}{m.group(2)}[{k}]", text)
        text = _PASSWORD.sub(self._password, text)
        text = _PASSWORD_NEAR.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}[PASSWORD]", text)
        text = _DOB.sub(lambda m: f"{m.group(1)}{m.group(2)}[DOB]", text)
        text = _EXPIRY.sub(lambda m: f"{m.group(1)}{m.group(2)}[EXPIRY]", text)
        text = self._ibans(text)
        text = _NINO.sub(lambda m: "[NINO]" if _nino_ok(m.group(1), m.group(5)) else m.group(0), text)
        text = _PAN.sub(lambda m: "[PAN]" if stdnum_pan.is_valid(m.group(1).upper()) else m.group(0), text)
        text = _SORT_CODE.sub(lambda m: f"{m.group(1)}{m.group(2)}[SORT_CODE]", text)
        text = _ACCOUNT.sub(lambda m: f"{m.group(1)}{m.group(2)}[ACCOUNT]", text)
        text = self._cards(text)
        text = _SSN.sub(lambda m: "[SSN]" if stdnum_ssn.is_valid("".join(m.groups())) else m.group(0), text)
        text = self._phones(text)
        # what is kept from here on: references the bank needs, dates that are not a birth date
        text = _REFERENCE.sub(lambda m: m.group(0).replace(m.group(1), protect(m.group(1)))
                              if _is_reference(m.group(1)) else m.group(0), text)
        text = _DATE.sub(lambda m: protect(m.group(0)) if _plausible_date(m.group(0)) else m.group(0), text)
        text = _SORT_CODE_SHAPE.sub(lambda m: "[SORT_CODE]", text)
        text = _RUN.sub(lambda m: self._long_number(m, text), text)
        return re.sub(r"\x00(\d+)\x00", lambda m: protected[int(m.group(1))], text)

    def scrub_messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{**m, "content": self.scrub(m.get("content", ""))} for m in messages]

    def scrub_conversation(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Scrub turns together, so a secret given across turns ("my password is" / "hunter2pass") is
        caught as in one text: the contents are joined by a record separator (whitespace to the
        patterns), scrubbed once and split again. Where a placeholder swallowed a separator, the
        turns are kept as one user message of the scrubbed text: the structure gives way, not the
        customer's data."""
        sep = "\n\x1e\n"
        contents = [(m.get("content") or "").replace("\x1e", " ") for m in messages]
        scrubbed = self.scrub(sep.join(contents)) or ""
        parts = scrubbed.split(sep)
        if len(parts) != len(messages) or "\x1e" in scrubbed.replace(sep, ""):
            return [{"role": "user", "content": scrubbed.replace("\x1e", "")}]
        return [{**m, "content": part} for m, part in zip(messages, parts)]

    def _kept(self, run: str, protect) -> str:  # noqa: ANN001
        """Protect every kept number inside a digit run ("1800 200 1999 / 1860 2000 700" is two)."""
        positions = [i for i, ch in enumerate(run) if ch.isdecimal()]
        digits = digits_of(run)
        spans = []
        for number in sorted(self.keep, key=len, reverse=True):
            for found in re.finditer(re.escape(number), digits):
                a, b = positions[found.start()], positions[found.end() - 1] + 1
                if all(b <= s or a >= e for s, e in spans):
                    spans.append((a, b))
        out, pos = [], 0
        for a, b in sorted(spans):
            out.append(run[pos:a] + protect(run[a:b]))
            pos = b
        return "".join(out) + run[pos:]

    @staticmethod
    def _password(m: re.Match[str]) -> str:
        connector, value = m.group(2), m.group(3)
        core = value.rstrip(".,!?;:)]}\"'")
        trailing = value[len(core):]
        core = core.lstrip("\"'([{")
        digit, letter = any(c.isdigit() for c in core), any(c.isalpha() for c in core)
        symbol = re.search(r"[^\w\s'\-]", core) is not None  # a hyphen or apostrophe is a word's ("re-set")
        explicit = ":" in connector or "=" in connector
        named = connector.strip().lower() in ("is", "was")
        if len(core) >= 3 and (explicit or (named and (digit or symbol)) or (not named and digit and letter)):
            return f"{m.group(1)}{connector}[PASSWORD]{trailing}"
        return m.group(0)

    def _ibans(self, text: str) -> str:
        """Country code + check digits, then up to 30 letters/digits with any separators; the longest
        prefix that passes the IBAN check (so a following word is never swallowed)."""
        out, pos = [], 0
        for start in _IBAN_START.finditer(text):
            if start.start() < pos:
                continue
            chars, ends, i = [], [], start.start()
            while i < len(text) and len(chars) < 34:
                ch = text[i]
                if ch.isascii() and ch.isalnum():
                    chars.append(ch.upper())
                    ends.append(i + 1)
                elif not re.match(SEP, ch) or not chars:
                    break
                i += 1
            for n in range(len(chars), 14, -1):
                if stdnum_iban.is_valid("".join(chars[:n])):
                    out.append(text[pos:start.start()] + "[IBAN]")
                    pos = ends[n - 1]
                    break
        return "".join(out) + text[pos:]

    def _cards(self, text: str) -> str:
        """Within every digit run, the first stretch of whole digit groups with 13-19 digits that
        passes Luhn — or, after a card word, 16 digits that fail it (a mistyped card is still one)."""
        out, pos = [], 0
        for run in _RUN.finditer(text):
            groups = list(_GROUP.finditer(run.group()))
            i = 0
            while i < len(groups):
                digits, found = "", None
                starts_like_a_phone = groups[i].group()[0] == "0" or \
                    text[max(0, run.start() + groups[i].start() - 1)] == "+"  # no card starts with 0 or +
                for j in range(i, len(groups) if not starts_like_a_phone else i):
                    digits += groups[j].group()
                    if len(digits) > 19:
                        break
                    if 13 <= len(digits) and (luhn.is_valid(digits) or (
                            len(digits) == 16 and _CARD_WORD.search(text[max(0, run.start() - 40):run.start()]))):
                        found = j  # keep extending: the longest valid stretch wins
                if found is None:
                    i += 1
                    continue
                start, end = run.start() + groups[i].start(), run.start() + groups[found].end()
                out.append(text[pos:start] + "[CARD]")
                pos = end
                i = found + 1
        return "".join(out) + text[pos:]

    def _phones(self, text: str) -> str:
        out, pos = [], 0
        for match in phonenumbers.PhoneNumberMatcher(text, self.region, leniency=phonenumbers.Leniency.VALID):
            # the kept numbers as written are protected already; this catches them in another format (+44 ...)
            if phonenumbers.format_number(match.number, phonenumbers.PhoneNumberFormat.E164) in self._keep_e164:
                continue
            out.append(text[pos:match.start] + "[PHONE]")
            pos = match.end
        return "".join(out) + text[pos:]

    def _long_number(self, m: re.Match[str], text: str) -> str:
        if len(digits_of(m.group())) < 8:  # (the bank's kept numbers were protected by the first pass)
            return m.group()
        before, after = text[max(0, m.start() - 12):m.start()], text[m.end():m.end() + 8]
        if _LETTER_PREFIXED.search(before) and not before.endswith(" "):  # FT2314567890, TRN-88120041
            return m.group()
        if before.endswith(",") or _CURRENCY_BEFORE.search(before) or _CURRENCY_AFTER.match(after):
            return m.group()  # an amount, or the tail of one ("800,000 0 0 200,000" in a table)
        return "[NUMBER]"


@lru_cache(maxsize=8)
def scrubber(keep: frozenset[str] = frozenset(), phone_region: str = "GB") -> Scrubber:
    return Scrubber(keep, phone_region)


def scrub(text: str | None, keep: frozenset[str] | set[str] = frozenset(), phone_region: str = "GB") -> str | None:
    return scrubber(frozenset(keep), phone_region).scrub(text)


def scrub_messages(messages: list[dict[str, str]], keep: frozenset[str] | set[str] = frozenset(),
                   phone_region: str = "GB") -> list[dict[str, str]]:
    return scrubber(frozenset(keep), phone_region).scrub_messages(messages)
