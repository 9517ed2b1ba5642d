"""A floor raised outside the gateway (the loop's live-audit check, or a trainer in another
process) reaches routing within about a second, without a swap or a restart."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from distill_loop import BASE, Registry, RoutingState
from gateway import Settings, create_app
from tests.servers import serve_in_thread


def test_a_raised_floor_applies_without_a_swap(tiny_model_dir: Path, teacher_url: str, tmp_path: Path) -> None:
    settings = Settings(
        student={"kind": "local", "model": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
        teacher={"kind": "remote", "url": teacher_url, "model": "auto"},
        router={"threshold": 0.0},  # never escalate, until the version's floor says otherwise
        signal={"path": tmp_path / "s.db", "audit_fraction": 0.0},
        distill={"registry_dir": tmp_path / "registry", "enabled": False, "label_budget_per_hour": 0},
    )
    body = {"messages": [{"role": "user", "content": "refund?"}], "max_tokens": 4}
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url, httpx.Client(base_url=url) as client:
        first = client.post("/v1/chat/completions", json=body)
        assert first.headers["x-tiergate-tier"] == "student" and float(first.headers["x-tiergate-threshold"]) == 0.0
        # What the loop's live-audit check does when audits fall below the quality target.
        Registry(tmp_path / "registry").save_routing_state(BASE, RoutingState(floor=1.0))
        deadline = time.monotonic() + 10
        while True:
            r = client.post("/v1/chat/completions", json=body)
            if r.headers["x-tiergate-tier"] == "teacher":
                break
            assert time.monotonic() < deadline, "the raised floor never reached routing"
            time.sleep(0.2)
        assert float(r.headers["x-tiergate-threshold"]) == 1.0 and r.headers["x-tiergate-escalated"] == "true"
        assert r.headers["x-tiergate-student-version"] == BASE  # no swap happened
