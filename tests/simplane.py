"""Python models of the data plane's C, for tests (issue 14; issue 19 checks them against C).

:class:`SimulatedPlane` is C's allocation state (cachefs/native/dp_alloc.c) for one
image, and C's writes over a recorded memory file, planned from Python's own L2
tables; :class:`PublishedPlane` adds C's table of published entries (dp_table.c:
dp_map_clusters with dp_alloc_restore, dp_unmap_clusters) and plans from that
table, as C does. tests/test_powercut_fastalloc.py runs the production image layer
against them; tests/test_dataplane_differential.py drives them side by side with
the real C functions and compares every step.

A plain module, not a test file, so that both can import it.
"""

from __future__ import annotations

import collections
import random

import trio

from cachefs import native
from cachefs.backend import RecordingBackend
from cachefs.qcow2 import format as fmt
from cachefs.qcow2image import Qcow2Image

INO = 7  # the one image a plane serves


class SimulatedPlane:
    """C's allocation state (dp_alloc.c) for one image, and C's writes, over the recorded file."""

    def __init__(self, img: Qcow2Image, rec: RecordingBackend, mode, rng: random.Random):
        self.img, self.rec, self.mode, self.rng = img, rec, mode, rng
        self.engine = img.engine
        self.alive = True
        self.alloc_capacity = native.lib.DP_SPARE  # lent clusters C holds at most
        self.on = False
        self.low_water = 4
        self.spares: collections.deque[int] = collections.deque()
        self.log: list[tuple[int, int]] = []
        self.claims: dict[int, tuple[int, int]] = {}
        self.cmap: dict[int, int] = {}   # guest cluster -> host: C's entry for what it allocated
        self.completed = 0               # C's completed fast writes (BackendSet.fast_writes)
        self.allocated = 0
        self.in_place = 0
        self.forwarded = 0
        self.refused = 0                 # allocations refused for want of a lent cluster
        self._seq = 0
        self._inflight: set[int] = set()
        self.wake = trio.Event()
        self.on_alloc_wake = lambda: self.wake.set()  # DataPlane.on_alloc_wake: C's wake, from Python
        img.backends.fast_writes = lambda: self.completed
        img.free_fence = self._fence
        self.engine.on_mapping_change(self._changed)

    # ------------------------------------------------------------ the plane calls (dataplane.DataPlane)

    def alloc_set(self, ino, on, low_water):
        assert ino == INO
        self.on, self.low_water = bool(on), low_water

    def alloc_give(self, ino, hosts):
        assert ino == INO and all(h % self.engine.cs == 0 for h in hosts)
        n = min(len(hosts), self.alloc_capacity - len(self.spares))
        self.spares.extend(hosts[:n])
        return n

    def alloc_take_spares(self, ino):
        out = list(self.spares)
        self.spares.clear()
        return out

    def alloc_peek_log(self, ino):
        return list(self.log)

    def alloc_drop_log(self, ino, count):
        del self.log[:count]

    def alloc_claim(self, ino, first, count):
        cid = next(i for i in range(len(self.claims) + 1) if i not in self.claims)
        self.claims[cid] = (first, first + (count or 1))
        return cid

    def alloc_unclaim(self, ino, cid):
        del self.claims[cid]

    def alloc_status(self, ino):
        return len(self.spares), len(self.log)

    # ------------------------------------------------------------ C's mapping

    def _changed(self, change) -> None:
        """Python published a change (dpmap.changed): C's entry is Python's again, except for the
        clusters still in the log (dp_alloc_restore)."""
        logged = {g for g, _ in self.log}
        for c in range(change.first, change.first + change.count):
            if c not in logged:
                self.cmap.pop(c, None)

    def _entry(self, vcl: int) -> int | None:
        """The L2 entry C holds for a guest cluster: None when its table is not published (cached)."""
        m = self.engine.map
        l1_idx, idx = divmod(vcl, m.l2_entries)
        off = m.l1[l1_idx] & fmt.OFFSET_MASK if l1_idx < len(m.l1) else 0
        table = self.engine.cache.get(off) if off else None
        return None if table is None else table.entries[idx]

    def _claimed(self, vcl: int) -> bool:
        return any(a <= vcl < b for a, b in self.claims.values())

    def _plan(self, vcl: int, data) -> int | None:
        """dp_plan_mapped + dp_alloc_commit for one cluster, in one step: the host cluster to write
        (allocating it if need be), or None: forwarded to Python."""
        if len(data) == self.engine.cs and not any(data):
            return None  # a whole cluster of zeros is Python's (discard by zeroes)
        if vcl in self.cmap:
            self.in_place += 1
            return self.cmap[vcl]
        entry = self._entry(vcl)
        if entry is None or entry & fmt.L2_COMPRESSED:
            return None
        host = entry & fmt.OFFSET_MASK
        if host and entry & fmt.L2_COPIED and not entry & fmt.L2_ZERO:
            self.in_place += 1
            return host
        if entry not in (0, fmt.L2_ZERO) or not self.on or self._claimed(vcl):
            return None
        if not self.spares or len(self.log) >= native.lib.DP_ALOG:
            self.refused += 1  # forwarded: Python allocates it, then wakes the refill (python_allocated)
            return None
        host = self.spares.popleft()
        self.cmap[vcl] = host
        self.log.append((vcl, host))
        self.allocated += 1
        if len(self.spares) <= self.low_water or len(self.log) >= native.lib.DP_ALOG // 2:
            self.wake.set()
        return host

    async def c_write(self, off: int, data: bytes) -> bool:
        """A guest write inside one cluster as C serves it; False if it was forwarded to Python."""
        vcl, inside = divmod(off, self.engine.cs)
        assert (off + len(data) - 1) // self.engine.cs == vcl
        host = self._plan(vcl, data)
        if host is None:
            self.forwarded += 1
            await self.img.write(off, data, self.mode)
            return False
        seq, self._seq = self._seq, self._seq + 1
        self._inflight.add(seq)
        try:
            for _ in range(self.rng.randrange(3)):
                await trio.sleep(0)  # the I/O takes a while: flushes, adoptions run meanwhile
            await self.rec.pwrite(host + inside, data)
            self.completed += 1
        finally:
            self._inflight.discard(seq)
        return True

    async def _fence(self) -> None:
        """dpmap.fence: C's requests dispatched so far have completed before frees are applied."""
        ticket = self._seq
        while any(s < ticket for s in self._inflight):
            await trio.sleep(0)

    async def serve(self, allocs: FastAllocations) -> None:
        """fastpaths.FastPaths.serve_allocations: C woke us (few lent clusters, or the log fills)."""
        while True:
            await self.wake.wait()
            self.wake = trio.Event()  # on_alloc_wake sets the current one
            await allocs.refill()


class PublishedPlane(SimulatedPlane):
    """C's table of published entries (dp_table.c: dp_map_clusters with dp_alloc_restore,
    dp_unmap_clusters), kept by the production dpmap.MappingPublisher, and C's requests planned
    from that table, as C plans them, not from Python's L2 tables."""

    def __init__(self, img, rec, mode, rng):
        super().__init__(img, rec, mode, rng)
        lib = native.lib
        self.W, self.R, self.Z, self.A = lib.DP_MAP_WRITABLE, lib.DP_MAP_READONLY, lib.DP_MAP_ZERO, lib.DP_MAP_ALLOC
        self.entries: dict[int, int] = {}  # guest cluster -> host | DP_MAP_*; missing: absent

    def _changed(self, change) -> None:
        pass  # the MappingPublisher tells this plane (map_clusters)

    def map_states(self):
        return self.W, self.R, self.Z, self.A

    def map_clusters(self, ino, first, states):
        for i, e in enumerate(states):
            if e:
                self.entries[first + i] = e
            else:
                self.entries.pop(first + i, None)
        for g, h in self.log:  # dp_alloc_restore
            if first <= g < first + len(states):
                self.entries[g] = h | self.W

    def unmap_clusters(self, ino, first, count):
        for c in range(first, first + count):
            self.entries.pop(c, None)

    def ticket(self):
        return self._seq

    async def drain(self, ticket):
        while any(s < ticket for s in self._inflight):
            await trio.sleep(0)

    def _plan(self, vcl: int, data) -> int | None:
        e = self.entries.get(vcl, 0)
        st, host = e & 3, e & ~511
        if len(data) == self.engine.cs and not any(data) and st != self.R:
            return None
        if st == self.W:
            self.in_place += 1
            return host
        if st != self.Z or not e & self.A or host or not self.on or self._claimed(vcl) or not self.spares:
            return None
        host = self.spares.popleft()
        self.entries[vcl] = host | self.W
        self.log.append((vcl, host))
        self.allocated += 1
        return host

    async def c_read(self, off: int, n: int) -> bytes:
        """A guest read inside one cluster as C serves it (forwarded when the entry is absent)."""
        vcl, inside = divmod(off, self.engine.cs)
        e = self.entries.get(vcl, 0)
        if e & 3 in (self.W, self.R):
            return bytes(await self.rec.pread((e & ~511) + inside, n))
        if e & 3 == self.Z:
            return bytes(n)
        return bytes(await self.img.read(off, n, self.mode))
