"""Per-key usage shared by gateway replicas, so a key's limits hold across all of them.

Each replica's `Limiter` (limits.py) enforces a key's buckets and teacher budget in memory: a
database round trip per request would cost more than the request. With `signal.url`, every
replica also writes what each key used through it to one table (`tiergate_usage`: a row per
replica and key with its running totals) every `sync.interval_s`, and reads the other
replicas' rows back: what another replica admitted since the last read is taken out of this
replica's buckets (as debt, if need be), and the others' teacher spend today counts against
the key's daily budget. A key so gets its limits once across N replicas, not N times, give or
take what the others admit within one interval. A replica that restarts (a new id) finds its
former self's spend today among the others' rows.

It does not coordinate each admission (no lock, lease or counter per request), and it is not
used where the state is a file: one process, nothing to share.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import psycopg

KEEP_S = 2 * 86_400.0  # rows untouched this long (replicas gone days ago) are deleted
RECENT_S = 120.0  # a row this old holds nothing a bucket (one minute's worth) still remembers


class Totals(NamedTuple):
    """What one replica admitted for one key since `born` (wall time; its totals start from 0
    there): requests, tokens (net of settlement), teacher calls; and its teacher spend in US
    dollars on UTC day `day`."""

    requests: float
    tokens: float
    calls: float
    day: int
    usd: float
    born: float


class SharedUsage:
    """The `tiergate_usage` table in the shared PostgreSQL database, for one replica. Blocking:
    call `exchange` in a thread. One connection, reopened after an error."""

    def __init__(self, url: str, replica: str | None = None) -> None:
        self.url = url
        self.replica = replica or uuid.uuid4().hex
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._next_prune = 0.0

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg  # only where replicas share a database: a lone gateway never loads it

        if self._conn is None or self._conn.closed or self._conn.broken:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS tiergate_usage (replica TEXT NOT NULL, tenant TEXT NOT NULL,"
                " requests DOUBLE PRECISION NOT NULL, tokens DOUBLE PRECISION NOT NULL,"
                " calls DOUBLE PRECISION NOT NULL, day BIGINT NOT NULL, usd DOUBLE PRECISION NOT NULL,"
                " born DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (replica, tenant))"
            )
            self._conn = conn
        return self._conn

    def exchange(self, mine: dict[str, Totals], today: int) -> dict[tuple[str, str], Totals]:
        """Write this replica's changed totals, and return the other replicas' rows that matter
        now: those written in the last two minutes (their recent admissions) and those that
        hold spend today, keyed by (replica, tenant)."""
        import psycopg

        now = time.time()
        with self._lock:
            try:
                conn = self._connect()
                with conn.transaction():
                    if mine:
                        conn.cursor().executemany(
                            "INSERT INTO tiergate_usage"
                            " (replica, tenant, requests, tokens, calls, day, usd, born, updated_at)"
                            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (replica, tenant) DO UPDATE SET"
                            " requests = EXCLUDED.requests, tokens = EXCLUDED.tokens, calls = EXCLUDED.calls,"
                            " day = EXCLUDED.day, usd = EXCLUDED.usd, born = EXCLUDED.born,"
                            " updated_at = EXCLUDED.updated_at",
                            [(self.replica, tenant, *totals, now) for tenant, totals in mine.items()],
                        )
                    if now >= self._next_prune:
                        self._next_prune = now + 3600.0
                        conn.execute("DELETE FROM tiergate_usage WHERE updated_at < %s", (now - KEEP_S,))
                    rows = conn.execute(
                        "SELECT replica, tenant, requests, tokens, calls, day, usd, born FROM tiergate_usage"
                        " WHERE replica <> %s AND (updated_at > %s OR (day = %s AND usd > 0))",
                        (self.replica, now - RECENT_S, today),
                    ).fetchall()
            except psycopg.Error:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                raise
        return {
            (r[0], r[1]): Totals(float(r[2]), float(r[3]), float(r[4]), int(r[5]), float(r[6]), float(r[7]))
            for r in rows
        }

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
