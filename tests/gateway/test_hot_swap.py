"""Hot-swap under load through the real HTTP API: several swaps while concurrent requests
run; zero failed requests, and every response names a version that was serving while it ran."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from distill_loop import Registry, VersionMeta
from gateway import Settings, create_app
from tests.fakes import make_adapter
from tests.servers import serve_in_thread

ADMIN = "admin-key"


def test_swaps_under_concurrent_load_fail_nothing(tiny_model_dir: Path, teacher_url: str, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    versions = ["v0001", "v0002", "v0003"]
    for i, name in enumerate(versions):
        adapter = make_adapter(tiny_model_dir, tmp_path / f"a{i}", seed=i)
        registry.add(name, adapter, VersionMeta(name=name, parent="base", created_at=time.time()))
    settings = Settings(
        server={"admin_api_key": ADMIN},
        student={"kind": "local", "model": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
        teacher={"kind": "remote", "url": teacher_url, "model": "auto"},
        router={"threshold": 0.0},  # never escalate: every answer comes from the student
        signal={"path": tmp_path / "s.db", "audit_fraction": 0.0},
        distill={"registry_dir": tmp_path / "registry", "enabled": False},
    )
    results: list[tuple[float, float, int, str]] = []
    swaps: list[tuple[float, float, str]] = []  # (call start, call end, version now serving)
    stop = threading.Event()

    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:

        def client_loop(i: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    r = c.post(
                        "/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": f"refund {i}"}], "max_tokens": 12},
                    )
                    results.append(
                        (t0, time.monotonic(), r.status_code, r.headers.get("x-tiergate-student-version", ""))
                    )

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
        start = time.monotonic()
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, timeout=60, headers={"authorization": f"Bearer {ADMIN}"}) as admin:
            for target in versions * 2:
                time.sleep(0.4)
                t0 = time.monotonic()
                r = admin.post("/admin/student/rollback", json={"version": target})
                assert r.status_code == 200, r.text
                assert r.json()["serving"] == target
                swaps.append((t0, time.monotonic(), target))
            time.sleep(0.4)
        stop.set()
        for t in threads:
            t.join()
        metrics = httpx.get(url + "/metrics").text

    assert len(results) > 30
    assert {status for *_, status, _ in results} == {200}, "a request failed during a swap"
    # Serving intervals: the initial version until the first swap returned; then each swapped-in
    # version from the start of its swap call until the next swap call returned.
    intervals = [(start, swaps[0][1], "base")]
    for k, (t0, _, version) in enumerate(swaps):
        end = swaps[k + 1][1] if k + 1 < len(swaps) else float("inf")
        intervals.append((t0, end, version))
    for t0, t1, _, version in results:
        assert any(v == version and a <= t1 and t0 <= b for a, b, v in intervals), (version, t0, t1)
    seen = {v for *_, v in results}
    assert len(seen & set(versions)) >= 2  # traffic really was served by several versions
    assert "tiergate_student_swaps_total 6.0" in metrics
    assert 'tiergate_student_rollbacks_total{trigger="manual"} 6.0' in metrics
    assert "tiergate_student_info{model=" in metrics and 'version="v0003"' in metrics
