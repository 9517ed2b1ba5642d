"""The registry's mutable part: which version serves, every change of it, and each version's
routing state. In files in the registry folder by default; in PostgreSQL with `signal.url`.

Versions themselves (adapter weights, meta.json) are immutable and stay on the registry volume
that every gateway, trainer and vLLM server mounts at the same path. What changes after a
version is written lives here, so that replicas on several hosts agree on it:

- `FileState`: `CURRENT`, `history.jsonl` and `routing/<name>.json`, as before; one host, or a
  shared filesystem.
- `PostgresState`: three tables in the signal database. A change is one transaction and sends
  `NOTIFY tiergate_state`; `wait_for_change` blocks on LISTEN, so a gateway's watcher applies a
  swap, a rollback or a new floor as soon as it is committed, and its periodic poll stays the
  fallback if a notification is lost (a dropped connection).

No version logic here (what exists, pruning, names): that is `registry.py`'s.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill_loop.db import without_password
from distill_loop.errors import SignalDBError

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)
CHANNEL = "tiergate_state"
_SCHEMA_LOCK = 0x706F696E746572  # pg_advisory_xact_lock key ("pointer")


class RegistryState(ABC):
    notifies = False  # whether `wait_for_change` hears of changes (else it only waits)

    @abstractmethod
    def current(self, default: str) -> str: ...

    @abstractmethod
    def history(self) -> list[dict[str, Any]]:
        """Every pointer change, oldest first: {time, from, to, reason}."""

    @abstractmethod
    def set_current(self, name: str, reason: str, default: str) -> str:
        """Point at `name` and record the change, atomically; returns the old pointer."""

    @abstractmethod
    def routing(self, name: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def save_routing(self, name: str, body: dict[str, Any]) -> None: ...

    @abstractmethod
    def drop_routing(self, name: str) -> None: ...

    @abstractmethod
    def stamp(self) -> int:
        """Changes whenever any routing state is saved."""

    def close(self) -> None:  # noqa: B027 - files hold nothing open
        """Let go of connections, if any."""

    def wait_for_change(self, timeout: float) -> bool:
        """Block until another process changes the state, or `timeout`; True if told of one.
        Without notifications (files), it only waits: the caller polls."""
        time.sleep(timeout)
        return False


class FileState(RegistryState):
    def __init__(self, root: Path) -> None:
        self.root = root

    def current(self, default: str) -> str:
        try:
            return (self.root / "CURRENT").read_text().strip() or default
        except FileNotFoundError:
            return default

    def history(self) -> list[dict[str, Any]]:
        path = self.root / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def set_current(self, name: str, reason: str, default: str) -> str:
        with flocked(self.root / ".lock"):
            old = self.current(default)
            atomic_write(self.root / "CURRENT", name)
            with open(self.root / "history.jsonl", "a") as fh:
                fh.write(json.dumps({"time": time.time(), "from": old, "to": name, "reason": reason}) + "\n")
        return old

    def _routing_path(self, name: str) -> Path:
        return self.root / "routing" / f"{name}.json"

    def routing(self, name: str) -> dict[str, Any] | None:
        try:
            body: dict[str, Any] = json.loads(self._routing_path(name).read_text())
            return body
        except FileNotFoundError:
            return None

    def save_routing(self, name: str, body: dict[str, Any]) -> None:
        path = self._routing_path(name)
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, json.dumps(body))

    def drop_routing(self, name: str) -> None:
        self._routing_path(name).unlink(missing_ok=True)

    def stamp(self) -> int:
        folder = self.root / "routing"
        if not folder.is_dir():
            return 0
        return sum(p.stat().st_mtime_ns for p in folder.glob("*.json"))


class PostgresState(RegistryState):
    notifies = True
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS tiergate_pointer (
            id      INTEGER PRIMARY KEY CHECK (id = 1),
            current TEXT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS tiergate_pointer_history (
            seq     BIGSERIAL PRIMARY KEY,
            at      DOUBLE PRECISION NOT NULL,
            from_v  TEXT NOT NULL,
            to_v    TEXT NOT NULL,
            reason  TEXT NOT NULL
        );
        CREATE SEQUENCE IF NOT EXISTS tiergate_routing_stamp;
        CREATE TABLE IF NOT EXISTS tiergate_routing (
            version TEXT PRIMARY KEY,
            body    TEXT NOT NULL,
            stamp   BIGINT NOT NULL
        );
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = without_password(url)
        self._ready = False
        # One connection for reads and writes (each a statement or two; the watcher, the loop
        # and admin calls take turns), and one that LISTENs.
        self._lock = threading.Lock()
        self._connection: psycopg.Connection[Any] | None = None
        self._listener = Listener(url)

    def _conn(self) -> psycopg.Connection[Any]:
        """The shared connection, (re)opened as needed; call with `_lock` held."""
        import psycopg

        conn = self._connection
        if conn is None or conn.closed or conn.broken:
            try:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            except psycopg.Error as exc:
                raise SignalDBError(f"cannot connect to {self.name}: {exc}") from exc
            self._connection = conn
        if not self._ready:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(self.SCHEMA)
            self._ready = True
        return conn

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with self._lock:
            try:
                cur = self._conn().execute(sql, args)
                return cur.fetchall() if cur.description else []
            except psycopg.Error as exc:
                self._drop()
                raise SignalDBError(f"{self.name}: {exc}") from exc

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def close(self) -> None:
        with self._lock:
            self._drop()
        self._listener.close()

    def current(self, default: str) -> str:
        rows = self._run("SELECT current FROM tiergate_pointer WHERE id = 1")
        return str(rows[0][0]) if rows else default

    def history(self) -> list[dict[str, Any]]:
        rows = self._run("SELECT at, from_v, to_v, reason FROM tiergate_pointer_history ORDER BY seq")
        return [{"time": at, "from": f, "to": t, "reason": r} for at, f, t, r in rows]

    def set_current(self, name: str, reason: str, default: str) -> str:
        import psycopg

        with self._lock:
            try:
                conn = self._conn()
                with conn.transaction():
                    rows = conn.execute("SELECT current FROM tiergate_pointer WHERE id = 1 FOR UPDATE").fetchall()
                    old = str(rows[0][0]) if rows else default
                    conn.execute(
                        "INSERT INTO tiergate_pointer (id, current) VALUES (1, %s)"
                        " ON CONFLICT (id) DO UPDATE SET current = EXCLUDED.current",
                        (name,),
                    )
                    conn.execute(
                        "INSERT INTO tiergate_pointer_history (at, from_v, to_v, reason) VALUES (%s, %s, %s, %s)",
                        (time.time(), old, name, reason),
                    )
                    conn.execute("SELECT pg_notify(%s, 'pointer')", (CHANNEL,))
            except psycopg.Error as exc:
                self._drop()
                raise SignalDBError(f"{self.name}: {exc}") from exc
        return old

    def routing(self, name: str) -> dict[str, Any] | None:
        rows = self._run("SELECT body FROM tiergate_routing WHERE version = %s", (name,))
        return json.loads(rows[0][0]) if rows else None

    def save_routing(self, name: str, body: dict[str, Any]) -> None:
        self._run(
            "WITH s AS (SELECT nextval('tiergate_routing_stamp') AS n)"
            " INSERT INTO tiergate_routing (version, body, stamp) SELECT %s, %s, n FROM s"
            " ON CONFLICT (version) DO UPDATE SET body = EXCLUDED.body, stamp = EXCLUDED.stamp",
            (name, json.dumps(body)),
        )
        self._run("SELECT pg_notify(%s, 'routing')", (CHANNEL,))

    def drop_routing(self, name: str) -> None:
        self._run("DELETE FROM tiergate_routing WHERE version = %s", (name,))

    def stamp(self) -> int:
        rows = self._run("SELECT coalesce(max(stamp), 0), count(*) FROM tiergate_routing")
        return int(rows[0][0]) * 1_000_000 + int(rows[0][1])  # a drop changes it too

    def wait_for_change(self, timeout: float) -> bool:
        return self._listener.wait(timeout)


class Listener:
    """`LISTEN tiergate_state` on a connection of its own. `wait(timeout)` returns True as soon
    as any process commits a change to the shared state (the pointer, routing, policies,
    limits), False after `timeout`. A lost connection is reopened at the next call; meanwhile
    the caller's poll covers the gap. One waiter at a time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None

    def wait(self, timeout: float) -> bool:
        import psycopg

        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
                self._conn.execute(f"LISTEN {CHANNEL}")
            got = any(True for _ in self._conn.notifies(timeout=timeout, stop_after=1))
            if got:
                for _ in self._conn.notifies(timeout=0.01):  # drain: several changes wake once
                    pass
            return got
        except (psycopg.Error, OSError) as exc:
            log.warning("LISTEN on %s failed (%s); polling", without_password(self.url), exc)
            self.close()
            time.sleep(timeout)
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes (a gateway and a trainer share a registry)."""
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two writer processes never share one
    tmp.write_text(text)
    os.replace(tmp, path)


_shared: dict[str, PostgresState] = {}
_shared_lock = threading.Lock()


def registry_state(root: Path, url: str | None) -> RegistryState:
    """Files in `root`, or the database at `url`: one PostgresState (two connections) per URL
    in a process, whichever registries use it, closed at exit."""
    if url is None:
        return FileState(root)
    with _shared_lock:
        state = _shared.get(url)
        if state is None:
            state = _shared[url] = PostgresState(url)
            atexit.register(state.close)
        return state
