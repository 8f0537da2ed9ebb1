"""The metadata queue: dirty metadata written in dependency order, one sync per round.

What it owns (docs/design.md, "Ordering stored as data" and "One fdatasync
per guest flush"):

- the dirty items (meta.py) and their ordering edges: which items are ready
  (every dependency durable), what is written but not yet synced;
- the flush rounds: write every ready item, sync, repeat until nothing is
  dirty. Edges run one way by kind (refcount blocks and data, then L2 tables
  and refcount-table chunks, then L1 chunks, then the header), so the rounds
  end;
- early writeout when the table cache is full of dirty tables: write what is
  ready without a sync, so written tables may be evicted and memory stays
  bounded whatever the image size;
- frees that wait: a dropped reference lowers its refcount only once the
  item that dropped it is durable (invariant 2) *and* no guest I/O that
  looked up a mapping is still running (``inflight``), since that I/O may
  still use the old host cluster;
- the reservation and the header's dirty bit: each flush raises the
  refcounts of clusters the next interval will allocate, so that interval's
  L2 updates wait for no refcount block and its flush needs one sync;
- the generation numbers that group commit shares (:class:`Generations`).

It does no I/O. Its generators yield plan.WriteRequest, SyncRequest,
TruncateRequest (and ReadRequest, for refcount blocks a free or a
reservation needs) and are driven by plan.run_async in the image layer, by
plan.run_sync in tests. A round's writes are all tried (STYLE.md habit 4:
a flush tries every step and reports the first error): an item whose write
failed stays dirty, the others are written, and the first failure is raised
once the round's writes are done, before its sync. The next flush writes the
failed items again (and syncs the others). Any other failed request raises
out of the driver and leaves the generator where it was.
"""

from __future__ import annotations

import attrs

from cachefs.errors import CorruptImage
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.meta import HeaderItem, MetaItem, State, Table
from cachefs.qcow2.plan import DiscardRequest, SyncRequest, TruncateRequest, WriteRequest

#: Reservation bounds (clusters are reserved in bytes' worth, see prepare_flush).
MIN_RESERVE_BYTES = 1 << 20
MAX_RESERVE_BYTES = 256 << 20
#: Reserved clusters Python keeps for itself at the least, lending the rest (new L2 tables, writes C forwards).
MIN_KEEP = 4
#: Rounds a writeout may take: far more than the one-way order of kinds
#: needs. Reaching it means an ordering cycle, a bug, not something to wait out.
MAX_ROUNDS = 64


@attrs.frozen
class PendingFree:
    cluster: int
    after: MetaItem  # must be durable before the refcount may drop


@attrs.define
class Generations:
    """Group commit, as numbers: flushes are numbered as they start.

    Invariant: flush number N starts after every flush numbered below N has
    ended, so a caller that arrives while N-1 runs is covered once N is done.
    The image layer waits (a trio.Event); the numbers are kept here.
    """

    started: int = 0
    done: int = 0
    merged: int = 0  # callers whose flush was another caller's

    def ticket(self) -> int:
        """The flush that covers a caller arriving now."""
        return self.started + 1

    def covered(self, ticket: int) -> bool:
        return self.done >= ticket

    def begin(self) -> int:
        self.started += 1
        return self.started

    def end(self, generation: int) -> None:
        """Flush ``generation`` succeeded (a failed one covers nobody)."""
        self.done = generation


class MetaQueue:
    def __init__(self, header: HeaderItem, refs, overlap, counters):
        self.header = header
        self.data_item = MetaItem(name="data", kind="data")
        self.refs = refs
        self.cache = refs.cache
        self.overlap = overlap
        self.counters = counters
        self.cb = header.hdr.cluster_bits
        self._chunks: list[dict] = []  # index -> TableChunk, per table held whole in memory
        # Invariant: every WRITTEN item is in this list (a sync makes them all CLEAN).
        self._awaiting_sync: list[MetaItem] = []
        self.pending: list[PendingFree] = []
        # A host cluster someone may still write whole, with references yet to come (the
        # compress-on-write fill cluster kept open: compress.FillCache): its frees wait, so its
        # refcount cannot reach 0 and the allocator cannot hand it out meanwhile.
        self.holds = lambda cluster: False
        # Guest I/O that looked up a mapping outside the image's write lock
        # and may still use it. Frees wait while it is not zero.
        self.inflight = 0
        self.commits = Generations()
        self.early_writeouts = 0
        self._allocs_since_flush = 0
        self._own_allocs_since_flush = 0
        # Reserved clusters Python keeps for its own allocations when it lends the rest to the
        # data plane (dataplane/lending.py): twice its own allocations of the last interval.
        self.keep = MIN_KEEP
        # The least a flush reserves once the interval allocated anything (reserve_at_least).
        self.min_reserve_bytes = MIN_RESERVE_BYTES
        self.marked_dirty = False  # we set the dirty bit (reservations); a clean close clears it
        # The driver punches holes for freed host clusters (plan.DiscardRequest): the image layer's does.
        self.punch_freed = False

    def track(self, *chunks: dict) -> None:
        """Tables held whole in memory, as index -> TableChunk (the L1 and refcount tables)."""
        self._chunks.extend(chunks)

    # ------------------------------------------------------------ what is dirty

    def dirty_items(self) -> list[MetaItem]:
        items: list[MetaItem] = [t for t in self.cache.values() if t.state is State.DIRTY]
        for chunks in self._chunks:
            items += [c for c in chunks.values() if c.state is State.DIRTY]
        items += [i for i in (self.header, self.data_item) if i.state is State.DIRTY]
        return items

    @property
    def dirty(self) -> bool:
        """Anything not yet durable: dirty items, written-but-unsynced ones, or pending frees."""
        return bool(self.dirty_items()) or self.needs_sync or bool(self.pending)

    @property
    def needs_sync(self) -> bool:
        return bool(self._awaiting_sync)

    def data_written(self) -> None:
        """Guest data reached the backend: the next flush must sync it."""
        self.data_item.touch()

    def allocated(self, allocation, *, by_plane: bool = False) -> None:
        """A cluster was allocated (counted, and it sizes the next reservation). ``by_plane``: the
        data plane allocated it from a lent cluster (dataplane/lending.py); the others size the share of
        the reservation Python keeps for itself (:attr:`keep`)."""
        self.counters.allocations += 1
        self.counters.from_reservation += allocation.fresh
        self._allocs_since_flush += 1
        self._own_allocs_since_flush += not by_plane

    # ------------------------------------------------------------ one round

    def writeout_batch(self) -> list[tuple[MetaItem, int, bytes]]:
        """Every dirty item whose ordering edges are satisfied, placed, overlap-checked, by offset."""
        batch = []
        for item in self.dirty_items():
            if not item.ready():
                continue
            offset, payload = item.placed()
            if payload:
                self.overlap.check_write(item, offset, len(payload))
            batch.append((item, offset, payload))
        batch.sort(key=lambda b: b[1])
        return batch

    def written(self, batch) -> None:
        """The batch's writes completed (not yet durable)."""
        for item, offset, payload in batch:
            item.state = State.WRITTEN
            item.deps.clear()
            if isinstance(item, Table):
                item.written()
            self._awaiting_sync.append(item)
            if payload:
                self.refs.note_written(offset + len(payload))
                if item.kind != "data":  # a compressed-data cluster (qcow2/compress.py) is not metadata
                    self.counters.metadata_writes += 1
                    self.counters.metadata_bytes += len(payload)
        if batch:
            self.counters.batches += 1

    def written_by_caller(self, item: MetaItem) -> None:
        """The caller wrote ``item`` itself (a full compressed-data cluster,
        qcow2/compress.py): it is durable after the next sync."""
        item.state = State.WRITTEN
        item.deps.clear()
        self._awaiting_sync.append(item)

    def synced(self) -> None:
        """A sync completed: every WRITTEN item is durable."""
        # The list, not the cache: a WRITTEN table may have been evicted (writeout_early).
        for item in self._awaiting_sync:
            if item.state is State.WRITTEN:
                item.state = State.CLEAN
                if isinstance(item, Table):
                    item.new = False  # on disk now
        self._awaiting_sync.clear()

    def _write(self, batch):
        """Generator: write every item of the batch; raise the first failure after trying them all.

        An item whose write failed stays DIRTY, so the next writeout tries it
        again; nothing in a batch depends on another item of it (each is
        ready), so the rest may be written meanwhile.
        """
        done, first_error = [], None
        for entry in batch:
            offset, payload = entry[1], entry[2]
            if payload:
                failed = yield WriteRequest(offset, payload, reports_failure=True)
                if isinstance(failed, OSError):
                    first_error = first_error or failed
                    continue
            done.append(entry)
        self.written(done)
        if first_error is not None:
            raise first_error

    # ------------------------------------------------------------ rounds

    def writeout(self, *, sync: bool = False):
        """Generator: write every dirty item in dependency order, one sync per round.

        Then apply the frees that became due, unless guest I/O is in flight
        (they stay pending for the next writeout). Through an O_DSYNC
        descriptor the image's sync costs no fdatasync: the rounds' writes are
        durable when they complete.

        ``sync`` (a flush, a close): end in a sync even when no metadata needed
        a round. Guest data the queue never sees, the data plane's fast writes,
        is durable only through that sync, which the image skips when no
        completed write is unsynced (Image.sync, BackendSet.unsynced). Without
        it, a flush with only pending frees queued (dirty, yet nothing to write)
        returned with no fdatasync at all and lost C's flushed writes (issue 19).
        """
        synced = False
        for _ in range(MAX_ROUNDS):
            batch = self.writeout_batch()
            if not batch and not self.needs_sync:
                break
            yield from self._write(batch)
            yield SyncRequest()
            self.synced()
            synced = True
        else:
            raise CorruptImage("metadata writeout does not converge")
        if sync and not synced:
            yield SyncRequest()
        self.refs.reserve_durable()  # nothing is left unsynced: the reservation's raise neither
        if self.inflight == 0:
            yield from self.apply_frees()

    def writeout_early(self):
        """Generator: too much of the table cache is dirty; write what is ready now, without a sync.

        Written tables may then be evicted (meta.TableCache). Only if nothing
        was ready (every dirty table waits for a sync) does a full writeout
        with syncs run.
        """
        yield from self._write(self.writeout_batch())
        self.early_writeouts += 1
        self.cache.trim()
        if self.cache.over_budget:
            yield from self.writeout()

    def make_durable(self):
        """Generator: everything written and synced, with no new reservation."""
        yield from self.writeout(sync=True)

    def flush(self, *, reserve: bool):
        """Generator: a guest flush. Reserve for the next interval, then make everything durable.

        The reservation's refcount raise and the file extension over it ride
        in this flush's one sync (refcount.py), so the next flush's L2
        updates wait for nothing. Modes that never queue metadata
        (writethrough) have no sync to save: ``reserve=False``.
        """
        if reserve:
            yield from self.prepare_flush()
        if self.min_file_size:
            yield TruncateRequest(self.min_file_size, grow=True)  # a hole: no disk space
        yield from self.make_durable()

    def refill(self, count: int):
        """Generator: reserve ``count`` more clusters now, without a sync: the data plane ran
        short of lent clusters between guest flushes (dataplane/lending.py). The file grows over them (a
        hole) before anything may point at them; their raise becomes durable with the next
        flush, which writes the refcount blocks a round before the L2 entries that wait for them
        (Refcounts.counted): an extra sync for that flush only, as an allocation outside the
        reservation costs."""
        if self.overlap.writable:
            yield from self.reserve(len(self.refs.reservation) + len(self.refs.lent) + count)
        if self.min_file_size:
            yield TruncateRequest(self.min_file_size, grow=True)

    def close(self):
        """Generator: a clean close. Give the reservation back, trim the file, write everything."""
        yield from self.release_reservation()
        if self.allocated_end >= self.min_file_size:
            yield TruncateRequest(self.allocated_end, grow=False)  # the reservation's hole goes too
        for n in range(8):  # frees applied in one writeout dirty refcount blocks for the next
            yield from self.writeout(sync=n == 0)
            if not self.dirty:
                break

    # ------------------------------------------------------------ frees

    def defer_free(self, cluster: int, after: MetaItem) -> None:
        """Drop a reference to ``cluster`` once ``after`` (what dropped it) is durable."""
        self.pending.append(PendingFree(cluster, after))

    def apply_frees(self):
        """Generator: lower the refcounts whose dropping reference is durable now.

        With ``punch_freed``, the host clusters that reach refcount 0 get
        their space back (DiscardRequest) before this generator returns: the
        caller holds the image's write lock, so nothing can allocate them in
        between and lose new data to the punch. Only at refcount 0: a
        compressed cluster's host cluster may hold other clusters' data. A
        crash before the lowered refcount is durable leaves a leak whose
        bytes read as zeros, which nothing references.
        """
        ready = [p for p in self.pending if p.after.durable and not self.holds(p.cluster)]
        self.pending = [p for p in self.pending if p not in ready]
        emptied = []
        for p in ready:
            block = yield from self.refs.change(p.cluster, -1)
            if self.punch_freed and block.entries[p.cluster % self.refs.per_block] == 0:
                emptied.append(p.cluster)
        for first, count in cluster_runs(sorted(emptied)):
            yield DiscardRequest(first << self.cb, count << self.cb)
        return len(ready)

    # ------------------------------------------------------------ the reservation

    def prepare_flush(self):
        """Generator: reserve clusters for the next interval, so its flush needs one sync.

        Sized from the allocations since the last flush (twice that, within
        MIN/MAX_RESERVE_BYTES): a guest that allocated nothing reserves
        nothing, so an idle flush writes nothing. Topped up only once less
        than three quarters of that is left: a reservation that still covers
        one and a half intervals like the last one is kept, so a flush after a
        few allocations (a write-through write is one: MIN_RESERVE_BYTES
        covers several) rewrites no refcount block, while a steady guest
        still tops up at every flush, as before.
        """
        recent, self._allocs_since_flush = self._allocs_since_flush, 0
        own, self._own_allocs_since_flush = self._own_allocs_since_flush, 0
        self.keep = max(MIN_KEEP, 2 * own)
        if not recent or not self.overlap.writable:
            return
        lo, hi = max(1, self.min_reserve_bytes >> self.cb), max(2, MAX_RESERVE_BYTES >> self.cb)
        want = min(max(2 * recent, lo), hi)
        yield from self.reserve(want)

    def reserve_at_least(self, nbytes: int) -> None:
        """Reserve at least ``nbytes`` at a flush that reserves at all (the data plane serves most
        flushes itself and leaves Python one only when its lent clusters run low: a reservation
        sized from one interval would send every other flush to Python; dataplane/cflush.py)."""
        self.min_reserve_bytes = min(max(nbytes, MIN_RESERVE_BYTES), MAX_RESERVE_BYTES)

    def reserve(self, want: int):
        """Generator: top the reservation (lent clusters included) up to ``want`` clusters,
        unless three quarters of that are left; sets the header's dirty bit."""
        reserved, lent = len(self.refs.reservation), len(self.refs.lent)
        if reserved + lent >= want * 3 // 4 and reserved >= min(self.keep, want):
            return
        before = reserved
        yield from self.refs.reserve(max(want, lent + self.keep))
        self.counters.reserved += len(self.refs.reservation) - before
        self._mark_dirty()

    def _mark_dirty(self) -> None:
        """Set the header's dirty bit while reserved clusters may leak (spec "dirty bit").

        After a crash the unused reservation is leaked refcount; QEMU, and
        our own open (image/opening.open_image), rebuild refcounts on a writable open
        of a dirty image, so the leaks are reclaimed at the next mount. It
        rides in the same round as the reservation: no extra sync. v2 has no
        feature bits; its leaks wait for ``cachefs check --repair leaks``.
        """
        hdr = self.header.hdr
        if hdr.version >= 3 and not hdr.dirty:
            self.header.update(incompatible=hdr.incompatible | fmt.INCOMPAT_DIRTY)
            self.marked_dirty = True

    def release_reservation(self):
        """Generator: a clean close gives unused reserved clusters back (no leaks)."""
        if self.overlap.writable:
            yield from self.refs.release_reservation()
        if self.marked_dirty and not self.refs.lent:  # clusters still lent would leak: stay dirty
            # Clean again only once everything else is durable: the header goes last.
            others = [i for i in self.dirty_items() if i is not self.header]
            self.header.update(*others, incompatible=self.header.hdr.incompatible & ~fmt.INCOMPAT_DIRTY)
            self.marked_dirty = False

    @property
    def min_file_size(self) -> int:
        """The file must be at least this long before the next sync: it covers the reservation.

        Reserved clusters must be inside the file by the time an L2 entry can
        point at them (a reference past EOF is corruption to qemu-img check);
        extending the file in the flush that raises their refcounts does it.
        """
        reservation = self.refs.reservation
        return reservation[-1] + 1 << self.cb if reservation else 0

    @property
    def allocated_end(self) -> int:
        """Bytes up to the end of the last cluster with a refcount (for trimming at close)."""
        return self.refs.end_cluster << self.cb


def cluster_runs(clusters: list[int]):
    """Sorted cluster numbers as (first, count) runs: one punch per run."""
    start = prev = None
    for c in clusters:
        if prev is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            yield start, prev - start + 1
        start = prev = c
    if start is not None:
        yield start, prev - start + 1
