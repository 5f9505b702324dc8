"""The reload gate: writers exclude each other and readers, and no cancellation leaves it stuck."""

from __future__ import annotations

import anyio
import pytest

from exitagent.serving.gate import Gate

pytestmark = pytest.mark.anyio


async def test_two_writers_never_interleave() -> None:
    gate, events = Gate(), []

    async def writer(name: str) -> None:
        async def work() -> None:
            events.append(f"{name} in")
            await anyio.sleep(0.05)
            events.append(f"{name} out")

        await gate.exclusive(work)

    async with anyio.create_task_group() as tasks:
        for name in "abc":
            tasks.start_soon(writer, name)
    assert len(events) == 6
    for i in range(0, 6, 2):  # each "in" is followed by its own "out"
        assert events[i].split()[0] == events[i + 1].split()[0] and events[i].endswith("in")


async def test_a_writer_waits_for_readers_and_holds_new_ones_back() -> None:
    gate, events = Gate(), []
    reader = anyio.CancelScope()
    await gate.acquire(reader)

    async def work() -> None:
        events.append("reload")

    async def late_reader() -> None:
        scope = anyio.CancelScope()
        await gate.acquire(scope)
        events.append("late reader in")
        gate.release(scope)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(gate.exclusive, work)
        await anyio.sleep(0.05)
        assert gate.reloading and events == []  # waiting for the reader
        tasks.start_soon(late_reader)
        await anyio.sleep(0.05)
        assert events == []  # the late reader waits behind the writer
        gate.release(reader)
    assert events == ["reload", "late reader in"] and gate.in_flight == 0 and not gate.reloading


async def test_a_cancelled_writer_leaves_the_gate_open() -> None:
    gate = Gate()
    reader = anyio.CancelScope()
    await gate.acquire(reader)
    ran = []

    async def work() -> None:
        ran.append(True)

    with anyio.move_on_after(0.1):  # cancelled while draining
        await gate.exclusive(work)
    assert not gate.reloading and not ran and gate.in_flight == 1
    gate.release(reader)
    with anyio.fail_after(1):  # readers and writers pass again
        await gate.acquire(reader)
        gate.release(reader)
        await gate.exclusive(work)
    assert ran == [True]


async def test_a_cancelled_writer_in_the_queue_does_not_block_the_next() -> None:
    gate, ran = Gate(), []
    release_first = anyio.Event()

    async def slow() -> None:
        await release_first.wait()
        ran.append("first")

    async def fast() -> None:
        ran.append("third")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(gate.exclusive, slow)
        await anyio.sleep(0.02)
        with anyio.move_on_after(0.05):  # queued behind the first writer, then cancelled
            await gate.exclusive(fast)
        release_first.set()
    with anyio.fail_after(1):
        await gate.exclusive(fast)
    assert ran == ["first", "third"] and not gate.reloading


async def test_a_cancelled_waiting_reader_is_never_counted() -> None:
    gate = Gate()
    started, finish = anyio.Event(), anyio.Event()

    async def work() -> None:
        started.set()
        await finish.wait()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(gate.exclusive, work)
        await started.wait()
        with anyio.move_on_after(0.05):  # a reader waiting behind the writer, cancelled
            await gate.acquire(anyio.CancelScope())
        finish.set()
    assert gate.in_flight == 0
    with anyio.fail_after(1):  # so the next writer does not wait for a ghost
        await gate.exclusive(work)


async def test_the_drain_deadline_cancels_readers_that_do_not_finish() -> None:
    gate, outcome = Gate(drain_timeout_s=0.2), []

    async def stuck_reader() -> None:
        with anyio.CancelScope() as scope:
            await gate.acquire(scope)
            try:
                await anyio.sleep_forever()
            finally:
                gate.release(scope)
        outcome.append("cut off" if scope.cancelled_caught else "finished")

    async def work() -> None:
        outcome.append("reload")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(stuck_reader)
        await anyio.sleep(0.02)
        with anyio.fail_after(2):
            await gate.exclusive(work)
    assert outcome == ["cut off", "reload"] and gate.in_flight == 0
