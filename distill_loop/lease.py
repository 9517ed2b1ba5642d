"""One trainer at a time: the lease a distillation loop holds while it acts.

Several processes may run the loop on one store and registry: gateways with an embedded loop,
standalone trainers (`python -m distill_loop run`), a spare on another host. Only the holder
of the lease trains, gates, promotes or rolls back; the others skip their tick. Whoever takes
it next re-reads the loop's state, so one trigger is one run, never two on the same window.

- With `signal.url` (PostgreSQL): a session advisory lock on a connection of its own. A
  trainer that crashes closes its session and the lock goes with it; one whose host vanishes
  is dropped by TCP keepalives within about 30 s, and the lock then expires.
- Without (one host): an exclusive `flock` on `trainer.lock` in the registry folder, which the
  kernel releases when the process dies, however it dies.

Acquiring never waits: a loop that finds the lease taken tries again at its next tick. The lease
is reentrant within a process. It does not fence a holder that is alive but stuck. Each process
logs when it takes the lease and when it stops getting it, once per change, so the logs say which
trainer is active.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill_loop.config import SignalConfig
from distill_loop.db import without_password

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

_LEASE_KEY = 0x747261696E6572  # pg_try_advisory_lock key ("trainer")


class TrainerLease(ABC):
    def __init__(self) -> None:
        self._holds = 0
        self._guard = threading.Lock()
        self._got_last: bool | None = None  # what the last try outside a hold found, for the log

    def try_acquire(self) -> bool:
        """Take the lease if no other process holds it; True if this process holds it now."""
        with self._guard:
            if self._holds == 0:
                got = self._acquire()
                if got != self._got_last:  # once per change: loops try every tick
                    if got:
                        log.info("trainer lease acquired: this process (pid %d) is the active trainer", os.getpid())
                    else:
                        log.info("trainer lease not held: this process (pid %d) stands by", os.getpid())
                    self._got_last = got
                if not got:
                    return False
            self._holds += 1
            return True

    def release(self) -> None:
        with self._guard:
            self._holds -= 1
            if self._holds == 0:
                self._release()

    @contextmanager
    def held(self) -> Iterator[bool]:
        """`with lease.held() as mine:` mine is whether this process may act; released after."""
        mine = self.try_acquire()
        try:
            yield mine
        finally:
            if mine:
                self.release()

    @abstractmethod
    def _acquire(self) -> bool: ...

    @abstractmethod
    def _release(self) -> None: ...


class FileLease(TrainerLease):
    @classmethod
    def in_registry(cls, registry_dir: Path) -> FileLease:
        """The lease of the loops sharing this registry folder on one host."""
        return cls(registry_dir / "trainer.lock")

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fd: int | None = None

    def _acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
        self._fd = fd
        return True

    def _release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class PostgresLease(TrainerLease):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None

    def _acquire(self) -> bool:
        import psycopg

        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=10,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=4,
            )
        except psycopg.Error as exc:
            log.warning("trainer lease: cannot reach %s (%s); not training this tick", without_password(self.url), exc)
            return False
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_LEASE_KEY,)).fetchone()
        if not (row and row[0]):
            conn.close()
            return False
        self._conn = conn
        return True

    def _release(self) -> None:
        if self._conn is not None:
            self._conn.close()  # ends the session, and its advisory lock with it
            self._conn = None


def trainer_lease(signal: SignalConfig, registry_dir: Path) -> TrainerLease:
    """The lease for loops sharing this store and registry: in the database if it is shared."""
    if signal.url is not None:
        return PostgresLease(signal.url)
    return FileLease.in_registry(registry_dir)
