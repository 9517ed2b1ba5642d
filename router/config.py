"""Router configuration: the threshold and which confidence scorer computes the score."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
