"""The HTTP contract over scripted backends: errors in OpenAI shape, auth, admin, health."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway import Settings, create_app
from models import BackendConfig, FakeBackend, Scripted

ADMIN = "admin-secret"
KEY = "client-key"


def make_client(tmp_path: Path, **server: Any) -> TestClient:
    settings = Settings(
        server={"admin_api_key": ADMIN, **server},
        signal={"path": tmp_path / "signal.db", "audit_fraction": 0.0},
        router={"threshold": 0.5},
    )
    student = FakeBackend(
        BackendConfig(kind="fake", model="tiny-student"),
        lambda m: Scripted("student says hi", -0.05 if "HARD" not in m[-1].content else -3.0),
    )
    teacher = FakeBackend(BackendConfig(kind="fake", model="big-teacher"), lambda m: Scripted("teacher says hi"))
    return TestClient(create_app(settings, student=student, teacher=teacher))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(tmp_path) as c:
        yield c


def chat(client: TestClient, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/v1/chat/completions", json=body, headers=headers)


def assert_openai_error(resp: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiered", "messages": []}, "messages"),
        ({"model": "tiered"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, None),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, None),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_invalid_requests_get_400_in_openai_shape(client: TestClient, body: dict[str, Any], param: str | None) -> None:
    err = assert_openai_error(chat(client, body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_malformed_json_is_400(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(resp, 400)


def test_unknown_model_is_404_model_not_found(client: TestClient) -> None:
    err = assert_openai_error(chat(client, {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_unknown_fields_are_ignored(client: TestClient) -> None:
    resp = chat(client, {"messages": [{"role": "user", "content": "x"}], "frobnicate": 1, "store": True})
    assert resp.status_code == 200


def test_content_parts_are_joined(client: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert chat(client, body).status_code == 200


def test_models_lists_the_three_aliases(client: TestClient) -> None:
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiered", "student", "teacher"]
    assert all(m["object"] == "model" and m["owned_by"] for m in data)
    assert client.get("/v1/models/student").json()["root"] == "tiny-student@base"
    assert_openai_error(client.get("/v1/models/nope"), 404)


def test_forced_tiers_and_routing(client: TestClient) -> None:
    msgs = [{"role": "user", "content": "HARD question"}]
    teacher = chat(client, {"model": "teacher", "messages": msgs})
    assert teacher.headers["x-tiergate-tier"] == "teacher" and teacher.headers["x-tiergate-reason"] == "forced"
    assert teacher.headers["x-tiergate-confidence"] == "none"
    student = chat(client, {"model": "student", "messages": msgs})
    assert student.headers["x-tiergate-tier"] == "student" and student.headers["x-tiergate-escalated"] == "false"
    routed = chat(client, {"model": "tiered", "messages": msgs})
    assert routed.headers["x-tiergate-tier"] == "teacher" and routed.headers["x-tiergate-escalated"] == "true"
    assert routed.json()["model"] == "big-teacher"
    assert routed.json()["tiergate"]["reason"] == "low_confidence"


def test_request_id_is_echoed(client: TestClient) -> None:
    resp = chat(client, {"messages": [{"role": "user", "content": "x"}]}, **{"x-request-id": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    # The body's id is the gateway's own, as the signal record's is: clients reuse theirs.
    own = resp.headers["x-tiergate-request-id"]
    assert own != "abc-123" and resp.json()["id"] == f"chatcmpl-{own}"


def test_api_keys_are_enforced(tmp_path: Path) -> None:
    with make_client(tmp_path, api_keys=[KEY]) as c:
        body = {"messages": [{"role": "user", "content": "x"}]}
        err = assert_openai_error(chat(c, body), 401)
        assert err["code"] == "invalid_api_key"
        assert_openai_error(chat(c, body, authorization="Bearer wrong"), 401)
        assert chat(c, body, authorization=f"Bearer {KEY}").status_code == 200
        assert_openai_error(c.get("/v1/models"), 401)


def test_admin_threshold_needs_the_admin_key(client: TestClient) -> None:
    assert_openai_error(client.put("/admin/threshold", json={"threshold": 0.9}), 401)
    wrong = {"authorization": "Bearer x"}
    assert_openai_error(client.put("/admin/threshold", json={"threshold": 0.9}, headers=wrong), 401)
    auth = {"authorization": f"Bearer {ADMIN}"}
    assert_openai_error(client.put("/admin/threshold", json={"threshold": 1.5}, headers=auth), 400, "threshold")
    resp = client.put("/admin/threshold", json={"threshold": 0.99}, headers=auth)
    assert resp.json() == {"threshold": 0.99, "previous": 0.5}
    assert client.get("/admin/threshold", headers=auth).json() == {"threshold": 0.99}
    # Even a confident answer (confidence about 0.95) now escalates: the live threshold changed.
    routed = chat(client, {"messages": [{"role": "user", "content": "easy"}]})
    assert routed.headers["x-tiergate-tier"] == "teacher"
    assert routed.headers["x-tiergate-threshold"] == "0.9900"


def test_admin_disabled_without_key(tmp_path: Path) -> None:
    settings = Settings(signal={"path": tmp_path / "s.db"})
    fake = BackendConfig(kind="fake", model="f")
    with TestClient(create_app(settings, student=FakeBackend(fake), teacher=FakeBackend(fake))) as c:
        assert_openai_error(c.get("/admin/threshold"), 403)


def test_readiness_waits_for_both_tiers(tmp_path: Path) -> None:
    class SlowStart(FakeBackend):
        async def start(self) -> None:
            import asyncio

            await asyncio.sleep(3600)

    settings = Settings(signal={"path": tmp_path / "s.db"})
    fake = BackendConfig(kind="fake", model="f")
    with TestClient(create_app(settings, student=FakeBackend(fake), teacher=SlowStart(fake))) as c:
        assert c.get("/health/live").status_code == 200
        ready = c.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["tiers"] == {"student": True, "teacher": False}
        # Requests that need the unloaded tier get 503 with Retry-After, in OpenAI shape.
        resp = chat(c, {"model": "teacher", "messages": [{"role": "user", "content": "x"}]})
        assert_openai_error(resp, 503)
        assert resp.headers["retry-after"]


def test_student_failure_escalates_and_both_failing_is_503(tmp_path: Path) -> None:
    from models import BackendUnavailable

    settings = Settings(signal={"path": tmp_path / "s.db", "audit_fraction": 0.0})
    student = FakeBackend(BackendConfig(kind="fake", model="s"))
    teacher = FakeBackend(BackendConfig(kind="fake", model="t"))
    with TestClient(create_app(settings, student=student, teacher=teacher)) as c:
        student.fail_with = BackendUnavailable("student down")
        resp = chat(c, {"messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 200 and resp.headers["x-tiergate-reason"] == "student_error"
        teacher.fail_with = BackendUnavailable("teacher down")
        assert_openai_error(chat(c, {"messages": [{"role": "user", "content": "x"}]}), 503)


def test_openapi_documents_the_chat_body(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert "messages" in chat["required"] and "MessageIn" in schema["components"]["schemas"]


def test_gc_is_tuned_once_tiers_are_up_and_restored_at_shutdown(tmp_path: Path) -> None:
    """gateway/gc_tuning.py: the start-up heap is frozen while serving, released after."""
    before = gc.get_threshold()
    with make_client(tmp_path) as client:
        assert client.get("/health/ready").status_code == 200
        deadline = time.monotonic() + 5
        while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gc.get_freeze_count() > 10_000  # modules, settings, backends
        assert gc.get_threshold()[0] == Settings().runtime.gc_gen0_threshold
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_wrong_method_on_chat_is_405_in_openai_shape(client: TestClient) -> None:
    assert_openai_error(client.get("/v1/chat/completions"), 405)


def test_a_student_versions_routing_floor_raises_the_threshold(client: TestClient) -> None:
    """A version promoted with a routing floor is never routed below it (distill gate)."""
    body = {"messages": [{"role": "user", "content": "easy"}]}
    kept = chat(client, body)
    assert kept.headers["x-tiergate-tier"] == "student" and kept.headers["x-tiergate-threshold"] == "0.5000"
    service = client.app.state.service  # type: ignore[attr-defined]
    service.policies.floors = {kept.headers["x-tiergate-student-version"]: 0.99}
    raised = chat(client, body)
    assert raised.headers["x-tiergate-tier"] == "teacher" and raised.headers["x-tiergate-threshold"] == "0.9900"
    service.policies.floors = {"some-other-version": 0.99}
    assert chat(client, body).headers["x-tiergate-tier"] == "student"


def test_an_oversized_body_is_413_in_openai_shape(tmp_path: Path) -> None:
    with make_client(tmp_path, max_body_bytes=4096) as client:
        big = {"messages": [{"role": "user", "content": "x" * 10_000}]}
        assert assert_openai_error(chat(client, big), 413)["code"] == "request_too_large"

        def chunked() -> Iterator[bytes]:  # no content-length: counted while it streams
            yield b'{"messages": [{"role": "user", "content": "'
            yield b"x" * 10_000
            yield b'"}]}'

        assert_openai_error(client.post("/v1/chat/completions", content=chunked()), 413)
        assert chat(client, {"messages": [{"role": "user", "content": "hi"}]}).status_code == 200


def test_a_bug_is_a_logged_500_never_a_404_or_an_escalation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A KeyError raised by a backend is a bug: 500 with its traceback in the log. It used to
    be a silent 404 (any LookupError), and a student bug used to escalate as student_error."""
    settings = Settings(signal={"path": tmp_path / "s.db", "audit_fraction": 0.0})
    student = FakeBackend(BackendConfig(kind="fake", model="s"))
    teacher = FakeBackend(BackendConfig(kind="fake", model="t"))
    app = create_app(settings, student=student, teacher=teacher)
    with TestClient(app, raise_server_exceptions=False) as c:
        student.fail_with = KeyError("a bug")
        for model in ("tiered", "student"):
            caplog.clear()
            resp = chat(c, {"model": model, "messages": [{"role": "user", "content": "x"}]})
            err = assert_openai_error(resp, 500)
            assert err["type"] == "server_error" and "a bug" not in resp.text  # no internals leak
            bug = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], KeyError)]
            assert bug, "the bug's traceback is logged"
        assert teacher.calls == 0  # never escalated


def test_an_upstream_429_is_a_429_with_its_retry_after(client: TestClient) -> None:
    from models import BackendRateLimited

    teacher = client.app.state.service.tiers["teacher"]  # type: ignore[attr-defined]
    teacher.fail_with = BackendRateLimited("teacher: slow down", retry_after=7.2)
    resp = chat(client, {"model": "teacher", "messages": [{"role": "user", "content": "x"}]})
    err = assert_openai_error(resp, 429)
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert resp.headers["retry-after"] == "8"  # whole seconds, rounded up


def test_401_challenges_bearer_on_the_api_and_basic_on_the_admin_api(tmp_path: Path) -> None:
    with make_client(tmp_path, api_keys=[KEY]) as c:
        data = chat(c, {"messages": [{"role": "user", "content": "x"}]})
        assert data.status_code == 401 and data.headers["www-authenticate"] == 'Bearer realm="tiergate"'
        admin = c.get("/admin/threshold")
        assert admin.status_code == 401 and admin.headers["www-authenticate"] == 'Basic realm="tiergate"'


def test_an_unknown_version_is_404_through_its_own_meaning(client: TestClient) -> None:
    resp = client.post(
        "/admin/student/rollback", json={"version": "v9999"}, headers={"authorization": f"Bearer {ADMIN}"}
    )
    err = assert_openai_error(resp, 404)
    assert err["code"] == "version_not_found"


def test_a_stream_that_fails_after_its_first_byte_logs_the_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from models import BackendUnavailable, GenerationDelta

    class DiesMidStream(FakeBackend):
        async def stream(self, messages: Any, params: Any) -> Any:  # type: ignore[override]
            yield GenerationDelta(text="partial")
            raise BackendUnavailable("teacher died mid-stream")

    settings = Settings(signal={"path": tmp_path / "s.db", "audit_fraction": 0.0})
    fake = BackendConfig(kind="fake", model="f")
    with TestClient(create_app(settings, student=FakeBackend(fake), teacher=DiesMidStream(fake))) as c:
        body = {"model": "teacher", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        resp = chat(c, body)
    assert resp.status_code == 200 and '"error"' in resp.text and resp.text.rstrip().endswith("data: [DONE]")
    logged = [r for r in caplog.records if "failed after start" in r.getMessage()]
    assert logged and logged[0].exc_info is not None and isinstance(logged[0].exc_info[1], BackendUnavailable)
