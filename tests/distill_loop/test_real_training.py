"""A short real training run on the bundled models: Gemma-3 teacher answers, SmolLM2 student."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from distill_loop import DEFAULT_STUDENT, DEFAULT_TEACHER, DistillConfig, Sample, SignalConfig, SignalStore
from distill_loop.loop import DistillLoop
from models import ChatMessage, SamplingParams
from models.local import LocalBackend

FACTS = {
    "refund": ("How long does a refund take?", "Can I get my money back, and when?", "When will my refund arrive?"),
    "shipping": ("Is shipping free?", "How much does delivery cost?", "Do I pay for shipping?"),
    "hours": ("When is support open?", "What are your opening hours?", "Can I call you on Sunday?"),
    "warranty": ("How long is the warranty?", "Is my blender still under warranty?", "What does the warranty cover?"),
    "password": ("How do I reset my password?", "I forgot my password.", "I can't log in to my account."),
}
KB = (
    "Acme Blenders support facts: Refunds reach your card within 7 business days. Shipping is free on orders "
    "over 40 euros. Support is open Monday to Friday, 8am to 6pm. The warranty lasts 3 years and covers the "
    "motor. Reset your password with the 'Forgot password' link on the login page."
)


@pytest.mark.slow
@pytest.mark.anyio
async def test_short_real_run_lowers_heldout_nll(tmp_path: Path) -> None:
    teacher = LocalBackend(
        DEFAULT_TEACHER.model_copy(update={"system_prompt": f"{KB}\n\n{DEFAULT_TEACHER.system_prompt}"})
    )
    await teacher.start()
    samples = []
    try:
        for intent, questions in FACTS.items():
            for i, q in enumerate(questions):
                messages = (ChatMessage("user", q),)
                answer = await teacher.generate(messages, SamplingParams(max_tokens=32, temperature=0))
                samples.append(
                    Sample(
                        id=f"{intent}-{i}",
                        created_at=time.time(),
                        tenant="t",
                        kind="escalation",
                        reason="low_confidence",
                        messages=messages,
                        student=None,
                        confidence=None,
                        features={},
                        teacher=answer,
                        threshold=0.35,
                    )
                )
    finally:
        await teacher.aclose()
    assert all(s.teacher.text for s in samples)
    store = SignalStore(SignalConfig(path=tmp_path / "s.db"))
    store.open()
    for s in samples:
        store.submit(s)
    store.close()
    config = DistillConfig(
        registry_dir=tmp_path / "registry",
        holdout_fraction=0.3,
        lora={"r": 16, "alpha": 32, "lr": 1e-3, "epochs": 3, "batch_size": 4, "max_steps": 12},
        gate={"max_items": 6, "max_new_tokens": 24, "min_heldout": 1},  # measures NLL, not promotion
    )
    outcome = DistillLoop(config, tmp_path / "s.db", DEFAULT_STUDENT).run_once()
    assert outcome.gate is not None and outcome.gate.n_heldout > 0, outcome
    before, after = outcome.gate.heldout_serving.nll, outcome.gate.heldout_candidate.nll
    assert after < before, f"held-out NLL on teacher answers {before:.3f} -> {after:.3f}"
