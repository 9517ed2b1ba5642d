"""Each tenant's share of a run's data held to a cap, so one API key cannot fill a run.

A tenant's share is its records' weight (training examples) over the whole set's. When
several tenants contribute, the largest is downsampled, one record at a time in a seeded
random order, until no tenant is over the cap. The cap is never below 1/k for k contributing
tenants (k equal shares are the best any split can do), so a set one tenant makes up alone,
the usual single-key or `anonymous` deployment, is never cut. Knows nothing of prompts or splits.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def cap_share(
    items: Sequence[T],
    tenant: Callable[[T], str],
    weight: Callable[[T], int],
    cap: float,
    rng: random.Random,
) -> tuple[list[T], int]:
    """The items, in their order, less those dropped so that no tenant's weight is over
    max(cap, 1/k) of the total; and how many were dropped.

    A tenant is cut to one record at the least: with uneven weights (a record may give one
    training example or two) exact shares are not always reachable, and emptying a tenant to
    reach one would take its data from a run it is not flooding.
    """
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tenant(item), []).append(i)
    if len(groups) < 2:
        return list(items), 0
    limit = max(cap, 1.0 / len(groups))
    # Which of a tenant's records go first: a seeded shuffle, in tenant order, so a run's data
    # is reproducible from its seed.
    queue = {t: rng.sample(idx, len(idx)) for t, idx in sorted(groups.items())}
    totals = {t: sum(weight(items[i]) for i in idx) for t, idx in groups.items()}
    total = sum(totals.values())
    dropped: set[int] = set()
    while True:
        largest = max(sorted(totals), key=totals.__getitem__)
        if totals[largest] <= limit * total or len(queue[largest]) <= 1:
            break
        victim = queue[largest].pop()
        totals[largest] -= weight(items[victim])
        total -= weight(items[victim])
        dropped.add(victim)
    return [item for i, item in enumerate(items) if i not in dropped], len(dropped)
