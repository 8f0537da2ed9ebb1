"""A guest flush syncs the data plane's writes whatever the metadata queue holds (issue 19).

The data plane's fast writes never pass the metadata queue: the only thing
that knows of them is ``BackendSet.unsynced`` (C's completed-writes counter),
which the image checks when the queue asks for a sync (Image.sync). A flush
whose queue held only frees waiting for guest I/O in flight (``pending``:
dirty, yet nothing to write and nothing awaiting a sync) ran a writeout of no
rounds, asked for no sync, and returned: C's writes acknowledged before it
were not durable. The seeded power-cut simulation found it as seed 119 of
test_powercut_fastalloc's c-heavy case (cut 306/453: 5 sectors lost a flushed
write). Here the same state is built step by step, production image layer over
a recorded memory file; only C's one write is done by hand, as dp_loop.c does
it: a pwrite on a published writable cluster, then the completed-writes count.
"""

from __future__ import annotations

import trio
import trio.testing

from cachefs.backend import IOCounters, MemoryBackend, RecordingBackend
from cachefs.backend.faulty import Sync, Write
from cachefs.image.backends import BackendSet
from cachefs.image.hooks import PlaneHooks
from cachefs.qcow2.engine import open_engine
from cachefs.qcow2.plan import ExtentKind, run_async
from cachefs.image.qcow2image import Qcow2Image
from memimage import new_buffer

CS = 1 << 16


class HeldReads:
    """A descriptor of the recorded file whose reads wait while ``held`` is set (guest I/O in flight)."""

    def __init__(self, rec: RecordingBackend) -> None:
        self.rec, self.held = rec, None
        self.counters, self.fd, self.direct = IOCounters(), None, False

    def size(self) -> int:
        return self.rec.size()

    def close(self) -> None:
        pass

    async def pread(self, offset, length):
        if self.held is not None:
            await self.held.wait()
        return await self.rec.pread(offset, length)

    async def pwrite(self, offset, data):
        await self.rec.pwrite(offset, data)

    async def truncate(self, size):
        await self.rec.truncate(size)

    async def fdatasync(self):
        await self.rec.fdatasync()


async def open_recorded(buf: bytearray):
    rec = RecordingBackend(MemoryBackend(buf))
    view = HeldReads(rec)
    backends = BackendSet(lambda mode: view)
    engine = await run_async(open_engine(len(buf), writable=True), rec.pread)
    return Qcow2Image("mem.qcow2", backends, None, True, engine), rec, view


async def host_of(img: Qcow2Image, offset: int) -> int:
    (extent,) = await run_async(img.engine.plan_read(offset, 512), img.backend.pread)
    assert extent.kind is ExtentKind.DATA
    return extent.host_offset


async def test_a_flush_with_only_pending_frees_still_syncs_the_data_planes_writes():
    img, rec, view = await open_recorded(new_buffer(4 << 20))
    fast_writes = 0
    img.connect_plane(PlaneHooks(fast_writes=lambda: fast_writes))  # dataplane.DataPlane's counter, C's completed writes
    await img.write(0, b"a" * 4096)
    await img.write(CS, b"b" * 4096)
    await img.flush()
    await img.discard(0, CS)  # cluster 0's free waits until its L2 change is durable

    # A read of cluster 1 is in flight while the next flush runs: the L2 change becomes durable,
    # but the free stays pending (MetaQueue.writeout applies frees only with no guest I/O in flight).
    view.held = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(img.read, CS, 4096)
        await trio.testing.wait_all_tasks_blocked()
        assert img.queue.inflight == 1
        await img.flush()
        view.held.set()
    view.held = None
    q = img.queue
    assert q.pending and not q.dirty_items() and not q.needs_sync, "not the state this test is about"

    # C overwrites cluster 1 in place and answers the guest; then the guest flushes.
    host = await host_of(img, CS)
    await rec.pwrite(host, b"c" * 4096)
    fast_writes += 1
    written = len(rec.events) - 1
    assert rec.events[written] == Write(host, b"c" * 4096)
    await img.flush()
    syncs = [e for e in rec.events[written:] if isinstance(e, Sync)]
    assert syncs and syncs[-1].covers > written, "the flush returned without syncing C's acknowledged write"
    await img.close()
