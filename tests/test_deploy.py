"""The GPU docker-compose file and its HAProxy config: structure, shared volumes and database,
that every gateway replica and the trainer load their environment through our real Settings
(so every variable is a real key), and that the load balancer health-checks a path the real
app serves."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi.testclient import TestClient

from bench.haproxy import CONFIG as HAPROXY_CFG
from bench.haproxy import health_check, sections, servers
from gateway import Settings, create_app
from gateway.settings import load_settings
from models import BackendConfig, FakeBackend

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "docker-compose.gpu.yml"
# What `docker compose` would substitute for the file's required variables.
VARIABLES = {"TIERGATE_ADMIN_KEY": "test-admin-key", "TIERGATE_DB_PASSWORD": "test-db-password"}


def interpolate(text: str) -> str:
    """Compose's substitution of `${NAME}`, `${NAME:?message}` and `$$`, from VARIABLES."""

    def sub(m: re.Match[str]) -> str:
        return "$" if m.group(0) == "$$" else VARIABLES[m.group(1)]

    return re.sub(r"\$\$|\$\{(\w+)(?::?[?-][^}]*)?\}", sub, text)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE.read_text()))
    return data


def gateways() -> list[str]:
    """The services that run `python -m gateway`: built from our Dockerfile, whose CMD it is."""
    return [name for name, s in compose()["services"].items() if "build" in s and "command" not in s]


def settings_of(service: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The service's settings, from its environment alone (the Dockerfile's ENV aside)."""
    for key in [k for k in os.environ if k.startswith("TIERGATE_")]:
        monkeypatch.delenv(key)
    for key, value in compose()["services"][service]["environment"].items():
        monkeypatch.setenv(key, str(value))
    return load_settings()


def test_services_images_and_gpus() -> None:
    services = compose()["services"]
    assert gateways() == ["gateway-1", "gateway-2"]
    assert {"vllm-student", "vllm-teacher", "trainer", "postgres", "lb", "prometheus"} <= set(services)
    for name in ("vllm-student", "vllm-teacher"):
        assert services[name]["image"].startswith("vllm/vllm-openai:")
    for name in ("vllm-student", "vllm-teacher", "trainer"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["trainer"]["command"] == ["python", "-m", "distill_loop", "run"]
    for name in gateways():
        assert services[name]["build"]["dockerfile"] == "Dockerfile" and (ROOT / "Dockerfile").exists()
    assert 'CMD ["python", "-m", "gateway"]' in (ROOT / "Dockerfile").read_text()
    assert services["vllm-student"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--enable-lora" in services["vllm-student"]["command"]


def test_replicas_differ_only_in_their_spill_file() -> None:
    services = compose()["services"]
    first, second = (services[name] for name in gateways())
    assert {**first, "environment": None} == {**second, "environment": None}
    env1, env2 = first["environment"], second["environment"]
    differing = {k for k in env1.keys() | env2.keys() if env1.get(k) != env2.get(k)}
    # Spilled records are replayed by whoever starts next on that file: one file per replica.
    assert differing == {"TIERGATE_SIGNAL__SPILL_PATH"}
    assert all("ports" not in services[name] for name in gateways()), "clients go through the load balancer"


def test_postgres_is_one_healthy_database_for_every_process(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    db = services["postgres"]
    assert db["image"] == "postgres:15" and "pgdata" in compose()["volumes"]
    assert db["volumes"] == ["pgdata:/var/lib/postgresql/data"]
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    for name in (*gateways(), "trainer"):
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}, name
    urls = {services[name]["environment"]["TIERGATE_SIGNAL__URL"] for name in (*gateways(), "trainer")}
    (url,) = urls
    loaded = {settings_of(name, monkeypatch).signal.url for name in (*gateways(), "trainer")}
    assert loaded == {url}
    parts, env = urlsplit(url), db["environment"]
    assert (parts.scheme, parts.hostname, parts.port) == ("postgresql", "postgres", 5432)
    assert (parts.username, parts.password, parts.path) == (
        env["POSTGRES_USER"],
        env["POSTGRES_PASSWORD"],
        "/" + env["POSTGRES_DB"],
    )


def test_adapters_volume_is_shared_at_the_same_path() -> None:
    services = compose()["services"]
    assert "data" in compose()["volumes"]

    def mounts(name: str) -> dict[str, str]:
        return {v.split(":")[0]: v.split(":")[1] for v in services[name]["volumes"]}

    # A gateway sends vLLM the registry path it sees; vLLM and the trainer must see the same path.
    for name in (*gateways(), "trainer", "vllm-student"):
        assert mounts(name)["data"] == "/data", name
    for name in gateways():
        env = services[name]["environment"]
        assert env["TIERGATE_DISTILL__REGISTRY_DIR"].startswith("/data/")
        assert env["TIERGATE_SIGNAL__SPILL_PATH"].startswith("/data/"), "a spill must outlive the container"
    for ref in ("./transcript.jinja", "./prometheus.yml", "./haproxy.cfg"):
        assert (COMPOSE.parent / ref).exists()


@pytest.mark.parametrize("service", ["gateway-1", "gateway-2", "trainer"])
def test_environment_loads_through_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_of(service, monkeypatch)
    assert s.student.kind == "remote" and s.teacher.kind == "remote"
    services = compose()["services"]
    for tier, svc in (("student", "vllm-student"), ("teacher", "vllm-teacher")):
        cfg = getattr(s, tier)
        command = services[svc]["command"]
        assert cfg.url == f"http://{svc}:8000/v1" and "--port=8000" in command
        assert f"--served-model-name={cfg.model}" in command
    assert s.distill.student_base and f"--model={s.distill.student_base}" in services["vllm-student"]["command"]
    assert s.signal.teacher_top_logprobs == 20 and "--max-logprobs=20" in services["vllm-teacher"]["command"]


def test_the_load_balancer_fronts_exactly_the_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    services, cfg = compose()["services"], HAPROXY_CFG.read_text()
    lb = services["lb"]
    assert lb["image"].startswith("haproxy:2.6")
    assert lb["volumes"] == ["./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"]
    expected = {}
    for name in gateways():
        port = settings_of(name, monkeypatch).server.port
        expected[name] = f"{name}:{port}"
        assert lb["depends_on"][name] == {"condition": "service_started"}
    assert servers(cfg) == expected
    (frontend,) = [lines for header, lines in sections(cfg).items() if header.startswith("frontend ")]
    (bind,) = [words[1] for words in frontend if words[0] == "bind"]
    assert lb["ports"] == [f"{bind.rsplit(':', 1)[1]}:{bind.rsplit(':', 1)[1]}"]


def seconds(value: str) -> float:
    return float(value.removesuffix("ms")) / 1000 if value.endswith("ms") else float(value.removesuffix("s"))


def test_load_balancer_timeouts_outlast_a_whole_escalation_and_stream_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    timeouts = {w[1]: seconds(w[2]) for w in sections(HAPROXY_CFG.read_text())["defaults"] if w[0] == "timeout"}
    s = settings_of("gateway-1", monkeypatch)
    # An escalated, non-streaming answer is silent for a student draft and then a teacher call.
    longest = s.guard.student.deadline_s + s.guard.teacher.deadline_s
    assert timeouts["server"] > longest and timeouts["client"] > longest
    assert timeouts["server"] > s.server.sse_ping_s


def test_health_check_path_is_the_real_apps_readiness(tmp_path: Path) -> None:
    method, path = health_check(HAPROXY_CFG.read_text())
    settings = Settings(signal={"path": tmp_path / "s.db"})
    fake = BackendConfig(kind="fake", model="f")
    app = create_app(settings, student=FakeBackend(fake), teacher=FakeBackend(fake))
    with TestClient(app) as client:
        answer = client.request(method, path)
        assert answer.status_code == 200 and answer.json()["status"] == "ready"
        app.state.shutting_down = True  # a draining replica is taken out of the rotation
        assert client.request(method, path).status_code == 503
        app.state.shutting_down = False


def test_prometheus_scrapes_each_replica_not_the_load_balancer(monkeypatch: pytest.MonkeyPatch) -> None:
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    for name in gateways():
        assert f"{name}:{settings_of(name, monkeypatch).server.port}" in targets
    assert not any(t.startswith("lb:") for t in targets)
