"""The hot path's cheap parts stay cheap (issue 10, item 6), and stay correct.

- an uncontended write lock is taken without a scheduler round, and a
  contended one still excludes and queues in order;
- BackendSet.in_use makes no object and no event per request, and a
  quiesce still waits for the I/O that is running.
"""

from __future__ import annotations

import trio
import trio.testing

from cachefs.backend import MemoryBackend
from cachefs.image.backends import BackendSet
from cachefs.image.qcow2image import UncontendedLock
from cachefs.policy import WRITEBACK


async def test_a_free_lock_is_taken_without_a_checkpoint():
    lock = UncontendedLock()
    with trio.testing.assert_no_checkpoints():
        async with lock:
            assert lock.locked()
    assert not lock.locked()


async def test_a_held_lock_excludes_and_queues_in_order():
    lock, order = UncontendedLock(), []

    async def holder(name, task_status=trio.TASK_STATUS_IGNORED):
        async with lock:
            task_status.started()
            order.append(f"{name} in")
            await trio.sleep(0.01)
            order.append(f"{name} out")

    async with trio.open_nursery() as nursery:
        await nursery.start(holder, "a")
        nursery.start_soon(holder, "b")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(holder, "c")
    assert order == ["a in", "a out", "b in", "b out", "c in", "c out"]


async def test_in_use_is_free_and_a_quiesce_waits_for_running_io():
    backends = BackendSet(lambda mode: MemoryBackend(bytearray(4096)))
    backends.get(WRITEBACK)
    assert backends.in_use() is backends.in_use()  # no object per request
    events = []

    async def io(task_status=trio.TASK_STATUS_IGNORED):
        async with backends.in_use():
            task_status.started()
            await trio.sleep(0.02)
            events.append("io done")

    async with trio.open_nursery() as nursery:
        await nursery.start(io)
        assert backends._idle is None  # no event made per request
        async with backends.quiesced():
            events.append("quiesced")
    assert events == ["io done", "quiesced"]
