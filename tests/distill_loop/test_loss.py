"""Each loss on small tensors, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distill_loop.loss import (
    SEG_ANSWER,
    SEG_CHAIN,
    SEG_IGNORE,
    LossWeights,
    answer_ce,
    chain_and_answer_ce,
    dynamic_weights,
    split_reasoning,
    topk_tail_kl,
)


def lp(*rows: list[float]) -> torch.Tensor:
    """Log-probabilities [1, T, V] from probability rows."""
    return torch.tensor([rows], dtype=torch.float64).log()


def test_answer_ce_is_mean_nll_of_counted_tokens() -> None:
    logprobs = lp([0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6])
    targets = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[1, 1, 0]])
    expected = -(math.log(0.5) + math.log(0.8)) / 2
    assert answer_ce(logprobs, targets, mask).item() == pytest.approx(expected)


def test_chain_and_answer_are_separate_weighted_means() -> None:
    logprobs = lp([0.5, 0.5], [0.25, 0.75], [0.9, 0.1], [0.6, 0.4])
    targets = torch.tensor([[0, 1, 0, 0]])
    segments = torch.tensor([[SEG_CHAIN, SEG_CHAIN, SEG_ANSWER, SEG_IGNORE]])
    chain = -(math.log(0.5) + math.log(0.75)) / 2
    answer = -math.log(0.9)
    got = chain_and_answer_ce(logprobs, targets, segments, w_answer=1.0, w_chain=0.5)
    assert got.item() == pytest.approx(answer + 0.5 * chain)
    plain = chain_and_answer_ce(logprobs, targets, torch.tensor([[1, 1, 1, 0]]), 1.0, 0.5)
    assert plain.item() == pytest.approx(-(math.log(0.5) + math.log(0.75) + math.log(0.9)) / 3)


def test_topk_tail_kl_matches_hand_computation() -> None:
    # Student q over V=4; teacher top-2 on ids {0, 2} with p = 0.6, 0.3, tail 0.1.
    student = lp([0.4, 0.3, 0.2, 0.1])
    ids = torch.tensor([[[0, 2]]])
    t_lp = torch.tensor([[[0.6, 0.3]]], dtype=torch.float64).log()
    expected = 0.6 * math.log(0.6 / 0.4) + 0.3 * math.log(0.3 / 0.2) + 0.1 * math.log(0.1 / 0.4)
    got = topk_tail_kl(student, ids, t_lp, torch.tensor([[1]]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_topk_tail_kl_zero_when_equal_and_positive_with_k1() -> None:
    q = [0.5, 0.3, 0.2]
    student = lp(q)
    ids = torch.tensor([[[0, 1, 2]]])
    assert topk_tail_kl(student, ids, lp(q).reshape(1, 1, 3), torch.tensor([[1]])).item() == pytest.approx(0, abs=1e-6)
    # k = 1: the tail bucket keeps the loss informative (renormalising inside S would give 0).
    one = topk_tail_kl(
        student, torch.tensor([[[0]]]), torch.tensor([[[math.log(0.9)]]], dtype=torch.float64), torch.tensor([[1]])
    )
    assert one.item() == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5), rel=1e-6)


def test_topk_padding_and_masked_positions_give_no_nan() -> None:
    student = lp([0.5, 0.5], [0.5, 0.5])
    ids = torch.tensor([[[0, -1], [-1, -1]]])
    t_lp = torch.tensor([[[math.log(0.7), 0.0], [0.0, 0.0]]], dtype=torch.float64)
    got = topk_tail_kl(student, ids, t_lp, torch.tensor([[1, 0]]))
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5), rel=1e-6)


def test_split_reasoning_formats() -> None:
    assert split_reasoning("<think>2+2 is 4</think> The answer is 4.") == ("2+2 is 4", "The answer is 4.")
    assert split_reasoning("Natalia sold 48 clips, then half.\n#### 72") == ("Natalia sold 48 clips, then half.", "72")
    assert split_reasoning("Reasoning: refunds take 5 days\nAnswer: 5 days") == ("refunds take 5 days", "5 days")
    assert split_reasoning("Refunds take five business days.") is None


def test_dynamic_weights_follow_agreement() -> None:
    base = LossWeights(answer=1.0, chain=0.1, kd=1.0, correction=0.1)
    late = LossWeights(answer=0.5, chain=0.5, kd=0.5, correction=0.3)
    assert dynamic_weights(None, low=0.4, high=0.8, base=base, late=late) == base
    assert dynamic_weights(0.2, low=0.4, high=0.8, base=base, late=late) == base
    assert dynamic_weights(0.9, low=0.4, high=0.8, base=base, late=late) == late
    mid = dynamic_weights(0.6, low=0.4, high=0.8, base=base, late=late)
    assert mid.answer == pytest.approx(0.75) and mid.chain == pytest.approx(0.3)
