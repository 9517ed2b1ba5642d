"""Router configuration: the threshold and which confidence scorer computes the score."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RouterConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Escalate to the teacher when confidence < threshold. 0 never escalates, 1 always does.
    threshold: float = Field(default=0.35, ge=0.0, le=1.0)
    # Name of the confidence scorer (see router/confidence.py SCORERS).
    scorer: str = "logprob_v1"
    # logprob_v1: weight of the mean token logprob; the rest goes to the low quantile.
    mean_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    # logprob_v1: which low quantile of the token logprobs to blend in (0.1 = 10th percentile).
    quantile: float = Field(default=0.1, ge=0.0, le=0.5)
    # early: decide on a prefix of the draft (router/prefix.py) and stream the student's answer
    # as it is generated; full: draft and score the whole answer before the first byte.
    # A tenant's policy may choose otherwise (PUT /admin/policies, "decision").
    decision: Literal["early", "full"] = "early"
    # The prefix decision is forced (to whichever side is likelier) once the draft has this many tokens.
    decide_after_tokens: int = Field(default=16, ge=1, le=4096)
    # No prefix shorter than this decides: a few tokens say little about a whole answer.
    min_prefix_tokens: int = Field(default=4, ge=1, le=4096)
    # A prefix decides early once P(the full draft escalates) is at least this (escalate), or at
    # most 1 minus it (keep).
    decisive: float = Field(default=0.9, gt=0.5, le=1.0)
    # Hedge: while a prefix is undecided and its predicted confidence is below this, the teacher
    # starts in parallel (cancelled if the draft turns out confident). 0 turns hedging off.
    hedge_below: float = Field(default=0.25, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _prefix_lengths(self) -> RouterConfig:
        if self.min_prefix_tokens > self.decide_after_tokens:
            raise ValueError("router.min_prefix_tokens must not exceed router.decide_after_tokens")
        return self
