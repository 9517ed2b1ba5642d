"""The registry's pointer, history and routing state, in files and in a real PostgreSQL server:
the same behaviour either way, and with PostgreSQL a change is heard at once (LISTEN/NOTIFY)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from distill_loop import BASE, Registry, RoutingState
from distill_loop.pointer import FileState, PostgresState, RegistryState, registry_state
from tests.distill_loop.test_loop import make_version


@pytest.fixture(params=["files", "postgres"])
def state_for(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    """Makes the state of a registry folder: its own files, or the test's database."""
    if request.param == "files":
        return lambda root: FileState(root)
    url: str = request.getfixturevalue("postgres_url")
    return lambda root: registry_state(root, url)


def test_pointer_history_routing_and_pruning(tmp_path: Path, state_for: object) -> None:
    make = state_for  # type: ignore[assignment]
    reg = Registry(tmp_path / "reg", keep=2, state=make(tmp_path / "reg"))  # type: ignore[operator]
    assert reg.current() == BASE and reg.history() == [] and reg.previous() is None
    names = [reg.new_name() for _ in range(4)]
    stamp = reg.routing_stamp()
    for n, parent in zip(names, [BASE, *names[:-1]], strict=True):
        make_version(reg, tmp_path, n, parent)
        reg.set_current(n, "promoted")
        reg.save_routing_state(n, RoutingState(floor=0.25))
    assert reg.routing_stamp() != stamp
    assert reg.current() == "v0004" and reg.previous() == "v0003"
    assert reg.versions() == ["v0003", "v0004"]  # oldest pruned, current and previous kept
    assert reg.routing_state("v0004").floor == 0.25
    assert reg.state.routing("v0001") is None  # a pruned version's routing state goes with it
    assert [h["to"] for h in reg.history()] == names and reg.history()[0]["from"] == BASE
    # Another process's registry on the same state sees the same pointer, and moves it for all.
    other = Registry(tmp_path / "reg", keep=2, state=make(tmp_path / "reg"))  # type: ignore[operator]
    assert other.current() == "v0004"
    assert other.set_current("v0003", "rollback by test") == "v0004"
    assert reg.current() == "v0003" and reg.history()[-1]["reason"] == "rollback by test"


def test_a_change_in_postgres_is_heard_at_once(tmp_path: Path, postgres_url: str) -> None:
    # One state per URL in a process: its query connection writes, its own LISTEN hears it.
    watcher = writer = registry_state(tmp_path / "reg", postgres_url)
    assert isinstance(writer, PostgresState)
    reg = Registry(tmp_path / "reg", state=writer)
    make_version(reg, tmp_path, "v0001", BASE)
    assert watcher.current(BASE) == BASE
    assert watcher.wait_for_change(0.2) is False  # nothing changed: it waited the timeout
    heard: list[float] = []

    def listen(state: RegistryState) -> None:
        t0 = time.monotonic()
        if state.wait_for_change(10):
            heard.append(time.monotonic() - t0)

    thread = threading.Thread(target=listen, args=(watcher,))
    thread.start()
    time.sleep(0.3)
    reg.set_current("v0001", "promoted")
    thread.join(15)
    assert heard and heard[0] < 2.0, heard  # woken by the NOTIFY, not by the 10 s timeout
    assert watcher.current(BASE) == "v0001"
