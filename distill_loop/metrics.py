"""Answer agreement between a student answer and the teacher's (the gate's and rollback's measure).

Pure string functions; no models. `token_f1` is SQuAD-style bag-of-words F1 after lower-casing
and stripping punctuation; `exact` compares normalised strings; `contains` asks whether the
normalised teacher answer appears in the student's.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

_WORD = re.compile(r"[a-z0-9]+")


def normalise(text: str) -> list[str]:
    return _WORD.findall(text.lower())


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


METRICS: dict[str, Callable[[str, str], float]] = {"token_f1": token_f1, "exact": exact, "contains": contains}
