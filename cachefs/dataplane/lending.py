"""Allocating writes in the data plane: Python's half (issue 14; docs/design.md "Allocating in C").

C serves a write to an unallocated cluster by taking a host cluster Python
*lent* it, mapping it at once and logging (guest cluster, host offset)
(cachefs/native/dp_alloc.c). This module keeps C supplied and takes the log
back:

- **lending** (:meth:`FastAllocations.top_up`, after every run of the
  metadata queue): reserved clusters whose refcount raise is durable
  (refcount.Refcounts.lend). They are fresh holes inside the file, so a crash
  leaves a leak at worst; a clean close takes the unused ones back
  (:meth:`take_back`) and the reservation gives them up.
- **adopting** the log as L2 updates (qcow2image.Qcow2Image.adopt_logged, Engine.adopt):
  before Python plans anything that touches those clusters (it first
  *claims* the range in C, so C allocates nothing there meanwhile, then
  adopts everything logged), before a Python read or lseek, at every run of
  the metadata queue (so every flush covers what C allocated before it), and
  when C wakes us with the log half full.
- **refilling** (:meth:`refill`): when C runs low between flushes (a guest
  that writes and never flushes), Python reserves more and lends it at once,
  without a sync: the L2 entries adopted for those clusters wait for their
  refcount blocks (invariant 1), so the next flush takes a second round.

C allocates only while :attr:`allowed`: the image has fast writes, is
writable and not compress-on-write. A write-through handle (writethrough,
directsync) allocates through its twin descriptor without O_DSYNC, and C
answers such a write only after a sync made its data and its new L2 entry
durable: C's own, when it may serve flushes (dp_cflush.c, dataplane/cflush.py),
else Python's next flush (dp_park.c, :meth:`sync_parked`): one fdatasync per
write at most, shared by every write waiting meanwhile.

A guest flush C serves itself writes C's entries into their L2 tables and
syncs them; the records it made durable are adopted here without dirtying
their tables (:meth:`durable_logged`, Engine.adopt).
"""

from __future__ import annotations

import errno
import logging

from cachefs.errors import CachefsError

log = logging.getLogger("cachefs.dataplane.plane")

#: Clusters lent at the least per refill, in bytes' worth (a guest flush lends what it reserved).
MIN_REFILL_BYTES = 16 << 20


class FastAllocations:
    """One qcow2 image's lent clusters and C's allocation log; see the module docstring.

    The image's lender (image/hooks.py, PlaneHooks.lender): FastPaths connects it.
    """

    def __init__(self, plane, inode: int, image, publisher) -> None:
        self.plane = plane
        self.inode = inode
        self.image = image
        self.publisher = publisher
        self.refs = image.engine.refs
        self.cb = image.engine.cb
        self.allowed = False
        self.lent = 0      # counters, for stats and tests
        self.adopted = 0
        self.refills = 0
        self.parked_syncs = 0  # flushes run for write-through writes C parked
        self.copies_adopted = 0  # C's copies on write of shared clusters (dp_cow.c), adopted
        self.copy_waits = 0  # claims that waited for C's copies in flight
        self._since_refill = 0  # C's allocations adopted since the last refill: sizes the next
        self.low_water = 4  # C wakes us when it holds this few lent clusters
        self.capacity = plane.alloc_capacity  # lent clusters C holds at most

    # ------------------------------------------------------------ C's state

    def allow(self, on: bool) -> None:
        """Let C allocate (the image has fast writes) or stop it (no writer left, compress-on-write,
        corruption); stopping makes C's unadopted clusters read-only there (dp_alloc_set)."""
        if on == self.allowed:
            return
        self.allowed = on
        self._set()

    def _set(self) -> None:
        spares, _ = self.status()
        self.low_water = max(4, spares // 8)
        self.plane.alloc_set(self.inode, self.allowed, self.low_water)

    def status(self) -> tuple[int, int]:
        """(clusters C holds lent, log records not yet adopted)."""
        return self.plane.alloc_status(self.inode)

    def logged(self) -> bool:
        return self.status()[1] > 0

    # ------------------------------------------------------------ claims and the log

    def claim(self, first: int, count: int) -> int:
        """C allocates nothing in guest clusters [first, first+count) until :meth:`unclaim`."""
        return self.plane.alloc_claim(self.inode, first, count)

    def unclaim(self, claim: int) -> None:
        self.plane.alloc_unclaim(self.inode, claim)

    def peek_log(self) -> list[tuple[int, int]]:
        """Every (guest cluster, host offset) C logged, oldest first. C keeps them until
        :meth:`drop_log`: adopting may load an L2 table, whose publication must not make such
        a cluster allocatable again in C (dp_alloc_restore keeps it C's while it is logged)."""
        return self.plane.alloc_peek_log(self.inode)

    def drop_log(self, count: int) -> None:
        """The first ``count`` records are adopted: C forgets them."""
        self.plane.alloc_drop_log(self.inode, count)
        self.adopted += count
        self._since_refill += count

    async def copies_done(self, first: int, count: int) -> None:
        """After a claim of [first, first+count): C starts no copy on write there any more; wait for
        those in flight, which C logs when their write completes (dp_cow.c), before the caller
        adopts the log and plans. A drain of everything dispatched so far covers them."""
        if self.plane.cow_inflight(self.inode, first, count) > 0:
            self.copy_waits += 1
            await self.plane.drain(self.plane.ticket())

    def adopted_copies(self, count: int) -> None:
        """C's copies on write were adopted: each old host cluster loses a reference once its L2
        table is durable, and the free that may follow waits for every fast request dispatched
        up to now (a read of the old cluster, planned while the copy was in flight; mapping.fence)."""
        self.copies_adopted += count
        self.publisher.fence_ticket = self.plane.ticket()

    def adopted_clusters(self, vclusters) -> None:
        """Their L2 entries are Python's now. While a write-through handle is published, C keeps
        them DP_MAP_UNSYNCED (its write-through writes there wait for a sync, dp_park.c) until
        they are durable and mapping's settle publishes them plainly writable."""
        if self.publisher.write_through:
            self.publisher.unsettled.update(vclusters)

    # ------------------------------------------------------------ lending

    def top_up(self) -> None:
        """After a run of the metadata queue (the image's write lock held): lend C what the
        reservation has, but what Python's own allocations (new L2 tables, forwarded writes)
        take in an interval, twice (MetaQueue.keep). A cluster whose raise is not durable yet
        (a refill's) is lent too: its adopted L2 entry waits for the block (Refcounts.lend)."""
        if not self.allowed:
            return
        spares, _ = self.status()
        room = self.capacity - spares
        keep = self.image.queue.keep  # Python's own allocations of an interval, twice
        clusters = self.refs.lend(min(room, len(self.refs.reservation) - keep)) if room > 0 else []
        if not clusters:
            return
        given = self.plane.alloc_give(self.inode, [c << self.cb for c in clusters])
        if given < len(clusters):
            self.refs.unlend(clusters[given:])
        self.lent += given
        self._set()  # the low-water mark follows what C holds

    def durable_logged(self) -> int:
        """How many of the oldest log records C wrote into their L2 tables and synced itself (a
        flush served in C, dp_cflush.c): Engine.adopt stores them without dirtying the tables."""
        return self.plane.cflush_status(self.inode)[0] if self.plane.alive else 0

    def python_allocated(self) -> None:
        """Python allocated a cluster (a write C forwarded, maybe for want of lent clusters): if C
        runs low, refill now that this write has taken what it needed."""
        if self.allowed and self.plane.on_alloc_wake is not None and self.status()[0] <= self.low_water:
            self.plane.on_alloc_wake()

    def take_back(self) -> None:
        """C's unused lent clusters return to the reservation (a clean close releases it)."""
        hosts = self.plane.alloc_take_spares(self.inode)
        self.refs.unlend([h >> self.cb for h in hosts])

    async def refill(self) -> None:
        """C woke us: adopt its log, and when its lent clusters run low, reserve more and lend
        them (MetaQueue.refill: no sync now; the next flush makes the raise durable)."""
        img = self.image
        if not img.writable:
            return
        spares, logged = self.status()
        if not logged and not (self.allowed and spares <= self.low_water):
            return
        async with img.backends.in_use(), img.write_lock:
            be = img.backends.batch(img.mode.default)
            await img.adopt_logged(be)
            if self.allowed and self.status()[0] <= self.low_water:
                count = max(MIN_REFILL_BYTES >> self.cb, 2 * self._since_refill)
                self._since_refill = 0
                self.refills += 1
                await img.refill_reservation(be, min(count, self.capacity))
                self.top_up()

    async def sync_parked(self) -> None:
        """Write-through writes C parked (dp_park.c): one flush covers every write parked before it
        started, data and new mappings (group commit); C then answers them with its result."""
        while ticket := self.plane.sync_ticket(self.inode):
            err = 0
            try:
                await self.image.sync_for_plane()
            except OSError as exc:
                err = -(exc.errno or errno.EIO)
            except CachefsError as exc:  # corruption found on the way: the image is read-only now
                log.error("%s: the sync of write-through writes failed: %s", self.image.path, exc)
                err = -errno.EIO
            self.plane.sync_release(self.inode, ticket, err)
            self.parked_syncs += 1

    def stats(self) -> dict:
        spares, logged = self.status() if self.plane.alive else (0, 0)
        return {"fast_allocations_lent": self.lent, "fast_allocations_adopted": self.adopted,
                "fast_lent_clusters": spares, "fast_alloc_log": logged, "fast_refills": self.refills,
                "fast_parked_syncs": self.parked_syncs, "fast_cows_adopted": self.copies_adopted,
                "fast_cow_waits": self.copy_waits}
