"""Guest clusters whose allocation is in flight: planned, data being written, not yet committed.

An allocating qcow2 write plans under the image's write lock (the new host
clusters are then reserved for it), lets the lock go for its data writes, and
takes it again to commit or abort (image/qcow2image.py; QEMU's qcow2 drops its lock
for the data I/O the same way and keeps the in-flight allocations in
``s->cluster_allocs``). Until the commit, the L2 entry still holds the old
mapping, so readers see the old data (the engine's two-phase promise: never
an entry whose data is not written). Anything that would *change* such a
cluster meanwhile must wait: a second allocating write would allocate it
again and one of the two writes would be lost, a discard or a preallocation
would be overwritten by the commit. :meth:`InFlight.settle` is that wait.
"""

from __future__ import annotations

import trio


class InFlight:
    """guest cluster -> the event its allocating writer sets after commit or abort."""

    def __init__(self) -> None:
        self._busy: dict[int, trio.Event] = {}

    def __len__(self) -> int:
        return len(self._busy)

    def _first_busy(self, first: int, count: int) -> trio.Event | None:
        if count > len(self._busy):  # few in flight (one per queued request at most): scan those
            return next((ev for v, ev in self._busy.items() if first <= v < first + count), None)
        return next((self._busy[v] for v in range(first, first + count) if v in self._busy), None)

    async def settle(self, lock, first: int, count: int) -> None:
        """Return, holding ``lock``, once no cluster in [first, first+count) has an allocation in flight.

        The caller holds ``lock``; it is let go while waiting, so the writer being waited for
        can take it to commit.
        """
        while (ev := self._first_busy(first, count)) is not None:
            lock.release()
            try:
                await ev.wait()
            finally:
                with trio.CancelScope(shield=True):  # the caller's ``async with`` releases it
                    await lock.acquire()

    def claim(self, vclusters) -> trio.Event:
        """Mark these clusters in flight (the caller holds the lock and checked them with settle)."""
        ev = trio.Event()
        for v in vclusters:
            self._busy[v] = ev
        return ev

    def release(self, vclusters, ev: trio.Event) -> None:
        """The allocation committed or aborted: its waiters may plan again."""
        for v in vclusters:
            if self._busy.get(v) is ev:
                del self._busy[v]
        ev.set()


class Writing:
    """Data writes between their plan and their end: what a new metadata generation waits for.

    An overwrite in place plans under the write lock and writes without it (Qcow2Image.write_plain).
    A snapshot makes every cluster shared; a write planned in place before it and landing after it
    would change the snapshot's bytes. So the snapshot point is taken holding the lock (nothing new
    plans) once this count is zero (nothing planned is still writing).
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle: trio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if not self.count and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def drained(self) -> None:
        while self.count:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
