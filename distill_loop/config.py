"""Configuration of the signal store and the distillation loop. Pure data; nothing reads env here."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from distill_loop.metrics import METRICS


class SignalConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # SQLite database file for escalation and audit records (created with its folder).
    path: Path = Path("data/signal.db")
    # A PostgreSQL database instead (postgresql://user:password@host:5432/db), for replicas and
    # trainers on several machines to share one store. Unset: the SQLite file at `path`.
    url: str | None = Field(default=None, pattern=r"^postgres(ql)?://")
    # Share of confident requests also answered by the teacher in the background, for audit.
    audit_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    # Records waiting for the writer; when full, new records are dropped and counted.
    queue_size: int = Field(default=10_000, ge=1)
    # acknowledged: an escalated response is sent only once its record is committed (group
    # commit: the requests waiting share one fsync). buffered: it is sent at once, and a crash
    # (kill -9, power loss) loses what the writer had not committed, up to `linger_s` and a
    # batch of records: a fault probe lost 100 of 446 acknowledged escalations over 10 kill -9s.
    durability: Literal["acknowledged", "buffered"] = "acknowledged"
    # The longest an acknowledged response waits for its commit. Past it the response goes out
    # (a failing database never fails serving), the record stays queued, and the wait is counted.
    ack_timeout_s: float = Field(default=5.0, gt=0)
    # Records committed per transaction.
    batch_size: int = Field(default=64, ge=1)
    # Seconds the writer waits for more records before committing a partial batch: one
    # synchronous=FULL commit (an fsync) per few records cost the gateway about 165 us of CPU
    # per record under load (bench/). A graceful shutdown still flushes everything queued.
    linger_s: float = Field(default=0.05, ge=0.0, le=1.0)
    # The longest the writer holds a batch with an acknowledged record open while more such
    # records are on their way (teacher calls in flight), so that they share its fsync. A lone
    # escalation never waits; 0 commits every acknowledged record as soon as it is queued.
    ack_linger_s: float = Field(default=0.005, ge=0.0, le=0.1)
    # Alternatives per token requested from the teacher for the signal (0-20).
    teacher_top_logprobs: int = Field(default=5, ge=0, le=20)
    # Ask a teacher that supports it (vLLM prompt_logprobs) to score each escalated draft, in the
    # background; the per-token scores are stored with the record. Costs one extra prefill pair.
    score_drafts: bool = False
    # Where records go if the database still fails at shutdown (JSONL, replayed at next start).
    spill_path: Path | None = None
    # The most UTF-8 bytes a record's texts (prompt messages and both answers) are stored with.
    # Larger ones are cut, flagged (`truncated_from`) and counted, never dropped, and never
    # trained on. 256 KiB is about 64k tokens of English.
    max_record_bytes: int = Field(default=256 * 1024, ge=1024)
    # Replace emails, phone, card and IBAN numbers, SSNs, NI numbers and street-address postcodes
    # with typed placeholders (<EMAIL_1>) before a record reaches the database, the spill file,
    # an export or the logs (docs/privacy.md). A record's token logprobs go where its text changed.
    redact: bool = True
    # Also redact the prompt sent live to the teacher (escalations, audits, labels). Off: the
    # teacher answers what the client asked; its answer is redacted before it is stored.
    redact_teacher_requests: bool = False


class LoraSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # LoRA rank and scaling; all linear layers are adapted.
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # AdamW learning rate, passes over the run's data, and examples per optimiser step.
    lr: float = Field(default=1e-3, gt=0)
    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=8, ge=1)
    # Cap on optimiser steps per run (keeps a CPU run bounded).
    max_steps: int = Field(default=48, ge=1)
    seed: int = 0


class LossSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # (a) cross-entropy on the teacher's answer.
    answer: bool = True
    # (b) reasoning chain and final answer as separate weighted terms, when the answer has a chain.
    reasoning: bool = True
    # (c) KL to the teacher's logged top-k logprobs plus a tail bucket (same tokenizer only).
    token_kd: bool = True
    # (d) learn from the student's own rejected draft, paired with the teacher's answer.
    error_correction: bool = True
    # (d) also ask the teacher, in the background, for a critique of the draft (costs teacher calls).
    critique: bool = False
    # (e) weights move from answer-first to reasoning/correction as measured agreement rises.
    dynamic_weights: bool = True
    # Agreement at which the weights start to move, and at which they reach their late values.
    agreement_low: float = Field(default=0.4, ge=0, le=1)
    agreement_high: float = Field(default=0.8, ge=0, le=1)
    # Early (low agreement) and late weights: answer, chain, kd, correction.
    early: tuple[float, float, float, float] = (1.0, 0.1, 1.0, 0.1)
    late: tuple[float, float, float, float] = (0.6, 0.5, 0.5, 0.3)


class GateSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # How a student answer is compared with the teacher's: fact_f1 (token F1 times the share of
    # the teacher's numbers and names the answer states), token_f1, exact, or contains.
    metric: Literal["fact_f1", "token_f1", "exact", "contains"] = "fact_f1"
    # An answer "agrees" when the metric is at least this.
    agree_at: float = Field(default=0.5, ge=0, le=1)
    # Held-out NLL must fall by at least this (nats/token) and agreement must not fall.
    min_nll_gain: float = Field(default=0.01, ge=0)
    # Anchor set: the largest allowed drop in agreement and rise in NLL. The agreement drop
    # allowed is never below one item's share (1/n): one slipped answer is not forgetting.
    anchor_max_agreement_drop: float = Field(default=0.05, ge=0)
    anchor_max_nll_rise: float = Field(default=0.1, ge=0)
    # With the gateway's routing replayed on held-out items, how far the agreement of what
    # clients would be served may fall under the candidate (0: it must not fall).
    max_served_quality_drop: float = Field(default=0.0, ge=0, le=1)
    # The candidate must agree better with the teacher on more held-out items than it agrees
    # worse, by a one-sided sign test at this p-value (1.0 turns the test off). At 0.1, 4 items
    # better and none worse pass (p = 1/16); 3 and none (1/8) or one flipped answer do not.
    # At 0.05 the stream benchmark refused six candidates in a row that each kept served
    # quality and saved half or more of the escalations, all at 4/0; live-audit rollback
    # backs the gate up.
    max_p_value: float = Field(default=0.1, gt=0, le=1)
    # Fewest held-out items a decision may rest on; with fewer the run is skipped before
    # training. A sign test on fewer than 4 items cannot reach p <= 0.1, so a run on them
    # could only be refused.
    min_heldout: int = Field(default=20, ge=1)
    # Tokens generated per item when measuring agreement.
    max_new_tokens: int = Field(default=48, ge=1)
    # Most held-out items evaluated per run (keeps CPU gates bounded).
    max_items: int = Field(default=32, ge=1)

    def agrees(self, answer: str, teacher: str) -> bool:
        """Whether `answer` agrees with the teacher's: the one rule the gate, the floors, the
        live quality check, tuning and error-correction examples all use."""
        return METRICS[self.metric](answer, teacher) >= self.agree_at


class DistillConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Run the loop in the background inside the gateway.
    enabled: bool = True
    # Version registry: adapters, metadata and the CURRENT pointer.
    registry_dir: Path = Path("data/registry")
    # Start a run after this many new records...
    trigger_records: int = Field(default=64, ge=1)
    # ...or when records have waited this long (seconds), whichever comes first.
    max_staleness_s: float = Field(default=3600.0, gt=0)
    # How often the loop checks its triggers and the rollback rule (seconds).
    poll_s: float = Field(default=5.0, gt=0)
    # Share of records (by id hash) kept out of training for the gate.
    holdout_fraction: float = Field(default=0.3, gt=0, lt=1)
    # Older records replayed per run (a reservoir sample), against forgetting.
    replay_size: int = Field(default=64, ge=0)
    # Largest share of a run's training examples, and of its held-out items, one tenant (API
    # key) may hold when several contribute: a larger one is downsampled, seeded by the run. It is
    # never below 1/k for k tenants, so data from one tenant alone is never cut. 1 (the default)
    # turns it off: a cap cannot tell a flood from a key that carries most of the traffic, and
    # beside a trickle from a second key it would starve the main key's training. Set 0.5 where
    # keys belong to parties who must not steer each other's student.
    max_tenant_share: float = Field(default=1.0, gt=0, le=1)
    # Records whose prompts and teacher answers are both at least this similar (Jaccard of the
    # character 5-grams of their words), with the same numbers and names in the answers, are
    # near-duplicates: only the newest is used. None turns this off.
    near_duplicate_similarity: float | None = Field(default=0.7, gt=0, le=1)
    # JSONL of {"messages": [...], "answer": "..."} guarding general behaviour; None = the shipped set.
    anchor_path: Path | None = None
    # Versions kept on disk (the current and previous are always kept).
    keep_versions: int = Field(default=5, ge=2)
    # Served quality each version is held to: the share of served answers that agree with the
    # teacher (the gate's metric and `agree_at`; an escalated request counts as agreeing). A
    # version's routing floor is the lowest threshold at which the lower confidence bound of
    # that share, on held-out and audit items, meets it. 0 turns the floor off.
    quality_target: float = Field(default=0.95, ge=0, le=1)
    # One-sided confidence of that lower bound (Wilson).
    quality_confidence: float = Field(default=0.8, gt=0, lt=1)
    # Teacher answers per hour asked for in the background for served prompts the routing
    # decision was closest on (margin sampling) and for prompt clusters no record covers yet.
    # 0 turns active labels off.
    label_budget_per_hour: float = Field(default=120.0, ge=0)
    # Auto-rollback when the new version's live audit agreement is this much below the previous one's...
    rollback_margin: float = Field(default=0.1, ge=0, le=1)
    # ...measured over at least this many audit samples of each.
    rollback_min_samples: int = Field(default=20, ge=1)
    # torch threads for training (serving keeps its own).
    torch_threads: int = Field(default=1, ge=1)
    # "cpu", "cuda" or "auto" for training.
    device: str = "auto"
    # Local weights of a remote (vLLM) student, for training: a bundled name or a folder. It must
    # be the model the server serves. None: the loop runs only for in-process students.
    student_base: str | None = None
    lora: LoraSettings = LoraSettings()
    losses: LossSettings = LossSettings()
    gate: GateSettings = GateSettings()
