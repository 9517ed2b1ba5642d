"""A gateway whose tiers are both remote never imports torch, transformers, peft or vLLM, nor
numpy and scikit-learn while calibration and the learned router are off (the defaults).

The pytest process has torch loaded already, so each gateway starts in a fresh interpreter: it
serves the real app under uvicorn, answers one chat completion through the `openai` SDK from the
fast fake upstream (bench/upstream.py, its own process), then reports which heavy packages
`sys.modules` holds after start-up and after that request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
# What a remote-only gateway with default tuning must not load. numpy alone was 13.7 MiB of RSS.
NEVER = {"torch", "transformers", "peft", "vllm", "numpy", "sklearn"}

# Runs in the fresh interpreter: argv = upstream URL, data folder, loop on ("1") or off ("0").
CHILD = """
import json, sys
from pathlib import Path

import openai

from gateway import create_app
from gateway.settings import cli_overrides, load_settings
from tests.servers import serve_in_thread

url, data, loop = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
WATCHED = set(json.loads(sys.argv[4]))


def loaded():
    return sorted(WATCHED & {name.partition(".")[0] for name in sys.modules})


overrides = cli_overrides(base=load_settings(), student_url=url, teacher_url=url)
settings = load_settings(
    **overrides,
    signal={"path": data / "signal.db"},
    distill={"registry_dir": data / "registry", "enabled": loop},
    tuning={"policy_db": data / "policy.db"},
)
assert settings.student.kind == settings.teacher.kind == "remote"
with serve_in_thread(create_app(settings), ready_path="/health/ready", timeout=30) as base:
    after_start = loaded()
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="tiered", messages=[{"role": "user", "content": "Can I change my address?"}], max_tokens=8
    )
    after_request = loaded()
answer = reply.choices[0].message.content
print(json.dumps({"answer": answer, "after_start": after_start, "after_request": after_request}))
"""


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}


@pytest.fixture(scope="module")
def upstream_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "upstream.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.upstream", "--port", str(port)],
            cwd=ROOT,
            env=clean_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base + "/health", log, timeout=20, poll_s=0.05)
        yield base + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("loop", [True, False], ids=["loop-on-by-default", "loop-off"])
def test_a_remote_only_gateway_never_imports_torch(upstream_url: str, tmp_path: Path, loop: bool) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, upstream_url, str(tmp_path), "1" if loop else "0", json.dumps(sorted(NEVER))],
        cwd=ROOT,  # `-c` puts the working directory on sys.path, so `tests.servers` imports
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["answer"], "the chat completion came back empty"
    assert not NEVER & set(report["after_start"]), f"imported by start-up: {report['after_start']}"
    assert not NEVER & set(report["after_request"]), f"imported by the first request: {report['after_request']}"
