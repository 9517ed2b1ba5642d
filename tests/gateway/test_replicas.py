"""Two gateway processes on one PostgreSQL database and one registry volume, as replicas behind a
load balancer: records from both land in one store; a version promoted by a trainer, and a
rollback made through one replica's admin API, are served by both within 2 s; one replica
killed with SIGKILL under load leaves the other answering every request. Real processes, real
HTTP on loopback, a real PostgreSQL server and the tiny real student."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from distill_loop import BASE, DistillConfig, SignalConfig, VersionMeta, open_registry, read_samples, signal_db
from tests.servers import start_gateway

ADMIN = "replica-admin"
AUTH = {"authorization": f"Bearer {ADMIN}"}
SYNC_S = 2.0  # the bound: every replica applies a swap within this


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A real LoRA adapter for the tiny student (random B, so it changes outputs), as a trainer saves."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(out)
    return out


@pytest.fixture
def replica_procs(
    tiny_model_dir: Path, teacher_url: str, postgres_url: str, tmp_path: Path
) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    env = {
        "TIERGATE_STUDENT__KIND": "local",
        "TIERGATE_STUDENT__MODEL": str(tiny_model_dir),
        "TIERGATE_STUDENT__DEVICE": "cpu",
        "TIERGATE_STUDENT__DTYPE": "float32",
        "TIERGATE_TEACHER__KIND": "remote",
        "TIERGATE_TEACHER__URL": teacher_url,
        "TIERGATE_TEACHER__MODEL": "auto",
        "TIERGATE_ROUTER__THRESHOLD": "0.99",  # the untrained tiny student escalates everything
        "TIERGATE_SIGNAL__URL": postgres_url,
        "TIERGATE_SIGNAL__AUDIT_FRACTION": "0",
        "TIERGATE_DISTILL__REGISTRY_DIR": str(tmp_path / "registry"),  # the shared volume
        "TIERGATE_DISTILL__ENABLED": "false",  # the trainer is this test
        "TIERGATE_SERVER__ADMIN_API_KEY": ADMIN,
    }
    procs = []
    try:
        for i in range(2):
            # Each replica's spill file and policies stay its own; the store and registry are shared.
            own = env | {"TIERGATE_SIGNAL__PATH": str(tmp_path / f"replica{i}" / "signal.db")}
            procs.append(start_gateway(own, tmp_path / f"replica{i}.log", timeout=120))
        yield procs
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait(30)


@pytest.fixture
def replicas(replica_procs: list[tuple[subprocess.Popen[bytes], str]]) -> list[str]:
    return [url for _, url in replica_procs]


def serving(url: str) -> str:
    r = httpx.post(
        url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    assert r.status_code == 200, r.text
    return r.headers["x-tiergate-student-version"]


def until_both_serve(urls: list[str], version: str) -> float:
    t0 = time.monotonic()
    while not all(serving(u) == version for u in urls):
        assert time.monotonic() - t0 < SYNC_S + 10, [serving(u) for u in urls]
        time.sleep(0.05)
    return time.monotonic() - t0


def test_two_replicas_share_the_store_the_version_and_rollbacks(
    replicas: list[str], tiny_model_dir: Path, postgres_url: str, tmp_path: Path
) -> None:
    a, b = replicas
    # Records from both replicas land in one store.
    ids = set()
    for url in (a, b) * 3:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "HARD q"}]})
        assert r.status_code == 200 and r.headers["x-tiergate-tier"] == "teacher"
        ids.add(r.headers["x-tiergate-request-id"])
    db = signal_db(SignalConfig(url=postgres_url))
    assert ids <= {s.id for s in read_samples(db)}

    # A trainer on another host promotes a version: both replicas serve it within 2 s.
    registry = open_registry(DistillConfig(registry_dir=tmp_path / "registry"), SignalConfig(url=postgres_url))
    name = registry.new_name()
    registry.add(name, make_adapter(tiny_model_dir, tmp_path / "adapter"), VersionMeta(name, BASE, time.time()))
    assert serving(a) == serving(b) == BASE
    registry.set_current(name, "promoted by test")
    assert until_both_serve(replicas, name) < SYNC_S

    # A rollback through one replica's admin API reaches the other.
    r = httpx.post(a + "/admin/student/rollback", json={"version": BASE}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert until_both_serve(replicas, BASE) < SYNC_S
    assert httpx.get(b + "/admin/student/versions", headers=AUTH).json()["serving"] == BASE
    assert registry.history()[-1]["reason"].startswith("rollback by key-")  # the admin key's id

    # A policy change and a key's new limits, made through one replica, reach the other.
    t0 = time.monotonic()
    assert httpx.put(a + "/admin/threshold", json={"threshold": 0.42}, headers=AUTH).status_code == 200
    limits = {"tenant": "key-0123456789ab", "requests_per_minute": 77}
    assert httpx.put(a + "/admin/limits", json=limits, headers=AUTH).status_code == 200
    while (
        httpx.get(b + "/admin/threshold", headers=AUTH).json()["threshold"] != 0.42
        or httpx.get(b + "/admin/limits", params={"tenant": limits["tenant"]}, headers=AUTH).json()["limits"][
            "requests_per_minute"
        ]
        != 77
    ):
        assert time.monotonic() - t0 < SYNC_S, "a policy or limits change did not reach the other replica"
        time.sleep(0.05)
    audit = httpx.get(b + "/admin/policy/audit", headers=AUTH).json()["audit"]
    assert audit[0]["new"]["threshold"] == 0.42  # one audit trail, whichever replica is asked


def test_a_replica_killed_under_load_leaves_the_other_serving(
    replica_procs: list[tuple[subprocess.Popen[bytes], str]],
) -> None:
    (victim, a), (_, b) = replica_procs
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load(url: str) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                r = client.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}]})
                if r.status_code != 200:
                    failures.append(r.text)
                answered[0] += 1

    workers = [threading.Thread(target=load, args=(url,)) for url in (b, b, b, b)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    before = answered[0]
    victim.send_signal(signal.SIGKILL)  # mid-load, as a node dies
    victim.wait(30)
    time.sleep(2.0)
    stop.set()
    for w in workers:
        w.join(30)
    assert answered[0] > before > 0 and failures == []
    with pytest.raises(httpx.TransportError):
        httpx.get(a + "/health", timeout=2)
