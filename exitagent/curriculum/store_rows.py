"""The curriculum store's tables, and how the contract types (exitagent/types.py) map to their rows.

Token ids, masks and log-probabilities are stored as little-endian arrays (BLOBs), several
sequences of one rollout concatenated with a JSON layout to split them again; messages as
canonical JSON (sorted keys), which is also what a buffer entry's dedup key hashes.
"""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from exitagent.types import (
    BufferEntry,
    Message,
    PolicyVersion,
    Rollout,
    StepKind,
    StoredGroup,
    StoredRollout,
    ToolCall,
    TrainingSequence,
    Variant,
)


def messages_to_json(messages: Sequence[Message]) -> str:
    """Messages as canonical JSON (sorted keys): also what the dedup key hashes."""
    return json.dumps(
        [
            {
                "role": m.role, "content": m.content, "tool_call_id": m.tool_call_id, "name": m.name,
                "tool_calls": [
                    {"name": c.name, "arguments": dict(c.arguments), "id": c.id, "raw": c.raw} for c in m.tool_calls
                ],
            }
            for m in messages
        ],
        sort_keys=True, default=str,
    )


def messages_from_json(text: str) -> tuple[Message, ...]:
    return tuple(
        Message(
            role=m["role"], content=m["content"], tool_call_id=m["tool_call_id"], name=m["name"],
            tool_calls=tuple(ToolCall(c["name"], c["arguments"], c["id"], c["raw"]) for c in m["tool_calls"]),
        )
        for m in json.loads(text)
    )


def _blob(values: Sequence[Any], code: str) -> bytes:
    packed = array(code, values)
    if sys.byteorder == "big":  # stored little-endian, so a store file moves between machines
        packed.byteswap()
    return packed.tobytes()


def _unblob(data: bytes, code: str) -> list[Any]:
    packed = array(code)
    packed.frombytes(data)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tolist()


def pack_sequences(seqs: Sequence[TrainingSequence]) -> tuple[bytes, bytes, bytes, str]:
    """Concatenated int32 tokens, uint8 mask, float64 logprobs, and a layout to split them again."""
    tokens = [t for s in seqs for t in s.tokens]
    mask = [m for s in seqs for m in s.mask]
    logprobs = [lp for s in seqs for lp in s.logprobs]
    layout = json.dumps([[len(s.tokens), s.version.step, s.version.name] for s in seqs])
    return _blob(tokens, "i"), _blob(mask, "B"), _blob(logprobs, "d"), layout


def unpack_sequences(tokens: bytes, mask: bytes, logprobs: bytes, layout: str) -> tuple[TrainingSequence, ...]:
    all_tokens, all_mask, all_lp = _unblob(tokens, "i"), _unblob(mask, "B"), _unblob(logprobs, "d")
    seqs, at = [], 0
    for length, step, name in json.loads(layout):
        cut = slice(at, at + length)
        seqs.append(TrainingSequence(
            tuple(all_tokens[cut]), tuple(all_mask[cut]), tuple(all_lp[cut]), PolicyVersion(step, name)
        ))
        at += length
    return tuple(seqs)


SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, task_id TEXT NOT NULL,
    prefix TEXT NOT NULL, iterate TEXT NOT NULL, depth INTEGER NOT NULL, start_turn INTEGER NOT NULL,
    parent_id INTEGER, version_step INTEGER NOT NULL, version_name TEXT NOT NULL, score REAL NOT NULL,
    reward REAL, prev_reward REAL, errored INTEGER NOT NULL, step_kind TEXT NOT NULL,
    group_id TEXT NOT NULL, created REAL NOT NULL, evicted REAL);
CREATE INDEX entries_live_score ON entries(score, id) WHERE evicted IS NULL;
CREATE INDEX entries_live_key ON entries(key) WHERE evicted IS NULL;
CREATE TABLE groups (
    id TEXT PRIMARY KEY, task_id TEXT NOT NULL, entry_id INTEGER, step_kind TEXT NOT NULL,
    variant TEXT NOT NULL, version_step INTEGER NOT NULL, version_name TEXT NOT NULL,
    depth INTEGER NOT NULL, start_turn INTEGER NOT NULL, created REAL NOT NULL,
    consumed_by_step INTEGER, dropped INTEGER NOT NULL DEFAULT 0);
CREATE INDEX groups_consumed ON groups(consumed_by_step);
CREATE TABLE rollouts (
    group_id TEXT NOT NULL REFERENCES groups(id), idx INTEGER NOT NULL, tokens BLOB NOT NULL,
    mask BLOB NOT NULL, logprobs BLOB NOT NULL, layout TEXT NOT NULL, reward REAL,
    components TEXT NOT NULL, detail TEXT NOT NULL, failure TEXT NOT NULL, diversity REAL NOT NULL,
    text TEXT NOT NULL, PRIMARY KEY (group_id, idx));
"""

# PostgreSQL (store_pg.py): the same tables, with DOUBLE PRECISION for REAL (4 bytes there),
# identity columns for order, and BYTEA for BLOB.
PG_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, key TEXT NOT NULL, task_id TEXT NOT NULL,
    prefix TEXT NOT NULL, iterate TEXT NOT NULL, depth INTEGER NOT NULL, start_turn INTEGER NOT NULL,
    parent_id BIGINT, version_step INTEGER NOT NULL, version_name TEXT NOT NULL, score DOUBLE PRECISION NOT NULL,
    reward DOUBLE PRECISION, prev_reward DOUBLE PRECISION, errored INTEGER NOT NULL, step_kind TEXT NOT NULL,
    group_id TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, evicted DOUBLE PRECISION);
CREATE INDEX entries_live_score ON entries(score, id) WHERE evicted IS NULL;
CREATE INDEX entries_live_key ON entries(key) WHERE evicted IS NULL;
CREATE TABLE groups (
    seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE, id TEXT PRIMARY KEY, task_id TEXT NOT NULL,
    entry_id BIGINT, step_kind TEXT NOT NULL, variant TEXT NOT NULL, version_step INTEGER NOT NULL,
    version_name TEXT NOT NULL, depth INTEGER NOT NULL, start_turn INTEGER NOT NULL,
    created DOUBLE PRECISION NOT NULL, consumed_by_step INTEGER, dropped INTEGER NOT NULL DEFAULT 0);
CREATE INDEX groups_consumed ON groups(consumed_by_step);
CREATE INDEX groups_waiting ON groups(version_step) WHERE consumed_by_step IS NULL;
CREATE TABLE rollouts (
    group_id TEXT NOT NULL REFERENCES groups(id), idx INTEGER NOT NULL, tokens BYTEA NOT NULL,
    mask BYTEA NOT NULL, logprobs BYTEA NOT NULL, layout TEXT NOT NULL, reward DOUBLE PRECISION,
    components TEXT NOT NULL, detail TEXT NOT NULL, failure TEXT NOT NULL, diversity DOUBLE PRECISION NOT NULL,
    text TEXT NOT NULL, PRIMARY KEY (group_id, idx));
"""

PG_GROUP_INSERT = (
    "INSERT INTO groups (id, task_id, entry_id, step_kind, variant, version_step, version_name, depth, start_turn, "
    "created) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
PG_ROLLOUTS_OF = (
    "SELECT group_id, idx, tokens, mask, logprobs, layout, reward, components, detail, failure, diversity, text "
    "FROM rollouts WHERE group_id = ANY(%s) ORDER BY group_id, idx"
)

# Migrations from version v to v + 1, as SQL scripts; none yet.
MIGRATIONS: dict[int, str] = {}

ENTRY_COLUMNS = (
    "id, key, task_id, prefix, iterate, depth, start_turn, parent_id, version_step, version_name, "
    "score, reward, prev_reward, errored, step_kind, group_id"
)


def entry_from_row(row: Sequence[Any]) -> BufferEntry:
    return BufferEntry(
        id=row[0], key=row[1], task_id=row[2], prefix=messages_from_json(row[3]), iterate=row[4], depth=row[5],
        start_turn=row[6], parent_id=row[7], version=PolicyVersion(row[8], row[9]), score=row[10],
        reward=row[11], prev_reward=row[12], errored=bool(row[13]), step_kind=StepKind(row[14]), group_id=row[15],
    )


GROUP_SELECT = (
    "SELECT g.id, g.task_id, g.step_kind, g.variant, g.version_step, g.version_name, g.depth, g.start_turn, "
    "g.entry_id, g.created, g.consumed_by_step, e.version_step FROM groups g LEFT JOIN entries e ON e.id = g.entry_id"
)


def group_from_row(row: Sequence[Any], rollouts: tuple[StoredRollout, ...] = ()) -> StoredGroup:
    return StoredGroup(
        id=row[0], task_id=row[1], step_kind=StepKind(row[2]), variant=Variant(row[3]),
        version=PolicyVersion(row[4], row[5]), depth=row[6], start_turn=row[7], entry_id=row[8], created=row[9],
        consumed_by_step=row[10], sampled_from=row[11], rollouts=rollouts,
    )


def rollout_row(group_id: str, index: int, rollout: Rollout) -> tuple[Any, ...]:
    tokens, mask, logprobs, layout = pack_sequences(rollout.episode.sequences)
    score = rollout.score
    components: Mapping[str, float] = score.components if score else {}
    return (
        group_id, index, tokens, mask, logprobs, layout, rollout.reward, json.dumps(dict(components)),
        score.detail if score else "", rollout.failure, rollout.diversity, rollout.episode.final_text,
    )


def entry_values(entry: BufferEntry, created: float) -> tuple[Any, ...]:
    """An entry's columns in ``ENTRY_COLUMNS`` order, without ``id``, then ``created``."""
    return (entry.key, entry.task_id, messages_to_json(entry.prefix), entry.iterate, entry.depth, entry.start_turn,
            entry.parent_id, entry.version.step, str(entry.version), entry.score, entry.reward, entry.prev_reward,
            int(entry.errored), entry.step_kind.value, entry.group_id, created)


# Both databases run these as written (``?`` becomes ``%s`` for PostgreSQL).
CONSUME = (
    "UPDATE groups SET consumed_by_step = ? WHERE id = ? AND "
    "(consumed_by_step IS NULL OR (consumed_by_step = ? AND dropped = 0))"
)
PROGRESS = (
    "SELECT count(*), sum(CASE WHEN consumed_by_step IS NULL THEN 1 ELSE 0 END), "
    "min(CASE WHEN consumed_by_step IS NULL THEN version_step END), max(consumed_by_step) FROM groups"
)

ROLLOUT_SELECT = (
    "SELECT idx, tokens, mask, logprobs, layout, reward, components, detail, failure, diversity, text "
    "FROM rollouts WHERE group_id = ? ORDER BY idx"
)


def rollout_from_row(r: Sequence[Any]) -> StoredRollout:
    return StoredRollout(
        index=r[0], sequences=unpack_sequences(r[1], r[2], r[3], r[4]), reward=r[5], diversity=r[9],
        text=r[10], components=json.loads(r[6]), detail=r[7], failure=r[8],
    )
