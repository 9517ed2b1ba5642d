"""Replace structured personal identifiers with typed placeholders before anything is stored.

`Redactor` finds emails, phone numbers (phonenumbers), card numbers that pass the Luhn check,
IBANs, US social security numbers (python-stdnum), UK National Insurance numbers, and UK or
5-digit postcodes that follow a street address, and replaces each with `<KIND_n>`, numbered
by first appearance across a whole record: one value (normalised: a phone number in E.164,
a card as digits) gets one placeholder in the prompt, the draft and the answer alike. It
finds identifiers by their structure only: names, free-text addresses and anything else a
checksum or a numbering plan cannot vouch for are left alone.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import phonenumbers
from stdnum import iban, luhn
from stdnum.us import ssn

from distill_loop.sample import Sample
from models import ChatMessage, Generation

# National formats are read as these countries' numbers; "+" and "00" numbers parse from any.
DEFAULT_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR")

# Which detector wins where two overlap: the stronger evidence first (a checksum beats a
# numbering plan; an email's digits are not a phone number).
_PRIORITY = {"EMAIL": 0, "IBAN": 1, "CARD": 2, "SSN": 3, "NINO": 4, "POSTCODE": 5, "PHONE": 6}

_DIGIT = re.compile(r"\d")
_THREE_DIGITS = re.compile(r"\d(?:\D*\d){2}")  # in C: scanning characters in Python cost most of a record
_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# 13-19 digits, compact or in groups of 4 (Amex 4-6-5) with one kind of separator throughout.
_CARD = re.compile(
    r"(?<!\d)(?<!\d[ -])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{4,5})(?!\d|[ -]\d)"
)
# Country, check digits, then 11-30 characters, compact or spaced (in any grouping).
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])\d{3}([- ])\d{2}\1\d{4}(?![\d-])")
_SSN_NAMED = re.compile(r"(?i:\bssn|\bsocial security(?: number)?)\W{0,5}(\d{9})\b")
# HMRC's rules: no D F I Q U V first, no D F I O Q U V second, no BG GB KN NK NT TN ZZ; suffix A-D.
# QQ is HMRC's own example prefix, never issued: accepted, since documents and tests use it.
_NINO = re.compile(r"\b([A-Z]{2}) ?(\d{2}) ?(\d{2}) ?(\d{2}) ?([A-D])\b", re.IGNORECASE)
_NINO_FIRST, _NINO_SECOND = set("DFIQUV"), set("DFIOQUV")
_NINO_BARRED = {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}
# A phone number needs at least 7 digits; the windows phonenumbers is run on.
_PHONE_WINDOW = re.compile(r"[+(]?\b\d[\d ().\-/]{5,}\d(?:\s*(?:ext\.?|x)\s*\d{1,6})?")
_DECIMAL = re.compile(r"\d+\.\d+")
_DATE = re.compile(r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b|\b\d{1,2}[-/.]\d{1,2}[-/.]\d{4}\b")
_STREET = re.compile(
    r"\b\d{1,5}[A-Za-z]?,?\s+(?:[A-Z][\w'.-]*\s+){0,4}"
    r"(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|Boulevard|Blvd|Way|Court|Ct|Place|Pl|Close|Crescent|"
    r"Terrace|Square|Sq|Parkway|Pkwy|Highway|Hwy|Gardens|Grove|Hill|Mews|Row|Walk)\b\.?"
    r"|\b[A-ZÄÖÜ][\wäöüß-]*(?:straße|strasse|str\.|weg|platz|allee|gasse)\s+\d{1,4}[a-z]?\b"
    r"|\b\d{1,4}(?:\s?(?:bis|ter))?,?\s+(?:rue|avenue|boulevard|place|allée|chemin|impasse|quai)\s+[\w'-]+(?:\s+[\w'-]+){0,3}",
    re.IGNORECASE,
)
# A postcode counts only when it follows a street address on the same line: a UK postcode, or
# 5 digits (a US ZIP, optionally +4, or a German or French postcode).
_POSTCODE_AFTER = re.compile(
    r"[^\n.!?;:]{0,60}?\b((?:[A-Z]{1,2}\d[A-Z\d]?|GIR) ?\d[A-Z]{2}|\d{5}(?:-\d{4})?)\b", re.IGNORECASE
)
# The widest identifier (an email) is under this many characters: enough context for `safe_cut`.
_WINDOW = 320


@dataclass(frozen=True, slots=True)
class Span:
    start: int
    end: int
    kind: str  # EMAIL, PHONE, CARD, IBAN, SSN, NINO, POSTCODE
    key: str  # the normalised value: same key, same placeholder within a record


@dataclass(slots=True)
class Placeholders:
    """Numbering for one record: the first email seen is <EMAIL_1>, the next new one <EMAIL_2>."""

    names: dict[tuple[str, str], str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def name(self, kind: str, key: str) -> str:
        found = self.names.get((kind, key))
        if found is None:
            self.counts[kind] = n = self.counts.get(kind, 0) + 1
            found = self.names[(kind, key)] = f"<{kind}_{n}>"
        return found

    @property
    def total(self) -> int:
        return len(self.names)


class Redactor:
    """Finds and replaces identifiers; stateless and safe to share between threads.

    Cost grows with a text's digits and '@'s, not its length: prose without either is one
    regex pass. Phone numbers are parsed only in windows of 7 or more digits.
    """

    def __init__(self, regions: Iterable[str] = DEFAULT_REGIONS) -> None:
        self.regions = tuple(regions)

    # -- finding -----------------------------------------------------------------------------
    def find(self, text: str) -> list[Span]:
        """Non-overlapping identifier spans in `text`, in order."""
        found: list[Span] = []
        if "@" in text:
            found += [Span(m.start(), m.end(), "EMAIL", m.group().lower()) for m in _EMAIL.finditer(text)]
        if _THREE_DIGITS.search(text):  # the fewest: "1 A Street, A1 1AA"
            found += self._numbers(text)
        if not found:
            return []
        taken: list[Span] = []
        for s in sorted(found, key=lambda s: (_PRIORITY[s.kind], s.start - s.end)):
            if all(s.end <= t.start or s.start >= t.end for t in taken):
                taken.append(s)
        return sorted(taken, key=lambda s: s.start)

    def _numbers(self, text: str) -> list[Span]:
        found: list[Span] = []
        for m in _CARD.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if digits[0] in "23456" and luhn.is_valid(digits):
                found.append(Span(m.start(), m.end(), "CARD", digits))
        for m in _IBAN.finditer(text):
            span = _longest_valid(text, m.start(), m.end(), iban.is_valid)
            if span is not None:
                found.append(Span(*span, "IBAN", iban.compact(text[span[0] : span[1]])))
        for m in _SSN.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if ssn.is_valid(digits):
                found.append(Span(m.start(), m.end(), "SSN", digits))
        for m in _SSN_NAMED.finditer(text):
            if ssn.is_valid(m.group(1)):
                found.append(Span(m.start(1), m.end(1), "SSN", m.group(1)))
        for m in _NINO.finditer(text):
            prefix = m.group(1).upper()
            compact = "".join(m.groups()).upper()
            if prefix == "QQ" or (
                prefix[0] not in _NINO_FIRST and prefix[1] not in _NINO_SECOND and prefix not in _NINO_BARRED
            ):
                found.append(Span(m.start(), m.end(), "NINO", compact))
        found += self._phones(text)
        for street in _STREET.finditer(text):
            post = _POSTCODE_AFTER.match(text, street.end())
            if post is not None:
                code = post.group(1)
                found.append(Span(post.start(1), post.end(1), "POSTCODE", code.replace(" ", "").upper()))
        return found

    def _phones(self, text: str) -> list[Span]:
        found: list[Span] = []
        for w in _PHONE_WINDOW.finditer(text):
            chunk = w.group()
            if len(_DIGIT.findall(chunk)) < 7:
                continue
            # "+" numbers read the same from any region: one pass is enough.
            regions = self.regions[:1] if chunk.startswith("+") else self.regions
            for region in regions:
                for m in phonenumbers.PhoneNumberMatcher(chunk, region, leniency=phonenumbers.Leniency.VALID):
                    start, end = w.start() + m.start, w.start() + m.end
                    if not _dialled_as_written(m.raw_string, region):
                        continue
                    # Inside a code ("INV-2023-004512", "A7/415 555 2671") it is not a phone number.
                    before = text[start - 1] if start else " "
                    after = text[end] if end < len(text) else " "
                    if before.isalnum() or before in "-/#_:" or after.isalnum() or after in "-/_:":
                        continue
                    # A decimal number, or either side of its point: a time, a price ("1796027266.0412875").
                    if (
                        _DECIMAL.fullmatch(m.raw_string)
                        or (before == "." and text[start - 2 : start - 1].isdigit())
                        or (after == "." and text[end + 1 : end + 2].isdigit())
                    ):
                        continue
                    if _DATE.search(m.raw_string):  # "2024-03-15 10" reads as a US number
                        continue
                    e164 = phonenumbers.format_number(m.number, phonenumbers.PhoneNumberFormat.E164)
                    found.append(Span(start, end, "PHONE", e164))
        return found

    # -- replacing ---------------------------------------------------------------------------
    def text(self, text: str, names: Placeholders | None = None) -> str:
        """`text` with each identifier replaced by its placeholder (numbered in `names`)."""
        spans = self.find(text)
        if not spans:
            return text
        names = names if names is not None else Placeholders()
        out, at = [], 0
        for s in spans:
            out += [text[at : s.start], names.name(s.kind, s.key)]
            at = s.end
        out.append(text[at:])
        return "".join(out)

    def messages(self, messages: tuple[ChatMessage, ...], names: Placeholders | None = None) -> tuple[ChatMessage, ...]:
        names = names if names is not None else Placeholders()
        return tuple(ChatMessage(m.role, self.text(m.content, names)) for m in messages)

    def sample(self, sample: Sample) -> tuple[Sample, int]:
        """The record with every identifier replaced, and how many distinct ones there were.

        Texts are numbered in one order (prompt, draft, answer, critique, metadata), so a value
        keeps its placeholder across them. A generation whose text changed, or whose tokens
        joined hold an identifier, loses its token ids and logprobs: they spell the raw text
        and no longer match the redacted one (the trainer then learns the answer's text, not
        the teacher's token distribution). Teacher scores of a changed draft go for the same reason.
        """
        names = Placeholders()
        messages = self.messages(sample.messages, names)
        student = self._generation(sample.student, names) if sample.student is not None else None
        teacher = self._generation(sample.teacher, names)
        critique = self.text(sample.critique, names) if sample.critique else sample.critique
        metadata = {k: self.text(v, names) for k, v in sample.metadata.items()}
        client_id = self.text(sample.client_request_id, names) if sample.client_request_id else None
        draft_scores = sample.draft_scores
        drafted = sample.student.text if sample.student is not None else ""
        if draft_scores and (student is not sample.student or self._spelled((t.token for t in draft_scores), drafted)):
            draft_scores = ()
        tokens_kept = student is sample.student and teacher is sample.teacher and draft_scores is sample.draft_scores
        if not names.total and tokens_kept:
            return sample, 0
        return (
            replace(
                sample,
                messages=messages,
                student=student,
                teacher=teacher,
                critique=critique,
                metadata=metadata,
                client_request_id=client_id,
                draft_scores=draft_scores,
            ),
            names.total,
        )

    def _generation(self, gen: Generation, names: Placeholders) -> Generation:
        text = self.text(gen.text, names)
        if text == gen.text and not self._spelled((t.token for t in gen.logprobs), gen.text):
            return gen
        return replace(gen, text=text, token_ids=(), logprobs=())

    def _spelled(self, tokens: Iterable[str], text: str) -> bool:
        """Whether tokens, joined, spell an identifier (a backend whose tokens differ from its
        text; tokens that join to the text, already searched, spell none)."""
        joined = "".join(tokens)
        return bool(joined) and joined != text and bool(self.find(joined))

    # -- cutting -----------------------------------------------------------------------------
    def safe_cut(self, text: str, at: int) -> int:
        """The nearest cut position at or before `at` that splits no identifier: a record cut
        to `signal.max_record_bytes` must not keep the first half of a card number."""
        lo = max(0, at - _WINDOW)
        for s in self.find(text[lo : at + _WINDOW]):
            if lo + s.start < at < lo + s.end:
                return lo + s.start
        return at


def _dialled_as_written(raw: str, region: str) -> bool:
    """Whether a number reads as one the way it is written: international ("+", "00"), a
    10-digit North American number (with or without its leading 1), or a national number
    with its trunk 0. phonenumbers also takes "49844607" for +49 844607; an order number."""
    digits = re.sub(r"\D", "", raw)
    if raw.startswith("+") or digits.startswith("00"):
        return True
    if region in ("US", "CA"):
        return len(digits) == 10 or (len(digits) == 11 and digits[0] == "1")
    return digits.startswith("0")


def _longest_valid(text: str, start: int, end: int, valid: Callable[[str], bool]) -> tuple[int, int] | None:
    """The longest `text[start:e]`, e <= end at a word end, that `valid` accepts: a spaced
    IBAN's pattern may run on into a following word or number."""
    e = end
    while e > start:
        if valid(text[start:e]):
            return start, e
        e = text.rfind(" ", start, e)
    return None


def install_log_redaction(redactor: Redactor) -> Callable[[], None]:
    """Redact every log record as it is made, whichever logger or handler emits it (uvicorn's
    included): the message with its arguments, and the traceback text. Returns the undo."""
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call logs as-is, as logging itself would
            return record
        record.msg, record.args = redactor.text(message), None
        if record.exc_info and record.exc_info[1] is not None:
            tb = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = redactor.text(tb)  # Formatter uses exc_text when set
        return record

    logging.setLogRecordFactory(factory)
    return lambda: logging.setLogRecordFactory(previous)
