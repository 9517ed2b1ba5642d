"""Active teacher labels: the labeler's choice (uncovered clusters first, then the smallest
margin), its expiry and token bucket on an injected clock, and the whole path end to end: a
gateway under uvicorn on loopback whose confident answers get labelled, recorded and costed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from distill_loop import Sample, is_heldout, read_samples
from gateway import Settings, create_app
from gateway.labels import ActiveLabeler, HeldoutNeed, PromptClusters, content_words
from gateway.service import ChatCall, Route
from models import (
    BackendConfig,
    BackendUnavailable,
    ChatMessage,
    FakeBackend,
    Generation,
    SamplingParams,
    Scripted,
    Usage,
)
from router import Decision
from tests.servers import metric, serve_in_thread

THRESHOLD = 0.5


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


def served(
    prompt: str, *, confidence: float = 0.9, started: float = 10_000.0, rid: str = ""
) -> tuple[ChatCall, Route, Generation]:
    call = ChatCall(
        request_id=rid or prompt,
        tenant="default",
        alias="tiered",
        messages=(ChatMessage("system", "You answer support questions."), ChatMessage("user", prompt)),
        params=SamplingParams(),
        want_logprobs=False,
        metadata={},
        started=started,
    )
    decision = Decision(False, confidence, THRESHOLD, "confident", "mean_prob")
    route = Route("student", False, "confident", THRESHOLD, "base", decision)
    draft = Generation("a draft", "stop", Usage(5, 2), "student")
    return call, route, draft


def picked(labeler: ActiveLabeler) -> list[tuple[str, str]]:
    """One tick."""
    labeler.ingest()
    return [(p.candidate.call.request_id, p.reason) for p in labeler.select()]


# -- clustering --------------------------------------------------------------------------------


def test_content_words_drop_case_punctuation_stopwords_and_other_roles() -> None:
    messages = (ChatMessage("system", "Be terse."), ChatMessage("user", "How do I reset MY password?"))
    assert content_words(messages) == {"reset", "password"}
    assert content_words((ChatMessage("user", "what is it?"),)) == content_words((ChatMessage("user", "Why?"),))


def test_leader_clustering_joins_at_jaccard_one_half_and_forgets_the_least_recent() -> None:
    clusters = PromptClusters(max_leaders=2)
    a = clusters.assign(frozenset({"reset", "password"}))
    assert clusters.assign(frozenset({"reset", "password", "email"})) == a  # 2/3
    assert clusters.assign(frozenset({"reset", "password", "email", "phone"})) == a  # 2/4: joins
    b = clusters.assign(frozenset({"reset", "email", "phone"}))  # 1/4 to a's leader
    assert b != a
    clusters.cover(a)
    clusters.assign(frozenset({"refund"}))  # a third leader: a, least recently joined, goes
    assert a not in clusters and not clusters.covered(a) and b in clusters and len(clusters) == 2
    assert clusters.assign(frozenset({"reset", "password"})) not in (a, b)


# -- selection ---------------------------------------------------------------------------------


def test_uncovered_clusters_come_first_then_the_smallest_margin() -> None:
    clock = Clock()
    labeler = ActiveLabeler(3600, clock=clock)  # one token a second
    labeler.offer(*served("How do I reset my password?", confidence=0.52))
    labeler.offer(*served("Where is my refund for order 1234?", confidence=0.95))
    labeler.offer(*served("Can I change the delivery address?", confidence=0.60))
    labeler.offer(*served("When does the store open on Sunday?", confidence=0.99))
    # Records exist for near-copies of three of them (an escalation, an audit...).
    labeler.covered(served("how can I reset the password")[0].messages)
    labeler.covered(served("change my delivery address please")[0].messages)
    labeler.covered(served("store open Sunday hours")[0].messages)
    assert picked(labeler) == [("Where is my refund for order 1234?", "uncovered")]
    clock.now += 1
    assert picked(labeler) == [("How do I reset my password?", "margin")]
    clock.now += 2
    assert picked(labeler) == [
        ("Can I change the delivery address?", "margin"),
        ("When does the store open on Sunday?", "margin"),
    ]
    clock.now += 5
    assert picked(labeler) == []  # nothing left to label; the tokens wait


def test_a_labelled_cluster_is_covered_and_a_cluster_keeps_its_closest_call() -> None:
    clock = Clock()
    labeler = ActiveLabeler(3600, clock=clock)
    labeler.offer(*served("reset password", confidence=0.9, rid="far"))
    labeler.offer(*served("reset my password", confidence=0.55, rid="near"))
    labeler.offer(*served("password reset please", confidence=0.7, rid="between"))
    assert picked(labeler) == [("near", "uncovered")]
    labeler.offer(*served("reset password now", confidence=0.8, rid="later"))
    clock.now += 1
    assert picked(labeler) == [("later", "margin")]  # the cluster is covered by the first label


def test_expired_candidates_are_dropped() -> None:
    clock = Clock()
    labeler = ActiveLabeler(3600, clock=clock)
    labeler.offer(*served("too old by now", started=clock.now - 301))
    assert picked(labeler) == []
    labeler.offer(*served("fresh question about invoices", started=clock.now))
    labeler.offer(*served("another about shipping", confidence=0.6, started=clock.now))
    assert picked(labeler) == [("another about shipping", "uncovered")]
    clock.now += 301  # the invoice question waited in the pool too long
    assert picked(labeler) == []


def test_held_out_prompts_go_first_until_the_gate_has_enough_of_them() -> None:
    topics = [f"topic{i} word{i} thing{i}" for i in range(40)]  # no two share a cluster
    split = {t: is_heldout(served(t)[0].messages, 0.3) for t in topics}
    held, trained = [t for t in topics if split[t]], [t for t in topics if not split[t]]
    assert len(held) >= 3 and len(trained) >= 3
    clock = Clock()
    labeler = ActiveLabeler(3600, clock=clock, need=HeldoutNeed(0.3, needed=2))
    # A held-out prompt far above its threshold, in a cluster already on record, against
    # uncovered ones near it: while the gate is short, the held-out one goes first.
    labeler.covered(served(held[0])[0].messages)  # one held-out prompt on record: 1 of 2
    labeler.offer(*served(held[0], confidence=0.99))
    labeler.offer(*served(trained[0], confidence=0.51))
    assert picked(labeler) == [(held[0], "margin")]
    labeler.covered(served(held[1])[0].messages)  # 2 of 2: the gate has enough
    labeler.offer(*served(held[2], confidence=0.99))
    clock.now += 2
    assert picked(labeler) == [(trained[0], "uncovered"), (held[2], "uncovered")]
    assert labeler.need is not None and not labeler.need.short


def test_the_token_bucket_never_exceeds_the_budget() -> None:
    clock = Clock()
    budget = 360.0  # 0.1 a second; the bucket holds max(1, 360/60) = 6
    labeler = ActiveLabeler(budget, clock=clock)
    total = 0
    for second in range(600):
        for j in range(3):
            labeler.offer(*served(f"topic{second} item{j}", started=clock.now))
        total += len(picked(labeler))
        clock.now += 1
    assert 58 <= total <= 1 + budget * 600 / 3600
    clock.now += 3600  # an idle hour fills the bucket to one minute's worth, no more
    for j in range(50):
        labeler.offer(*served(f"burst{j}", started=clock.now))
    assert len(picked(labeler)) == 6


def test_budget_zero_builds_no_labeler(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ActiveLabeler(0)
    student, teacher = tiers()
    app = create_app(label_settings(tmp_path, 0), student=student, teacher=teacher)
    with TestClient(app) as client:
        for i in range(3):
            body = {"messages": [{"role": "user", "content": f"question {i}"}]}
            assert client.post("/v1/chat/completions", json=body).headers["x-tiergate-tier"] == "student"
        assert app.state.service.labeler is None
        assert "active-labels" not in client.portal.call(_task_names)  # type: ignore[union-attr]
    assert teacher.calls == 0 and list(read_samples(tmp_path / "signal.db")) == []


async def _task_names() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks()}


def test_what_if_leaves_labels_out_and_calibration_takes_them(tmp_path: Path) -> None:
    """What-if stands for all traffic by sampling weights; a label was chosen, not drawn."""
    student, teacher = tiers()
    app = create_app(label_settings(tmp_path, 0, audit_fraction=0.5, admin="k"), student=student, teacher=teacher)
    with TestClient(app) as client:
        for i, kind in enumerate(("escalation", "audit", "label", "label")):
            call, route, draft = served(f"question {i}", confidence=0.6, rid=f"r{i}")
            answer = Generation("the teacher's answer", "stop", Usage(5, 3), "teacher")
            reason = "margin" if kind == "label" else kind
            # On the app's event loop, where the service records (an escalation's commit is
            # a future of that loop).
            client.portal.call(app.state.service._record, call, kind, reason, draft, route.decision, answer)  # type: ignore[union-attr]
        assert app.state.service.store.flush()
        auth = {"authorization": "Bearer k"}
        assert client.get("/admin/whatif", headers=auth).json()["samples"] == 2
        (row,) = client.get("/admin/timeline?bucket_s=1e9", headers=auth).json()["buckets"]
        assert row["requests"] == 1 + 2  # the escalation, and the audit standing for 1/0.5 requests
        tuning = app.state.tuning
        assert len(tuning.samples()) == 4 and len(tuning.samples(population=True)) == 2
        assert tuning.refit("base")["samples"] == 4  # refits see the labels


# -- end to end --------------------------------------------------------------------------------


def tiers(teacher_delay_s: float = 0.0) -> tuple[FakeBackend, FakeBackend]:
    # Confident (exp(-0.2) = 0.82 against 0.5) unless the prompt says HARD.
    student = FakeBackend(
        BackendConfig(kind="fake", model="student"),
        lambda m: Scripted("the student's answer", -3.0 if "HARD" in m[-1].content else -0.2),
    )
    teacher = FakeBackend(
        BackendConfig(kind="fake", model="teacher"), lambda m: Scripted("the teacher's answer"), delay_s=teacher_delay_s
    )
    return student, teacher


def label_settings(tmp_path: Path, budget: float, audit_fraction: float = 0.0, admin: str | None = None) -> Settings:
    return Settings(
        server={"admin_api_key": admin},
        router={"threshold": THRESHOLD},
        signal={"path": tmp_path / "signal.db", "audit_fraction": audit_fraction, "teacher_top_logprobs": 5},
        distill={"label_budget_per_hour": budget, "registry_dir": tmp_path / "registry", "enabled": False},
        tuning={"policy_db": tmp_path / "policy.db"},
        pricing={
            "student": {"input_per_mtok": 1, "output_per_mtok": 2},
            "teacher": {"input_per_mtok": 10, "output_per_mtok": 20},
        },
    )


Gateway = Callable[..., contextlib.AbstractContextManager[tuple[str, FakeBackend]]]


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    """A gateway with fake tiers under uvicorn on loopback, and its teacher; stops on exit."""

    @contextlib.contextmanager
    def run(budget: float, teacher_delay_s: float = 0.0) -> Iterator[tuple[str, FakeBackend]]:
        student, teacher = tiers(teacher_delay_s)
        app = create_app(label_settings(tmp_path, budget), student=student, teacher=teacher)
        with serve_in_thread(app, ready_path="/health/ready") as url:
            yield url, teacher

    return run


def teacher_cost(usage: Any) -> float:
    return (usage.prompt_tokens * 10 + usage.completion_tokens * 20) / 1e6


def ask(url: str, prompt: str, model: str = "tiered", stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}
    resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp


def records(db: Path, until: Callable[[list[Sample]], bool], timeout: float = 15.0) -> list[Sample]:
    deadline = time.monotonic() + timeout
    while True:
        got = list(read_samples(db)) if db.exists() else []
        if until(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def labels_of(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.kind == "label"]


def test_confident_answers_are_labelled_recorded_and_costed(gateway: Gateway, tmp_path: Path) -> None:
    db = tmp_path / "signal.db"
    with gateway(36_000) as (url, _teacher):  # ten a second: every offer gets a label
        forced = ask(url, "forced student question about warranty", model="student")
        assert forced.headers["x-tiergate-reason"] == "forced"
        usage = ask(url, "forced teacher question about batteries", model="teacher").json()["usage"]
        forced_teacher = (usage["prompt_tokens"] * 10 + usage["completion_tokens"] * 20) / 1e6
        prompts = ["How long does a refund take?", "Can I ride the e-bike in rain?", "Where is my invoice?"]
        ids = [ask(url, p).headers["x-request-id"] for p in prompts[:2]]
        ids.append(ask(url, prompts[2], stream=True).headers["x-request-id"])
        got = records(db, lambda r: len(labels_of(r)) >= 3)
        assert {s.id for s in labels_of(got)} == {f"{i}-label" for i in ids}
        for s in labels_of(got):
            assert s.reason == "uncovered" and s.sampling_weight == 1.0
            assert s.student is not None and s.student.text == "the student's answer"
            assert s.confidence is not None and s.confidence > s.threshold == THRESHOLD
            assert s.features and s.teacher.text == "the teacher's answer"
            assert s.teacher.logprobs[0].top  # teacher top-logprobs kept, as for audits
        assert metric(url, "tiergate_labels_total", reason="uncovered", outcome="ok") == 3
        assert metric(url, "tiergate_labels_total", reason="margin", outcome="ok") == 0
        label_cost = metric(url, "tiergate_label_cost_usd_total")
        assert (
            label_cost == pytest.approx(sum(teacher_cost(s.teacher.usage) for s in labels_of(got))) and label_cost > 0
        )
        # The teacher's total cost: the forced teacher call plus the labels.
        assert metric(url, "tiergate_cost_usd_total", tier="teacher") == pytest.approx(label_cost + forced_teacher)
        # Records written for a prompt cover its cluster: asked again, it is a margin label.
        again = ask(url, "How long does a refund take?").headers["x-request-id"]
        got = records(db, lambda r: any(s.id == f"{again}-label" for s in r))
        assert next(s for s in got if s.id == f"{again}-label").reason == "margin"
        time.sleep(1.2)  # another tick: nothing new offered, nothing labelled
    got = list(read_samples(db))
    assert len(labels_of(got)) == 4 and len(got) == 4  # forced calls never labelled, nothing else recorded
    assert not any("forced" in s.messages[-1].content for s in got)


def test_labels_keep_within_the_budget_over_http(gateway: Gateway, tmp_path: Path) -> None:
    db = tmp_path / "signal.db"
    with gateway(3600) as (url, _teacher):  # one a second, one in the bucket at start
        start = time.monotonic()
        for i in range(8):
            ask(url, f"distinct topic number {i} about frames, {'saddles' if i % 2 else 'pedals'}")
        time.sleep(max(0.0, 2.2 - (time.monotonic() - start)))
        elapsed = time.monotonic() - start
        n = metric(url, "tiergate_labels_total", reason="uncovered", outcome="ok")
    assert 1 <= n <= 1 + elapsed  # starts with one token, then one a second
    assert len(labels_of(list(read_samples(db)))) == n


def test_a_failing_teacher_is_counted_and_logged_and_serving_goes_on(
    gateway: Gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.service")
    with gateway(36_000) as (url, teacher):
        teacher.fail_with = BackendUnavailable("teacher down")
        ask(url, "What does the warranty cover?")
        deadline = time.monotonic() + 10
        while metric(url, "tiergate_labels_total", reason="uncovered", outcome="failed") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ask(url, "Is the battery removable?").headers["x-tiergate-tier"] == "student"
        assert metric(url, "tiergate_label_cost_usd_total") == 0
    failures = [r for r in caplog.records if "active label" in r.getMessage()]
    assert failures and all(r.levelno == logging.WARNING for r in failures)
    assert list(read_samples(tmp_path / "signal.db")) == []


def test_a_label_in_flight_at_shutdown_is_written(gateway: Gateway, tmp_path: Path) -> None:
    with gateway(36_000, teacher_delay_s=0.8) as (url, teacher):
        ask(url, "How do I fold the handlebars?")
        deadline = time.monotonic() + 10
        while teacher.calls < 1:  # the label's teacher call has begun; shut down now
            assert time.monotonic() < deadline
            time.sleep(0.02)
    (label,) = list(read_samples(tmp_path / "signal.db"))
    assert label.kind == "label"
