"""No raw personal identifier at rest: a labelled corpus goes through a running gateway over
real HTTP (escalated, audited, streamed, one teacher failure logged, one batch spilled with the
database locked), then the database, its WAL, the spill file and the log are scanned byte by
byte for every identifier sent."""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from distill_loop import Redactor, install_log_redaction, read_samples
from gateway import create_app
from gateway.settings import GuardConfig
from tests.distill_loop.pii_corpus import identifier_prompts
from tests.fakes import UpstreamScript
from tests.gateway.test_e2e import settings_for
from tests.servers import metric, serve_in_thread

AUTH = {"authorization": "Bearer test-key"}


def _found(raw: str, blob: bytes) -> bool:
    """Whether `blob` holds `raw`. A short one (a 5-digit postcode) counts only standing alone:
    random hex request ids hold any 5 digits now and then."""
    if len(raw) >= 8:
        return raw.encode() in blob
    return re.search(rb"(?<![0-9A-Za-z])" + re.escape(raw.encode()) + rb"(?![0-9A-Za-z])", blob) is not None


def post(url: str, text: str, **body: object) -> httpx.Response:
    payload = {"messages": [{"role": "user", "content": text}], "max_tokens": 200, **body}
    r = httpx.post(url + "/v1/chat/completions", json=payload, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r


def test_no_raw_identifier_reaches_the_database_wal_spill_or_log(
    student_url: str,
    teacher_url: str,
    student_script: UpstreamScript,
    teacher_script: UpstreamScript,
    tmp_path: Path,
) -> None:
    # Both tiers repeat the prompt, so drafts, answers and their logprob tokens hold the identifiers too.
    student_script.echo = teacher_script.echo = True
    db, spill, log_path = tmp_path / "signal.db", tmp_path / "spill.jsonl", tmp_path / "gateway.log"
    prompts = identifier_prompts()[:240]
    easy = [p for p in prompts if "HARD" not in p.text][:80]  # some corpus prompts escalate themselves
    rest = [p for p in prompts if p not in easy]
    escalated, confident, locked, failing = rest[:120], easy, rest[120:150], rest[150]
    settings = settings_for(
        student_url, teacher_url, db, audit=1.0, spill_path=spill, ack_timeout_s=0.3, teacher_top_logprobs=2
    )
    # The failed escalation is not asked again later (guard.backlog_max): the spill holds exactly
    # the records of the locked period. A deferred record takes the same path to the store.
    settings = settings.model_copy(update={"guard": GuardConfig(backlog_max=0)})
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for lg in loggers:
        lg.addHandler(handler)
    undo = install_log_redaction(Redactor())  # as `python -m gateway` does with signal.redact on
    try:
        with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:
            with ThreadPoolExecutor(8) as pool:
                # Escalated (half of them streamed) and confident-but-audited requests.
                rs = list(pool.map(lambda p: post(url, "HARD " + p.text, stream=len(p.text) % 2 == 0), escalated))
                assert all(r.headers["x-tiergate-escalated"] == "true" for r in rs)
                rs = list(pool.map(lambda p: post(url, p.text), confident))
                assert all(r.headers["x-tiergate-escalated"] == "false" for r in rs)
            # Audits run in the background: all written before the teacher is made to fail.
            deadline = time.monotonic() + 20
            while metric(url, "tiergate_signal_records_total", result="written") < len(escalated) + len(confident):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # The teacher fails once and its error repeats the prompt: that goes to the log.
            teacher_script.status = 500
            assert post(url, "HARD " + failing.text).headers["x-tiergate-reason"] == "teacher_unavailable"
            teacher_script.status = 200
            # Now the database is locked: these records wait in the queue and are spilled at shutdown.
            blocker = sqlite3.connect(db, timeout=10)
            blocker.execute("BEGIN IMMEDIATE")
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda p: post(url, "HARD " + p.text), locked))
        blocker.execute("ROLLBACK")
        blocker.close()
    finally:
        undo()
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()

    files = {p.name: p.read_bytes() for p in (db, spill, log_path, tmp_path / "signal.db-wal") if p.exists()}
    assert {"signal.db", "spill.jsonl", "gateway.log"} <= set(files)
    raws = {raw for p in prompts for _, raw in p.labels}
    leaks = {(name, raw) for name, blob in files.items() for raw in raws if _found(raw, blob)}
    assert not leaks, sorted(leaks)[:10]
    # Not vacuous: the records, the spilled ones and the logged failure are there, redacted.
    assert b"scripted failure" in files["gateway.log"] and b"_1>" in files["gateway.log"]
    assert files["spill.jsonl"].count(b"\n") == len(locked)
    stored = list(read_samples(db))
    assert len(stored) == len(escalated) + len(confident)
    assert {s.kind for s in stored} == {"escalation", "audit"}
    assert sum("_1>" in s.teacher.text for s in stored) >= 0.9 * len(stored)


def test_redact_teacher_requests_sends_the_teacher_placeholders_numbered_as_the_record(
    student_url: str, teacher_url: str, teacher_script: UpstreamScript, tmp_path: Path
) -> None:
    teacher_script.echo = True
    db = tmp_path / "signal.db"
    prompt = "HARD mail jane@example.com or call +44 20 7946 0958"
    for redact_teacher in (False, True):
        settings = settings_for(student_url, teacher_url, db, redact_teacher_requests=redact_teacher)
        with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:
            answer = post(url, prompt).json()["choices"][0]["message"]["content"]
        sent = teacher_script.requests[-1]["messages"][-1]["content"]
        if redact_teacher:
            assert sent == "HARD mail <EMAIL_1> or call <PHONE_1>" and answer.endswith(sent)
        else:
            assert sent == prompt and answer.endswith(prompt)  # the client's answer is never redacted
    stored = [s.teacher.text for s in read_samples(db)]
    assert len(stored) == 2 and all(t.endswith("HARD mail <EMAIL_1> or call <PHONE_1>") for t in stored)
