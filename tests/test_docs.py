"""The docs hold against the code: docs/metrics.md's table against what the app's registry
really exports, and every `curl` example in README.md and docs/*.md run as written (with the
host, port and `$ADMIN` of `make run` swapped for a live gateway's) by the real curl binary."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.metrics import MetricWrapperBase

from distill_loop import Registry, VersionMeta
from gateway import Settings, create_app
from models import BackendConfig, FakeBackend
from tests.fakes import UpstreamScript, fake_upstream, make_adapter
from tests.servers import serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAKE_RUN_URL = "http://127.0.0.1:8080"  # where `make run` listens, as the examples say
ADMIN = "docs-admin-key"
VERSIONS = ("v0001", "v0002", "v0003")  # the rollback example names v0002


# -- examples ----------------------------------------------------------------------------------


def fenced(path: Path, lang: str) -> list[str]:
    """The bodies of a page's ```lang blocks, indented ones (inside list items) included."""
    blocks = []
    for m in re.finditer(rf"^( *)```{lang}\n(.*?)^\1```", path.read_text(), re.S | re.M):
        indent = len(m.group(1))
        blocks.append("\n".join(line[indent:] for line in m.group(2).splitlines()))
    return blocks


def curl_examples(path: Path) -> list[str]:
    """Each `curl` command in a page's bash blocks, backslash continuations joined."""
    found = []
    for block in fenced(path, "bash"):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            if command.strip().startswith("curl "):
                found.append(command.strip())
    return found


ALL_CURLS = [(p.relative_to(ROOT).as_posix(), c) for p in DOCS for c in curl_examples(p)]


def test_the_docs_have_the_examples_a_newcomer_needs() -> None:
    commands = " ".join(c for _, c in ALL_CURLS)
    assert len(ALL_CURLS) >= 10
    for needle in ("/v1/chat/completions", "-X PUT http://127.0.0.1:8080/admin/threshold", "/admin/policy"):
        assert needle in commands, needle
    for page, command in ALL_CURLS:
        assert MAKE_RUN_URL in command, f"{page}: an example must target `make run`'s {MAKE_RUN_URL}: {command}"
        assert "Bearer …" not in command and "<" not in command, f"{page}: not runnable as written: {command}"


# -- a live gateway with fake tiers ------------------------------------------------------------


@pytest.fixture
def live_gateway(tiny_model_dir: Path, tmp_path: Path) -> Iterator[str]:
    """A real gateway on loopback: the tiny local student (so it has a registry with three
    versions to roll back to), a fake OpenAI-compatible teacher, and an admin key."""
    registry = Registry(tmp_path / "registry")
    for i, name in enumerate(VERSIONS):
        adapter = make_adapter(tiny_model_dir, tmp_path / f"adapter{i}", seed=i)
        registry.add(name, adapter, VersionMeta(name=name, parent="base", created_at=time.time()))
    teacher = UpstreamScript(name="teacher-upstream", text="Open Settings, then Security, then Reset password.")
    with serve_in_thread(fake_upstream(teacher)) as teacher_url:
        settings = Settings(
            server={"admin_api_key": ADMIN},
            student={"kind": "local", "model": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
            teacher={"kind": "remote", "url": teacher_url + "/v1", "model": "auto"},
            signal={"path": tmp_path / "signal.db", "audit_fraction": 0.0},
            distill={"registry_dir": tmp_path / "registry", "enabled": False},
        )
        with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:
            yield url


def run_curl(command: str, url: str) -> tuple[int, str]:
    """Run one example through bash, as a reader would paste it; returns (HTTP status, output)."""
    command = command.replace(MAKE_RUN_URL, url)
    command = "curl -w '\\n%{http_code}'" + command[len("curl") :]  # the status, on a last line of its own
    env = {**os.environ, "ADMIN": ADMIN}
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"curl exited {done.returncode}: {done.stderr}"
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")
def test_every_curl_example_in_the_docs_succeeds_against_a_live_gateway(live_gateway: str) -> None:
    failed = []
    for page, command in ALL_CURLS:
        status, body = run_curl(command, live_gateway)
        if not 200 <= status < 300:
            failed.append(f"{page}: {status} from `{command}`:\n{body[-500:]}")
    assert not failed, "\n\n".join(failed)


def test_admin_bodies_are_json_whatever_the_content_type(live_gateway: str) -> None:
    """What `curl -d` sends (a form content type) is read as JSON, and still validated."""
    auth = {"authorization": f"Bearer {ADMIN}"}
    form = {**auth, "content-type": "application/x-www-form-urlencoded"}
    put = httpx.put(live_gateway + "/admin/threshold", content=b'{"threshold":0.4}', headers=form)
    assert put.status_code == 200 and put.json()["threshold"] == 0.4
    bad = httpx.put(live_gateway + "/admin/threshold", content=b'{"threshold":1.5}', headers=form)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "threshold"
    garbled = httpx.put(live_gateway + "/admin/policy", content=b"kind=fixed", headers=form)
    assert garbled.status_code == 400 and garbled.json()["error"]["type"] == "invalid_request_error"
    unauthenticated = httpx.put(live_gateway + "/admin/threshold", content=b"not json", headers={})
    assert unauthenticated.status_code == 401  # the key is checked before the body is read


def test_the_readme_python_example_runs(live_gateway: str) -> None:
    (example,) = fenced(ROOT / "README.md", "python")
    done = subprocess.run(
        [sys.executable, "-c", example.replace(MAKE_RUN_URL, live_gateway)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    tier, confidence, *_ = done.stdout.split()
    assert tier in ("student", "teacher") and 0.0 <= float(confidence) <= 1.0


# -- docs/metrics.md against the registry ------------------------------------------------------


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, label names), from the table in docs/metrics.md."""
    rows = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`tiergate_"):
            name, kind, labels, _ = cells
            rows[name.strip("`")] = (kind, set(re.findall(r"`(\w+)`", labels)))
    return rows


def exported_metrics(tmp_path: Path) -> dict[str, tuple[str, set[str]]]:
    """name -> (type, label names) for every tiergate_* metric in the running app's registry."""
    settings = Settings(signal={"path": tmp_path / "s.db"})
    fake = BackendConfig(kind="fake", model="f")
    app = create_app(settings, student=FakeBackend(fake), teacher=FakeBackend(fake))
    with TestClient(app) as c:
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        metrics = app.state.service.metrics
    # Label names of families that have no sample yet are only on the metric objects.
    labels = {
        m._name: set(m._labelnames)  # prometheus_client keeps these private, but has no public getter
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
    }
    exported = {}
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        sampled = {k for s in family.samples for k in s.labels if k != "le"}
        assert family.name in labels, f"{family.name} is not an attribute of Metrics"
        assert sampled <= labels[family.name]
        exported[name] = (family.type, labels[family.name])
    return {name: v for name, v in exported.items() if name.startswith("tiergate_")}


def test_metrics_page_matches_what_the_app_exports(tmp_path: Path) -> None:
    documented, exported = documented_metrics(), exported_metrics(tmp_path)
    assert len(documented) >= 20
    assert sorted(set(documented) - set(exported)) == [], "documented but not exported"
    assert sorted(set(exported) - set(documented)) == [], "exported but not in docs/metrics.md"
    for name, (kind, labels) in exported.items():
        assert documented[name] == (kind, labels), name


def test_escalation_reasons_are_documented_as_the_app_declares_them(tmp_path: Path) -> None:
    """The one typed set of reasons, as the app's registry pre-declares them, in the metrics
    table and in the README's x-tiergate-reason row."""
    settings = Settings(signal={"path": tmp_path / "s.db"})
    fake = BackendConfig(kind="fake", model="f")
    app = create_app(settings, student=FakeBackend(fake), teacher=FakeBackend(fake))
    with TestClient(app):
        (family,) = [f for f in app.state.service.metrics.registry.collect() if f.name == "tiergate_escalations"]
    declared = {s.labels["reason"] for s in family.samples if s.name == "tiergate_escalations_total"}
    row = next(
        line for line in (ROOT / "docs" / "metrics.md").read_text().splitlines() if "`tiergate_escalations" in line
    )
    assert set(re.findall(r"`(\w+)`", row.split("|")[4])) == declared
    readme = next(line for line in (ROOT / "README.md").read_text().splitlines() if "`x-tiergate-reason`" in line)
    assert declared <= set(re.findall(r"`(\w+)`", readme))
