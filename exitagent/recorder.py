"""Record an app's episodes as training data for a run: the embedded agent learning from its app.

    recorder = Recorder("runs/app", group_fraction=0.25, group_size=4, reward=my_reward)
    async with SelfImprovingAgent(url, tools=[lookup], recorder=recorder) as agent:
        reply = await agent.respond(request)          # served to the user
        ...
        await agent.feedback(reply.episode_id, 1.0)   # the app's verdict, whenever it has one

Each episode keeps the exact token ids and behaviour logprobs the server returned (the same
token-faithful sequences collect records) and is recorded in the run's curriculum store
(``store.sqlite`` in the run directory, or a store URL) once its rewards are known.

When an app episode becomes a trainable group (GRPO needs G answers to ONE prompt, with rewards
that differ):

- For a fraction ``group_fraction`` of requests the agent samples ``group_size`` answers in one
  request (n=G), serves the first and keeps the others (``Reply.group_ids``). The group is
  recorded once every member has a reward: the served one's from the app's ``feedback``; the
  others' from ``reward(request, response)`` when the app gave one (scored at once), else from the
  app's ``feedback`` on their ids. A reward function that raises leaves its answer out (a failed
  rollout, never a 0), as in collect.
- Every other request is one episode, recorded once its feedback arrives as a group of one. It
  enters the ExIt buffer as a start (every per-turn prefix, as collect's groups do); the trainer
  consumes it without learning from it (one reward carries no group-relative signal).

Groups are groups of the request as a task (id ``iterates.request_id``): ``respond``'s are BASE
groups; ``improve``'s step k is a group that starts from the step's prompt (the request and the
latest iterate), an IMPROVE or DIVERGE group of depth k as in ExIt, whose tokens hold that prompt.
Its previous iterate is not a buffer entry (the app gave it, not the buffer), so the new answers
enter the buffer as first attempts. ``training.update --run-dir RUN`` trains on them like any
collected group. A collect on the same run trains on its own tasks beside them: only the app can
score answers to its requests, so collect leaves their buffer entries to the app (a draw of one
starts a base task; ``app_entries_skipped`` says so once).

A store that cannot be reached does not stop the app: the record is appended to a spool (JSONL,
``RUN/spool/recorder.jsonl`` or ``spool=``) and written, in order, on the next record or
``flush()``; nothing is retried in a loop. Episodes waiting for feedback live in this process:
an app that exits before giving it loses only those (``pending`` says how many).
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import structlog

from exitagent.agent import FeedbackError
from exitagent.curriculum import Curriculum, CurriculumConfig, Start
from exitagent.curriculum.store import CurriculumStore
from exitagent.curriculum.store_rows import messages_from_json, messages_to_json
from exitagent.curriculum.store_url import open_run_store, open_store, run_store_target
from exitagent.errors import ConfigError, StoreError
from exitagent.iterates import TextScorer, request_id
from exitagent.rollouts import CUT_OFF
from exitagent.types import (
    Episode,
    PolicyVersion,
    Rollout,
    Sample,
    Score,
    StepKind,
    StopReason,
    Task,
    TrainingSequence,
    Turn,
)

log = structlog.get_logger(__name__)

REMEMBERED = 100_000  # recorded episode ids kept to refuse a second feedback (oldest forgotten first)
Reward = Callable[[str, str], Any]  # reward(request, response): a number or a Score, sync or async


@dataclass
class _Pending:
    """One request's sampled episodes, waiting for their rewards."""

    request: str
    head: int  # messages before the answer (system, request; an improve step: its prompt)
    kind: StepKind
    depth: int
    episodes: tuple[Episode, ...]
    ids: tuple[str, ...]
    scores: list[Score | None]
    failures: list[str]

    def missing(self) -> int:
        return sum(s is None and not f for s, f in zip(self.scores, self.failures, strict=True))


class Recorder:
    """The app's episodes into a run's store (see the module docstring for when they are trained on)."""

    def __init__(self, run_dir: Path | str | None = None, *, store: str = "", spool: Path | str | None = None,
                 group_fraction: float = 0.25, group_size: int = 4, reward: Reward | None = None,
                 curriculum: CurriculumConfig | None = None, seed: int | None = None) -> None:
        if run_dir is None and not store:
            raise ConfigError("Recorder needs a run directory or a store URL")
        if not 0.0 <= group_fraction <= 1.0 or group_size < 2:
            raise ConfigError(f"Recorder: group_fraction must lie in [0, 1] and group_size be >= 2, "
                              f"not {group_fraction} and {group_size}")
        if run_dir is None and spool is None:
            raise ConfigError("Recorder with a store URL and no run directory needs spool=PATH (where records "
                              "wait while the store is unreachable)")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.target = run_store_target(self.run_dir, store) if self.run_dir else store  # ConfigError now, not later
        self.spool = Path(spool) if spool is not None else Path(str(run_dir)) / "spool" / "recorder.jsonl"
        self.group_fraction, self.size, self.reward = group_fraction, group_size, reward
        self.config = curriculum or CurriculumConfig.for_domain("math", group_size=group_size)
        self.rng = random.Random(seed)
        self._pending: dict[str, _Pending] = {}
        self._recorded: OrderedDict[str, str] = OrderedDict()  # episode id -> group id
        self._store: CurriculumStore | None = None
        self._lock = anyio.Lock()

    @property
    def pending(self) -> int:
        """Episodes waiting for a reward."""
        return len(self._pending)

    def spooled(self) -> int:
        """Records waiting in the spool for the store."""
        return len(self._spool_lines())

    # --- the EpisodeRecorder seam (exitagent.agent) ----------------------------------------------

    def group_size(self) -> int:
        return self.size if self.rng.random() < self.group_fraction else 1

    async def open(self, request: str, head: int, episodes: Sequence[Episode], *, kind: StepKind = StepKind.BASE,
                   depth: int = 0) -> list[str]:
        ids = tuple(uuid.uuid4().hex for _ in episodes)
        pending = _Pending(request, head, kind, depth, tuple(episodes), ids, [None] * len(ids), [""] * len(ids))
        for i, episode in enumerate(episodes):
            if episode.stop_reason is StopReason.CRASHED or not episode.sequences:
                pending.failures[i] = episode.failure or "no token ids to train on"
        if self.reward is not None:
            for i in range(1, len(ids)):  # the served answer (0) waits for the app's own verdict
                if not pending.failures[i]:
                    await self._score(pending, i)
        for episode_id in ids:
            self._pending[episode_id] = pending
        if pending.missing() == 0:  # nothing waits for the app (its answer failed; the rest are scored)
            await self._complete(pending)
        return list(ids)

    async def feedback(self, episode_id: str, reward: float | Score) -> None:
        score = _as_score(episode_id, reward)
        if episode_id in self._recorded:
            raise FeedbackError(f"episode {episode_id} was already recorded (group {self._recorded[episode_id]})")
        pending = self._pending.get(episode_id)
        if pending is None:
            raise FeedbackError(f"unknown episode {episode_id!r}: not answered by this agent, or already recorded "
                                f"more than {REMEMBERED} episodes ago")
        index = pending.ids.index(episode_id)
        if pending.failures[index]:
            raise FeedbackError(f"episode {episode_id} failed ({pending.failures[index][:200]}): it is left out of "
                                "training, so it takes no reward")
        if pending.scores[index] is not None:
            raise FeedbackError(f"episode {episode_id} already has its reward; its group waits for "
                                f"{pending.missing()} more")
        pending.scores[index] = score
        if pending.missing() == 0:
            await self._complete(pending)

    async def flush(self) -> int:
        """Write what the spool holds; the records still waiting (0 when the store took them all)."""
        return await self._deliver([])

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # --- pieces ----------------------------------------------------------------------------------

    async def _score(self, pending: _Pending, index: int) -> None:
        reward = self.reward
        assert reward is not None
        try:
            value = await TextScorer(lambda text: reward(pending.request, text))(pending.episodes[index].final_text)
        except Exception as error:  # the app's reward failed on this answer: left out, never a 0
            log.warning("app_reward_failed", error=repr(error)[:200])
            pending.failures[index] = f"reward function raised {type(error).__name__}: {str(error)[:200]}"
            return
        pending.scores[index] = Score(value, {"reward": value})

    async def _complete(self, pending: _Pending) -> None:
        for episode_id in pending.ids:
            del self._pending[episode_id]
        record = _record(pending)
        for episode_id in pending.ids:
            self._recorded[episode_id] = record["group_id"]
        while len(self._recorded) > REMEMBERED:
            self._recorded.popitem(last=False)
        await self._deliver([record])

    async def _deliver(self, records: list[dict[str, Any]]) -> int:
        """The spool's records, then ``records``, into the store, in order; what the store did not
        take goes (back) to the spool, whatever stopped it."""
        async with self._lock:
            waiting = self._spooled_records() + records
            done = 0
            try:
                for record in waiting:
                    await anyio.to_thread.run_sync(self._write, record)
                    done += 1
            except (StoreError, OSError) as error:  # unreachable or unwritable: the app goes on, the record waits
                self.close()
                log.warning("records_spooled", spool=str(self.spool), waiting=len(waiting) - done,
                            error=str(error)[:200])
            finally:
                if waiting:
                    self._rewrite_spool(waiting[done:])
            return len(waiting) - done

    def _write(self, record: dict[str, Any]) -> None:
        if self._store is None:
            self._store = open_run_store(self.run_dir, self.target) if self.run_dir else open_store(self.target)
        start, depth, histories, rollouts = _rebuild(record)
        start = replace(start, variant=self.config.variant)
        group = replace(start.group(rollouts, histories), id=record["group_id"], depth=depth)
        Curriculum(self.config, [start.task], self.rng).record(self._store, start, group)

    def _spool_lines(self) -> list[str]:
        try:
            return [line for line in self.spool.read_text(encoding="utf-8").splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def _spooled_records(self) -> list[dict[str, Any]]:
        """The spool's records; a line that is not one (a hand edit, a torn disk) is moved to
        ``SPOOL.bad`` and logged, so it neither blocks the records behind it nor is lost."""
        records, bad = [], []
        for line in self._spool_lines():
            try:
                record = json.loads(line)
                _rebuild(record)
                records.append(record)
            except (ValueError, KeyError, TypeError):
                bad.append(line)
        if bad:
            with self.spool.with_suffix(".bad").open("a", encoding="utf-8") as out:
                out.writelines(line + "\n" for line in bad)
            log.error("spool_lines_set_aside", count=len(bad), path=str(self.spool.with_suffix(".bad")))
            self._rewrite_spool(records)
        return records

    def _rewrite_spool(self, records: list[dict[str, Any]]) -> None:
        """Write, then rename: a crash leaves the old spool or the new one, never half of one."""
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        partial = self.spool.with_suffix(".partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        partial.replace(self.spool)


def _as_score(episode_id: str, reward: object) -> Score:
    total = reward.total if isinstance(reward, Score) else reward
    if not isinstance(total, bool | int | float) or not math.isfinite(total):
        raise FeedbackError(f"the reward for episode {episode_id} must be a finite number or a Score, "
                            f"not {reward!r:.80}")
    return reward if isinstance(reward, Score) else Score(float(total), {"reward": float(total)})


def _record(pending: _Pending) -> dict[str, Any]:
    """A completed request as plain JSON: what the store (or the spool) keeps of it."""
    rollouts = []
    for episode, score, failure in zip(pending.episodes, pending.scores, pending.failures, strict=True):
        components = {**score.components, "truncated": float(episode.stop_reason in CUT_OFF)} if score else {}
        rollouts.append({
            "reward": score.total if score and not failure else None, "components": components,
            "failure": failure, "text": episode.final_text, "stop": episode.stop_reason.value,
            "history": messages_to_json(episode.messages[pending.head:]),
            "sequences": [[s.tokens, s.mask, s.logprobs, s.version.step, s.version.name] for s in episode.sequences],
        })
    return {"group_id": f"app-{uuid.uuid4().hex}", "task_id": request_id(pending.request),
            "request": pending.request, "step_kind": pending.kind.value, "depth": pending.depth, "rollouts": rollouts}


def _rebuild(record: dict[str, Any]) -> tuple[Start, int, list[tuple[Any, ...]], list[Rollout]]:
    """(start, depth, histories, rollouts) of a record; a spool line written before improve steps
    were recorded has no step kind: a BASE group."""
    task = Task(record["task_id"], "app", record["request"])
    rollouts, histories = [], []
    for r in record["rollouts"]:
        sequences = tuple(TrainingSequence(tuple(t), tuple(m), tuple(lp), PolicyVersion(step, name))
                          for t, m, lp, step, name in r["sequences"])
        version = min((s.version for s in sequences), default=PolicyVersion(0, "unknown"))
        final = Sample(r["text"], (), (), (), "stop", version)  # the served text; the tokens are in ``sequences``
        history = messages_from_json(r["history"])
        episode = Episode(task, history, (Turn(final),), StopReason(r["stop"]), sequences)
        score = Score(r["reward"], r["components"]) if r["reward"] is not None else None
        rollouts.append(Rollout(episode, score, r["reward"], failure=r["failure"]))
        histories.append(history)
    kind = StepKind(record.get("step_kind", StepKind.BASE.value))
    return Start(task, kind), int(record.get("depth", 0)), histories, rollouts
