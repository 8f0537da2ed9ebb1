"""The metadata queue alone, driven by plan.run_sync over a bytearray.

The queue does no I/O: a flush is a sequence of requests (plan.WriteRequest,
SyncRequest, TruncateRequest), so its ordering edges can be read off the
requests as rounds between syncs (docs/design.md, "Ordering stored as
data"). Guest writes go through the production image layer over the same
bytearray; only the queue's generators are run synchronously here.
"""

from __future__ import annotations

from cachefs.qcow2.check import check_image
from cachefs.qcow2.plan import run_sync
from memimage import new_buffer, open_memory

CS = 1 << 16


class FileIO:
    """plan.py's requests on a bytearray, logged: ("write", offset) | ("sync",) | ("truncate", size)."""

    def __init__(self, buf: bytearray) -> None:
        self.buf, self.log = buf, []

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset:offset + length])

    def pwrite(self, offset: int, data) -> None:
        self.buf[offset:offset + len(data)] = data
        self.log.append(("write", offset))

    def sync(self) -> None:
        self.log.append(("sync",))

    def truncate(self, size: int, grow: bool) -> None:
        if (len(self.buf) < size) if grow else (len(self.buf) > size):
            self.buf[size:] = b""
            self.buf.extend(bytes(size - len(self.buf)))
            self.log.append(("truncate", size))

    def rounds(self) -> list[list[int]]:
        """The offsets written between syncs, one list per sync."""
        out, current = [], []
        for entry in self.log:
            if entry[0] == "write":
                current.append(entry[1])
            elif entry[0] == "sync":
                out.append(current)
                current = []
        assert current == [], "writes after the last sync"
        return out


async def test_a_flushs_rounds_follow_the_edges_and_steady_state_needs_one_sync():
    buf = new_buffer(8 << 20)
    img = await open_memory(buf)
    eng, io = img.engine, FileIO(buf)

    await img.write(0, b"x" * 4096)  # a new L2 table and a cluster from free space
    run_sync(eng.queue.flush(reserve=True), io.pread, io)
    l2, refblock, l1 = eng.map.l1[0] & ~(1 << 63), eng.refs.table[0], eng.map.l1_offset
    assert io.log[0] == ("truncate", eng.queue.min_file_size)  # over the new reservation, before any sync
    # Refcounts (and the header's dirty bit) first, then the L2 table that
    # points at the new cluster, then the L1 entry that points at the table.
    assert io.rounds() == [[0, refblock], [l2], [l1]]

    io.log.clear()
    await img.write(CS, b"y" * 4096)  # from the reservation, under the same L2 table
    run_sync(eng.queue.flush(reserve=True), io.pread, io)
    # The reservation still covers an interval like the last one: no refcount block this time.
    assert io.rounds() == [[l2]], "the table waits for nothing: one sync"
    assert not eng.queue.dirty

    io.log.clear()
    run_sync(eng.queue.close(), io.pread, io)
    assert io.log[0] == ("truncate", eng.queue.allocated_end)  # the reservation's hole goes
    result = run_sync(check_image(len(buf)), io.pread)
    assert result.exit_code() == 0, (result.corruptions, result.leaks)
    assert (await img.read(0, 4096), await img.read(CS, 4096)) == (b"x" * 4096, b"y" * 4096)
