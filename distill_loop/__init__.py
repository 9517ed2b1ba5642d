"""Online distillation: the durable signal store now; the training loop in a later issue."""

from __future__ import annotations

from distill_loop.config import SignalConfig
from distill_loop.errors import DistillError, SignalStoreError, StoreClosed
from distill_loop.sample import Sample, to_chat_jsonl
from distill_loop.store import SCHEMA_VERSION, SignalStore, export_jsonl, read_samples

__all__ = [
    "SCHEMA_VERSION",
    "DistillError",
    "Sample",
    "SignalConfig",
    "SignalStore",
    "SignalStoreError",
    "StoreClosed",
    "export_jsonl",
    "read_samples",
    "to_chat_jsonl",
]
