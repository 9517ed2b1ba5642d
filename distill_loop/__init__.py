"""Online distillation: the signal store, and the loop that trains, gates and publishes students."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distill_loop.buffer import is_heldout, prompt_key
from distill_loop.config import DistillConfig, GateSettings, LoraSettings, LossSettings, SignalConfig
from distill_loop.db import SCHEMA_VERSION, SignalDB, signal_db, without_password
from distill_loop.errors import DistillError, SignalStoreError, StoreClosed
from distill_loop.metrics import METRICS
from distill_loop.pointer import Listener
from distill_loop.redact import Redactor, install_log_redaction
from distill_loop.registry import BASE, Registry, RoutingState, UnknownVersion, VersionMeta, open_registry
from distill_loop.sample import Sample, generation_from_json, generation_to_json, to_chat_jsonl, to_json
from distill_loop.settings import (
    DEFAULT_STUDENT,
    DEFAULT_TEACHER,
    DEFAULT_TEACHER_PROMPT,
    RuntimeConfig,
    SharedSettings,
    TuningConfig,
    load_settings_as,
    load_shared_settings,
    training_student,
)
from distill_loop.store import SignalStore, export_jsonl, read_samples, teacher_usage_since

if TYPE_CHECKING:
    from distill_loop.loop import DistillLoop, RunOutcome
    from distill_loop.publish import LocalPublisher, VllmPublisher

__all__ = [
    "DEFAULT_STUDENT",
    "DEFAULT_TEACHER",
    "DEFAULT_TEACHER_PROMPT",
    "RuntimeConfig",
    "SharedSettings",
    "TuningConfig",
    "load_settings_as",
    "load_shared_settings",
    "BASE",
    "METRICS",
    "SCHEMA_VERSION",
    "DistillConfig",
    "DistillError",
    "DistillLoop",
    "GateSettings",
    "LocalPublisher",
    "LoraSettings",
    "LossSettings",
    "Registry",
    "RoutingState",
    "Redactor",
    "RunOutcome",
    "Sample",
    "SignalConfig",
    "SignalStore",
    "SignalStoreError",
    "StoreClosed",
    "UnknownVersion",
    "VersionMeta",
    "VllmPublisher",
    "export_jsonl",
    "Listener",
    "open_registry",
    "signal_db",
    "SignalDB",
    "install_log_redaction",
    "is_heldout",
    "prompt_key",
    "read_samples",
    "teacher_usage_since",
    "to_chat_jsonl",
    "to_json",
    "generation_from_json",
    "generation_to_json",
    "without_password",
    "training_student",
]

_LAZY = {
    "DistillLoop": "distill_loop.loop",
    "RunOutcome": "distill_loop.loop",
    "LocalPublisher": "distill_loop.publish",
    "VllmPublisher": "distill_loop.publish",
}


def __getattr__(name: str) -> object:
    """Training pieces import torch and peft; they load on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distill_loop' has no attribute {name!r}")
