"""Per-tenant policies, dry runs, target quality, the audit trail and calibration refits,
through the admin API over logged records."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from distill_loop import Registry, read_samples
from gateway import Settings, create_app
from models import BackendConfig, ChatMessage, FakeBackend, Scripted

ADMIN = "tune-admin"
AUTH = {"authorization": f"Bearer {ADMIN}"}
KEYS = ["tenant-a-key", "tenant-b-key"]


def student_reply(messages: tuple[ChatMessage, ...]) -> Scripted:
    k = int(re.findall(r"\d+", messages[-1].content)[0])
    return Scripted("refunds take five days" if k % 3 else "no idea", -3.0 + 3.0 * (k % 40) / 40)


def make(tmp_path: Path, **tuning: object) -> TestClient:
    settings = Settings(
        server={"admin_api_key": ADMIN, "api_keys": KEYS},
        router={"threshold": 0.3},
        signal={"path": tmp_path / "s.db", "audit_fraction": 1.0},
        distill={"registry_dir": tmp_path / "registry"},
        tuning=tuning,
    )
    student = FakeBackend(BackendConfig(kind="fake", model="s"), student_reply)
    teacher = FakeBackend(BackendConfig(kind="fake", model="t"), lambda _m: Scripted("refunds take five days"))
    return TestClient(create_app(settings, student=student, teacher=teacher))


def traffic(c: TestClient, n: int = 80, key: str = KEYS[0]) -> list[dict[str, str]]:
    out = []
    for k in range(n):
        r = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": f"q{k}"}]},
            headers={"authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200
        out.append(dict(r.headers))
    assert c.app.state.service.store.flush()  # type: ignore[attr-defined]
    return out


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with make(tmp_path) as c:
        traffic(c)
        yield c


def test_whatif_curve_and_current_point(client: TestClient) -> None:
    data = client.get("/admin/whatif", headers=AUTH).json()
    assert data["samples"] == 80 and len(data["curve"]) == 51
    rates = [p["escalation_rate"] for p in data["curve"]]
    assert rates[0] == 0.0 and rates[-1] == 1.0 and rates == sorted(rates)
    assert data["current"]["threshold"] == 0.3
    assert 0.0 < data["current"]["cost_vs_teacher"] < 1.0


def test_dry_run_changes_nothing(client: TestClient) -> None:
    r = client.post("/admin/policy/dry-run", json={"kind": "fixed", "threshold": 0.8}, headers=AUTH).json()
    assert r["predicted"]["escalation_rate"] > r["current"]["escalation_rate"]
    assert client.get("/admin/threshold", headers=AUTH).json()["threshold"] == 0.3
    assert client.get("/admin/policy/audit", headers=AUTH).json()["audit"] == []


def test_target_quality_picks_a_threshold_meeting_the_bound(client: TestClient) -> None:
    r = client.put("/admin/policy", json={"kind": "target_quality", "quality": 0.8}, headers=AUTH).json()
    assert r["policy"]["kind"] == "target_quality" and r["predicted"]["quality_lower"] >= 0.8
    assert r["policy"]["quality"] == 0.8
    assert client.put("/admin/policy", json={"kind": "target_quality", "quality": 1.0}, headers=AUTH).status_code == 400


def test_per_tenant_policy_is_audited_and_applies_to_that_tenant_only(client: TestClient) -> None:
    tenant_a = traffic(client, 1)[0]
    assert client.get("/admin/policy/audit", headers=AUTH).json()["audit"] == []
    a = "key-" + hashlib.sha256(KEYS[0].encode()).hexdigest()[:12]  # tenants are API-key ids
    r = client.put("/admin/policy", json={"tenant": a, "kind": "fixed", "threshold": 0.95}, headers=AUTH)
    assert r.status_code == 200 and r.json()["previous"] is None
    assert float(traffic(client, 1, KEYS[0])[0]["x-tiergate-threshold"]) == 0.95
    assert float(traffic(client, 1, KEYS[1])[0]["x-tiergate-threshold"]) == 0.3
    assert tenant_a["x-tiergate-threshold"] == "0.3000"
    (entry,) = client.get("/admin/policy/audit", headers=AUTH).json()["audit"]
    assert entry["tenant"] == a and entry["old"] is None and entry["new"]["threshold"] == 0.95
    assert entry["actor"].startswith("key-") and ADMIN not in json.dumps(entry)
    assert client.get("/admin/policy", headers=AUTH).json()["policies"][a]["threshold"] == 0.95


def test_target_rate_policy_holds_the_rate_on_live_traffic(tmp_path: Path) -> None:
    with make(tmp_path) as c:
        r = c.put("/admin/policy", json={"kind": "target_rate", "rate": 0.25, "window": 40}, headers=AUTH)
        assert r.status_code == 200
        headers = traffic(c, 200)
    escalated = [h["x-tiergate-escalated"] == "true" for h in headers[40:]]
    assert abs(sum(escalated) / len(escalated) - 0.25) <= 0.05


def test_a_target_rate_policy_without_traffic_starts_at_the_configured_threshold(tmp_path: Path) -> None:
    with make(tmp_path) as c:
        r = c.put("/admin/policy", json={"kind": "target_rate", "rate": 0.25}, headers=AUTH)
        assert r.status_code == 200 and r.json()["policy"]["threshold"] == 0.3  # not a made-up constant
        assert float(traffic(c, 1)[0]["x-tiergate-threshold"]) == 0.3


def test_policy_requests_are_validated(client: TestClient) -> None:
    assert client.put("/admin/policy", json={"kind": "fixed"}, headers=AUTH).status_code == 400
    assert client.put("/admin/policy", json={"kind": "magic"}, headers=AUTH).status_code == 400
    assert client.put("/admin/policy", json={"kind": "fixed", "threshold": 0.5}).status_code == 401


def test_calibration_refits_is_stored_with_the_version_and_survives_a_restart(tmp_path: Path) -> None:
    with make(tmp_path, calibrate=True) as c:
        traffic(c, 120)
        tuning = c.app.state.tuning  # type: ignore[attr-defined]
        report = tuning.refit("base")
        assert report["calibrator"]["method"] == "platt" and report["samples"] == 120
        assert c.app.state.service.router.calibrator.method == "platt"  # type: ignore[attr-defined]
        headers = traffic(c, 1)[0]
    assert 0.0 <= float(headers["x-tiergate-confidence"]) <= 1.0
    # Kept as the version's routing state in the registry, beside (not inside) the version.
    stored = Registry(tmp_path / "registry").routing_state("base").calibrator
    assert stored.to_json() == report["calibrator"]
    with make(tmp_path, calibrate=True) as c:  # a restart routes with the same calibration
        router = c.app.state.service.router  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while router.calibrator != stored and time.monotonic() < deadline:
            time.sleep(0.05)
        assert router.calibrator == stored


def test_cli_prints_a_table_writes_a_png_and_dry_runs(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    with make(tmp_path) as c:
        traffic(c, 60)
    env = {**os.environ, "TIERGATE_SIGNAL__PATH": str(tmp_path / "s.db"), "TIERGATE_SIGNAL__AUDIT_FRACTION": "1.0"}
    png = tmp_path / "curve.png"
    out = subprocess.run(
        [sys.executable, "-m", "gateway.tune", "whatif", "--png", str(png)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "60 logged requests" in out.stdout and "current" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    dry = subprocess.run(
        [sys.executable, "-m", "gateway.tune", "dry-run", "--kind", "target_rate", "--rate", "0.5"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    result = json.loads(dry.stdout)
    assert result["policy"]["kind"] == "target_rate" and abs(result["predicted"]["escalation_rate"] - 0.5) < 0.1


def test_learned_router_refits_from_records_and_skips_the_student_on_hard_prompts(tmp_path: Path) -> None:
    def reply(messages: tuple[ChatMessage, ...]) -> Scripted:
        hard = "order" in messages[-1].content
        return Scripted("no idea" if hard else "refunds take five days", -2.5 if hard else -0.1)

    settings = Settings(
        server={"admin_api_key": ADMIN},
        router={"threshold": 0.3},
        signal={"path": tmp_path / "s.db", "audit_fraction": 1.0},
        distill={"registry_dir": tmp_path / "registry"},
        tuning={"learned_router": True, "skip_student_above": 0.8},
    )
    student = FakeBackend(BackendConfig(kind="fake", model="s"), reply)
    teacher = FakeBackend(BackendConfig(kind="fake", model="t"), lambda _m: Scripted("refunds take five days"))
    with TestClient(create_app(settings, student=student, teacher=teacher)) as c:
        for k in range(60):
            text = f"where is order {10000 + k} now?" if k % 2 else f"hello {k}"
            assert (
                c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]}).status_code
                == 200
            )
        assert c.app.state.service.store.flush()  # type: ignore[attr-defined]
        report = c.app.state.tuning.refit("base")  # type: ignore[attr-defined]
        assert report["learned_router"] is True
        drafts_before = student.calls
        hard = c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "where is order 55555 now?"}]}
        )
        assert hard.headers["x-tiergate-reason"] == "predicted_hard" and hard.headers["x-tiergate-tier"] == "teacher"
        assert student.calls == drafts_before  # the student never drafted
        easy = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello 99"}]})
        assert easy.headers["x-tiergate-tier"] == "student" and easy.json()["tiergate"]["scorer"] == "learned"
        metrics = c.get("/metrics").text
    assert 'tiergate_escalations_total{reason="predicted_hard"} 1.0' in metrics


class EvenDraws(random.Random):
    """Audit draws spread evenly over [0, 1): of every 20 confident requests, exactly
    20 * audit_fraction are audited, so a weighted estimate can be checked exactly."""

    def __init__(self) -> None:
        super().__init__(0)
        self.n = 0

    def random(self) -> float:
        self.n += 1
        return ((self.n - 1) % 20 + 0.5) / 20


def test_whatif_weights_each_audit_by_the_fraction_it_was_sampled_at(tmp_path: Path) -> None:
    def reply(messages: tuple[ChatMessage, ...]) -> Scripted:
        hard = messages[-1].content.startswith("hard")
        return Scripted("no idea" if hard else "refunds take five days", -3.0 if hard else -0.1)

    def gateway(**signal: object) -> TestClient:
        settings = Settings(
            server={"admin_api_key": ADMIN},
            router={"threshold": 0.3},
            signal={"path": tmp_path / "s.db", **signal},
            # No active labels: their budget refills with time, so a slow run made one more record.
            distill={"registry_dir": tmp_path / "registry", "label_budget_per_hour": 0},
        )
        student = FakeBackend(BackendConfig(kind="fake", model="s"), reply)
        teacher = FakeBackend(BackendConfig(kind="fake", model="t"), lambda _m: Scripted("refunds take five days"))
        return TestClient(create_app(settings, student=student, teacher=teacher))

    escalated: list[bool] = []
    # One gateway audits 1 in 5 confident requests, a later one on the same database 1 in 20.
    for fraction, hard, easy in ((0.2, 20, 60), (0.05, 60, 120)):
        with gateway(audit_fraction=fraction) as c:
            c.app.state.service._rng = EvenDraws()  # type: ignore[attr-defined]
            for k in range(hard + easy):
                text = f"hard {k}" if k < hard else f"easy {k}"
                r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]})
                escalated.append(r.headers["x-tiergate-escalated"] == "true")
    records = list(read_samples(tmp_path / "s.db"))
    assert sorted({(s.kind, s.sampling_weight) for s in records}) == [
        ("audit", 5.0),
        ("audit", 20.0),
        ("escalation", 1.0),
    ]
    assert len(records) == 20 + 60 + 60 // 5 + 120 // 20
    true_rate = sum(escalated) / len(escalated)  # 80 of 260
    # Read by a process at the default fraction (0.05), as `python -m gateway.tune` would be.
    # Weighting every audit by the reader's fraction would say 80 / (80 + 18 * 20) = 18%.
    with gateway() as reader:
        current = reader.get("/admin/whatif", headers=AUTH).json()["current"]
        tuning = reader.app.state.tuning  # type: ignore[attr-defined]
        audit = next(s for s in records if s.sampling_weight == 5.0)
        assert tuning.weight(audit) == 5.0
        assert tuning.weight(dataclasses.replace(audit, sampling_weight=None)) == 20.0  # a pre-v4 row
    assert current["threshold"] == 0.3
    assert current["escalation_rate"] == pytest.approx(true_rate) == pytest.approx(80 / 260)


def test_the_prefix_scorer_refits_on_full_drafts_and_is_stored_with_the_version(tmp_path: Path) -> None:
    with make(tmp_path) as c:  # audits on every confident answer, and the audited slice of early escalations
        traffic(c, 120)
        service = c.app.state.service  # type: ignore[attr-defined]
        assert not service.router.prefix.fitted  # the prior decides until a refit
        report = c.app.state.tuning.refit("base")  # type: ignore[attr-defined]
        assert report["prefix"] is not None and report["prefix"]["n"] >= 30
        assert service.router.prefix.fitted
        early = c.get("/admin/whatif", headers=AUTH).json()["early"]  # the early policy beside the full one
        assert early["samples"] > 0 and 0.0 <= early["agreement"] <= 1.0 and early["curve"]
        headers = traffic(c, 1)[0]
    assert headers["x-tiergate-decided-by"] in ("prefix", "full_draft")
    stored = Registry(tmp_path / "registry").routing_state("base").prefix
    assert stored.to_json() == report["prefix"]
    records = read_samples(tmp_path / "s.db")
    # Every record keeps the prefix decision beside the whole draft's, where the draft ran to its end.
    both = [s for s in records if "prefix_confidence" in s.features and s.features.get("full_draft") == 1.0]
    assert both and all(s.confidence is not None for s in both)
    with make(tmp_path) as c:  # a restart routes with the same prefix scorer
        router = c.app.state.service.router  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while router.prefix != stored and time.monotonic() < deadline:
            time.sleep(0.05)
        assert router.prefix == stored
