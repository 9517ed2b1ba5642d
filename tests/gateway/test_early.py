"""The early decision, end to end over loopback HTTP with the `openai` SDK: a routed stream
is decided on its draft's first tokens, a kept draft streams as it is generated, an unsure
prefix escalates before any byte and stops the draft, a hedge starts the teacher while a
prefix is unsure, and the tiny real model's kept stream is the same answer a full decision
gives. Fake upstreams pace their tokens, so "before the draft ends" is read off their count.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from distill_loop import read_samples
from gateway import Settings, create_app
from tests.fakes import UpstreamScript
from tests.gateway.test_e2e import settings_for
from tests.servers import metric, serve_in_thread

LONG = " ".join(f"word{i}" for i in range(40)) + "."  # 40 tokens in the fake's word tokenizer


@pytest.fixture
def paced(student_script: UpstreamScript) -> UpstreamScript:
    student_script.text = LONG
    student_script.token_delay_s = 0.02  # 40 tokens: 0.8 s a draft
    return student_script


@pytest.fixture
def gateway(paced: UpstreamScript, student_url: str, teacher_url: str, tmp_path: Path) -> Iterator[str]:
    settings = settings_for(student_url, teacher_url, tmp_path / "signal.db")
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:
        yield url


def stream(url: str, text: str, **kw: Any) -> tuple[dict[str, str], list[tuple[str, int]], str]:
    """(headers, [(content, student chunks the upstream had sent then)], final finish reason)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    script: UpstreamScript = kw.pop("script")
    with client.chat.completions.with_streaming_response.create(
        model="tiered", messages=[{"role": "user", "content": text}], stream=True, **kw
    ) as raw:
        headers = dict(raw.headers)
        seen, finish = [], ""
        for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append((chunk.choices[0].delta.content, script.streamed))
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    return headers, seen, finish


def test_a_confident_prefix_streams_the_draft_as_it_is_generated(gateway: str, paced: UpstreamScript) -> None:
    headers, seen, finish = stream(gateway, "where is my refund?", script=paced, max_tokens=64)
    assert headers["x-tiergate-tier"] == "student" and headers["x-tiergate-reason"] == "prefix_confident"
    assert headers["x-tiergate-decided-by"] == "prefix"
    assert "".join(text for text, _ in seen) == LONG  # the held prefix, then the rest, nothing lost
    assert finish == "stop"
    # The first token reached the client while the student still had most of its draft to make.
    assert seen[0][1] < len(LONG.split()) // 2
    assert metric(gateway, "tiergate_routing_decisions_total", decided_by="prefix", tier="student") == 1
    assert metric(gateway, "tiergate_early_decision_checks_total", agreed="true") == 1


def test_an_unsure_prefix_escalates_before_any_byte_and_stops_the_draft(
    gateway: str, paced: UpstreamScript, teacher_script: UpstreamScript, tmp_path: Path
) -> None:
    headers, seen, _ = stream(gateway, "HARD question about a refund", script=paced, max_tokens=64)
    # Headers go out with the first byte: they name the teacher, so no student byte was sent.
    assert headers["x-tiergate-tier"] == "teacher" and headers["x-tiergate-escalated"] == "true"
    assert (headers["x-tiergate-reason"], headers["x-tiergate-decided-by"]) == ("prefix_unsure", "prefix")
    assert "".join(text for text, _ in seen) == teacher_script.text
    # Decided on the prefix (4 tokens by default): the draft was cut there, and stays cut.
    stopped_at = paced.streamed
    assert stopped_at < 10
    time.sleep(1.0)
    assert paced.streamed == stopped_at  # no further student tokens within 1 s
    (rec,) = read_samples(tmp_path / "signal.db", kind="escalation")
    assert rec.reason == "prefix_unsure" and rec.confidence is None  # a cut draft has no confidence of its own
    assert rec.features["full_draft"] == 0.0 and rec.features["prefix_tokens"] >= 4
    assert rec.student is not None and rec.student.finish_reason == "length"
    assert metric(gateway, "tiergate_escalations_total", reason="prefix_unsure") == 1


def test_an_audited_prefix_escalation_streams_the_teacher_live_and_records_the_whole_draft(
    paced: UpstreamScript, teacher_script: UpstreamScript, student_url: str, teacher_url: str, tmp_path: Path
) -> None:
    """The audited slice of prefix escalations lets the draft run on beside the teacher, so
    the record holds both decisions. The teacher still streams live: its first token reaches
    the client long before its last is generated, and the record waits only for the end."""
    teacher_script.text = LONG
    teacher_script.token_delay_s = 0.02
    settings = settings_for(student_url, teacher_url, tmp_path / "signal.db", audit=1.0)
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:
        headers, seen, finish = stream(url, "HARD question about a refund", script=teacher_script, max_tokens=64)
    assert (headers["x-tiergate-reason"], headers["x-tiergate-decided-by"]) == ("prefix_unsure", "prefix")
    assert "".join(text for text, _ in seen) == LONG and finish == "stop"
    # Streamed from the teacher (a whole answer is asked for unstreamed), and the first token
    # reached the client while the teacher was still generating.
    assert 0 < seen[0][1] < len(LONG.split()) // 2
    (rec,) = read_samples(tmp_path / "signal.db", kind="escalation")
    assert rec.features["full_draft"] == 1.0 and rec.confidence is not None  # the whole draft, scored
    assert rec.student is not None and rec.student.text == LONG
    assert rec.sampling_weight == 1.0  # drawn at a fraction of 1


def test_non_streaming_requests_to_a_remote_student_are_decided_on_the_whole_draft(
    gateway: str, paced: UpstreamScript
) -> None:
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="k", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="tiered", messages=[{"role": "user", "content": "where is my refund?"}], max_tokens=64
    )
    assert raw.headers["x-tiergate-decided-by"] == "full_draft" and raw.headers["x-tiergate-reason"] == "confident"


def test_an_unsure_undecided_prefix_hedges_and_the_hedge_answers(
    paced: UpstreamScript, teacher_script: UpstreamScript, student_url: str, teacher_url: str, tmp_path: Path
) -> None:
    # confidence exp(-1.6) = 0.20 at a threshold of 0.5: P(escalate) 0.82 under the prior, so no
    # prefix is decisive (0.9) until the 16th token forces it, and 0.20 < hedge_below (0.25).
    paced.token_logprobs = [-1.6]
    teacher_script.token_delay_s = 0.1  # still streaming when the request escalates
    settings = settings_for(student_url, teacher_url, tmp_path / "signal.db")
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:
        headers, seen, _ = stream(url, "a middling question", script=teacher_script, max_tokens=64)
        assert headers["x-tiergate-reason"] == "prefix_unsure"
        assert "".join(text for text, _ in seen) == teacher_script.text
        assert len(teacher_script.requests) == 1  # the hedge was the teacher call
        # Taken over mid-way and streamed on: the first token left before the teacher had finished.
        assert seen[0][1] < len(teacher_script.text.split())
        assert metric(url, "tiergate_hedges_total", outcome="used") == 1
        assert metric(url, "tiergate_hedge_tokens_total", outcome="used") > 0


def test_a_draft_that_fails_while_a_hedge_runs_is_answered_by_the_hedge(
    paced: UpstreamScript, teacher_script: UpstreamScript, student_url: str, teacher_url: str, tmp_path: Path
) -> None:
    """The student's stream breaks after the teacher was hedged: the request escalates as a
    student error, and the hedge already under way answers it: no second teacher call."""
    paced.token_logprobs = [-1.6]  # undecided and under hedge_below: a hedge starts at 4 tokens
    paced.cut_stream_after = 8
    teacher_script.token_delay_s = 0.05
    settings = settings_for(student_url, teacher_url, tmp_path / "signal.db")
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:
        headers, seen, finish = stream(url, "a middling question", script=teacher_script, max_tokens=64)
        assert (headers["x-tiergate-tier"], headers["x-tiergate-reason"]) == ("teacher", "student_error")
        assert "".join(text for text, _ in seen) == teacher_script.text and finish == "stop"
        assert len(teacher_script.requests) == 1  # the hedge, not a second call
        assert metric(url, "tiergate_hedges_total", outcome="used") == 1
        assert metric(url, "tiergate_escalations_total", reason="student_error") == 1
        failed = [
            line
            for line in httpx.get(url + "/metrics").text.splitlines()
            if line.startswith("tiergate_request_errors_total{") and 'tier="student"' in line
        ]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in failed) == 1  # the broken stream, counted once
    (rec,) = read_samples(tmp_path / "signal.db", kind="escalation")
    assert rec.reason == "student_error" and rec.student is None


def test_a_hedge_is_cancelled_when_the_draft_turns_out_confident(
    paced: UpstreamScript, teacher_script: UpstreamScript, student_url: str, teacher_url: str, tmp_path: Path
) -> None:
    # Two unsure tokens, then sure ones, at a threshold of 0.3. At 4 tokens the prior predicts
    # 0.15 (P(escalate) 0.72: undecided, and below hedge_below, so the teacher starts); at the
    # 16th it predicts 0.45 (P(escalate) 0.33), and the forced decision keeps the draft.
    paced.token_logprobs = [-2.5] * 2 + [-0.01]
    teacher_script.delay_s = 5.0  # still answering when the draft is kept
    base = settings_for(student_url, teacher_url, tmp_path / "signal.db")
    settings = base.model_copy(update={"router": base.router.model_copy(update={"threshold": 0.3})})
    app = create_app(settings)
    with serve_in_thread(app, ready_path="/health/ready") as url:
        headers, seen, _ = stream(url, "a question that starts unsure", script=paced, max_tokens=64)
        assert headers["x-tiergate-tier"] == "student" and headers["x-tiergate-reason"] == "prefix_confident"
        assert "".join(text for text, _ in seen) == LONG
        assert metric(url, "tiergate_hedges_total", outcome="cancelled") == 1
        assert metric(url, "tiergate_hedge_tokens_total", outcome="cancelled") > 0  # its prompt, priced
        assert metric(url, "tiergate_prompt_tokens_total", tier="teacher") > 0
        assert teacher_script.inflight == 1  # the teacher had not answered ...
        # ... and the gateway let go of the call at once: no teacher slot is held for it.
        assert app.state.service.guards["teacher"].admission.inflight == 0


def test_a_tenant_policy_chooses_full_draft_decisions(
    paced: UpstreamScript, student_url: str, teacher_url: str, tmp_path: Path
) -> None:
    base = settings_for(student_url, teacher_url, tmp_path / "signal.db")
    settings = Settings(**{**base.model_dump(), "server": {"admin_api_key": "adm"}})
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:
        r = httpx.put(
            url + "/admin/policy",
            json={"tenant": "*", "kind": "fixed", "threshold": 0.5, "decision": "full"},
            headers={"authorization": "Bearer adm"},
        )
        assert r.status_code == 200, r.text
        headers, seen, _ = stream(url, "where is my refund?", script=paced, max_tokens=64)
        assert headers["x-tiergate-decided-by"] == "full_draft" and headers["x-tiergate-reason"] == "confident"
        assert paced.streamed == 0  # the draft was asked for whole, before the first byte


def test_the_tiny_models_kept_stream_is_the_answer_a_full_decision_gives(
    tiny_model_dir: Path, teacher_url: str, tmp_path: Path
) -> None:
    def gateway(decision: str) -> Settings:
        return Settings(
            student={"kind": "local", "model": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
            teacher={"kind": "remote", "url": teacher_url, "model": "auto"},
            router={"threshold": 0.0, "decision": decision},  # a threshold of 0 keeps every draft
            signal={"path": tmp_path / f"{decision}.db", "audit_fraction": 0.0},
            distill={"registry_dir": tmp_path / "registry", "label_budget_per_hour": 0},
        )

    answers = {}
    for decision in ("early", "full"):
        with serve_in_thread(create_app(gateway(decision)), ready_path="/health/ready") as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
            with client.chat.completions.with_streaming_response.create(
                model="tiered",
                messages=[{"role": "user", "content": "refund?"}],
                stream=True,
                max_tokens=24,
                temperature=0,
            ) as raw:
                assert raw.headers["x-tiergate-tier"] == "student"
                assert raw.headers["x-tiergate-decided-by"] == ("prefix" if decision == "early" else "full_draft")
                answers[decision] = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert answers["early"] == answers["full"] and answers["early"]


def test_a_client_that_leaves_a_stream_stops_the_drafts_generation(gateway: str, paced: UpstreamScript) -> None:
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="k", max_retries=0)
    for model in ("tiered", "student"):  # a kept routed stream, and a live student one
        start = paced.streamed
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "where is my refund?"}], max_tokens=64, stream=True
        )
        for i, _chunk in enumerate(stream):
            if i == 6:
                break
        stream.close()  # the client leaves with most of the draft still to come
        time.sleep(0.3)  # the gateway notices, and closes the student's stream
        left = paced.streamed
        time.sleep(1.0)
        assert paced.streamed == left < start + len(LONG.split())  # nothing more within 1 s
