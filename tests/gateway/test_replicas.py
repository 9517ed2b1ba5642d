"""Two gateway processes on one PostgreSQL database and one registry volume, as replicas behind a
load balancer: records from both land in one store; a version promoted by a trainer, and a
rollback made through one replica's admin API, are served by both within 2 s; one replica
killed with SIGKILL under load leaves the other answering every request. With two trainer
processes beside them, each trigger makes one training run, and a trainer killed mid-run
leaves serving untouched while the other takes over. Real processes, real HTTP on loopback, a
real PostgreSQL server and the tiny real student, trained for real."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from distill_loop import (
    BASE,
    DistillConfig,
    Registry,
    SignalConfig,
    VersionMeta,
    open_registry,
    read_samples,
    signal_db,
)
from distill_loop.buffer import is_heldout
from gateway.routes import key_id
from models import ChatMessage
from tests.servers import TrainerProcess, metric, start_gateway

ADMIN = "replica-admin"
AUTH = {"authorization": f"Bearer {ADMIN}"}
SYNC_S = 2.0  # the bound: every replica applies a swap within this
TRIGGER = 16  # records that start a distillation run; each burst of escalations is this many
HELDOUT = 6  # of which the gate holds this many out (it needs 4)
# The smallest real loop that learns the fake teacher's one answer (tests/distill_loop/test_loop.py
# loop_config), for the trainers; the gateways get it too, as every process reads one config.
SMALL_LOOP = {
    "TIERGATE_DISTILL__TRIGGER_RECORDS": str(TRIGGER),
    "TIERGATE_DISTILL__POLL_S": "0.3",
    "TIERGATE_DISTILL__DEVICE": "cpu",
    "TIERGATE_DISTILL__HOLDOUT_FRACTION": "0.25",
    "TIERGATE_DISTILL__QUALITY_TARGET": "0",
    "TIERGATE_DISTILL__LOSSES__ERROR_CORRECTION": "false",
    "TIERGATE_DISTILL__LORA__R": "8",
    "TIERGATE_DISTILL__LORA__ALPHA": "16",
    "TIERGATE_DISTILL__LORA__LR": "0.02",
    "TIERGATE_DISTILL__LORA__EPOCHS": "20",
    "TIERGATE_DISTILL__LORA__MAX_STEPS": "60",
    "TIERGATE_DISTILL__GATE__MIN_HELDOUT": "4",
    "TIERGATE_DISTILL__GATE__MAX_P_VALUE": "1.0",
    "TIERGATE_DISTILL__GATE__MAX_NEW_TOKENS": "12",
}


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A real LoRA adapter for the tiny student (random B, so it changes outputs), as a trainer saves."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(out)
    return out


@pytest.fixture
def replica_env(tiny_model_dir: Path, teacher_url: str, postgres_url: str, tmp_path: Path) -> dict[str, str]:
    """The settings every gateway and trainer of the deployment shares."""
    return {
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
        **SMALL_LOOP,
    }


@pytest.fixture
def replica_procs(replica_env: dict[str, str], tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    procs = []
    try:
        for i in range(2):
            # Each replica's spill file and policies stay its own; the store and registry are shared.
            own = replica_env | {"TIERGATE_SIGNAL__PATH": str(tmp_path / f"replica{i}" / "signal.db")}
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
    """The version a replica's student answers with. Asked of the student tier alone, so the
    question writes no record and moves no trainer's trigger."""
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
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

    # A key's request limit holds across both replicas, not once in each: within a sync
    # interval each admits from its own bucket (6 + 6 of 10), then each takes the other's 6.
    t0 = time.monotonic()
    flood = {"authorization": "Bearer sk-flood"}
    limits = {"tenant": key_id("sk-flood"), "requests_per_minute": 10}
    assert httpx.put(a + "/admin/limits", json=limits, headers=AUTH).status_code == 200
    asked = {"tenant": limits["tenant"]}
    while httpx.get(b + "/admin/limits", params=asked, headers=AUTH).json()["limits"]["requests_per_minute"] != 10:
        assert time.monotonic() - t0 < SYNC_S, "the new limit did not reach the other replica"
        time.sleep(0.05)
    ask = {"model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    statuses = [httpx.post(url + "/v1/chat/completions", json=ask, headers=flood).status_code for url in (a, b) * 6]
    assert statuses == [200] * 12  # each had 10, and neither had heard of the other's yet
    time.sleep(2 * SYNC_S)  # both exchange their usage (`sync.interval_s`, 1 s): 10 - 6 - 6 each
    again = [httpx.post(url + "/v1/chat/completions", json=ask, headers=flood) for url in (a, b)]
    assert [r.status_code for r in again] == [429, 429], [r.text for r in again]


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


def prompts(burst: str, n: int = TRIGGER, heldout: int = HELDOUT) -> list[str]:
    """`n` prompts, no two alike (the loop collapses near-duplicates), of which the gate's split
    holds out `heldout`: the split hashes the prompt, so this fixes how many it gets."""
    held: list[str] = []
    train: list[str] = []
    for i in itertools.count():
        text = "ticket " + hashlib.sha256(f"{burst}-{i}".encode()).hexdigest()[:12]
        if is_heldout((ChatMessage("user", text),), float(SMALL_LOOP["TIERGATE_DISTILL__HOLDOUT_FRACTION"])):
            held += [text] if len(held) < heldout else []
        else:
            train += [text] if len(train) < n - heldout else []
        if len(held) + len(train) == n:
            return held + train
    raise AssertionError("unreachable")


def escalate(urls: list[str], texts: list[str]) -> None:
    """Send each prompt to the replicas in turn, all at once: each escalates and writes a record."""

    def one(k: int) -> None:
        body = {"messages": [{"role": "user", "content": texts[k]}], "max_tokens": 8}
        r = httpx.post(urls[k % len(urls)] + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.headers["x-tiergate-tier"] == "teacher", r.text

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(len(texts))))


class StudentLoad:
    """A client per replica, asking the student tier back to back until stopped; it writes no
    record, so only the bursts move the trainers' trigger. Any answer but a 200 is a failure."""

    def __init__(self, urls: list[str]) -> None:
        self.answered = dict.fromkeys(urls, 0)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(u,)) for u in urls]

    def _run(self, url: str) -> None:
        body = {"model": "student", "messages": [{"role": "user", "content": "where is my order"}], "max_tokens": 8}
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(url + "/v1/chat/completions", json=body)
                    if r.status_code != 200:
                        self.failures.append(f"{url}: {r.status_code} {r.text}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{url}: {exc!r}")
                self.answered[url] += 1
                time.sleep(0.02)  # a steady trickle: the two CPUs are the trainers' too

    def __enter__(self) -> StudentLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


@pytest.fixture
def trainers(replica_env: dict[str, str], tmp_path: Path) -> Iterator[list[TrainerProcess]]:
    """Two standalone trainers on the replicas' database and registry volume, started first so
    that they load while the replicas do."""
    procs = []
    try:
        for i in range(2):
            own = replica_env | {"TIERGATE_SIGNAL__PATH": str(tmp_path / f"trainer{i}" / "signal.db")}
            procs.append(TrainerProcess(own, tmp_path / f"trainer{i}.log"))
        yield procs
    finally:
        for t in procs:
            t.stop()


def event(line: str, name: str) -> dict[str, Any] | None:
    """The data of a `name: {...}` event line the trainer CLI printed, else None."""
    head, _, data = line.partition(": ")
    return json.loads(data) if head == name else None


RUN_START = re.compile(r"distillation run on \d+ examples \(\{'since': ([^,]+), .*'new_records': (\d+),")


def run_window(line: str) -> tuple[str, int] | None:
    """Where the data window of a run a trainer logged the start of begins (as logged: the log
    may redact a time as if it were a phone number, the same way each time), and how many new
    records it holds; None for other lines."""
    m = RUN_START.search(line)
    return (m.group(1), int(m.group(2))) if m else None


def loop_runs(registry_dir: Path) -> int:
    """Runs completed on this registry, by every trainer: the loop state they share."""
    return int(json.loads((registry_dir / "loop_state.json").read_text())["runs"])


def the_one_that_prints(trainers: list[TrainerProcess], marks: list[int], found: Callable[[str], bool]) -> int:
    """Which trainer prints a line for which `found` is true first, after its line `marks[i]`."""
    deadline = time.monotonic() + 60
    while True:
        for i, (t, at) in enumerate(zip(trainers, marks, strict=True)):
            if any(found(line) for line in t.lines[at:]):
                return i
        assert time.monotonic() < deadline, [t.lines[-20:] for t in trainers]
        time.sleep(0.02)


def quiet_after(trainers: list[TrainerProcess], marks: list[int]) -> None:
    """Wait until every trainer has ticked again and found nothing pending (the loop's
    `pending` event, which it prints before it tries the lease at each tick)."""
    for t, at in zip(trainers, marks, strict=True):
        t.wait_for(lambda line: event(line, "pending") == {"records": 0}, after=at, timeout=30)


def served_after_promotion(replicas: list[str], registry: Registry, version: str) -> float:
    """Seconds from a trainer's promotion of `version` until the later replica swapped to it,
    by that replica's own clock (`tiergate_student_last_swap_timestamp_seconds`), once both
    answer with it. Not until a poll sees it: under `StudentLoad` each poll waits its turn in a
    student batch, which measures the load, not the swap (2.26 s once on a busy CI machine)."""
    until_both_serve(replicas, version)
    promoted = registry.history()[-1]
    assert promoted["to"] == version
    applied = max(metric(url, "tiergate_student_last_swap_timestamp_seconds") for url in replicas)
    return applied - float(promoted["time"])


@pytest.mark.slow
def test_two_trainers_make_one_run_per_trigger_and_a_killed_one_hands_over(
    trainers: list[TrainerProcess], replicas: list[str], postgres_url: str, tmp_path: Path
) -> None:
    registry_dir = tmp_path / "registry"
    registry = open_registry(DistillConfig(registry_dir=registry_dir), SignalConfig(url=postgres_url))
    with StudentLoad(replicas) as load:
        # Trigger 1, both trainers up: one trains, gates and promotes; the other stands by.
        marks = [len(t.lines) for t in trainers]
        escalate(replicas, prompts("first"))
        active = trainers[the_one_that_prints(trainers, marks, lambda line: run_window(line) is not None)]
        (standby,) = [t for t in trainers if t is not active]
        done = active.wait_for(lambda line: event(line, "run") is not None, after=marks[trainers.index(active)])
        outcome = event(active.lines[done], "run")
        assert outcome is not None and outcome["result"] == "promoted", active.lines[-30:]
        assert registry.current() == outcome["version"] != BASE
        first = outcome["version"]
        lag = served_after_promotion(replicas, registry, first)
        # The other trainer tried while that run held the lease, and once it was free found the
        # records taken: one run for the trigger, not two.
        quiet_after(trainers, [done if t is active else len(t.lines) for t in trainers])
        at = marks[trainers.index(standby)]
        assert any(line.endswith("stands by") for line in standby.lines[at:]), standby.lines[at:]
        for t, m in zip(trainers, marks, strict=True):
            assert sum(run_window(line) is not None for line in t.lines[m:]) == (t is active)
            assert sum(event(line, "run") is not None for line in t.lines[m:]) == (t is active)
        assert loop_runs(registry_dir) == 1
        assert lag < SYNC_S

        # Trigger 2: the trainer that takes it is killed mid-run, while training.
        marks = [len(t.lines) for t in trainers]
        history, kept = registry.history(), sorted(p.name for p in (registry_dir / "versions").iterdir())
        escalate(replicas, prompts("second"))
        victim = trainers[the_one_that_prints(trainers, marks, lambda line: "distill step 1/" in line)]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(30)
        (survivor,) = [t for t in trainers if t is not victim]
        killed_at = len(survivor.lines)
        at_v, at_s = marks[trainers.index(victim)], marks[trainers.index(survivor)]
        assert not any(event(line, "run") for line in victim.lines[at_v:]), "killed after its run, not in it"
        # Serving is untouched: the same version everywhere, no partial version kept or current.
        assert registry.current() == first and registry.history() == history
        assert sorted(p.name for p in (registry_dir / "versions").iterdir()) == kept
        assert serving(replicas[0]) == serving(replicas[1]) == first
        # The other trainer takes the lease over (it runs only while holding it) and runs on
        # the same records.
        done = survivor.wait_for(lambda line: event(line, "run") is not None, after=at_s)
        outcome = event(survivor.lines[done], "run")
        assert outcome is not None and outcome["result"] in {"promoted", "rejected"}, survivor.lines[-30:]
        (started,) = [w for w in map(run_window, victim.lines[at_v:]) if w]
        (took_over,) = [(i, w) for i, w in enumerate(map(run_window, survivor.lines)) if w and i >= at_s]
        assert took_over[0] >= killed_at, "both trainers ran at once"
        assert took_over[1] == started and started[1] == TRIGGER
        assert loop_runs(registry_dir) == 2
        if outcome["result"] == "promoted":
            assert served_after_promotion(replicas, registry, outcome["version"]) < SYNC_S
        else:
            assert registry.history() == history and serving(replicas[0]) == serving(replicas[1]) == first
    for t in trainers:  # not one run failed, from the trainers' start before any gateway to now
        assert not [line for line in t.lines if (event(line, "run") or {}).get("result") == "failed"], t.lines[-30:]
    assert load.failures == [] and all(n > 0 for n in load.answered.values()), (load.failures[:5], load.answered)
