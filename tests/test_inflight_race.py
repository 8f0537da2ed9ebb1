"""The ``inflight`` race of issue 10, made deterministic.

A freed host cluster may be handed out again only once no guest I/O that
looked up the old mapping is still running (invariant 2's second half: the
L2 change is durable *and* nobody reads through the old entry). The image
counts such I/O in ``inflight``; a writeout applies due frees only when it
is zero.

The race: a read plans first and counts itself afterwards. ``plan_read`` may
record an extent of one cluster, then wait for the L2 table of the next. If,
during that wait, the first cluster is zeroed (its host cluster freed), a
flush writes the L2 change out and sees ``inflight == 0``, the free is
applied, and a new write recycles the host cluster, the read then returns the
new write's bytes for the old cluster: data of another guest offset.

Here the wait is an Event: the backend's pread of the second L2 table blocks
until the test lets it go.
"""

from __future__ import annotations

import trio
import trio.testing

from cachefs.backend import MemoryBackend
from cachefs.image.backends import BackendSet
from cachefs.image.qcow2image import Qcow2Image
from cachefs.policy import WRITEBACK
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.check import check_image
from cachefs.qcow2.engine import open_engine
from cachefs.qcow2.plan import run_async, run_sync
from recorded import ModeView, fresh_qcow2

CB = 9                  # 512-byte clusters: one L2 table maps 64 of them
CS = 1 << CB
A = 63                  # the last guest cluster of the first L2 table
B = 64                  # the first guest cluster of the second


class GatedView(ModeView):
    """A descriptor whose pread of one offset waits until ``gate`` is set."""

    blocked_offset: int | None = None
    gate: trio.Event | None = None

    async def pread(self, offset, length):
        if offset == type(self).blocked_offset:
            type(self).blocked_offset = None  # once: the reader's load
            await type(self).gate.wait()
        return await super().pread(offset, length)


async def open_image(buf: bytearray) -> Qcow2Image:
    store = MemoryBackend(buf)
    backends = BackendSet(lambda m: GatedView(store, m))
    engine = await run_async(open_engine(len(buf), writable=True), backends.get(WRITEBACK).pread)
    return Qcow2Image("mem.qcow2", backends, None, True, engine, WRITEBACK)


async def two_tables() -> bytearray:
    """An image whose guest clusters A and B hold data, under two different L2 tables; closed cleanly."""
    buf = fresh_qcow2(1 << 20, CB)
    img = await open_image(buf)
    await img.write(A * CS, b"A" * CS)
    await img.write(B * CS, b"B" * CS)
    await img.close()
    return buf


async def test_a_read_waiting_for_an_l2_table_keeps_the_cluster_it_already_mapped():
    buf = await two_tables()
    img = await open_image(buf)
    assert await img.read(A * CS, CS) == b"A" * CS  # the first table is cached, the second not
    GatedView.blocked_offset = img.engine.map.l1[B // (CS // 8)] & fmt.OFFSET_MASK
    GatedView.gate = trio.Event()
    got = []

    async def reader():
        got.append(bytes(await img.read(A * CS, 2 * CS)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert GatedView.blocked_offset is None, "the reader is not waiting for the second L2 table"
        # Meanwhile: cluster A becomes a zero cluster (its host cluster is
        # freed once the L2 change is durable), a flush makes it durable, and
        # a new cluster is written. The lowest free host cluster is A's.
        await img.write(A * CS, bytes(CS))
        await img.flush()
        await img.write(10 * CS, b"C" * CS)
        GatedView.gate.set()
    # The read began before the zeroing: it may see A's old bytes or the
    # zeros, never the bytes of guest cluster 10.
    assert got[0][:CS] in (b"A" * CS, bytes(CS)), got[0][:16]
    assert got[0][CS:] == b"B" * CS
    # The free was not lost, only postponed: after a later flush and a clean
    # close nothing leaks.
    await img.flush()
    assert await img.read(10 * CS, CS) == b"C" * CS
    await img.close()
    result = run_sync(check_image(len(buf)), lambda o, n: bytes(buf[o:o + n]))
    assert result.exit_code() == 0, (result.corruptions, result.leaks)
