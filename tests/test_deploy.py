"""The GPU docker-compose file: structure, shared volumes, and that the gateway and trainer
environments load through our real Settings (so every variable is a real key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "docker-compose.gpu.yml"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_services_images_and_gpus() -> None:
    services = compose()["services"]
    assert {"vllm-student", "vllm-teacher", "gateway", "trainer", "prometheus"} <= set(services)
    for name in ("vllm-student", "vllm-teacher"):
        assert services[name]["image"].startswith("vllm/vllm-openai:")
    for name in ("vllm-student", "vllm-teacher", "trainer"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["trainer"]["command"] == ["python", "-m", "distill_loop", "run"]
    assert services["gateway"]["build"]["dockerfile"] == "Dockerfile" and (ROOT / "Dockerfile").exists()
    assert services["vllm-student"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--enable-lora" in services["vllm-student"]["command"]


def test_adapters_volume_is_shared_at_the_same_path() -> None:
    services = compose()["services"]
    assert "data" in compose()["volumes"]

    def mounts(name: str) -> dict[str, str]:
        return {v.split(":")[0]: v.split(":")[1] for v in services[name]["volumes"]}

    # The gateway sends vLLM the registry path it sees; vLLM must see the same path.
    assert mounts("gateway")["data"] == mounts("trainer")["data"] == mounts("vllm-student")["data"] == "/data"
    registry = services["gateway"]["environment"]["TIERGATE_DISTILL__REGISTRY_DIR"]
    assert registry.startswith("/data/")
    for ref in ("./transcript.jinja", "./prometheus.yml"):
        assert (COMPOSE.parent / ref).exists()


@pytest.mark.parametrize("service", ["gateway", "trainer"])
def test_environment_loads_through_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = compose()["services"][service]["environment"]
    for key, value in env.items():
        if str(value).startswith("${"):
            value = "test-admin-key"
        monkeypatch.setenv(key, str(value))
    s = load_settings()
    assert s.student.kind == "remote" and s.teacher.kind == "remote"
    services = compose()["services"]
    for tier, svc in (("student", "vllm-student"), ("teacher", "vllm-teacher")):
        cfg = getattr(s, tier)
        command = services[svc]["command"]
        assert cfg.url == f"http://{svc}:8000/v1" and "--port=8000" in command
        assert f"--served-model-name={cfg.model}" in command
    assert s.distill.student_base and f"--model={s.distill.student_base}" in services["vllm-student"]["command"]
    assert s.signal.teacher_top_logprobs == 20 and "--max-logprobs=20" in services["vllm-teacher"]["command"]


def test_prometheus_scrapes_the_gateway() -> None:
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    port = compose()["services"]["gateway"]["environment"]["TIERGATE_SERVER__PORT"]
    assert f"gateway:{port}" in targets
