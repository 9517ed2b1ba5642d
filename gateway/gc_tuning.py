"""Garbage-collector settings for a long-running server process.

Two measured changes (bench/README.md), both applied once the tiers are up:
- `gc.freeze()` moves every object alive after start-up (modules, torch, models, settings) out
  of the collector's reach. With torch imported that is about 260k objects, and each full
  collection cost about 90 ms; under load they were a fifth of the gateway's CPU and most of its
  p99 latency.
- A larger youngest-generation threshold (Python's default is 700 allocations): a request's
  short-lived containers then mostly die before a collection has to scan them.

Garbage made after start-up is still collected. This module imports nothing heavy, so the
benchmark's pass-through can apply the very same settings for a like-for-like comparison.
"""

from __future__ import annotations

import gc

_original_threshold = gc.get_threshold()


def tune_gc(freeze: bool, gen0_threshold: int) -> int:
    """Apply the settings; returns how many objects are now frozen. 0 leaves the threshold alone."""
    if gen0_threshold > 0:
        _, gen1, gen2 = _original_threshold
        gc.set_threshold(gen0_threshold, gen1, gen2)
    if freeze:
        gc.collect()
        gc.freeze()
    return gc.get_freeze_count()


def release_gc() -> None:
    """Undo both, so that what a stopped app held can be collected (tests build many apps)."""
    gc.unfreeze()
    gc.set_threshold(*_original_threshold)
