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
import errno
import random
from typing import TYPE_CHECKING

import attrs
import trio

from cachefs import native
from cachefs.image.hooks import PlaneHooks
from cachefs.qcow2 import format as fmt

if TYPE_CHECKING:
    from cachefs.backend import RecordingBackend
    from cachefs.dataplane.lending import FastAllocations
    from cachefs.image.qcow2image import Qcow2Image

INO = 7  # the one image a plane serves
W, R, Z = native.lib.DP_MAP_WRITABLE, native.lib.DP_MAP_READONLY, native.lib.DP_MAP_ZERO  # dp_abi.h
A, U = native.lib.DP_MAP_ALLOC, native.lib.DP_MAP_UNSYNCED
HOST = ~511  # an entry's host offset (DP_MAP_HOST)
MAX_WRITE = 1 << 20  # the largest WRITE C serves (DP_DATA - 4096: libfuse's max_write)


@attrs.frozen
class Served:
    """What C made of one WRITE (PublishedPlane.plan_write; dp_take_fast)."""
    kind: str                        # "forwarded", "in place", "allocated"
    hosts: tuple[int, ...] = ()      # the host cluster of each guest cluster written, in order
    allocated: tuple[int, ...] = ()  # the guest clusters it allocated, in order
    via: str = ""                    # "fd" or "twin" (write-through's descriptor without O_DSYNC)
    defer: bool = False              # answered only after Python's sync (dp_park.c)


class SimulatedPlane:
    """C's allocation state (dp_alloc.c) for one image, and C's writes, over the recorded file."""

    def __init__(self, img: Qcow2Image, rec: RecordingBackend, mode, rng: random.Random):
        self.img, self.rec, self.mode, self.rng = img, rec, mode, rng
        self.engine = img.engine
        self.alive = True
        self.alloc_capacity = native.lib.DP_SPARE  # lent clusters C holds at most
        self.on = False
        self.low_water = 0               # C's until Python's first alloc_set
        self.spares: collections.deque[int] = collections.deque()
        self.log: list[tuple[int, int]] = []
        self.claims: dict[int, tuple[int, int]] = {}
        self.overflow = 0                # claims beyond DP_NCLAIM: no allocation at all meanwhile
        self.wake_sent = False           # C woke Python, which has not lent or adopted since
        self.cmap: dict[int, int] = {}   # guest cluster -> C's entry (host | DP_MAP_*) for what it allocated
        self.completed = 0               # C's completed fast writes (PlaneHooks.fast_writes)
        self.allocated = 0
        self.in_place = 0
        self.forwarded = 0
        self.refused = 0                 # allocations refused for want of a lent cluster
        self._seq = 0
        self._inflight: set[int] = set()
        self.wake = trio.Event()
        self.on_alloc_wake = lambda: self.wake.set()  # DataPlane.on_alloc_wake: C's wake, from Python
        self.engine.on_mapping_change(self._changed)
        self.engine.cache.listeners.append(self)  # C holds the entries of cached tables only

    def hooks(self, **more) -> PlaneHooks:
        """The image's hooks into this plane (FastPaths._connect): C's completed writes count for the
        next sync, frees wait for C's requests in flight (_fence); ``more`` sets or replaces others."""
        return attrs.evolve(PlaneHooks(fast_writes=lambda: self.completed, fence_frees=self._fence), **more)

    # ------------------------------------------------------------ the plane calls (dataplane.DataPlane)

    def alloc_set(self, ino, on, low_water):
        """Stopping makes C's logged clusters read-only (a write-through handle is coming)."""
        assert ino == INO
        self.on, self.low_water = bool(on), low_water
        for g, h in self.log if not on else ():
            if self._c_entry(g) & 3 == W:
                self._set_c_entry(g, h | R)

    def alloc_give(self, ino, hosts):
        assert ino == INO and all(h % self.engine.cs == 0 for h in hosts)
        n = min(len(hosts), self.alloc_capacity - len(self.spares))
        self.spares.extend(hosts[:n])
        self.wake_sent = False  # even when nothing fitted: Python answered the wake
        return n

    def alloc_take_spares(self, ino):
        out = list(self.spares)
        self.spares.clear()
        return out

    def alloc_peek_log(self, ino):
        return list(self.log)

    def alloc_drop_log(self, ino, count):
        del self.log[:count]
        if len(self.log) < native.lib.DP_ALOG // 2 and len(self.spares) > self.low_water:
            self.wake_sent = False

    def alloc_claim(self, ino, first, count):
        """The lowest free id; DP_NCLAIM when all are taken (an overflow: nothing is allocated)."""
        cid = next((i for i in range(native.lib.DP_NCLAIM) if i not in self.claims), native.lib.DP_NCLAIM)
        if cid == native.lib.DP_NCLAIM:
            self.overflow += 1
        else:
            self.claims[cid] = (first, first + (count or 1))
        return cid

    def alloc_unclaim(self, ino, cid):
        if cid == native.lib.DP_NCLAIM:
            self.overflow -= 1
        else:
            del self.claims[cid]

    def cflush_status(self, ino):
        return 0, 0, 0  # no flush is served in C here (dp_cflush.c): none made durable, no error

    def alloc_status(self, ino):
        return len(self.spares), len(self.log)

    def cow_inflight(self, ino, first, count):
        """dp_cow_inflight: the model copies nothing on write (its images have no snapshot), so
        none is ever in flight (MappingPublisher's may_cow stays off: no DP_MAP_COW published)."""
        return 0

    # ------------------------------------------------------------ C's mapping

    def _changed(self, change) -> None:
        """Python published a change (mapping.changed): C's entry is Python's again, except for the
        clusters still in the log (dp_alloc_restore)."""
        for c in range(change.first, change.first + change.count):
            self.cmap.pop(c, None)
        self._restore(change.first, change.count)

    def entered(self, table) -> None:
        """An L2 table entered Python's cache: mapping publishes Python's entries, and C keeps what
        it logged there (dp_alloc_restore)."""
        if table.kind == "l2" and table.l1_index >= 0:
            per = self.engine.map.l2_entries
            self.left(table)
            self._restore(table.l1_index * per, per)

    def left(self, table) -> None:
        """An L2 table left the cache: C's entries there are gone, its allocations' too."""
        if table.kind == "l2" and table.l1_index >= 0:
            per = self.engine.map.l2_entries
            for c in range(table.l1_index * per, (table.l1_index + 1) * per):
                self.cmap.pop(c, None)

    def _restore(self, first: int, count: int) -> None:
        """dp_alloc_restore: what C logged keeps C's mapping, writable (not durable) while C may
        allocate, read-only once it may not."""
        for g, h in self.log:
            if first <= g < first + count:
                self._set_c_entry(g, h | (W | U if self.on else R))

    def _c_entry(self, vcl: int) -> int:
        return self.cmap.get(vcl, 0)

    def _set_c_entry(self, vcl: int, e: int) -> None:
        self.cmap[vcl] = e

    def _entry(self, vcl: int) -> int | None:
        """The L2 entry C holds for a guest cluster: None when its table is not published (cached)."""
        m = self.engine.map
        l1_idx, idx = divmod(vcl, m.l2_entries)
        off = m.l1[l1_idx] & fmt.OFFSET_MASK if l1_idx < len(m.l1) else 0
        table = self.engine.cache.get(off) if off else None
        return None if table is None else table.entries[idx]

    def _claimed(self, vcl: int) -> bool:
        return self.overflow > 0 or any(a <= vcl < b for a, b in self.claims.values())

    def _woken(self) -> None:
        """dp_alloc_commit's wake, after an allocation: few lent clusters left or the log half full,
        and only once until Python lends or adopts (alloc_give, alloc_drop_log)."""
        if not self.wake_sent and (len(self.spares) <= self.low_water or len(self.log) >= native.lib.DP_ALOG // 2):
            self.wake_sent = True
            self.wake.set()

    def _plan(self, vcl: int, data) -> int | None:
        """dp_plan_mapped + dp_alloc_commit for one cluster, in one step: the host cluster to write
        (allocating it if need be), or None: forwarded to Python."""
        if len(data) == self.engine.cs and not any(data):
            return None  # a whole cluster of zeros is Python's (discard by zeroes)
        entry = self._entry(vcl)
        if entry is None:
            return None  # its table is not cached, so not published: C forwards it
        if vcl in self.cmap:  # allocated by C: writable, or read-only since allocation stopped
            if self.cmap[vcl] & 3 != W:
                return None
            self.in_place += 1
            return self.cmap[vcl] & HOST
        if entry & fmt.L2_COMPRESSED:
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
        self.cmap[vcl] = host | W | U
        self.log.append((vcl, host))
        self.allocated += 1
        self._woken()
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
        """mapping.fence: C's requests dispatched so far have completed before frees are applied."""
        ticket = self._seq
        while any(s < ticket for s in self._inflight):
            await trio.sleep(0)

    async def serve(self, allocs: FastAllocations) -> None:
        """handles.FastPaths.serve_allocations: C woke us (few lent clusters, or the log fills)."""
        while True:
            await self.wake.wait()
            self.wake = trio.Event()  # on_alloc_wake sets the current one
            await allocs.refill()


class PublishedPlane(SimulatedPlane):
    """C's table of published entries (dp_table.c: dp_map_clusters with dp_alloc_restore,
    dp_unmap_clusters), kept by the production mapping.MappingPublisher, and C's requests planned
    from that table, as C plans them, not from Python's L2 tables."""

    def __init__(self, img, rec, mode, rng):
        super().__init__(img, rec, mode, rng)
        self.W, self.R, self.Z, self.A = W, R, Z, A
        self.entries: dict[int, int] = {}  # guest cluster -> host | DP_MAP_*; missing: absent
        self.guest_clusters: int | None = None  # C's guest size in clusters, where a test sets it

    def _changed(self, change) -> None:
        pass  # the MappingPublisher tells this plane (map_clusters)

    def entered(self, table) -> None:
        pass  # the MappingPublisher tells this plane (map_clusters)

    def left(self, table) -> None:
        pass  # the MappingPublisher tells this plane (unmap_clusters)

    def _c_entry(self, vcl: int) -> int:
        return self.entries.get(vcl, 0)

    def _set_c_entry(self, vcl: int, e: int) -> None:
        self.entries[vcl] = e

    def map_states(self):
        return self.W, self.R, self.Z, self.A

    @staticmethod
    def cow_state():
        return native.lib.DP_MAP_COW  # never published here: the model has no copy on write (cow_inflight)

    def map_clusters(self, ino, first, states):
        if self.guest_clusters is not None and states and first + len(states) > self.guest_clusters:
            raise OSError(errno.ERANGE, "past the guest's last cluster: nothing published")
        for i, e in enumerate(states):
            if e:
                self.entries[first + i] = e
            else:
                self.entries.pop(first + i, None)
        self._restore(first, len(states))

    def unmap_clusters(self, ino, first, count):
        for c in range(first, first + count):
            self.entries.pop(c, None)

    def ticket(self):
        return self._seq

    async def drain(self, ticket):
        while any(s < ticket for s in self._inflight):
            await trio.sleep(0)

    def _plan(self, vcl: int, data) -> int | None:
        served = self.plan_write(vcl * self.engine.cs, data)
        return served.hosts[0] if served.hosts else None

    def plan_write(self, off: int, data: bytes, *, sync: bool = False, twin: bool = False) -> Served:
        """A WRITE of ``data`` at guest offset ``off`` (inside the guest) through a handle that is
        write-through (``sync``) or not, with a ``twin`` descriptor or not, as dp_take_fast plans
        and dispatches it: every cluster writable in place, or allocatable with a lent cluster
        (the nth allocation takes the nth lent cluster), else the whole request is forwarded and
        nothing is taken; a whole cluster of zeros is Python's."""
        cs, hosts, allocs, ends, unsynced = self.engine.cs, [], [], [], False
        if not data or len(data) > MAX_WRITE:
            return Served("forwarded")
        done = 0
        while done < len(data):
            vcl, inside = divmod(off + done, cs)
            n = min(cs - inside, len(data) - done)
            e = self.entries.get(vcl, 0)
            if n == cs and e & 3 != R and not any(data[done:done + n]):
                return Served("forwarded")  # discard by zeroes keeps working
            if e & 3 != W:
                if (e & (A | 3)) != A | Z or e & HOST or not self._may_allocate(vcl, len(allocs), sync, twin):
                    return Served("forwarded")
                e = self.spares[len(allocs)] | W | U
                allocs.append(vcl)
            unsynced |= bool(e & U)
            hosts.append(e & HOST)
            if not ends or ends[-1] != (e & HOST) + inside:  # a new piece, unless the host run goes on
                ends.append(None)
                if len(ends) > native.lib.DP_MAXPIECE:
                    return Served("forwarded")
            ends[-1] = (e & HOST) + inside + n
            done += n
        return self._dispatch(tuple(hosts), tuple(allocs), sync and unsynced, twin)

    def _may_allocate(self, vcl: int, nth: int, sync: bool, twin: bool) -> bool:
        """dp_alloc_may: the request's nth allocation, at guest cluster ``vcl``."""
        lib = native.lib
        if not self.on or (sync and not twin) or nth == lib.DP_MAXALLOC or self._claimed(vcl):
            return False
        if nth >= len(self.spares) or len(self.log) + nth >= lib.DP_ALOG:
            self.refused += 1  # forwarded: Python allocates it, then refills (dataplane/lending.py)
            return False
        return True

    def _dispatch(self, hosts, allocs, defer: bool, twin: bool) -> Served:
        """dp_alloc_commit: take the lent clusters, map them writable (not durable), log them."""
        for vcl in allocs:
            host = self.spares.popleft()
            self.entries[vcl] = host | W | U
            self.log.append((vcl, host))
        self.allocated += len(allocs)
        if allocs:
            self._woken()
        else:
            self.in_place += 1
        return Served("allocated" if allocs else "in place", hosts, allocs, "twin" if defer and twin else "fd", defer)

    async def c_read(self, off: int, n: int) -> bytes:
        """A guest read inside one cluster as C serves it (forwarded when the entry is absent)."""
        vcl, inside = divmod(off, self.engine.cs)
        e = self.entries.get(vcl, 0)
        if e & 3 in (self.W, self.R):
            return bytes(await self.rec.pread((e & ~511) + inside, n))
        if e & 3 == self.Z:
            return bytes(n)
        return bytes(await self.img.read(off, n, self.mode))
