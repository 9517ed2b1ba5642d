"""Graceful shutdown of a real `python -m gateway` process: SIGTERM while escalations are in
flight. Every accepted request completes and every escalation record is on disk afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from distill_loop import read_samples
from tests.fakes import UpstreamScript
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_drains_requests_and_flushes_the_signal_log(
    student_url: str, teacher_url: str, teacher_script: UpstreamScript, tmp_path: Path
) -> None:
    teacher_script.delay_s = 1.5  # escalations are still waiting on the teacher at SIGTERM
    port = free_port()
    db = tmp_path / "signal.db"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")},
        "TIERGATE_SIGNAL__PATH": str(db),
        "TIERGATE_SIGNAL__AUDIT_FRACTION": "0",
        "TIERGATE_RUNTIME__LOG_LEVEL": "WARNING",
    }
    log = (tmp_path / "gateway.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "--port",
            str(port),
            "--threshold",
            "0.5",
            "--student-url",
            student_url,
            "--teacher-url",
            teacher_url,
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)

        def escalate(i: int) -> httpx.Response:
            return httpx.post(
                url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": f"HARD question {i}"}], "max_tokens": 50},
                timeout=30,
            )

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(escalate, i) for i in range(8)]
            time.sleep(0.7)  # all eight are in flight, waiting on the slow teacher
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.headers["x-tiergate-tier"] == "teacher" for r in responses)
    ids = {r.headers["x-request-id"] for r in responses}
    assert {s.id for s in read_samples(db)} == ids  # no acknowledged escalation lost
