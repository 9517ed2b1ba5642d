"""Calibration on real records: the real gateway on the bundled SmolLM2 student and Gemma-3
teacher, every request audited, then cross-validated ECE before and after calibration."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

import httpx
import pytest

from distill_loop import METRICS, read_samples
from gateway import Settings, create_app
from router import expected_calibration_error, fit_calibrator
from tests.servers import serve_in_thread

TOPICS = ["refund", "delivery", "password", "invoice", "warranty", "subscription", "discount code", "order status"]
ASKS = [
    "How do I get help with my {t}?", "What is your policy on {t}?", "I have a problem with my {t}.",
    "Can you explain the {t} process?", "Where can I find my {t}?", "Who do I contact about a {t}?",
    "Is there a fee for {t}?", "My {t} is not working, what now?",
]  # fmt: skip
AGREE_AT = 0.2  # loose acceptability, so both classes appear with these small models


@pytest.mark.slow
def test_calibration_lowers_ece_on_real_records(tmp_path: Path) -> None:
    settings = Settings(
        # Full-draft decisions: a draft a prefix escalated has no confidence of its own to
        # calibrate (5 of 64 were cut short on one machine, none on another).
        router={"threshold": 0.35, "decision": "full"},
        signal={"path": tmp_path / "s.db", "audit_fraction": 1.0},
        distill={"enabled": False, "registry_dir": tmp_path / "registry"},
        server={"default_max_tokens": 24, "default_temperature": 0.0},
    )
    prompts = [a.format(t=t) for t, a in itertools.product(TOPICS, ASKS)]

    async def send(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            for i in range(0, len(prompts), 16):  # 16 at a time: the student batches them
                batch = prompts[i : i + 16]
                rs = await asyncio.gather(
                    *(
                        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": p}]})
                        for p in batch
                    )
                )
                assert all(r.status_code == 200 for r in rs)

    with serve_in_thread(create_app(settings), ready_path="/health/ready", timeout=900) as url:
        asyncio.run(send(url))
    records = [r for r in read_samples(tmp_path / "s.db") if r.student is not None and r.confidence is not None]
    assert len(records) == len(prompts)  # every request: an escalation or an audit
    conf = [r.confidence for r in records]
    ok = [METRICS["token_f1"](r.student.text, r.teacher.text) >= AGREE_AT for r in records]  # type: ignore[union-attr]
    assert 0 < sum(ok) < len(ok), "need both acceptable and unacceptable drafts"
    # 4-fold out-of-fold predictions, pooled (as sklearn's cross_val_predict): ECE over 32 items
    # per fold is mostly noise, over the pooled 64 it is not.
    idx = list(range(len(records)))
    random.Random(0).shuffle(idx)
    folds = [idx[k::4] for k in range(4)]
    raw, calibrated, labels = [], [], []
    for k, test in enumerate(folds):
        train = [i for j, fold in enumerate(folds) if j != k for i in fold]
        cal = fit_calibrator([conf[i] for i in train], [ok[i] for i in train])
        raw += [conf[i] for i in test]
        calibrated += [cal(conf[i]) for i in test]
        labels += [ok[i] for i in test]
    before, after = expected_calibration_error(raw, labels), expected_calibration_error(calibrated, labels)
    assert after < before, (before, after)
