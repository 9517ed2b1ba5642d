"""Distillation losses on tensors, each switchable, plus the agreement-driven loss weights.

Shapes are in the names: B batch, T target positions, V vocabulary, K teacher top-k.
`logprobs_B_T_V` are the student's log-softmax outputs at the positions that predict each
target token. Masks are 1 where a target token counts. No model or data loading here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# Segment ids inside one target sequence.
SEG_IGNORE, SEG_ANSWER, SEG_CHAIN = 0, 1, 2


def token_nll_B_T(logprobs_B_T_V: torch.Tensor, targets_B_T: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token."""
    return -logprobs_B_T_V.gather(-1, targets_B_T.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def masked_mean(values_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    mask = mask_B_T.to(values_B_T.dtype)
    return (values_B_T * mask).sum() / mask.sum().clamp(min=1.0)


def answer_ce(logprobs_B_T_V: torch.Tensor, targets_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """(a) Cross-entropy on the teacher's answer tokens, averaged over counted tokens."""
    return masked_mean(token_nll_B_T(logprobs_B_T_V, targets_B_T), mask_B_T)


def chain_and_answer_ce(
    logprobs_B_T_V: torch.Tensor,
    targets_B_T: torch.Tensor,
    segments_B_T: torch.Tensor,
    w_answer: float,
    w_chain: float,
) -> torch.Tensor:
    """(b) Reasoning-chain supervision: separate means over chain and final-answer tokens, weighted.

    A batch without chain tokens reduces to `w_answer · answer CE`.
    """
    nll = token_nll_B_T(logprobs_B_T_V, targets_B_T)
    answer = masked_mean(nll, segments_B_T == SEG_ANSWER)
    has_chain = bool((segments_B_T == SEG_CHAIN).any())
    chain = masked_mean(nll, segments_B_T == SEG_CHAIN) if has_chain else nll.new_zeros(())
    return w_answer * answer + w_chain * chain


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable (x is clamped just below 0)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_tail_kl(
    logprobs_B_T_V: torch.Tensor,
    teacher_ids_B_T_K: torch.Tensor,
    teacher_logprobs_B_T_K: torch.Tensor,
    mask_B_T: torch.Tensor,
) -> torch.Tensor:
    """(c) Forward KL(teacher ‖ student) over the teacher's logged top-k plus one tail bucket.

    KL = Σ_{i∈S} p_i (log p_i − log q_i) + P_tail (log P_tail − log Q_tail), where the tails are
    the mass outside S. Entries with id < 0 are padding. Averaged over counted positions.
    """
    valid_B_T_K = teacher_ids_B_T_K >= 0
    neg_inf = torch.finfo(logprobs_B_T_V.dtype).min
    lp_t = teacher_logprobs_B_T_K.masked_fill(~valid_B_T_K, neg_inf)
    lq = logprobs_B_T_V.gather(-1, teacher_ids_B_T_K.clamp(min=0)).masked_fill(~valid_B_T_K, neg_inf)
    p = lp_t.exp()
    head_B_T = (p * (lp_t - lq)).masked_fill(~valid_B_T_K, 0.0).sum(-1)
    log_p_tail = _log1mexp(torch.logsumexp(lp_t, -1))
    log_q_tail = _log1mexp(torch.logsumexp(lq, -1))
    tail_B_T = log_p_tail.exp() * (log_p_tail - log_q_tail)
    return masked_mean(head_B_T + tail_B_T, mask_B_T)


_THINK = re.compile(r"^\s*<think>(?P<chain>.*?)</think>\s*(?P<answer>.*)$", re.S)
_GSM = re.compile(r"^(?P<chain>.*?)\s*####\s*(?P<answer>.+)$", re.S)
_LABELLED = re.compile(r"^\s*(?:Reasoning|Rationale):\s*(?P<chain>.*?)\n\s*Answer:\s*(?P<answer>.+)$", re.S | re.I)


def split_reasoning(text: str) -> tuple[str, str] | None:
    """Split a teacher answer into (chain, final answer) when it carries a reasoning chain.

    Recognises `<think>…</think> answer`, GSM8K-style `chain #### answer`, and
    `Reasoning: … / Answer: …`. Returns None for a plain answer.
    """
    for pattern in (_THINK, _GSM, _LABELLED):
        m = pattern.match(text)
        if m and m.group("chain").strip() and m.group("answer").strip():
            return m.group("chain").strip(), m.group("answer").strip()
    return None


@dataclass(frozen=True, slots=True)
class LossWeights:
    answer: float
    chain: float
    kd: float
    correction: float


def dynamic_weights(
    agreement: float | None,
    *,
    low: float,
    high: float,
    base: LossWeights,
    late: LossWeights,
) -> LossWeights:
    """(e) Weights driven by measured agreement with the teacher, not by a clock.

    Below `low` agreement the answer terms dominate (`base`); above `high` the reasoning and
    correction terms reach `late`; linear in between. Unknown agreement counts as the start.
    """
    a = 0.0 if agreement is None else agreement
    t = min(1.0, max(0.0, (a - low) / (high - low))) if high > low else float(a >= high)

    def mix(x: float, y: float) -> float:
        return x + (y - x) * t

    return LossWeights(
        answer=mix(base.answer, late.answer),
        chain=mix(base.chain, late.chain),
        kd=mix(base.kd, late.kd),
        correction=mix(base.correction, late.correction),
    )
