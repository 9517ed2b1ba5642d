"""Per-tenant JSON settings in one table, each change kept in an append-only audit trail.

`AuditedTable(where, "policy")` owns the tables `policy (tenant, body)` and `policy_audit (seq,
at, actor, tenant, old, new)`; the policy book and the gateway's limits each keep one, so every
runtime change of either is audited the same way. `where` is a SQLite file (one process's own)
or a PostgreSQL URL (`signal.url`: shared by every replica, as `tiergate_policy` and
`tiergate_policy_audit`; a write also sends `NOTIFY tiergate_state`). `stamp()` moves with every
write, so a replica that polls it knows when to `load()` again. It stores and reads JSON only:
what a body means is its owner's business. Every method blocks: call it in a thread.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Where = Path | str  # a SQLite file, or a postgresql:// URL
CHANNEL = "tiergate_state"  # the same channel the registry's pointer notifies on
_SCHEMA_LOCK = 0x61756469746564  # pg_advisory_xact_lock key ("audited")


def is_url(where: Where) -> bool:
    return isinstance(where, str) and where.startswith(("postgresql://", "postgres://"))


class AuditedTable:
    def __init__(self, where: Where, name: str) -> None:
        if not name.isidentifier():
            raise ValueError(f"table name must be an identifier, got {name!r}")
        self.where = where
        self.shared = is_url(where)
        # In PostgreSQL the tables carry a prefix: they share a database with the signal store.
        self.name = f"tiergate_{name}" if self.shared else name
        self._lock = threading.Lock()
        self._pg: Any = None  # one psycopg connection, opened on first use

    @property
    def path(self) -> Path:
        """The SQLite file (only for a table that is not shared)."""
        assert isinstance(self.where, Path), "a shared table has no file"
        return self.where

    def exists(self) -> bool:
        return self.shared or self.path.exists()

    # -- connections -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _sql(self) -> Iterator[tuple[Any, str]]:
        """(connection, parameter mark) for one call; SQLite commits at the end, PostgreSQL is in
        autocommit (writes take a transaction of their own)."""
        if not self.shared:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
                yield conn, "?"
            return
        import psycopg

        with self._lock:
            if self._pg is None or self._pg.closed or self._pg.broken:
                self._pg = psycopg.connect(str(self.where), autocommit=True, connect_timeout=10)
            try:
                yield self._pg, "%s"
            except psycopg.Error:
                self._pg.close()
                self._pg = None
                raise

    def close(self) -> None:
        with self._lock:
            if self._pg is not None:
                self._pg.close()
                self._pg = None

    # -- the table -----------------------------------------------------------------------------
    def open(self) -> dict[str, dict[str, Any]]:
        """Create the tables if needed; returns the stored bodies by tenant."""
        return self.load()[0]

    def load(self) -> tuple[dict[str, dict[str, Any]], int]:
        """Create the tables if needed; returns the stored bodies by tenant and the stamp they
        are at. The stamp is read first: a write landing in between shows as a newer stamp
        (read again later), never as a body the stamp claims to cover."""
        seq = "BIGSERIAL" if self.shared else "INTEGER"
        auto = "" if self.shared else " AUTOINCREMENT"
        real = "DOUBLE PRECISION" if self.shared else "REAL"
        with self._sql() as (conn, _):
            with conn.transaction() if self.shared else contextlib.nullcontext():
                if self.shared:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(f"CREATE TABLE IF NOT EXISTS {self.name} (tenant TEXT PRIMARY KEY, body TEXT NOT NULL)")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.name}_audit (seq {seq} PRIMARY KEY{auto},"
                    f" at {real} NOT NULL, actor TEXT NOT NULL, tenant TEXT NOT NULL, old TEXT, new TEXT NOT NULL)"
                )
            stamp = conn.execute(f"SELECT max(seq) FROM {self.name}_audit").fetchone()[0]
            rows = conn.execute(f"SELECT tenant, body FROM {self.name}").fetchall()
        return {tenant: json.loads(body) for tenant, body in rows}, int(stamp or 0)

    def write(self, tenant: str, old: dict[str, Any] | None, new: dict[str, Any], actor: str) -> None:
        """Store `new` for `tenant` and append who changed it from what, in one transaction."""
        audit_row = (time.time(), actor, tenant, json.dumps(old) if old is not None else None, json.dumps(new))
        with self._sql() as (conn, p), conn.transaction() if self.shared else contextlib.nullcontext():
            conn.execute(
                f"INSERT INTO {self.name} (tenant, body) VALUES ({p}, {p})"
                " ON CONFLICT (tenant) DO UPDATE SET body = EXCLUDED.body",
                (tenant, json.dumps(new)),
            )
            conn.execute(
                f"INSERT INTO {self.name}_audit (at, actor, tenant, old, new) VALUES ({p}, {p}, {p}, {p}, {p})",
                audit_row,
            )
            if self.shared:
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self.name))

    def stamp(self) -> int:
        """The newest audit row's number: it moves with every write, from any process."""
        with self._sql() as (conn, _):
            row = conn.execute(f"SELECT max(seq) FROM {self.name}_audit").fetchone()
        return int(row[0] or 0)

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest audit rows first."""
        with self._sql() as (conn, p):
            rows = conn.execute(
                f"SELECT seq, at, actor, tenant, old, new FROM {self.name}_audit ORDER BY seq DESC LIMIT {p}", (limit,)
            ).fetchall()
        return [
            {"seq": s, "at": at, "actor": a, "tenant": t, "old": json.loads(o) if o else None, "new": json.loads(n)}
            for s, at, a, t, o, n in rows
        ]
