"""One trainer at a time: the trainer lease across processes (a lock file, and a PostgreSQL
advisory lock on a real server), and two loops on one store making one run per trigger."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill_loop import SignalConfig, signal_db
from distill_loop.lease import FileLease, PostgresLease, TrainerLease, trainer_lease
from distill_loop.loop import DistillLoop
from tests.distill_loop.test_loop import loop_config, student_cfg, write
from tests.fakes import intent_samples

# A process that takes the lease, says so, and holds it until killed.
HOLDER = """
import sys, time
from pathlib import Path
from distill_loop.lease import FileLease, PostgresLease
where = sys.argv[1]
lease = PostgresLease(where) if where.startswith("postgresql://") else FileLease(Path(where))
assert lease.try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_another_process(where: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, where],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(params=["file", "postgres"])
def lease_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return str(tmp_path / "registry" / "trainer.lock")
    url: str = request.getfixturevalue("postgres_url")
    return url


def make_lease(where: str) -> TrainerLease:
    return PostgresLease(where) if where.startswith("postgresql://") else FileLease(Path(where))


def test_a_crashed_holders_lease_passes_to_the_next_trainer(
    lease_target: str, caplog: pytest.LogCaptureFixture
) -> None:
    holder = hold_in_another_process(lease_target)
    mine = make_lease(lease_target)
    caplog.set_level(logging.INFO, logger="distill_loop.lease")
    try:
        assert not mine.try_acquire()  # held elsewhere
        assert not mine.try_acquire()
        holder.send_signal(signal.SIGKILL)  # the trainer crashes mid-run
        holder.wait(10)
        deadline = time.monotonic() + 10
        while not mine.try_acquire():
            assert time.monotonic() < deadline, "the dead holder's lease never expired"
            time.sleep(0.1)
        # The log says which trainer is active, once per change rather than once per try.
        said = [r.getMessage() for r in caplog.records]
        assert [m.split(":")[0] for m in said] == ["trainer lease not held", "trainer lease acquired"], said
        assert f"pid {os.getpid()}" in said[1]
        assert mine.try_acquire()  # reentrant in this process
        mine.release()
        other = make_lease(lease_target)
        assert not other.try_acquire()  # still ours
        mine.release()
        assert other.try_acquire()  # released for good
        other.release()
    finally:
        holder.kill()
        holder.wait(10)
        assert holder.stdout is not None
        holder.stdout.close()


def test_the_lease_lives_in_the_database_when_the_store_does(tmp_path: Path) -> None:
    assert isinstance(trainer_lease(SignalConfig(path=tmp_path / "s.db"), tmp_path / "reg"), FileLease)
    shared = trainer_lease(SignalConfig(url="postgresql://db.internal/tiergate"), tmp_path / "reg")
    assert isinstance(shared, PostgresLease)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_loops_on_one_store_make_one_run_per_trigger(
    tiny_model_dir: Path, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Two trainers see the same trigger at once: one trains; the other finds the lease taken,
    and once it is free, finds the records already taken by that run."""
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    signal_cfg = SignalConfig(path=tmp_path / "signal.db", url=url)
    db = signal_db(signal_cfg)
    if url is None:
        write(tmp_path / "signal.db", intent_samples())
    else:
        from distill_loop import SignalStore

        store = SignalStore(signal_cfg)
        store.open()
        for s in intent_samples():
            store.submit(s)
        store.close()
    config = loop_config(tmp_path)
    loops = [
        DistillLoop(config, db, student_cfg(tiny_model_dir), lease=trainer_lease(signal_cfg, config.registry_dir))
        for _ in range(2)
    ]
    assert all(loop.due() for loop in loops)

    async def both() -> list[str]:
        outcomes = await asyncio.gather(*(loop.arun_once(if_due=True) for loop in loops))
        return sorted(o.result if o.result != "skipped" else o.reason for o in outcomes)

    first = asyncio.run(both())
    assert first[0] == "another_trainer" and first[1] in {"promoted", "rejected"}, first
    # The lease is free now; the loser comes back on its next tick and finds nothing left.
    again = [asyncio.run(loop.arun_once(if_due=True)) for loop in loops]
    assert [(o.result, o.reason) for o in again] == [("skipped", "not_due")] * 2
    assert sum(loop.state.runs for loop in loops) == 2 and loops[0].state.runs == loops[1].state.runs == 1
