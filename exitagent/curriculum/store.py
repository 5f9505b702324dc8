"""The curriculum store: groups, their rollouts, and the ExIt buffer, shared by processes.

The collector records each group, its children entries and the refresh of the entry it started
from in one transaction (a killed collector never leaves half a group); the trainer fetches
unconsumed groups and marks them consumed by its step (and can roll that back after restarting
from an older checkpoint); a viewer reads. ``CurriculumStore`` is the seam (no SQLite in it);
``SQLiteStore`` is the default, ``PostgresStore`` (store_pg.py) serves runs on several machines,
``store_url.open_store`` picks one by path or URL; ``MemoryBuffer`` is the fake
buffer beside the SQL one. The buffer RULES (sampling, dedup, eviction) live in curriculum.py:
the SQL here only stores and fetches.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog

from exitagent.curriculum.store_rows import (
    CONSUME,
    ENTRY_COLUMNS,
    GROUP_SELECT,
    MIGRATIONS,
    PROGRESS,
    ROLLOUT_SELECT,
    SCHEMA,
    entry_from_row,
    entry_values,
    group_from_row,
    rollout_from_row,
    rollout_row,
)
from exitagent.errors import StoreError
from exitagent.run_dir import RunDir
from exitagent.types import (
    BufferEntry,
    Group,
    StoredGroup,
    StoredRollout,
)

log = structlog.get_logger(__name__)

R = TypeVar("R")
SCHEMA_VERSION = 1


class Buffer(Protocol):
    """The live entries of the ExIt buffer, as the curriculum rules see them (one transaction)."""

    def size(self) -> int: ...
    def scores(self) -> list[tuple[int, float]]: ...  # (entry id, score) of every live entry
    def get(self, entry_id: int) -> BufferEntry | None: ...
    def has_key(self, key: str) -> bool: ...
    def lowest(self) -> tuple[int, float] | None: ...  # lowest score; ties: the oldest entry
    def insert(self, entry: BufferEntry) -> int: ...
    def evict(self, entry_id: int) -> None: ...
    def set_score(self, entry_id: int, score: float) -> bool: ...  # False when no longer live


@dataclass(frozen=True)
class StoreProgress:
    """What the staleness gate needs, counted by the database instead of read group by group."""

    groups: int
    waiting: int  # recorded, not yet consumed (nor dropped) by the trainer
    oldest_waiting: int | None  # the lowest policy step among those
    last_consumed_by: int | None  # the newest trainer step that consumed (or dropped) a group

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> StoreProgress:
        return cls(int(row[0]), int(row[1] or 0), row[2], row[3])


class CurriculumStore(Protocol):
    """What the collector, the trainer and viewers need from a store."""

    def view(self) -> AbstractContextManager[Buffer]: ...  # a read-only snapshot
    def record_group(self, group: Group, update: Callable[[Buffer], R]) -> R: ...
    def fetch_groups(self, *, min_version: int = 0, limit: int | None = None) -> list[StoredGroup]: ...
    def mark_consumed(self, group_ids: Sequence[str], step: int) -> None: ...
    def drop_stale(self, min_version: int, step: int) -> int: ...
    def unconsume(self, from_step: int) -> int: ...
    def entries(self, *, live: bool = True) -> list[BufferEntry]: ...
    def groups(self) -> list[StoredGroup]: ...
    def progress(self) -> StoreProgress: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def get_meta(self, key: str) -> str | None: ...
    def close(self) -> None: ...
    def __enter__(self) -> CurriculumStore: ...
    def __exit__(self, *exc: object) -> None: ...


class MemoryBuffer:
    """An in-memory ``Buffer``: the fake for unit tests and dry runs."""

    def __init__(self) -> None:
        self._live: dict[int, BufferEntry] = {}
        self._next_id = 1

    def size(self) -> int:
        return len(self._live)

    def scores(self) -> list[tuple[int, float]]:
        return [(i, e.score) for i, e in self._live.items()]

    def get(self, entry_id: int) -> BufferEntry | None:
        return self._live.get(entry_id)

    def has_key(self, key: str) -> bool:
        return any(e.key == key for e in self._live.values())

    def lowest(self) -> tuple[int, float] | None:
        if not self._live:
            return None
        entry_id, entry = min(self._live.items(), key=lambda item: (item[1].score, item[0]))
        return entry_id, entry.score

    def insert(self, entry: BufferEntry) -> int:
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._live[entry_id] = replace(entry, id=entry_id)
        return entry_id

    def evict(self, entry_id: int) -> None:
        del self._live[entry_id]

    def set_score(self, entry_id: int, score: float) -> bool:
        if entry_id not in self._live:
            return False
        self._live[entry_id] = replace(self._live[entry_id], score=score)
        return True


class _SqlBuffer:
    """``Buffer`` over one open transaction, of a ``SQLiteStore`` or a ``PostgresStore``.

    ``execute(sql, params)`` runs one statement written with ``?`` placeholders and returns its
    cursor (the PostgreSQL store translates them); the SQL itself is common to both databases.
    """

    def __init__(self, execute: Callable[..., Any], *, writable: bool) -> None:
        self._execute, self._writable = execute, writable

    def _check_writable(self) -> None:
        if not self._writable:
            raise StoreError("a buffer view is read-only: change the buffer inside record_group")

    def size(self) -> int:
        return int(self._execute("SELECT count(*) FROM entries WHERE evicted IS NULL").fetchone()[0])

    def scores(self) -> list[tuple[int, float]]:
        return [(i, s) for i, s in self._execute("SELECT id, score FROM entries WHERE evicted IS NULL ORDER BY id")]

    def get(self, entry_id: int) -> BufferEntry | None:
        row = self._execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE id = ? AND evicted IS NULL", (entry_id,)
        ).fetchone()
        return entry_from_row(row) if row else None

    def has_key(self, key: str) -> bool:
        row = self._execute("SELECT 1 FROM entries WHERE key = ? AND evicted IS NULL", (key,)).fetchone()
        return row is not None

    def lowest(self) -> tuple[int, float] | None:
        found = self._execute(
            "SELECT id, score FROM entries WHERE evicted IS NULL ORDER BY score, id LIMIT 1").fetchone()
        return (found[0], found[1]) if found else None

    def insert(self, entry: BufferEntry) -> int:
        self._check_writable()
        row = self._execute(
            f"INSERT INTO entries ({ENTRY_COLUMNS.removeprefix('id, ')}, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            entry_values(entry, time.time()),
        ).fetchone()
        return int(row[0])

    def evict(self, entry_id: int) -> None:
        # Evicted rows stay (flagged) so lineage and "sampled from iteration" survive for viewers.
        self._check_writable()
        self._execute("UPDATE entries SET evicted = ? WHERE id = ?", (time.time(), entry_id))

    def set_score(self, entry_id: int, score: float) -> bool:
        self._check_writable()
        cursor = self._execute("UPDATE entries SET score = ? WHERE id = ? AND evicted IS NULL", (score, entry_id))
        return int(cursor.rowcount) == 1




class SQLiteStore:
    """``CurriculumStore`` in one SQLite file (WAL): many readers, one writer at a time.

    Each process opens its own ``SQLiteStore``; writers take the lock up front (BEGIN IMMEDIATE)
    and wait up to ``busy_timeout_s`` for it. Safe to share between threads of one process.
    """

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL is safe under WAL against a killed process; only power loss can drop a commit.
            self._conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as error:
            raise StoreError(f"cannot open curriculum store {self.path}: {error}") from error
        self._open_schema()

    @classmethod
    def in_run(cls, run_dir: Path | str, **kwargs: Any) -> SQLiteStore:
        """The store of a run directory: ``RUN_DIR/store.sqlite``."""
        return cls(RunDir(Path(run_dir)).store, **kwargs)

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction; any error rolls it back whole. SQLite errors become StoreError."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as error:
                raise StoreError(f"curriculum store {self.path}: {error}") from error

    def _schema_version(self, conn: sqlite3.Connection) -> int | None:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" in tables:
            return int(conn.execute("SELECT version FROM schema_version").fetchone()[0])
        if tables - {"sqlite_sequence"}:
            raise StoreError(f"{self.path} is not an exitagent curriculum store (it has tables {sorted(tables)})")
        return None

    def _open_schema(self) -> None:
        with self._tx(write=False) as conn:
            version = self._schema_version(conn)
        if version == SCHEMA_VERSION:
            return
        with self._tx(write=True) as conn:  # re-read under the write lock: another process may have won
            version = self._schema_version(conn)
            if version is None:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                log.info("store_created", path=str(self.path), schema_version=SCHEMA_VERSION)
                return
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"curriculum store {self.path} has schema version {version}, newer than this exitagent "
                    f"understands ({SCHEMA_VERSION}): upgrade exitagent, or use a new run directory"
                )
            self._migrate(conn, version)

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        start = version
        while version < SCHEMA_VERSION:
            if version not in MIGRATIONS:
                raise StoreError(
                    f"curriculum store {self.path} has schema version {version} and no migration to "
                    f"{SCHEMA_VERSION} exists: use a new run directory"
                )
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            version += 1
        conn.execute("UPDATE schema_version SET version = ?", (version,))
        log.info("store_migrated", path=str(self.path), from_version=start, to_version=version)

    # --- the collector ---

    @contextmanager
    def view(self) -> Iterator[Buffer]:
        """A read-only, consistent snapshot of the buffer (e.g. to choose a start)."""
        with self._tx(write=False) as conn:
            yield _SqlBuffer(conn.execute, writable=False)

    def record_group(self, group: Group, update: Callable[[Buffer], R]) -> R:
        """Atomically: run ``update`` on the buffer (children, refresh, eviction) and record ``group``."""
        with self._tx(write=True) as conn:
            result = update(_SqlBuffer(conn.execute, writable=True))
            conn.execute(
                "INSERT INTO groups (id, task_id, entry_id, step_kind, variant, version_step, version_name, depth, "
                "start_turn, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (group.id, group.task_id, group.entry_id, group.step_kind.value, group.variant.value,
                 group.version.step, str(group.version), group.depth, group.start_turn, time.time()),
            )
            conn.executemany(
                "INSERT INTO rollouts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [rollout_row(group.id, i, r) for i, r in enumerate(group.rollouts)],
            )
        log.debug("group_written", group_id=group.id, step_kind=group.step_kind.value, rollouts=len(group.rollouts))
        return result

    # --- the trainer ---

    def fetch_groups(self, *, min_version: int = 0, limit: int | None = None) -> list[StoredGroup]:
        """Unconsumed groups produced by policy step >= ``min_version``, oldest first, with rollouts."""
        with self._tx(write=False) as conn:
            rows = conn.execute(
                f"{GROUP_SELECT} WHERE g.consumed_by_step IS NULL AND g.version_step >= ? ORDER BY g.rowid LIMIT ?",
                (min_version, -1 if limit is None else limit),
            ).fetchall()
            return [group_from_row(row, self._rollouts(conn, row[0])) for row in rows]

    def _rollouts(self, conn: sqlite3.Connection, group_id: str) -> tuple[StoredRollout, ...]:
        return tuple(rollout_from_row(r) for r in conn.execute(ROLLOUT_SELECT, (group_id,)))

    def mark_consumed(self, group_ids: Sequence[str], step: int) -> None:
        """Record that trainer step ``step`` consumed these groups; all or none (StoreError).

        Idempotent: groups this same step already consumed count as consumed (a retry after a lost
        acknowledgement), groups another step consumed are refused.
        """
        _check_distinct(group_ids)
        with self._tx(write=True) as conn:
            cursor = conn.executemany(CONSUME, [(step, group_id, step) for group_id in group_ids])
            _check_consumed(cursor.rowcount, len(group_ids), step)

    def drop_stale(self, min_version: int, step: int) -> int:
        """Mark unconsumed groups older than ``min_version`` as dropped by ``step``; returns how many."""
        with self._tx(write=True) as conn:
            cursor = conn.execute(
                "UPDATE groups SET consumed_by_step = ?, dropped = 1 WHERE consumed_by_step IS NULL "
                "AND version_step < ?", (step, min_version),
            )
            return cursor.rowcount

    def unconsume(self, from_step: int) -> int:
        """Forget consumption by steps >= ``from_step`` (a trainer resumed from checkpoint from_step - 1)."""
        with self._tx(write=True) as conn:
            cursor = conn.execute(
                "UPDATE groups SET consumed_by_step = NULL, dropped = 0 WHERE consumed_by_step >= ?", (from_step,)
            )
        log.info("groups_unconsumed", from_step=from_step, groups=cursor.rowcount)
        return cursor.rowcount

    # --- viewers ---

    def entries(self, *, live: bool = True) -> list[BufferEntry]:
        where = " WHERE evicted IS NULL" if live else ""
        with self._tx(write=False) as conn:
            rows = conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries{where} ORDER BY id")
            return [entry_from_row(r) for r in rows]

    def groups(self) -> list[StoredGroup]:
        """Every group's header (no rollouts), oldest first."""
        with self._tx(write=False) as conn:
            return [group_from_row(r) for r in conn.execute(f"{GROUP_SELECT} ORDER BY g.rowid")]

    def progress(self) -> StoreProgress:
        with self._tx(write=False) as conn:
            return StoreProgress.from_row(conn.execute(PROGRESS).fetchone())

    def set_meta(self, key: str, value: str) -> None:
        with self._tx(write=True) as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        with self._tx(write=False) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])


def _check_distinct(group_ids: Sequence[str]) -> None:
    if len(set(group_ids)) != len(group_ids):
        raise StoreError("mark_consumed was given the same group twice")


def _check_consumed(updated: int, asked: int, step: int) -> None:
    if updated != asked:
        raise StoreError(
            f"step {step}: {asked - updated} of {asked} groups are unknown or already consumed by another step "
            "(is a second trainer running on this run?)"
        )
