"""The curriculum store in PostgreSQL, for collectors and trainers on several machines.

Same contract as ``SQLiteStore`` (store.py), same buffer SQL (``_SqlBuffer``). One schema per run
(tables in store_rows.py beside SQLite's, with ``DOUBLE PRECISION`` scores: PostgreSQL's ``REAL`` has 4 bytes
and would change eviction ties, and identity columns for the order groups were recorded in).

Serial where the ExIt rules need it: every write transaction first takes the run's advisory lock
(``pg_advisory_xact_lock``, released at commit, rollback or a dead session), so top-N, eviction
and dedup see the buffer one collector at a time, exactly as under SQLite's write lock. Writes run
at READ COMMITTED on purpose: each statement after the lock sees what the previous holder
committed (REPEATABLE READ would keep the snapshot taken by the lock statement, before the wait).
Reads that need one consistent picture run as REPEATABLE READ, READ ONLY.

Connection failures (a restarted or unreachable server, a cut session) are retried here, and only
here, for up to ``reconnect_s``: a transaction that failed before COMMIT wrote nothing and runs
again whole; one whose COMMIT got no answer is checked (``record_group``: is the group there?) or
is idempotent (consumption, meta, staleness drops). Then ``StoreUnavailable``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import IsolationLevel, sql
from psycopg.types.string import StrDumper
from psycopg_pool import ConnectionPool
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from exitagent.curriculum.store import (
    SCHEMA_VERSION,
    Buffer,
    StoreProgress,
    _check_consumed,
    _check_distinct,
    _SqlBuffer,
)
from exitagent.curriculum.store_rows import (
    ENTRY_COLUMNS,
    GROUP_SELECT,
    PG_GROUP_INSERT,
    PG_ROLLOUTS_OF,
    PG_SCHEMA,
    PROGRESS,
    entry_from_row,
    group_from_row,
    rollout_from_row,
    rollout_row,
)
from exitagent.errors import ConfigError, StoreError, StoreRefused, StoreUnavailable
from exitagent.types import BufferEntry, Group, StoredGroup

log = structlog.get_logger(__name__)

R = TypeVar("R")

class _NulFreeText(StrDumper):
    """PostgreSQL text cannot hold NUL; a model can write one. It is stored as U+FFFD (the one
    place the two stores differ: SQLite keeps the NUL)."""

    def dump(self, obj: str) -> Any:
        return super().dump(obj.replace("\x00", "\ufffd"))


class _Lost(Exception):
    """The connection failed inside a transaction; ``committing``: during its COMMIT (outcome unknown)."""

    def __init__(self, error: BaseException, *, committing: bool) -> None:
        super().__init__(str(error))
        self.error, self.committing = error, committing


def lock_key(schema: str) -> int:
    """The run's advisory lock: a signed 64-bit number derived from its schema name."""
    return int.from_bytes(hashlib.blake2b(f"exitagent:{schema}".encode(), digest_size=8).digest(), "big", signed=True)


class _SnapshotBuffer:
    """A read-only ``Buffer``: the live ids, scores and keys of one moment, read at once, and an
    entry's content (which never changes once written) read when asked for. So a view needs no
    open transaction, and a connection lost during one is retried like any read."""

    def __init__(self, live: Sequence[tuple[int, float, str]], fetch: Callable[[int], BufferEntry | None]) -> None:
        self._live = {entry_id: (score, key) for entry_id, score, key in live}
        self._fetch = fetch

    def size(self) -> int:
        return len(self._live)

    def scores(self) -> list[tuple[int, float]]:
        return [(i, score) for i, (score, _) in sorted(self._live.items())]

    def get(self, entry_id: int) -> BufferEntry | None:
        if entry_id not in self._live:
            return None
        entry = self._fetch(entry_id)
        return None if entry is None else replace(entry, score=self._live[entry_id][0])

    def has_key(self, key: str) -> bool:
        return any(k == key for _, k in self._live.values())

    def lowest(self) -> tuple[int, float] | None:
        if not self._live:
            return None
        entry_id, (score, _) = min(self._live.items(), key=lambda item: (item[1][0], item[0]))
        return entry_id, score

    def insert(self, entry: BufferEntry) -> int:
        raise StoreError("a buffer view is read-only: change the buffer inside record_group")

    def evict(self, entry_id: int) -> None:
        self.insert(None)  # type: ignore[arg-type]

    def set_score(self, entry_id: int, score: float) -> bool:
        return bool(self.insert(None))  # type: ignore[arg-type]


class _LockedBuffer(_SnapshotBuffer):
    """The buffer inside a write transaction. Under the run's lock no other process changes it,
    so the live ids, scores and keys are read once and kept up to date here, and every write also
    goes to the database. The ExIt rules ask size and lowest many times per group: each was a round
    trip (about 55 per group of 8, most of the store's time in benchmarks/store.py)."""

    def __init__(self, live: Sequence[tuple[int, float, str]], sql: _SqlBuffer) -> None:
        super().__init__(live, sql.get)
        self._sql = sql

    def get(self, entry_id: int) -> BufferEntry | None:
        return self._sql.get(entry_id) if entry_id in self._live else None

    def insert(self, entry: BufferEntry) -> int:
        entry_id = self._sql.insert(entry)
        self._live[entry_id] = (entry.score, entry.key)
        return entry_id

    def evict(self, entry_id: int) -> None:
        self._sql.evict(entry_id)
        self._live.pop(entry_id, None)

    def set_score(self, entry_id: int, score: float) -> bool:
        if not self._sql.set_score(entry_id, score):
            return False
        self._live[entry_id] = (score, self._live[entry_id][1])
        return True


class PostgresStore:
    """``CurriculumStore`` in schema ``schema`` of the PostgreSQL database at ``url``.

    Opening checks the server (clear errors for an unreachable server and a refused login) and
    creates the schema or checks its version. Safe to share between threads of one process. Pooled
    connections are not checked before use (a round trip each): one that died while idle fails its
    first statement, before anything is written, and the transaction is retried on a fresh one.
    """

    def __init__(self, url: str, *, schema: str, shown: str | None = None, reconnect_s: float = 60.0,
                 pool_size: int = 4, connect_timeout_s: float = 10.0) -> None:
        self.schema, self.shown, self.reconnect_s = schema, shown or url, reconnect_s
        self._lock_key = lock_key(schema)
        self._check_login(url, connect_timeout_s)
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, configure=self._configure,
            kwargs={"connect_timeout": int(connect_timeout_s)},
            timeout=connect_timeout_s, name=f"exitagent-{schema}",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
            self._open_schema()
        except psycopg.OperationalError as error:  # gone again between the check and the pool
            self._pool.close()
            raise StoreUnavailable(f"cannot open the curriculum store {self.shown}: {error}") from error
        except BaseException:
            self._pool.close()
            raise

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.close()

    def _check_login(self, url: str, timeout_s: float) -> None:
        try:
            psycopg.connect(url, connect_timeout=int(timeout_s)).close()
        except psycopg.OperationalError as error:
            text = str(error).strip().replace("\n", " ")
            refused: type[StoreUnavailable] = StoreRefused
            if "password" in text or "authentication" in text:
                hint = "check the user and password (PGPASSWORD, ~/.pgpass or the URL file)"
            elif "does not exist" in text:
                hint = "create the database, or name an existing one in the URL"
            else:
                refused, hint = StoreUnavailable, "is PostgreSQL running there, and reachable from this machine?"
            raise refused(f"cannot open the curriculum store {self.shown}: {text} ({hint})") from error
        except psycopg.ProgrammingError as error:  # libpq could not parse the URL itself
            raise ConfigError(f"not a valid PostgreSQL URL {self.shown}: {error}") from error

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.adapters.register_dumper(str, _NulFreeText)
        conn.autocommit = True  # SET outside a transaction: the pool wants the connection idle afterwards
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        # A collector stopped (SIGSTOP, a hung machine) inside a write would hold the run's lock forever.
        conn.execute("SET idle_in_transaction_session_timeout = '300s'")
        conn.autocommit = False

    # --- transactions and the one retry place ---

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[psycopg.Connection[Any]]:
        committing = False
        try:
            with self._pool.connection() as conn:
                # Set on the connection, these go out with its BEGIN: no round trip of their own.
                conn.isolation_level = IsolationLevel.READ_COMMITTED if write else IsolationLevel.REPEATABLE_READ
                conn.read_only = not write
                with conn.transaction():
                    if write:
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
                    yield conn
                committing = True
        except psycopg.OperationalError as error:  # the server went away (PoolTimeout is one too)
            raise _Lost(error, committing=committing) from error
        except psycopg.Error as error:
            raise StoreError(f"curriculum store {self.shown}: {error}") from error

    def _retrying(self, what: str, attempt: Callable[[], R]) -> R:
        def note(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning("store_reconnecting", store=self.shown, during=what, attempt=state.attempt_number,
                        error=str(error).strip().splitlines()[0] if error else "")

        retrying = Retrying(retry=retry_if_exception_type(_Lost), stop=stop_after_delay(self.reconnect_s),
                            wait=wait_exponential_jitter(multiplier=0.1, max=2.0), before_sleep=note, reraise=True)
        try:
            return retrying(attempt)
        except _Lost as lost:
            raise StoreUnavailable(
                f"lost the curriculum store {self.shown} during {what} and could not reconnect in "
                f"{self.reconnect_s:.0f} s: {str(lost).strip().splitlines()[0]}"
            ) from lost

    def _run(self, what: str, body: Callable[[psycopg.Connection[Any]], R], *, write: bool) -> R:
        """``body`` in one transaction, retried whole: only for bodies that are safe to repeat."""

        def attempt() -> R:
            with self._tx(write=write) as conn:
                return body(conn)

        return self._retrying(what, attempt)

    def _open_schema(self) -> None:
        def body(conn: psycopg.Connection[Any]) -> None:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            tables = {r[0] for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (self.schema,))}
            if not tables:
                conn.execute(PG_SCHEMA)
                conn.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
                log.info("store_created", store=self.shown, schema=self.schema, schema_version=SCHEMA_VERSION)
                return
            if "schema_version" not in tables:
                raise StoreError(f"schema {self.schema} of {self.shown} is not an exitagent curriculum store "
                                 f"(it has tables {sorted(tables)})")
            version = int(conn.execute("SELECT version FROM schema_version").fetchone()[0])  # type: ignore[index]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"curriculum store {self.shown} (schema {self.schema}) has schema version {version}, newer than "
                    f"this exitagent understands ({SCHEMA_VERSION}): upgrade exitagent, or use a new schema"
                )
            if version < SCHEMA_VERSION:  # PostgreSQL migrations start with the first schema change
                raise StoreError(f"curriculum store {self.shown} (schema {self.schema}) has schema version "
                                 f"{version} and no migration to {SCHEMA_VERSION} exists: use a new schema")

        self._run("opening", body, write=True)

    # --- the collector ---

    @contextmanager
    def view(self) -> Iterator[Buffer]:
        """A read-only snapshot of the buffer (e.g. to choose a start)."""
        live = self._run("a buffer view", lambda conn: conn.execute(
            "SELECT id, score, key FROM entries WHERE evicted IS NULL").fetchall(), write=False)
        yield _SnapshotBuffer(live, self._entry)

    def _entry(self, entry_id: int) -> BufferEntry | None:
        row = self._run("reading an entry", lambda conn: conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE id = %s", (entry_id,)).fetchone(), write=False)
        return entry_from_row(row) if row else None

    def record_group(self, group: Group, update: Callable[[Buffer], R]) -> R:
        """Atomically: run ``update`` on the buffer (children, refresh, eviction) and record ``group``.

        After a lost connection ``update`` runs again on the buffer as it is then: the failed
        attempt wrote nothing. When COMMIT itself got no answer, the group's presence tells.
        """
        return self._retrying(f"recording group {group.id}", lambda: self._record_once(group, update))

    def _record_once(self, group: Group, update: Callable[[Buffer], R]) -> R:
        done: list[R] = []
        try:
            with self._tx(write=True) as conn:
                live = conn.execute("SELECT id, score, key FROM entries WHERE evicted IS NULL").fetchall()
                done.append(update(_LockedBuffer(live, _SqlBuffer(_placeholders(conn), writable=True))))
                conn.execute(PG_GROUP_INSERT, (
                    group.id, group.task_id, group.entry_id, group.step_kind.value, group.variant.value,
                    group.version.step, str(group.version), group.depth, group.start_turn, time.time()))
                with conn.cursor() as cursor:
                    cursor.executemany("INSERT INTO rollouts VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                                       [rollout_row(group.id, i, r) for i, r in enumerate(group.rollouts)])
        except _Lost as lost:
            if not (lost.committing and done and self._has_group(group.id)):
                raise
            log.info("store_commit_confirmed", group_id=group.id)
        log.debug("group_written", group_id=group.id, step_kind=group.step_kind.value, rollouts=len(group.rollouts))
        return done[0]

    def _has_group(self, group_id: str) -> bool:
        return self._run("checking a commit", lambda conn: conn.execute(
            "SELECT 1 FROM groups WHERE id = %s", (group_id,)).fetchone() is not None, write=False)

    # --- the trainer ---

    def fetch_groups(self, *, min_version: int = 0, limit: int | None = None) -> list[StoredGroup]:
        """Unconsumed groups produced by policy step >= ``min_version``, oldest first, with rollouts."""

        def body(conn: psycopg.Connection[Any]) -> list[StoredGroup]:
            rows = conn.execute(f"{GROUP_SELECT} WHERE g.consumed_by_step IS NULL AND g.version_step >= %s "
                                "ORDER BY g.seq LIMIT %s", (min_version, limit)).fetchall()
            rollouts: dict[str, list[Any]] = {row[0]: [] for row in rows}
            for r in conn.execute(PG_ROLLOUTS_OF, (list(rollouts),)):
                rollouts[r[0]].append(rollout_from_row(r[1:]))
            return [group_from_row(row, tuple(rollouts[row[0]])) for row in rows]

        return self._run("fetching groups", body, write=False)

    def mark_consumed(self, group_ids: Sequence[str], step: int) -> None:
        """Record that trainer step ``step`` consumed these groups; all or none, idempotent (store.py)."""
        _check_distinct(group_ids)

        def body(conn: psycopg.Connection[Any]) -> None:
            cursor = conn.execute(
                "UPDATE groups SET consumed_by_step = %s WHERE id = ANY(%s) AND "
                "(consumed_by_step IS NULL OR (consumed_by_step = %s AND dropped = 0))", (step, list(group_ids), step))
            _check_consumed(cursor.rowcount, len(group_ids), step)

        self._run(f"consumption by step {step}", body, write=True)

    def drop_stale(self, min_version: int, step: int) -> int:
        """Mark unconsumed groups older than ``min_version`` as dropped by ``step``; returns how many."""
        return self._run("dropping stale groups", lambda conn: conn.execute(
            "UPDATE groups SET consumed_by_step = %s, dropped = 1 WHERE consumed_by_step IS NULL "
            "AND version_step < %s", (step, min_version)).rowcount, write=True)

    def unconsume(self, from_step: int) -> int:
        """Forget consumption by steps >= ``from_step`` (a trainer resumed from checkpoint from_step - 1)."""
        count = self._run("rolling back consumption", lambda conn: conn.execute(
            "UPDATE groups SET consumed_by_step = NULL, dropped = 0 WHERE consumed_by_step >= %s",
            (from_step,)).rowcount, write=True)
        log.info("groups_unconsumed", from_step=from_step, groups=count)
        return count

    # --- viewers ---

    def entries(self, *, live: bool = True) -> list[BufferEntry]:
        where = " WHERE evicted IS NULL" if live else ""
        rows = self._run("reading entries", lambda conn: conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries{where} ORDER BY id").fetchall(), write=False)
        return [entry_from_row(r) for r in rows]

    def groups(self) -> list[StoredGroup]:
        """Every group's header (no rollouts), oldest first."""
        rows = self._run("reading groups", lambda conn: conn.execute(
            f"{GROUP_SELECT} ORDER BY g.seq").fetchall(), write=False)
        return [group_from_row(r) for r in rows]

    def progress(self) -> StoreProgress:
        row = self._run("reading progress", lambda conn: conn.execute(PROGRESS).fetchone(), write=False)
        return StoreProgress.from_row(row or (0, 0, None, None))

    def set_meta(self, key: str, value: str) -> None:
        self._run("writing meta", lambda conn: conn.execute(
            "INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (key, value)), write=True)

    def get_meta(self, key: str) -> str | None:
        row = self._run("reading meta", lambda conn: conn.execute(
            "SELECT value FROM meta WHERE key = %s", (key,)).fetchone(), write=False)
        return None if row is None else str(row[0])


def _placeholders(conn: psycopg.Connection[Any]) -> Callable[..., Any]:
    """``conn.execute`` for the shared buffer SQL, which is written with SQLite's ``?``."""

    def execute(query: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(query.replace("?", "%s"), params)

    return execute
