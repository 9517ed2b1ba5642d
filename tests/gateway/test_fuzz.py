"""Schemathesis fuzzes every operation in the gateway's own OpenAPI document, over real HTTP.

The gateway runs under uvicorn on loopback with both tiers remote (fake OpenAI-compatible
upstreams from tests/fakes.py), so every request it accepts is serialised by models/remote.py
for real: that is where `"seed": 2**70` used to become a 500. Each generated case is sent with
the key its path needs, without a key, and (admin paths) with a data-plane key only; every
response must be documented and match its schema, none may be 5xx, and admin never answers 2xx
without the admin key. Hypothesis runs derandomized, so CI sees the same cases every time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from gateway import Settings, create_app
from gateway.protocol import SEED_MAX, SEED_MIN
from gateway.routes import key_id
from models import BackendConfig, FakeBackend
from router import DEFAULT_TENANT
from tests.fakes import UpstreamScript, fake_upstream
from tests.servers import serve_in_thread

ADMIN = "fuzz-admin-key"
KEY = "fuzz-data-key"
EXAMPLES = 100
CASES: Counter[str] = Counter()  # generated cases per operation label, for the coverage test


def gateway_settings(tmp: Path, student_url: str, teacher_url: str, *, keys: bool = True) -> Settings:
    return Settings(
        server={"admin_api_key": ADMIN, "api_keys": [KEY]} if keys else {},
        student={"kind": "remote", "url": student_url, "model": "auto"},
        teacher={"kind": "remote", "url": teacher_url, "model": "auto"},
        signal={"path": tmp / "signal.db", "audit_fraction": 0.0},
        distill={"label_budget_per_hour": 0},
    )


def openapi_document(*, keys: bool = True) -> dict[str, Any]:
    """The document of an app with the served app's settings (it depends on nothing else)."""
    offline = BackendConfig(kind="fake", model="unused")
    app = create_app(
        gateway_settings(Path("unused"), "http://unused/v1", "http://unused/v1", keys=keys),
        student=FakeBackend(offline),
        teacher=FakeBackend(offline),
    )
    return app.openapi()


schema = schemathesis.openapi.from_dict(openapi_document())


STUDENT = UpstreamScript(name="student-upstream")


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with (
        serve_in_thread(fake_upstream(STUDENT)) as student,
        serve_in_thread(fake_upstream(UpstreamScript(name="teacher-upstream", text="The teacher says so."))) as teacher,
    ):
        app = create_app(gateway_settings(tmp, student + "/v1", teacher + "/v1"))
        with serve_in_thread(app, ready_path="/health/ready") as url:
            yield url


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def _unreachable_target(response: Any) -> bool:
    """A target-quality policy that no threshold meets on the logged traffic is a 400 even when
    well-formed (docs/tuning.md): the fuzzer's empty signal store makes every such target so."""
    return response.status_code == 400 and "no threshold reaches quality" in response.text


def _never_fits_the_key(response: Any) -> bool:
    """A request larger than its key's whole per-minute token limit is a 400 (docs/api.md): the
    fuzzer sets that limit itself through /admin/limits, as low as it likes."""
    return response.status_code == 400 and "tokens per minute; send a shorter prompt" in response.text


def _repeated_query(case: Any) -> bool:
    """`?hours=x&hours=1`: the fuzzer's way of sending a scalar query parameter an array (or an
    object, exploded into repeated keys). FastAPI reads the last value, a reading OpenAPI
    leaves open, so acceptance there breaks no promise."""
    return any(isinstance(v, (list, dict)) for v in (case.query or {}).values())


# About 50-60 s on two shared cores (5,400 requests): over the fast suite's budget, so `slow`.
@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
def test_fuzz(case: Any, gateway_url: str, session: requests.Session) -> None:
    CASES[case.operation.label] += 1
    admin = case.path.startswith("/admin/")
    keys = {"admin key" if admin else "data key": ADMIN if admin else KEY, "no key": None}
    if admin:
        keys["data key on admin"] = KEY
    for label, key in keys.items():
        headers = {"authorization": f"Bearer {key}"} if key else {}
        response = case.call(base_url=gateway_url, session=session, headers=headers)
        refused = _unreachable_target(response) or _never_fits_the_key(response)
        excluded = [positive_data_acceptance] if refused else []
        if _repeated_query(case):
            excluded.append(negative_data_rejection)
        case.validate_response(
            response, headers=headers, excluded_checks=excluded, transport_kwargs={"base_url": gateway_url}
        )
        if admin and key != ADMIN:
            assert not 200 <= response.status_code < 300, f"{label}: {case.operation.label} answered 2xx"


@pytest.mark.slow
def test_every_operation_was_fuzzed_with_enough_cases() -> None:
    """After the fuzz cases (file order): all operations ran, and each one with any input (a
    parameter, a body or a key) got at least EXAMPLES cases. The four GETs without any input
    (/health*, /metrics) get the few cases the coverage phase makes: nothing else varies."""
    if not CASES:
        pytest.skip("the fuzz cases were deselected in this run")
    operations = {op.ok().label: op.ok().definition.raw for op in schema.get_all_operations()}
    assert set(CASES) == set(operations)
    with_input = [label for label, op in operations.items() if {"parameters", "requestBody", "security"} & set(op)]
    assert len(with_input) == len(operations) - 4
    assert {label: CASES[label] for label in with_input if CASES[label] < EXAMPLES} == {}


@pytest.fixture
def no_limits(gateway_url: str, session: requests.Session) -> None:
    """The fuzz cases set limits through /admin/limits (a 3-token minute, say): lift them."""
    off = {"requests_per_minute": 0, "tokens_per_minute": 0, "teacher_calls_per_minute": 0, "teacher_usd_per_day": 0}
    for tenant in (DEFAULT_TENANT, key_id(KEY)):
        resp = session.put(
            gateway_url + "/admin/limits", json={"tenant": tenant, **off}, headers={"authorization": f"Bearer {ADMIN}"}
        )
        assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("seed", [SEED_MIN, SEED_MAX])
@pytest.mark.usefixtures("no_limits")
def test_a_64_bit_seed_reaches_the_remote_tier(gateway_url: str, session: requests.Session, seed: int) -> None:
    body = {"model": "student", "messages": [{"role": "user", "content": "hi"}], "seed": seed}
    resp = session.post(gateway_url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert resp.status_code == 200, resp.text
    assert STUDENT.requests[-1]["seed"] == seed


@pytest.mark.parametrize("seed", [2**70, SEED_MAX + 1, SEED_MIN - 1])
@pytest.mark.usefixtures("no_limits")
def test_a_seed_past_64_bits_is_a_400_not_a_500(gateway_url: str, session: requests.Session, seed: int) -> None:
    """The probe's 500: orjson could not serialise 2**70 for the remote tier."""
    sent = len(STUDENT.requests)
    body = {"model": "student", "messages": [{"role": "user", "content": "hi"}], "seed": seed}
    resp = session.post(gateway_url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "seed"
    assert len(STUDENT.requests) == sent


@pytest.mark.parametrize("keys", [True, False])
def test_the_document_promises_400_never_422_and_the_auth_of_the_deployment(keys: bool) -> None:
    doc = openapi_document(keys=keys)
    operations = [(path, op) for path, ops in doc["paths"].items() for op in ops.values()]
    assert all("422" not in op["responses"] for _, op in operations)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, op in operations:
        for status, response in op["responses"].items():
            if int(status) >= 400 and not path.startswith("/health"):
                assert response["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"
                }
        auth = {s for s in ("401", "403") if s in op["responses"]}
        if path.startswith("/admin/"):
            assert auth == ({"401"} if keys else {"403"}), path
        else:
            assert auth == ({"401"} if keys and path.startswith("/v1/") else set()), path


def test_the_document_states_the_enforced_ranges() -> None:
    schemas = openapi_document()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["seed"]["anyOf"][0] == {"type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX}
    assert chat["stop"]["anyOf"][1]["maxItems"] == 4
    assert chat["max_tokens"]["anyOf"][0]["maximum"] == chat["max_completion_tokens"]["anyOf"][0]["maximum"] == 1024
    assert chat["messages"]["maxItems"] == 256


@pytest.mark.parametrize("query", ["/admin/whatif?hours=nan", "/admin/timeline?bucket_s=inf"])
def test_a_window_that_is_not_finite_is_a_400(gateway_url: str, session: requests.Session, query: str) -> None:
    """NaN would reach the answer's JSON, which cannot carry it; the fuzzer's store is empty, so
    this is pinned by hand."""
    resp = session.get(gateway_url + query, headers={"authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].startswith("query.")
