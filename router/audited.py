"""Per-tenant JSON settings in one SQLite table, each change kept in an append-only audit trail.

`AuditedTable(path, "policy")` owns the tables `policy (tenant, body)` and `policy_audit (seq,
at, actor, tenant, old, new)`; the policy book and the gateway's limits each keep one, in the
same file, so every runtime change of either is audited the same way. It stores and reads JSON
only: what a body means is its owner's business. Every method blocks: call it in a thread.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any


class AuditedTable:
    def __init__(self, path: Path, name: str) -> None:
        if not name.isidentifier():
            raise ValueError(f"table name must be an identifier, got {name!r}")
        self.path = path
        self.name = name

    def open(self) -> dict[str, dict[str, Any]]:
        """Create the file and tables if needed; returns the stored bodies by tenant."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {self.name} (tenant TEXT PRIMARY KEY, body TEXT NOT NULL)")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.name}_audit (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                " at REAL NOT NULL, actor TEXT NOT NULL, tenant TEXT NOT NULL, old TEXT, new TEXT NOT NULL)"
            )
            rows = conn.execute(f"SELECT tenant, body FROM {self.name}").fetchall()
        return {tenant: json.loads(body) for tenant, body in rows}

    def write(self, tenant: str, old: dict[str, Any] | None, new: dict[str, Any], actor: str) -> None:
        """Store `new` for `tenant` and append who changed it from what, in one transaction."""
        with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
            conn.execute(f"INSERT OR REPLACE INTO {self.name} (tenant, body) VALUES (?, ?)", (tenant, json.dumps(new)))
            conn.execute(
                f"INSERT INTO {self.name}_audit (at, actor, tenant, old, new) VALUES (?, ?, ?, ?, ?)",
                (time.time(), actor, tenant, json.dumps(old) if old is not None else None, json.dumps(new)),
            )

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest audit rows first."""
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            rows = conn.execute(
                f"SELECT seq, at, actor, tenant, old, new FROM {self.name}_audit ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        return [
            {"seq": s, "at": at, "actor": a, "tenant": t, "old": json.loads(o) if o else None, "new": json.loads(n)}
            for s, at, a, t, o, n in rows
        ]
