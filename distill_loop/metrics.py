"""Answer agreement between a student answer and the teacher's (the gate's and rollback's measure).

Pure string functions; no models. `token_f1` is SQuAD-style bag-of-words F1 after case-folding
and stripping punctuation, over words in any script; `exact` compares normalised strings; `contains` asks whether the
normalised teacher answer appears in the student's. `fact_f1` is token F1 times the share of
the reference's facts (numbers, and capitalised names inside a sentence) that the candidate
states: the right sentence with the wrong number scores 0, which token F1 rewards.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

# Words in any script (letters and digits, no underscore); Chinese and Japanese script, written
# without spaces, one character a word. ASCII-only words made every non-Latin answer empty, and
# two empty answers "agreed": the gate scored any two Chinese answers as equal.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
# A capitalised word that does not open the text or a sentence: a product, place or scheme name.
_NAME = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][A-Za-z0-9]+")


def normalise(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def token_f1(candidate: str, reference: str) -> float:
    c, r = normalise(candidate), normalise(reference)
    if not c or not r:
        return float(c == r)
    common = sum((Counter(c) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(c), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact(candidate: str, reference: str) -> float:
    return float(normalise(candidate) == normalise(reference))


def contains(candidate: str, reference: str) -> float:
    return float(" ".join(normalise(reference)) in " ".join(normalise(candidate)))


def facts(text: str) -> set[str]:
    """Numbers (thousands separators dropped, so 1,200 == 1200) and in-sentence names, lower-cased."""
    numbers = {n.replace(",", "").rstrip(".") for n in _NUMBER.findall(text)}
    names = {m.group(0).lower() for m in _NAME.finditer(text.strip())}
    return numbers | names


def fact_f1(candidate: str, reference: str) -> float:
    wanted = facts(reference)
    f1 = token_f1(candidate, reference)
    if not wanted:
        return f1
    return f1 * len(wanted & facts(candidate)) / len(wanted)


METRICS: dict[str, Callable[[str, str], float]] = {
    "token_f1": token_f1,
    "fact_f1": fact_f1,
    "exact": exact,
    "contains": contains,
}
