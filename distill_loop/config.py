"""Configuration of the signal store (and, in a later issue, the distillation loop)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class SignalConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # SQLite database file for escalation and audit records (created with its folder).
    path: Path = Path("data/signal.db")
    # Share of confident requests also answered by the teacher in the background, for audit.
    audit_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    # Records waiting for the writer; when full, new records are dropped and counted.
    queue_size: int = Field(default=10_000, ge=1)
    # Records committed per transaction.
    batch_size: int = Field(default=64, ge=1)
    # Alternatives per token requested from the teacher for the signal (0-20).
    teacher_top_logprobs: int = Field(default=5, ge=0, le=20)
    # Where records go if the database still fails at shutdown (JSONL, replayed at next start).
    spill_path: Path | None = None
