"""The loop running inside the gateway: escalations arrive over HTTP, the background loop
trains and gates a candidate, the gateway hot-swaps it, and responses name the new version."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from distill_loop import BASE, Registry
from gateway import Settings, create_app
from tests.fakes import INTENTS, TEMPLATES, UpstreamScript
from tests.servers import serve_in_thread

ADMIN = "admin-key"


@pytest.fixture
def teacher_script() -> UpstreamScript:
    return UpstreamScript(name="teacher-upstream", text=INTENTS["refund"])


def test_background_loop_promotes_and_the_gateway_serves_it(
    tiny_model_dir: Path, teacher_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        server={"admin_api_key": ADMIN},
        student={"kind": "local", "model": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
        teacher={"kind": "remote", "url": teacher_url, "model": "auto"},
        router={"threshold": 0.99},  # the untrained tiny student escalates everything
        signal={"path": tmp_path / "s.db", "audit_fraction": 0.0},
        distill={
            "registry_dir": tmp_path / "registry",
            "trigger_records": 16,
            "poll_s": 0.2,
            "holdout_fraction": 0.25,
            "losses": {"error_correction": False},
            "lora": {"r": 8, "alpha": 16, "lr": 2e-2, "epochs": 40, "batch_size": 8, "max_steps": 150},
            # 20 prompts: about 5 held out, too few for the sign test
            "gate": {"max_new_tokens": 12, "min_heldout": 4, "max_p_value": 1.0},
        },
    )
    with (
        serve_in_thread(create_app(settings), ready_path="/health/ready") as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        for i in range(20):
            word = ["refund", "money back", "return", "reimbursement"][i // 8]  # 20 distinct prompts
            r = client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": TEMPLATES[i % 8].format(w=word)}], "max_tokens": 12},
            )
            assert r.status_code == 200 and r.headers["x-tiergate-tier"] == "teacher"
            assert r.headers["x-tiergate-student-version"] == "base"
        deadline = time.monotonic() + 240
        admin = {"authorization": f"Bearer {ADMIN}"}
        while client.get("/admin/student/versions", headers=admin).json()["serving"] != "v0001":
            assert time.monotonic() < deadline, client.get("/metrics").text
            time.sleep(0.5)
        r = client.post(
            "/v1/chat/completions",
            json={"model": "student", "messages": [{"role": "user", "content": "refund please"}], "max_tokens": 12},
        )
        assert r.headers["x-tiergate-student-version"] == "v0001"
        assert r.json()["model"].endswith("@v0001")
        metrics = client.get("/metrics").text
        versions = client.get("/admin/student/versions", headers=admin).json()
    assert 'tiergate_distill_runs_total{result="promoted"} 1.0' in metrics
    assert 'tiergate_distill_gate_total{reason="passed",result="pass"} 1.0' in metrics
    assert "tiergate_student_swaps_total 1.0" in metrics
    assert "tiergate_student_info{model=" in metrics and 'version="v0001"' in metrics
    (meta,) = versions["versions"]
    assert meta["name"] == "v0001" and meta["parent"] == "base" and meta["gate"]["passed"]
    # the gate replayed the gateway's own routing rule on the held-out drafts
    assert meta["gate"]["routed_candidate"]["n"] == meta["gate"]["n_heldout"] > 0
    # held to the quality target: the floor is the lowest threshold whose served-agreement lower
    # bound meets it on the held-out items, and routing never goes below the configured 0.99
    gate = meta["gate"]
    assert gate["quality_target"] == 0.95 and gate["floor_candidate"]["quality_lower"] >= 0.95
    assert gate["routing_threshold"] == gate["floor_candidate"]["threshold"]
    assert gate["heldout_sources"] == {"escalation": gate["n_heldout"]}
    assert meta["data_window"]["new_records"] >= 16  # 20 distinct escalations, some held out
    # The same run measured the base model it replaced: from then on it too had a floor.
    base = Registry(tmp_path / "registry").routing_state(BASE)
    assert len(base.evidence) == gate["n_heldout"] and base.floor == gate["floor_serving"]["threshold"]
