"""Near-duplicate records collapsed to one: the same prompt, barely varied, with the same answer.

Two records are near-duplicates when their prompts and their teacher answers both reach
`similarity`, the Jaccard similarity of their character 5-gram sets after casefolding and
reducing each text to its words (`\\w+`, any script), and the answers state the same facts
(`metrics.facts`: numbers and names). Requiring the answer too is what keeps look-alikes: a
template asked about different things gets different answers, and those records stay. Prompts
are indexed by MinHash with banded LSH, so each record is compared with the few kept records
that share a band, not with all of them. Knows nothing of tenants, splits or training.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from distill_loop.metrics import facts

T = TypeVar("T")
SHINGLE = 5
BANDS, ROWS = 16, 4  # 64 hashes; a pair at Jaccard 0.7 shares a band with probability 0.99
_WORD = re.compile(r"\w+")
_rng = np.random.default_rng(20240607)  # fixed: the same records collapse the same way in every process
_A = _rng.integers(1, 2**63, size=BANDS * ROWS, dtype=np.uint64) | np.uint64(1)
_B = _rng.integers(0, 2**63, size=BANDS * ROWS, dtype=np.uint64)


def _words(text: str) -> str:
    """The text's casefolded words joined by single spaces: punctuation, casing and spacing
    changes vanish."""
    return " ".join(_WORD.findall(text.casefold()))


def shingles(text: str) -> np.ndarray:
    """The text's character 5-grams (the whole of it when shorter), as sorted distinct 64-bit
    hashes of their code points: one changed word or digit changes only the 5-grams that
    overlap it. Hashed, not kept as strings, so that thousands of long prompts stay small,
    and the same in every process (Python's str hash is salted per process)."""
    points = np.frombuffer(_words(text).ljust(SHINGLE).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = len(points) - SHINGLE + 1
    h = np.zeros(n, dtype=np.uint64)
    for j in range(SHINGLE):  # a polynomial hash of each window; it wraps mod 2^64, as meant
        h = h * np.uint64(1_000_003) + points[j : j + n]
    return np.unique(h)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two `shingles` sets."""
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def bands(grams: np.ndarray) -> tuple[bytes, ...]:
    """MinHash of a `shingles` set over 64 multiply-shift hash functions, cut into 16 bands
    of 4: the LSH keys. Sets at Jaccard 0.7 share a band with probability 0.99, at 0.3 with
    probability 0.12."""
    mins = ((grams[:, None] * _A[None, :] + _B[None, :]) >> np.uint64(32)).min(axis=0)
    return tuple(mins[i * ROWS : (i + 1) * ROWS].tobytes() for i in range(BANDS))


@dataclass(frozen=True, slots=True)
class _Kept:
    prompt: np.ndarray
    answer: np.ndarray
    facts: frozenset[str]
    prompt_bands: tuple[bytes, ...]
    answer_bands: tuple[bytes, ...]


def _near(kept: _Kept, prompt: np.ndarray, answer: np.ndarray, facts: frozenset[str], at: float) -> bool:
    return kept.facts == facts and jaccard(kept.prompt, prompt) >= at and jaccard(kept.answer, answer) >= at


def _shares_band(a: tuple[bytes, ...], b: tuple[bytes, ...]) -> bool:
    return any(x == y for x, y in zip(a, b, strict=True))


def collapse(
    items: Sequence[T], prompt: Callable[[T], str], answer: Callable[[T], str], similarity: float
) -> tuple[list[T], int]:
    """The items with near-duplicates removed, in their given order, and how many were removed.

    The first item of each near-duplicate group is kept: callers order items by preference
    (the buffer passes newest first). Each later item is compared with kept items only, so a
    group is the items near its first one, not a chain of small steps away from it.

    Candidates share a prompt band and an answer band with the item. They are gathered on
    whichever side names fewer, then checked on the other: prompts that all share a long
    context, or a stock answer given to many questions, fill one side's buckets but not both.
    """
    by_prompt: dict[tuple[int, bytes], list[int]] = {}
    by_answer: dict[tuple[int, bytes], list[int]] = {}
    kept: list[_Kept] = []
    out: list[T] = []
    for item in items:
        reply = answer(item)
        p, a = shingles(prompt(item)), shingles(reply)
        pb, ab = bands(p), bands(a)
        pk, ak = list(enumerate(pb)), list(enumerate(ab))
        p_hits = [by_prompt.get(k, []) for k in pk]
        a_hits = [by_answer.get(k, []) for k in ak]
        if sum(map(len, p_hits)) <= sum(map(len, a_hits)):
            found = (k for hit in p_hits for k in hit if _shares_band(kept[k].answer_bands, ab))
        else:
            found = (k for hit in a_hits for k in hit if _shares_band(kept[k].prompt_bands, pb))
        f = frozenset(facts(reply))
        if any(_near(kept[k], p, a, f, similarity) for k in dict.fromkeys(found)):
            continue
        for k in pk:
            by_prompt.setdefault(k, []).append(len(kept))
        for k in ak:
            by_answer.setdefault(k, []).append(len(kept))
        kept.append(_Kept(p, a, f, pb, ab))
        out.append(item)
    return out, len(items) - len(out)
