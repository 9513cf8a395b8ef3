"""The scrubber (gateway/core/pii.py): property-based generators for every kind of customer data and
every way of writing it, a hand-written corpus of realistic messages (data/pii/corpus.jsonl) that
must lose every piece of personal data, and ordinary banking messages full of numbers
(data/pii/ordinary.jsonl, and 10,003 Banking77 utterances) that must come out unchanged."""

from __future__ import annotations

import csv
import json
import re

import phonenumbers
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from stdnum import iban, luhn

from gateway.core.pii import Scrubber, digits_of, scrub, scrub_messages
from tests.conftest import ROOT

KEEP = frozenset({"03457404404", "18002026161"})  # the corpus bank's helplines
S = Scrubber(KEEP)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Everything customers put between digits, and the words they glue numbers to.
SEPARATORS = [" ", "  ", "   ", ".", "/", "-", " - ", "\u00a0", "\u2009", "\n", "_", ""]
seps = st.sampled_from(SEPARATORS)
glue = st.sampled_from(["", " ", "\n", ": ", " is ", "#"])
words_before = st.sampled_from(["my card", "Card", "card no", "number", "here", "pls block", "its", ""])
words_after = st.sampled_from(["", " please", " thanks", "thanks", " ok?", "!", "\nregards"])


def joined(groups: list[str], sep: st.DrawFn) -> str:
    return "".join(g + (sep() if i < len(groups) - 1 else "") for i, g in enumerate(groups))


def survives(secret: str, text: str) -> bool:
    """Does a number's digit string survive anywhere in the output's digits?"""
    return digits_of(secret) in digits_of(text)


# ---- cards --------------------------------------------------------------------------------------
@st.composite
def cards(draw, valid: bool = True) -> str:
    prefix = draw(st.sampled_from(["4", "51", "55", "2221", "34", "37", "6011", "35"]))
    length = 15 if prefix in ("34", "37") else draw(st.sampled_from([16, 16, 16, 19, 13]))
    body = prefix + "".join(draw(st.lists(st.sampled_from("0123456789"), min_size=length - len(prefix) - 1,
                                          max_size=length - len(prefix) - 1)))
    check = luhn.calc_check_digit(body)
    if not valid:
        check = str((int(check) + draw(st.integers(1, 9))) % 10)
    return body + check


@st.composite
def written_card(draw) -> tuple[str, str]:
    number = draw(cards())
    size = draw(st.sampled_from([4, 4, 4, 3, 5, len(number)]))
    groups = [number[i:i + size] for i in range(0, len(number), size)]
    sep = draw(seps)
    if draw(st.booleans()):  # one separator style throughout, or a different one in each gap
        text = sep.join(groups)
    else:
        text = joined(groups, lambda: draw(seps))
    return number, f"{draw(words_before)}{draw(glue)}{text}{draw(words_after)}"


@PROPERTY
@given(written_card())
def test_a_valid_card_never_survives_whatever_the_separators(case):
    number, text = case
    out = S.scrub(text)
    assert "[CARD]" in out and not survives(number, out), (text, out)


@PROPERTY
@given(cards(valid=False), seps, st.sampled_from(["", "ref ", "number "]))
def test_a_card_that_fails_luhn_still_never_survives(number, sep, before):
    """Not a card then, but 13-19 digits are an identifier: `[NUMBER]` (or `[CARD]` after a card word)."""
    groups = [number[i:i + 4] for i in range(0, len(number), 4)]
    out = S.scrub(before + sep.join(groups))
    assert not survives(number, out), out


def test_card_with_expiry_and_cvv():
    out = S.scrub("card 4111111111111111 exp 12/26 cvv 737")
    assert out == "card [CARD] exp [EXPIRY] cvv [CVV]"


# ---- IBAN ---------------------------------------------------------------------------------------
@st.composite
def ibans(draw) -> str:
    country = draw(st.sampled_from(["GB", "DE", "NL", "IE"]))
    if country in ("GB", "IE"):
        bban = "".join(draw(st.lists(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), min_size=4, max_size=4))) + \
            "".join(draw(st.lists(st.sampled_from("0123456789"), min_size=14, max_size=14)))
    elif country == "NL":
        bban = "".join(draw(st.lists(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), min_size=4, max_size=4))) + \
            "".join(draw(st.lists(st.sampled_from("0123456789"), min_size=10, max_size=10)))
    else:
        bban = "".join(draw(st.lists(st.sampled_from("0123456789"), min_size=18, max_size=18)))
    number = country + iban.calc_check_digits(country + "00" + bban) + bban
    assume(iban.is_valid(number))
    return number


@PROPERTY
@given(ibans(), st.sampled_from([" ", "-", "", ".", "  "]), st.sampled_from(["upper", "lower", "mixed"]),
       words_before, words_after)
def test_an_iban_never_survives_in_any_case_or_grouping(number, sep, case, before, after):
    groups = [number[i:i + 4] for i in range(0, len(number), 4)]
    text = sep.join(groups)
    text = text.lower() if case == "lower" else text if case == "upper" else "".join(
        c.lower() if i % 2 else c for i, c in enumerate(text))
    out = S.scrub(f"{before} iban {text}{after}")
    compact = re.sub(r"[^A-Z0-9]", "", out.upper())
    assert "[IBAN]" in out and number not in compact, out


# ---- national identifiers ------------------------------------------------------------------------
FIRST, SECOND = "ABCEGHJKLMNOPRSTWXYZ", "ABCEGHJKLMNPRSTWXYZ"


@PROPERTY
@given(st.sampled_from(FIRST), st.sampled_from(SECOND), st.integers(0, 999999), st.sampled_from("ABCD"),
       st.sampled_from([" ", "", "-"]), st.booleans())
def test_a_uk_national_insurance_number_never_survives(a, b, digits, suffix, sep, lower):
    assume(a + b not in {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"})
    d = f"{digits:06d}"
    nino = sep.join([a + b, d[:2], d[2:4], d[4:], suffix])
    nino = nino.lower() if lower else nino
    out = S.scrub(f"my NI number is {nino} thanks")
    assert out == "my NI number is [NINO] thanks", out


@PROPERTY
@given(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=3), st.sampled_from("ABCFGHLJPTK"),
       st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), st.integers(0, 9999), st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
       st.booleans())
def test_an_indian_pan_never_survives(first3, holder, initial, digits, last, lower):
    pan = f"{first3}{holder}{initial}{digits:04d}{last}"
    assume(digits != 0)
    pan = pan.lower() if lower else pan
    assert S.scrub(f"PAN {pan} for KYC") == "PAN [PAN] for KYC"


# ---- contact details --------------------------------------------------------------------------
emails = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}@[a-z0-9-]{1,12}(\.[a-z]{2,6}){1,2}", fullmatch=True)


@PROPERTY
@given(emails, words_after)
def test_an_email_never_survives(address, after):
    out = S.scrub(f"mail me at {address}{after}")
    assert address not in out and "[EMAIL]" in out


@PROPERTY
@given(st.integers(0, 99_999_999), st.sampled_from(["07", "+44 7", "0044 7", "(07"]), st.sampled_from([" ", "-", ".", ""]))
def test_a_phone_number_never_survives(rest, prefix, sep):
    """Valid or not by the numbering plan, a phone-shaped number is gone ([PHONE], or [NUMBER])."""
    subscriber = f"{rest:08d}"
    close = ")" if prefix.startswith("(") else ""
    number = f"{prefix}{subscriber[0]}{subscriber[1:3]}{close}{sep}{subscriber[3:]}"
    out = S.scrub(f"call me on {number} after 6")
    assert not survives(subscriber, out) and ("[PHONE]" in out or "[NUMBER]" in out), out


@pytest.mark.parametrize("number", ["07911 123456", "+44 7911 123456", "020 7946 0958", "(020) 7946-0958",
                                    "+91 98765 43210", "+1 202 555 0143", "+353 85 123 4567", "07400.123.456"])
def test_valid_phone_numbers_are_named_phone(number):
    assert phonenumbers.is_valid_number(phonenumbers.parse(number, "GB"))
    assert S.scrub(f"ring me on {number} pls") == "ring me on [PHONE] pls"


@PROPERTY
@given(st.sampled_from(sorted(KEEP)), seps)
def test_the_banks_own_numbers_stay_whatever_their_separators(number, sep):
    written = sep.join([number[:4], number[4:7], number[7:]])
    assert S.scrub(f"Call us on {written} any time") == f"Call us on {written} any time"


# ---- secrets after their name -----------------------------------------------------------------
@PROPERTY
@given(st.sampled_from([("cvv", 3, "CVV"), ("CVC", 3, "CVV"), ("cvc2", 3, "CVV"), ("security code", 3, "CVV"),
                        ("PIN", 4, "PIN"), ("pin", 6, "PIN"), ("OTP", 6, "OTP"), ("one-time passcode", 6, "OTP"),
                        ("verification code", 8, "OTP")]),
       st.sampled_from(["", " ", ": ", ":", " is ", "=", " - ", " number is "]), st.integers(0, 10**8))
def test_a_secret_typed_after_its_name_never_survives(kind, connector, value):
    word, length, placeholder = kind
    secret = f"{value:0{length}d}"[:length]
    out = S.scrub(f"my {word}{connector}{secret} is not working")
    assert f"[{placeholder}]" in out and secret not in out, out


@pytest.mark.parametrize(("text", "expected"), [
    ("password: hunter2", "password: [PASSWORD]"),
    ("my password is Summer2024!", "my password is [PASSWORD]!"),
    ("pwd=Tr0ub4dor&3", "pwd=[PASSWORD]"),
    ("my password is not working", "my password is not working"),
    ("I forgot my password.", "I forgot my password."),
    ("My password doesn't work.", "My password doesn't work."),
])
def test_passwords_are_whatever_follows_their_name_when_they_look_like_one(text, expected):
    assert S.scrub(text) == expected


@PROPERTY
@given(st.sampled_from(["date of birth", "DOB", "dob:", "born on", "my birthday is", "D.O.B"]),
       st.integers(1, 28), st.integers(1, 12), st.integers(1940, 2006),
       st.sampled_from(["{d:02d}/{m:02d}/{y}", "{d}.{m}.{y}", "{y}-{m:02d}-{d:02d}", "{d} March {y}", "{d:02d}/{m:02d}/{yy:02d}"]))
def test_a_date_of_birth_never_survives(word, d, m, y, fmt):
    date = fmt.format(d=d, m=m, y=y, yy=y % 100)
    out = S.scrub(f"{word} {date}, can you check")
    assert "[DOB]" in out and date not in out, out


@PROPERTY
@given(st.sampled_from(["account", "acct", "a/c", "account number", "acc no", "Account No:"]),
       st.integers(10_000_000, 99_999_999), st.sampled_from([" ", "-", "", "  "]))
def test_an_account_number_never_survives(word, number, sep):
    digits = str(number)
    out = S.scrub(f"{word} {digits[:4]}{sep}{digits[4:]} balance?")
    assert "[ACCOUNT]" in out and not survives(digits, out), out


@PROPERTY
@given(st.integers(0, 999_999), st.sampled_from(["-", " ", "", "."]))
def test_a_sort_code_never_survives(code, sep):
    digits = f"{code:06d}"
    out = S.scrub(f"sort code {sep.join([digits[:2], digits[2:4], digits[4:]])} thanks")
    assert out == "sort code [SORT_CODE] thanks", out


# ---- what is kept ----------------------------------------------------------------------------
@PROPERTY
@given(st.integers(1, 9_999_999), st.integers(0, 99), st.sampled_from(["£{a},{c:02d}", "£{a:,}.{c:02d}", "{a:,}.{c:02d} GBP",
                                                                      "${a:,}", "€{a}", "{a} pounds"]))
def test_amounts_are_kept(amount, cents, fmt):
    text = f"I was charged {fmt.format(a=amount, c=cents)} yesterday"
    assert S.scrub(text) == text


@PROPERTY
@given(st.integers(1, 28), st.integers(1, 12), st.integers(2015, 2026),
       st.sampled_from(["on {d:02d}/{m:02d}/{y}", "on {y}-{m:02d}-{d:02d}", "on {d}.{m}.{y}", "on {d} March {y}"]),
       st.integers(0, 23), st.integers(0, 59))
def test_transaction_dates_and_times_are_kept(d, m, y, fmt, hh, mm):
    text = f"A payment {fmt.format(d=d, m=m, y=y)} at {hh:02d}:{mm:02d} was taken twice"
    assert S.scrub(text) == text


@pytest.mark.parametrize("text", [
    "the fee is 1,000.50 dollars", "paid on 12/05/2024", "transfer 250 to savings", "GB82 is not an IBAN",
    "my card ending 1234 was declined", "reference REF-20240312-88 for the transfer",
    "transaction FT2314567890 is missing", "case 00123456 was closed", "3.5% APR on 2 cards",
    "RBI Guidelines DBOD.NO.BP.BC.10/21.04.048/2004", "Top up 200,000 800,000 0 0 200,000",
    "Call 0345 740 4404 or 1800 202 6161",
])
def test_ordinary_text_is_kept(text):
    assert S.scrub(text) == text


def test_module_functions_and_messages_keep_roles():
    assert scrub("account 12345678") == "account [ACCOUNT]"
    out = scrub_messages([{"role": "user", "content": "my email is a@b.com"}])
    assert out == [{"role": "user", "content": "my email is [EMAIL]"}]
    assert scrub(None) is None and scrub("") == ""


# ---- the corpora ------------------------------------------------------------------------------
def corpus(name: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "data" / "pii" / name).read_text(encoding="utf-8").splitlines()
            if line.strip()]


NUMERIC = {"CARD", "PHONE", "ACCOUNT", "SORT_CODE", "CVV", "PIN", "OTP", "SSN", "DOB", "EXPIRY"}


def leaks(row: dict, out: str) -> list[str]:
    found = []
    for pii in row["pii"]:
        value = pii["value"]
        compact = lambda s: re.sub(r"[\W_]", "", s.upper())  # noqa: E731
        if value in out or compact(value) in compact(out) or (
                pii["kind"] in NUMERIC and len(digits_of(value)) >= 3 and digits_of(value) in digits_of(out)):
            found.append(f"{pii['kind']} {value!r} in {out!r}")
    return found


def test_the_corpus_of_realistic_messages_loses_every_piece_of_personal_data():
    rows = corpus("corpus.jsonl")
    assert len(rows) >= 100 and len({p["kind"] for r in rows for p in r["pii"]}) >= 12
    missed = [leak for row in rows for leak in leaks(row, S.scrub(row["text"]))]
    assert missed == []


def test_the_held_out_corpus_too():
    """data/pii/heldout.jsonl was written apart from the scrubber (92 messages with 144 items, 30 without):
    138/144 before its misses were fixed (context words between a secret's name and its value)."""
    rows = corpus("heldout.jsonl")
    assert sum(len(r["pii"]) for r in rows) >= 140
    assert [leak for row in rows for leak in leaks(row, S.scrub(row["text"]))] == []
    assert [r["text"] for r in rows if not r["pii"] and S.scrub(r["text"]) != r["text"]] == []


def test_ordinary_banking_messages_come_out_unchanged():
    rows = corpus("ordinary.jsonl")
    assert len(rows) >= 80
    changed = [(r["text"], S.scrub(r["text"])) for r in rows if S.scrub(r["text"]) != r["text"]]
    assert changed == []


def test_banking77_utterances_come_out_unchanged():
    """10,003 real customer utterances without personal data: the false-positive rate is 0."""
    with (ROOT / "data" / "banking77" / "train.csv").open(encoding="utf-8") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    assert len(texts) > 10_000
    assert [t for t in texts if S.scrub(t) != t] == []


def test_a_conversation_is_scrubbed_across_its_turns():
    """A secret split over two turns is caught as in one text; where a placeholder swallows the turn
    boundary, the turns are kept as one scrubbed message rather than split unscrubbed."""
    s = Scrubber()
    split = s.scrub_conversation([{"role": "user", "content": "my password is"},
                                  {"role": "user", "content": "hunter2pass ok"}])
    assert split == [{"role": "user", "content": "my password is"}, {"role": "user", "content": "[PASSWORD] ok"}]
    assert s.scrub_messages([{"role": "user", "content": "hunter2pass ok"}])[0]["content"] == "hunter2pass ok"
    card = s.scrub_conversation([{"role": "user", "content": "card 4111 1111"},
                                 {"role": "user", "content": "1111 1111 thanks"}])
    assert card == [{"role": "user", "content": "card [CARD] thanks"}] and "4111" not in json.dumps(card)
    kept = [{"role": "user", "content": "\nline one\nline two\n"}, {"role": "assistant", "content": "ok"}]
    assert s.scrub_conversation(kept) == kept  # nothing to scrub: the turns come back exactly
