"""End to end over real sockets: uvicorn gateway on 127.0.0.1, both tiers remote (fake
OpenAI-compatible servers on loopback), the official `openai` SDK as the client."""

from __future__ import annotations

import sqlite3
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
from tests.servers import metric, serve_in_thread

THRESHOLD = 0.5


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "signal.db"


def settings_for(student_url: str, teacher_url: str, db: Path, audit: float = 0.0, **signal: object) -> Settings:
    return Settings(
        student={"kind": "remote", "url": student_url, "model": "auto"},
        teacher={"kind": "remote", "url": teacher_url, "model": "auto", "system_prompt": None},
        router={"threshold": THRESHOLD},
        signal={"path": db, "audit_fraction": audit, "teacher_top_logprobs": 5, **signal},
        distill={"label_budget_per_hour": 0},  # exact token and record counts: no background labels
        pricing={
            "student": {"input_per_mtok": 1, "output_per_mtok": 2},
            "teacher": {"input_per_mtok": 10, "output_per_mtok": 20},
        },
    )


@pytest.fixture
def gateway_url(student_url: str, teacher_url: str, db: Path) -> Iterator[str]:
    with serve_in_thread(create_app(settings_for(student_url, teacher_url, db)), ready_path="/health/ready") as url:
        yield url


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="test-key", max_retries=0)


def ask(client: openai.OpenAI, text: str, **kw: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=kw.pop("model", "tiered"), messages=[{"role": "user", "content": text}], **kw
    )


def test_confident_request_stays_on_the_student(gateway_url: str, student_script: UpstreamScript) -> None:
    raw = ask(sdk(gateway_url), "Where is my refund?", logprobs=True, top_logprobs=1, max_tokens=50)
    resp = raw.parse()
    assert raw.headers["x-tiergate-tier"] == "student"
    assert raw.headers["x-tiergate-escalated"] == "false"
    assert raw.headers["x-tiergate-threshold"] == "0.5000"
    assert float(raw.headers["x-tiergate-confidence"]) == pytest.approx(0.9512, abs=1e-4)  # exp(-0.05)
    assert raw.headers["x-tiergate-student-version"] == "student-upstream"
    assert resp.choices[0].message.content == student_script.text
    assert resp.model == "student-upstream@student-upstream"
    assert resp.usage.completion_tokens == 8
    assert resp.choices[0].logprobs.content[0].top_logprobs[0].logprob == pytest.approx(-0.05)
    assert resp.model_extra["tiergate"]["tier"] == "student"


def test_escalation_path_headers_metrics_and_record(
    student_url: str, teacher_url: str, db: Path, teacher_script: UpstreamScript
) -> None:
    app = create_app(settings_for(student_url, teacher_url, db))
    with serve_in_thread(app, ready_path="/health/ready") as url:
        client = sdk(url)
        raw = ask(client, "HARD: my parcel is lost", max_tokens=50, metadata={"queue": "billing"})
        resp = raw.parse()
        assert raw.headers["x-tiergate-tier"] == "teacher"
        assert raw.headers["x-tiergate-escalated"] == "true"
        assert raw.headers["x-tiergate-reason"] == "low_confidence"
        assert float(raw.headers["x-tiergate-confidence"]) < THRESHOLD
        assert resp.choices[0].message.content == teacher_script.text
        assert resp.model == "teacher-upstream"
        ask(client, "an easy one", max_tokens=50)

        assert metric(url, "tiergate_requests_total", tier="teacher") == 1
        assert metric(url, "tiergate_requests_total", tier="student") == 1
        assert metric(url, "tiergate_escalations_total", reason="low_confidence") == 1
        # Both requests were scored: one below 0.5 (exp(-3)), one above (exp(-0.05)).
        assert metric(url, "tiergate_confidence_bucket", le="0.06") == 1
        assert metric(url, "tiergate_confidence_bucket", le="0.5") == 1
        assert metric(url, "tiergate_confidence_count") == 2
        # Two student drafts (11 prompt + 8 completion tokens each) and one teacher call (11 + 10).
        assert metric(url, "tiergate_prompt_tokens_total", tier="student") == 22
        assert metric(url, "tiergate_completion_tokens_total", tier="teacher") == 10
        spent = (22 * 1 + 16 * 2) / 1e6 + (11 * 10 + 10 * 20) / 1e6
        assert metric(url, "tiergate_cost_usd_total", tier="student") + metric(
            url, "tiergate_cost_usd_total", tier="teacher"
        ) == pytest.approx(spent)
        teacher_only = (11 * 10 + 10 * 20) / 1e6 + (11 * 10 + 8 * 20) / 1e6
        assert metric(url, "tiergate_teacher_only_cost_usd_total") == pytest.approx(teacher_only)
        assert metric(url, "tiergate_cost_saved_usd") == pytest.approx(teacher_only - spent)
        assert metric(url, "tiergate_student_info", version="student-upstream") == 1
        # The teacher was asked for top-k logprobs for the distillation signal.
        assert teacher_script.requests[0]["top_logprobs"] == 5
    # Shutdown flushed the record.
    (rec,) = list(read_samples(db))
    assert rec.kind == "escalation" and rec.reason == "low_confidence"
    assert rec.id == raw.headers["x-request-id"]
    assert rec.messages[0].content == "HARD: my parcel is lost"
    assert rec.student is not None and rec.student.text.startswith("Your refund")
    assert all(lp.logprob == -3.0 for lp in rec.student.logprobs)
    assert rec.confidence == pytest.approx(float(raw.headers["x-tiergate-confidence"]), abs=1e-4)
    assert rec.features["mean_logprob"] == -3.0
    assert rec.teacher.text == teacher_script.text and rec.teacher.logprobs[0].top
    assert rec.threshold == THRESHOLD
    assert rec.tenant.startswith("key-") and "test-key" not in rec.tenant
    assert rec.metadata == {"queue": "billing"}


def test_streaming_escalation_and_usage_chunk(gateway_url: str, teacher_script: UpstreamScript) -> None:
    with sdk(gateway_url).chat.completions.with_streaming_response.create(
        model="tiered",
        messages=[{"role": "user", "content": "HARD question"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=50,
    ) as raw:
        assert raw.headers["x-tiergate-tier"] == "teacher"
        assert raw.headers["x-tiergate-escalated"] == "true"
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == teacher_script.text
    assert chunks[0].model_extra["tiergate"]["tier"] == "teacher"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_streaming_student_answer_with_logprobs(gateway_url: str, student_script: UpstreamScript) -> None:
    stream = sdk(gateway_url).chat.completions.create(
        model="tiered", messages=[{"role": "user", "content": "easy"}], stream=True, logprobs=True, max_tokens=50
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == student_script.text
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked
    lps = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert len(lps) == 8 and lps[0].logprob == pytest.approx(-0.05)


def test_forced_student_stream_is_live_and_scored_at_the_end(gateway_url: str) -> None:
    chunks = list(
        sdk(gateway_url).chat.completions.create(
            model="student", messages=[{"role": "user", "content": "x"}], stream=True, max_tokens=50
        )
    )
    assert chunks[0].model_extra["tiergate"]["confidence"] is None
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert final.model_extra["tiergate"]["confidence"] == pytest.approx(0.9512, abs=1e-4)


def test_teacher_outage_degrades_to_the_student_draft(
    gateway_url: str, teacher_script: UpstreamScript, student_script: UpstreamScript
) -> None:
    teacher_script.status = 503
    raw = ask(sdk(gateway_url), "HARD and the teacher is down", max_tokens=50)
    assert raw.headers["x-tiergate-tier"] == "student"
    assert raw.headers["x-tiergate-reason"] == "teacher_unavailable"
    assert raw.parse().choices[0].message.content == student_script.text
    assert raw.parse().model_extra["tiergate"]["degraded"] is True
    assert metric(gateway_url, "tiergate_fallbacks_total", reason="teacher_unavailable") == 1
    # A 503 is retried once, before the first byte (the retry budget allows it): two errors.
    assert metric(gateway_url, "tiergate_request_errors_total", tier="teacher", error="unavailable") == 2
    assert metric(gateway_url, "tiergate_retries_total", tier="teacher") == 1
    assert len(teacher_script.requests) == 2


def test_teacher_stream_cut_after_first_byte_is_an_in_band_error(
    gateway_url: str, teacher_script: UpstreamScript, db: Path
) -> None:
    teacher_script.cut_stream_after = 2
    stream = sdk(gateway_url).chat.completions.create(
        model="tiered", messages=[{"role": "user", "content": "HARD"}], stream=True, max_tokens=50
    )
    with pytest.raises(openai.APIError):
        list(stream)


def test_sdk_sees_openai_errors(gateway_url: str) -> None:
    client = sdk(gateway_url)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiered", messages=[])
    assert bad.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_audit_slice_is_answered_by_the_teacher_in_the_background(student_url: str, teacher_url: str, db: Path) -> None:
    app = create_app(settings_for(student_url, teacher_url, db, audit=1.0))
    with serve_in_thread(app, ready_path="/health/ready") as url:
        raw = ask(sdk(url), "easy question", max_tokens=50)
        assert raw.headers["x-tiergate-tier"] == "student"  # the client got the student's answer
    (rec,) = list(read_samples(db))  # the audit finished and was flushed at shutdown
    assert rec.kind == "audit" and rec.confidence is not None and rec.confidence > THRESHOLD
    assert rec.student is not None and rec.teacher.text.startswith("Refunds take")


def test_a_reused_client_request_id_is_echoed_and_stored_but_never_a_key(
    student_url: str, teacher_url: str, db: Path
) -> None:
    """Clients reuse ids. A fault probe sent one `x-request-id` three times while the id was the
    record's key, and two of the three escalation records went to the dead-letter table."""
    app = create_app(settings_for(student_url, teacher_url, db))
    with serve_in_thread(app, ready_path="/health/ready") as url, httpx.Client(base_url=url, timeout=30) as client:
        responses = [
            client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": f"HARD: parcel {i} is lost"}]},
                headers={"x-request-id": "same-id", "authorization": "Bearer test-key"},
            )
            for i in range(3)
        ]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all(
        r.headers["x-request-id"] == "same-id" and r.headers["x-tiergate-escalated"] == "true" for r in responses
    )
    own = [r.headers["x-tiergate-request-id"] for r in responses]
    assert len(set(own)) == 3 and [r.json()["id"] for r in responses] == [f"chatcmpl-{i}" for i in own]
    records = list(read_samples(db))
    assert sorted(r.id for r in records) == sorted(own)
    assert {r.client_request_id for r in records} == {"same-id"}
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM dead_letter").fetchone()[0] == 0


def test_an_escalated_prompt_past_max_record_bytes_is_stored_cut_and_counted(
    student_url: str, teacher_url: str, db: Path
) -> None:
    app = create_app(settings_for(student_url, teacher_url, db, max_record_bytes=8192))
    prompt = "HARD: " + "my parcel never came " * 5000  # about 100 KB
    with serve_in_thread(app, ready_path="/health/ready") as url:
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": prompt}]},
            headers={"authorization": "Bearer test-key"},
            timeout=30,
        )
        assert r.status_code == 200 and r.headers["x-tiergate-escalated"] == "true"
        deadline = time.monotonic() + 10
        while metric(url, "tiergate_signal_records_total", result="written") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert metric(url, "tiergate_signal_records_total", result="truncated") == 1
    (rec,) = list(read_samples(db))
    assert rec.truncated_from is not None and rec.truncated_from > 100_000
    assert len(rec.messages[0].content.encode()) < 8192 and rec.messages[0].content.startswith("HARD: my parcel")
    assert sum(f.stat().st_size for f in db.parent.glob(db.name + "*")) < 100_000  # WAL included


def test_a_locked_signal_database_delays_an_escalated_answer_by_at_most_the_ack_timeout(
    student_url: str, teacher_url: str, db: Path
) -> None:
    """Acknowledged durability waits for the commit, but a failing store never fails serving:
    past `ack_timeout_s` the answer goes out, the wait is counted, and the record is written
    once the database is free again."""
    app = create_app(settings_for(student_url, teacher_url, db, ack_timeout_s=0.5))
    with serve_in_thread(app, ready_path="/health/ready") as url:
        blocker = sqlite3.connect(db, timeout=10)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            r = httpx.post(
                url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "HARD: where is my parcel"}]},
                headers={"authorization": "Bearer test-key"},
                timeout=30,
            )
            assert r.status_code == 200 and r.headers["x-tiergate-escalated"] == "true"
            assert metric(url, "tiergate_signal_ack_timeouts_total") == 1
            assert metric(url, "tiergate_signal_records_total", result="written") == 0
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        deadline = time.monotonic() + 20
        while metric(url, "tiergate_signal_records_total", result="written") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert [s.id for s in read_samples(db)] == [r.headers["x-tiergate-request-id"]]


def test_an_escalated_answer_is_committed_before_it_is_sent(student_url: str, teacher_url: str, db: Path) -> None:
    app = create_app(settings_for(student_url, teacher_url, db))
    with serve_in_thread(app, ready_path="/health/ready") as url, sdk(url) as client:
        for stream in (False, True):
            raw = client.chat.completions.with_raw_response.create(
                model="tiered", messages=[{"role": "user", "content": "HARD: a lost parcel"}], stream=stream
            )
            if stream:
                list(raw.parse())  # the whole stream, last chunk included
            own = raw.headers["x-tiergate-request-id"]
            assert own in {s.id for s in read_samples(db)}  # read while the gateway still runs


def test_a_client_that_disconnects_cancels_its_request(
    gateway_url: str, student_script: UpstreamScript, teacher_script: UpstreamScript, db: Path
) -> None:
    """Non-streaming, as streams already do: a probe found the draft finished, the teacher
    called and a record written for a client that had gone."""
    student_script.delay_s = 1.0
    body = {"model": "tiered", "messages": [{"role": "user", "content": "HARD and then I hang up"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway_url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.3))
    deadline = time.monotonic() + 10
    while metric(gateway_url, "tiergate_client_disconnects_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(gateway_url, "tiergate_client_disconnects_total") == 1
    time.sleep(1.2)  # past the draft's delay: a request left running would call the teacher now
    assert teacher_script.requests == []
    assert list(read_samples(db)) == []
    assert metric(gateway_url, "tiergate_requests_total", tier="student") == 0
