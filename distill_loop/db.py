"""Where signal records live: a SQLite file (the embedded default) or a PostgreSQL database.

`signal_db(config)` picks one: `signal.url: postgresql://…` selects PostgreSQL, shared by every
gateway replica and trainer; otherwise `signal.path` is a SQLite file in WAL mode. Both hold the
same schema (the same columns, JSON as text), migrated by version, and answer the same queries,
so the store's writer, the loop, the export, what-if and calibration read through one interface.

Here is only SQL and connections: rows arrive as tuples in `COLUMNS` order and leave the same
way. Turning records into rows, batching, redaction and spilling are `store.py`'s. psycopg is
imported only when a PostgreSQL URL is used, so SQLite deployments (and the vLLM venv, which
imports this package) need no driver.
"""

from __future__ import annotations

import atexit
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from distill_loop.config import SignalConfig
from distill_loop.errors import RecordRejected, SignalDBError, SignalStoreError

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

COLUMNS = (
    "id, created_at, tenant, kind, reason, messages, student, confidence, features, teacher, threshold, metadata, "
    "critique, draft_scores, sampling_weight, client_request_id, truncated_from"
)
_N_COLUMNS = COLUMNS.count(",") + 1
Row = tuple[Any, ...]

# -- SQLite ------------------------------------------------------------------------------------
# The signal table's columns in order, as SQLite declares them ({kinds}: the kinds its CHECK allows).
_SQLITE_COLUMNS = (
    "id TEXT PRIMARY KEY",
    "created_at REAL NOT NULL",
    "tenant TEXT NOT NULL",
    "kind TEXT NOT NULL CHECK (kind IN ({kinds}))",
    "reason TEXT NOT NULL",
    "messages TEXT NOT NULL",
    "student TEXT",
    "confidence REAL",
    "features TEXT NOT NULL",
    "teacher TEXT NOT NULL",
    "threshold REAL NOT NULL",
    "metadata TEXT NOT NULL",
    "critique TEXT",
    "draft_scores TEXT",
    "sampling_weight REAL",
    "client_request_id TEXT",
    "truncated_from INTEGER",
)


def _rebuilt(n_columns: int, kinds: tuple[str, ...]) -> str:
    """A migration step that rebuilds the signal table of its first `n_columns` columns with a
    new kind CHECK (SQLite cannot alter one), keeping every row and the index."""
    columns = _SQLITE_COLUMNS[:n_columns]
    names = ", ".join(c.split()[0] for c in columns)
    allowed = ", ".join(f"'{k}'" for k in kinds)
    declared = ",\n        ".join(columns).format(kinds=allowed)
    return f"""
    CREATE TABLE signal_new (
        {declared}
    );
    INSERT INTO signal_new ({names}) SELECT {names} FROM signal;
    DROP TABLE signal;
    ALTER TABLE signal_new RENAME TO signal;
    CREATE INDEX signal_created_at ON signal (created_at);
    """


# Each entry moves the schema from version i to i+1 (PRAGMA user_version). Append only, and
# add the same step to PG_MIGRATIONS.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE signal (
        id          TEXT PRIMARY KEY,
        created_at  REAL NOT NULL,
        tenant      TEXT NOT NULL,
        kind        TEXT NOT NULL CHECK (kind IN ('escalation', 'audit')),
        reason      TEXT NOT NULL,
        messages    TEXT NOT NULL,
        student     TEXT,
        confidence  REAL,
        features    TEXT NOT NULL,
        teacher     TEXT NOT NULL,
        threshold   REAL NOT NULL,
        metadata    TEXT NOT NULL
    );
    CREATE INDEX signal_created_at ON signal (created_at);
    CREATE TABLE dead_letter (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        record_id   TEXT,
        failed_at   REAL NOT NULL,
        error       TEXT NOT NULL,
        payload     TEXT NOT NULL
    );
    """,
    # v2: the teacher's critique of a rejected draft, filled in by the distillation loop.
    "ALTER TABLE signal ADD COLUMN critique TEXT",
    # v3: the teacher's per-token logprobs of the student's draft (JSON), where enabled.
    "ALTER TABLE signal ADD COLUMN draft_scores TEXT",
    # v4: how many requests the record stands for as sampled (1/audit fraction for audits);
    # NULL on older rows, whose audit fraction was not kept.
    "ALTER TABLE signal ADD COLUMN sampling_weight REAL",
    # v5: active labels (kind 'label'). SQLite cannot alter a CHECK, so the table is rebuilt
    # with the same columns in the same order, and its index recreated.
    _rebuilt(15, ("escalation", "audit", "label")),
    # v6: the client's x-request-id, stored beside the gateway's own id (which is the key);
    # and, for a record cut to signal.max_record_bytes, the size of its texts before the cut.
    """
    ALTER TABLE signal ADD COLUMN client_request_id TEXT;
    ALTER TABLE signal ADD COLUMN truncated_from INTEGER
    """,
    # v7: escalations answered from the teacher cache (kind 'cache_hit'). Rebuilt as in v5.
    _rebuilt(17, ("escalation", "audit", "label", "cache_hit")),
)
SCHEMA_VERSION = len(MIGRATIONS)

# -- PostgreSQL --------------------------------------------------------------------------------
# PostgreSQL support began at schema version 6: a new database is created at that version in
# one step, and each later version appends a step here as it does to MIGRATIONS.
PG_BASELINE = 6
PG_SCHEMA = """
    CREATE TABLE signal (
        id                TEXT PRIMARY KEY,
        created_at        DOUBLE PRECISION NOT NULL,
        tenant            TEXT NOT NULL,
        kind              TEXT NOT NULL CHECK (kind IN ('escalation', 'audit', 'label')),
        reason            TEXT NOT NULL,
        messages          TEXT NOT NULL,
        student           TEXT,
        confidence        DOUBLE PRECISION,
        features          TEXT NOT NULL,
        teacher           TEXT NOT NULL,
        threshold         DOUBLE PRECISION NOT NULL,
        metadata          TEXT NOT NULL,
        critique          TEXT,
        draft_scores      TEXT,
        sampling_weight   DOUBLE PRECISION,
        client_request_id TEXT,
        truncated_from    BIGINT
    );
    CREATE INDEX signal_created_at ON signal (created_at);
    CREATE TABLE dead_letter (
        seq         BIGSERIAL PRIMARY KEY,
        record_id   TEXT,
        failed_at   DOUBLE PRECISION NOT NULL,
        error       TEXT NOT NULL,
        payload     TEXT NOT NULL
    );
"""
PG_MIGRATIONS: tuple[str, ...] = (
    # v7: as MIGRATIONS[6].
    """
    ALTER TABLE signal DROP CONSTRAINT signal_kind_check;
    ALTER TABLE signal ADD CONSTRAINT signal_kind_check
        CHECK (kind IN ('escalation', 'audit', 'label', 'cache_hit'))
    """,
)
assert PG_BASELINE + len(PG_MIGRATIONS) == SCHEMA_VERSION, "a schema step is missing for PostgreSQL"
_MIGRATION_LOCK = 0x7469657267617465  # pg_advisory_xact_lock key ("tiergate"): one migrator at a time


class DBWriter(ABC):
    """The writer thread's connection. `insert` is one transaction: every row or none."""

    @abstractmethod
    def insert(self, rows: Sequence[Row]) -> None:
        """Raises RecordRejected if a row breaks a constraint (nothing written), SignalDBError
        if the database fails (nothing written; try again later)."""

    @abstractmethod
    def dead_letter(self, record_id: str, failed_at: float, error: str, payload: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class SignalDB(ABC):
    """One signal database; safe to share between threads (each call uses its own connection,
    or the pool's)."""

    name: str  # for logs: the file, or the URL without its password

    @abstractmethod
    def exists(self) -> bool:
        """Whether there is a database to read (a SQLite file is only made by a store's open)."""

    @abstractmethod
    def migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION; returns the version found before."""

    @abstractmethod
    def writer(self) -> DBWriter: ...

    @abstractmethod
    def rows(self, since: float = 0.0, kind: str | None = None) -> Iterator[Row]:
        """Records created at or after `since` (of one kind, if given), oldest first, in COLUMNS order."""

    @abstractmethod
    def teacher_usage_since(self, since: float) -> dict[str, tuple[int, int]]:
        """Per tenant, the prompt and completion tokens of teacher answers recorded since `since`
        (a cache hit's answer was paid for once, by the record it was first asked for)."""

    @abstractmethod
    def pending_since(self, since: float) -> tuple[int, float | None]:
        """How many records were created after `since`, and when the oldest of them was."""

    @abstractmethod
    def set_critique(self, record_id: str, critique: str) -> None: ...

    @abstractmethod
    def count(self) -> int: ...


class SqliteDB(SignalDB):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    def connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a committed record survives power loss
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def exists(self) -> bool:
        return self.path.exists()

    def migrate(self) -> int:
        conn = self.connect()
        try:
            found = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if found > SCHEMA_VERSION:
                raise SignalStoreError(f"database schema {found} is newer than this code ({SCHEMA_VERSION})")
            for version in range(found, SCHEMA_VERSION):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in MIGRATIONS[version].split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    conn.execute(f"PRAGMA user_version={version + 1}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            return found
        finally:
            conn.close()

    def writer(self) -> DBWriter:
        return _SqliteWriter(self)

    def _read(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise SignalStoreError(f"no signal database at {self.path}")
        return self.connect()

    def rows(self, since: float = 0.0, kind: str | None = None) -> Iterator[Row]:
        conn = self._read()
        try:
            sql = f"SELECT {COLUMNS} FROM signal WHERE created_at >= ?"
            args: list[Any] = [since]
            if kind:
                sql += " AND kind = ?"
                args.append(kind)
            yield from conn.execute(sql + " ORDER BY created_at, id", args)
        finally:
            conn.close()

    def teacher_usage_since(self, since: float) -> dict[str, tuple[int, int]]:
        if not self.path.exists():
            return {}
        conn = self.connect()
        try:
            rows = conn.execute(
                "SELECT tenant, sum(json_extract(teacher, '$.usage[0]')), sum(json_extract(teacher, '$.usage[1]'))"
                " FROM signal WHERE created_at >= ? AND kind != 'cache_hit' GROUP BY tenant",
                (since,),
            )
            return {tenant: (int(p or 0), int(c or 0)) for tenant, p, c in rows}
        finally:
            conn.close()

    def pending_since(self, since: float) -> tuple[int, float | None]:
        conn = self._read()
        try:
            n, oldest = conn.execute(
                "SELECT count(*), min(created_at) FROM signal WHERE created_at > ?", (since,)
            ).fetchone()
            return int(n), oldest
        finally:
            conn.close()

    def set_critique(self, record_id: str, critique: str) -> None:
        conn = self._read()
        try:
            conn.execute("UPDATE signal SET critique = ? WHERE id = ?", (critique, record_id))
        finally:
            conn.close()

    def count(self) -> int:
        conn = self._read()
        try:
            return int(conn.execute("SELECT count(*) FROM signal").fetchone()[0])
        finally:
            conn.close()


class _SqliteWriter(DBWriter):
    _insert = f"INSERT INTO signal ({COLUMNS}) VALUES ({', '.join('?' * _N_COLUMNS)})"

    def __init__(self, db: SqliteDB) -> None:
        self._conn = db.connect()

    def insert(self, rows: Sequence[Row]) -> None:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(self._insert, rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError as exc:
            raise RecordRejected(str(exc)) from exc
        except sqlite3.Error as exc:  # disk full, locked, I/O
            raise SignalDBError(str(exc)) from exc

    def dead_letter(self, record_id: str, failed_at: float, error: str, payload: str) -> None:
        try:
            self._conn.execute(
                "INSERT INTO dead_letter (record_id, failed_at, error, payload) VALUES (?,?,?,?)",
                (record_id, failed_at, error, payload),
            )
        except sqlite3.Error as exc:
            raise SignalDBError(str(exc)) from exc

    def close(self) -> None:
        self._conn.close()


class PostgresDB(SignalDB):
    """Readers share a small pool; the writer thread holds its own connection and opens a new
    one after the database failed. Commits are durable (synchronous_commit, the server's default)."""

    def __init__(self, url: str) -> None:
        import psycopg  # noqa: F401 - fail at start-up, not at the first record, if it is missing

        self.url = url
        self.name = without_password(url)
        self._pool: ConnectionPool[Any] | None = None
        self._lock = threading.Lock()
        self._exists = False

    def connect(self) -> psycopg.Connection[Any]:
        """A connection that waits at most 10 s for a lock, as SQLite's busy_timeout: a writer
        stuck behind a lock fails, retries and at shutdown spills, rather than hanging."""
        import psycopg

        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=10, options="-c lock_timeout=10000")
        except psycopg.Error as exc:
            raise SignalDBError(f"cannot connect to {self.name}: {exc}") from exc

    def _reader(self) -> ConnectionPool[Any]:
        with self._lock:
            if self._pool is None:
                from psycopg_pool import ConnectionPool

                self._pool = ConnectionPool(
                    self.url, min_size=0, max_size=4, kwargs={"autocommit": True}, open=True, name="tiergate-signal"
                )
                atexit.register(self._pool.close)
            return self._pool

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        import psycopg

        try:
            with self._reader().connection() as conn:
                return list(conn.execute(sql, args))
        except psycopg.Error as exc:
            raise SignalDBError(f"{self.name}: {exc}") from exc

    def exists(self) -> bool:
        # A trainer may start before any gateway has opened a store and made the schema: until
        # then there is nothing to read, not an error at every tick. Tables are never dropped,
        # so once seen the answer is kept. An unreachable server still raises.
        if not self._exists:
            self._exists = bool(self._query("SELECT to_regclass('signal') IS NOT NULL")[0][0])
        return self._exists

    def migrate(self) -> int:
        import psycopg

        conn = self.connect()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS tiergate_schema (version INTEGER NOT NULL)")
                row = conn.execute("SELECT version FROM tiergate_schema").fetchone()
                found = int(row[0]) if row else 0
                if found > SCHEMA_VERSION:
                    raise SignalStoreError(f"database schema {found} is newer than this code ({SCHEMA_VERSION})")
                if found == 0:
                    conn.execute(PG_SCHEMA)
                    conn.execute("INSERT INTO tiergate_schema (version) VALUES (%s)", (PG_BASELINE,))
                for version in range(max(found, PG_BASELINE), SCHEMA_VERSION):
                    conn.execute(PG_MIGRATIONS[version - PG_BASELINE])
                conn.execute("UPDATE tiergate_schema SET version = %s", (SCHEMA_VERSION,))
            return found
        except psycopg.Error as exc:
            raise SignalDBError(f"{self.name}: migration failed: {exc}") from exc
        finally:
            conn.close()

    def writer(self) -> DBWriter:
        return _PostgresWriter(self)

    def rows(self, since: float = 0.0, kind: str | None = None) -> Iterator[Row]:
        import psycopg

        sql = f"SELECT {COLUMNS} FROM signal WHERE created_at >= %s"
        args: list[Any] = [since]
        if kind:
            sql += " AND kind = %s"
            args.append(kind)
        try:
            with self._reader().connection() as conn, conn.cursor() as cur:
                cur.execute(sql + " ORDER BY created_at, id", args)
                while batch := cur.fetchmany(500):
                    yield from batch
        except psycopg.Error as exc:
            raise SignalDBError(f"{self.name}: {exc}") from exc

    def teacher_usage_since(self, since: float) -> dict[str, tuple[int, int]]:
        rows = self._query(
            "SELECT tenant, sum(((teacher::json)->'usage'->>0)::bigint), sum(((teacher::json)->'usage'->>1)::bigint)"
            " FROM signal WHERE created_at >= %s AND kind != 'cache_hit' GROUP BY tenant",
            (since,),
        )
        return {tenant: (int(p or 0), int(c or 0)) for tenant, p, c in rows}

    def pending_since(self, since: float) -> tuple[int, float | None]:
        ((n, oldest),) = self._query("SELECT count(*), min(created_at) FROM signal WHERE created_at > %s", (since,))
        return int(n), oldest

    def set_critique(self, record_id: str, critique: str) -> None:
        # PostgreSQL text cannot hold NUL; a model's output can.
        self._query("UPDATE signal SET critique = %s WHERE id = %s", (critique.replace("\x00", ""), record_id))

    def count(self) -> int:
        return int(self._query("SELECT count(*) FROM signal")[0][0])


class _PostgresWriter(DBWriter):
    _insert = f"INSERT INTO signal ({COLUMNS}) VALUES ({', '.join(['%s'] * _N_COLUMNS)})"

    def __init__(self, db: PostgresDB) -> None:
        self._db = db
        self._conn: psycopg.Connection[Any] | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._db.connect()
        return self._conn

    def insert(self, rows: Sequence[Row]) -> None:
        import psycopg

        try:
            conn = self._connection()
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(self._insert, rows)
        except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
            raise RecordRejected(str(exc).strip()) from exc
        except psycopg.Error as exc:  # the server is down, restarting or out of space
            self._drop()
            raise SignalDBError(f"{self._db.name}: {str(exc).strip()}") from exc

    def dead_letter(self, record_id: str, failed_at: float, error: str, payload: str) -> None:
        import psycopg

        try:
            self._connection().execute(
                "INSERT INTO dead_letter (record_id, failed_at, error, payload) VALUES (%s, %s, %s, %s)",
                (record_id, failed_at, error.replace("\x00", ""), payload.replace("\x00", "")),
            )
        except psycopg.Error as exc:
            self._drop()
            raise SignalDBError(f"{self._db.name}: {str(exc).strip()}") from exc

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._drop()


def without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


_postgres: dict[str, PostgresDB] = {}
_postgres_lock = threading.Lock()


def signal_db(where: SignalConfig | SignalDB | Path) -> SignalDB:
    """The database a store's config names (its URL if set, else its SQLite path); a Path is a
    SQLite file. One PostgresDB (and reader pool) per URL in a process."""
    if isinstance(where, SignalDB):
        return where
    if isinstance(where, Path):
        return SqliteDB(where)
    if where.url is None:
        return SqliteDB(where.path)
    with _postgres_lock:
        db = _postgres.get(where.url)
        if db is None:
            db = _postgres[where.url] = PostgresDB(where.url)
        return db
