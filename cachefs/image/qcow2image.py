"""An open qcow2 image: the engine and its metadata queue, driven on the image's backends.

Image (image/base.py) owns what every format shares: the lock, the cache modes and
their descriptors, the counters, the flush protocol and the sticky fdatasync
error. This module is the qcow2 half (QEMU's qcow2.c): the two-phase write
around the engine's plans (plan under the write lock, data writes without it,
commit or abort under it again; image/inflight.py), the one public way to
change the mapping otherwise (:meth:`Qcow2Image.remap`), reads of the extents a
plan maps, and the metadata queue's requests (``_QueueIO``). Every call into the
core goes through :meth:`Qcow2Image._core`, the one boundary where corruption
marks the image read-only. The data plane is told what it must know through
the hooks it connected (image/hooks.py), never by reaching in.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import trio

from cachefs.image import sparse
from cachefs.image.inflight import InFlight, Writing
from cachefs.image.compressed_writes import CompressedWrites, FillReader
from cachefs.errors import CorruptImage
from cachefs.image.backing import BackingImage
from cachefs.image.base import Image, zero_padded
from cachefs.image.cluster_runs import format_runs, runs_of
from cachefs.policy import WRITEBACK, Mode
from cachefs.qcow2.engine import OPENED_READ_ONLY, Engine
from cachefs.qcow2.generation import write_generation
from cachefs.qcow2.plan import CowSource, ExtentKind, WritePlan, run_async

log = logging.getLogger("cachefs.image.base")

#: A core generator (qcow2/engine.py, qcow2/discard.py) returning the plan :meth:`Qcow2Image.remap` commits.
Planner = Callable[[], Generator[Any, Any, WritePlan]]
#: ``planner(header, file_size, alloc_from)``: a qcow2/generation.py generator returning a Generation or None.
GenerationPlanner = Callable[[Any, int, int], Generator[Any, Any, Any]]


class Qcow2Image(Image):
    """A qcow2 image served through the engine and its metadata queue."""

    format = "qcow2"

    def __init__(self, path, backends, lock, writable, engine: Engine, mode: Mode = WRITEBACK):
        self.engine = engine
        self.queue = engine.queue
        super().__init__(path, backends, lock, writable and engine.writable, mode)
        self.commits = self.queue.commits
        self.queue.punch_freed = True  # _QueueIO.discard: freed host clusters give their space back
        # Taking it closes the data plane's flush gate, letting go may open it (dataplane/cflush.py):
        # every change and every write of metadata happens under this lock.
        self.write_lock = UncontendedLock(lambda: self.plane_hooks.flushes.held(),
                                          lambda: self.plane_hooks.flushes.released())
        self.allocating = InFlight()  # guest clusters whose allocating write has not committed yet
        self.writing = Writing()  # data writes planned and not finished (new_generation waits for them)
        self._zcache: tuple[int, bytes] | None = None  # last decompressed cluster
        self.compressed = CompressedWrites(self)  # compress-on-write (seed 003), if the header says so
        self.file_at_least = 0  # the image file is at least this long (_QueueIO.truncate)
        # The flush that makes the latest mapping change durable (Generations.ticket). An
        # overwrite in place through an O_DSYNC descriptor needs no sync of its own, unless
        # the mapping it wrote through may not be durable yet (_write_through_done).
        self._remap_ticket = 0
        # The image below, where this one allocated nothing (image/backing.py); None without a
        # backing file. Attached by opening.open_image before the image serves anything.
        self.backing: BackingImage | None = None
        engine.on_mapping_change(self._remapped)

    @property
    def size(self) -> int:
        return self.engine.size

    @property
    def read_only_reason(self) -> str | None:
        why = self.engine.overlap.read_only_reason
        return None if why == OPENED_READ_ONLY else why

    @property
    def cluster_size(self) -> int:
        return self.engine.cs

    @property
    def compress(self) -> str | None:
        """The compress-on-write algorithm the header names, or None (the data plane forwards
        every write of such an image: compressed clusters are never published)."""
        return self.compressed.algorithm

    async def set_compress(self, algorithm: str | None) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "image is read-only")
        if algorithm is not None:
            self.plane_hooks.lender.allow(False)  # compressed in Python only: what C allocated is adopted below
            async with self.write_lock:
                await self.adopt_logged(self.backend)
        async with self.backends.in_use():
            await self.compressed.set_algorithm(algorithm)

    def _reader(self, be):
        """What the core reads through: host bytes still in the fill cache come from memory."""
        return FillReader(self.compressed.fill, be) if self.compressed.fill.pending else be

    @property
    def early_writeouts(self) -> int:
        return self.queue.early_writeouts

    def info(self) -> dict:
        # The clusters counted ahead of their use (the reservation, and those lent to C): nothing
        # on disk points at them, so a check of the live image sees leaks; `cachefs check -U`
        # reports them apart (cli/served.py).
        refs = self.engine.refs
        out = {**super().info(), "reserved": format_runs([*refs.reservation, *refs.lent])}
        if self.backing is not None:  # qemu-img info's full-backing-filename and its format
            out.update(backing_file=self.backing.file.path, backing_format=self.backing.file.format)
        return out

    async def close(self) -> None:
        """Close, then let go of the backing image (closed with its last overlay: image/backing.py)."""
        try:
            await super().close()
        finally:
            backing, self.backing = self.backing, None
            if backing is not None:
                await backing.release()

    def stats(self) -> dict:
        out = super().stats()
        c, q = self.engine.counters, self.queue
        out.update(metadata_writes=c.metadata_writes, metadata_bytes=c.metadata_bytes,
                   metadata_batches=c.batches, allocations=c.allocations, frees=c.frees,
                   zero_writes=c.zero_writes, cow_reads=c.cow_reads,
                   queue_depth=len(q.dirty_items()), pending_frees=len(q.pending),
                   cached_tables=len(self.engine.cache), reserved_clusters=len(self.engine.refs.reservation),
                   from_reservation=c.from_reservation, data_first=c.data_first,
                   early_writeouts=q.early_writeouts, **self.compressed.stats())
        honoured = out["guest_flushes"] - sum(m.flushes_ignored for m in self.by_mode.values())
        out["fdatasyncs_per_flush"] = f"{out['backend_fdatasyncs'] / honoured:.3f}" if honoured else "0"
        return out

    async def _core(self, gen, be, io=None):
        """Drive one of the core's generators on ``be``: every planner and queue
        entry point runs through here.

        The one boundary for corruption (docs/design.md, "Validation and
        damage"): a CorruptImage raised anywhere in the core (an overlap, a
        refcount that would drop below zero, a cluster allocated twice)
        marks the image corrupt and read-only, as QEMU's
        qcow2_signal_corruption does, and fails the request with it (EIO);
        later writes get EROFS, and the corrupt bit reaches the header at
        the next writeout.
        """
        try:
            return await run_async(gen, be.pread, io, self._backing_reader())
        except CorruptImage as exc:
            self.engine.overlap.corrupted(str(exc))
            log.error("%s: %s; the image is now read-only", self.path, exc)
            self.plane_hooks.read_only()
            raise

    def _backing_reader(self):
        """What serves the core's BackingReadRequest (a copy-on-write from the backing file)."""
        return self.backing.read if self.backing is not None else None

    # -------------------------------------------------------------- reads

    async def _read(self, be, offset: int, length: int):
        await self.adopt_fast_allocations(be)  # a cluster C allocated must read as its data
        q = self.queue
        # Counted before planning: plan_read may wait for an L2 table after it
        # has mapped an earlier cluster, and a free of that cluster's host
        # cluster must not be applied meanwhile (tests/test_inflight_race.py).
        q.inflight += 1
        try:
            extents = await self._core(self.engine.plan_read(offset, length), be)
            if len(extents) == 1:  # the common case: no join, so no copy
                return await self._read_extent(be, extents[0])
            parts = [await self._read_extent(be, ext) for ext in extents]
        finally:
            q.inflight -= 1
        return b"".join(parts)

    async def _read_extent(self, be, ext) -> bytes:
        if ext.kind is ExtentKind.ZERO:
            return bytes(ext.length)
        if ext.kind is ExtentKind.DATA:
            return zero_padded(await be.pread_view(ext.host_offset, ext.length), ext.length)
        if ext.kind is ExtentKind.BACKING:
            if self.backing is None:
                raise OSError(errno.EIO, "the backing file of this range is not open")
            return await self.backing.read(ext.guest_offset, ext.length)
        if ext.kind is ExtentKind.COMPRESSED:
            desc = ext.compressed
            if self._zcache is None or self._zcache[0] != desc.offset:
                raw = await self._reader(be).pread(desc.offset, desc.max_length)
                self._zcache = (desc.offset, self.engine.decompress(desc, raw))
            return self._zcache[1][ext.in_cluster:ext.in_cluster + ext.length]
        raise OSError(errno.EIO, "damaged image metadata for this range")

    # -------------------------------------------------------------- writes

    async def _write(self, be, offset: int, data) -> None:
        if self.compressed.algorithm is not None:
            return await self.compressed.write(be, offset, data)
        await self.write_plain(be, offset, data)

    async def write_plain(self, be, offset: int, data) -> None:
        """A guest write without compression (compressed_writes.py sends the clusters it does not
        compress here): plan under the write lock, write the data without it, commit (or abort)
        under it again.

        As QEMU's qcow2 drops its lock for the data I/O: while one writer's allocation is in
        flight the others plan, write in place and commit their own. The guest clusters of an
        allocation in flight are claimed (allocations.InFlight), so no other change plans
        against their old mapping meanwhile; readers still see that old mapping until the
        commit. ``queue.inflight`` keeps frees of the clusters the data I/O writes from being
        applied (metaqueue.py). The data plane allocates none of them meanwhile (_settle_range).

        Not a :meth:`remap`, though it starts and ends as one (_settle_range and the plan; then
        _commit and _committed): the lock is let go for the data I/O, the plan chooses the
        descriptor, and an overwrite in place has nothing to commit, so never takes it again.
        """
        cs = self.engine.cs
        fenced = None
        try:
            async with self.write_lock:
                first = offset // cs
                fenced = await self._settle_range(be, first, (offset + len(data) - 1) // cs - first + 1)
                plan = await self._core(self.engine.plan_write(offset, data, defer_cow=True), self._reader(be))
                claimed = claim = None
                if plan.needs_commit:
                    # Write-through: the data and the metadata go out without O_DSYNC, and one
                    # fdatasync shared with concurrent writers covers them before the ack
                    # (_write_through_done), as QEMU emulates writethrough.
                    be = self.backends.batch(be.mode)
                    claimed = [u.vcluster for u in plan.updates]
                    claim = self.allocating.claim(claimed)
                elif be.dsync and len(plan.data_writes) > 1:
                    # Write-through in place: one O_DSYNC write is one device sync; more than one
                    # share an fdatasync instead.
                    be = self.backends.batch(be.mode)
                self.queue.inflight += 1
                self.writing.enter()
            try:
                await self._write_data(be, plan, claimed, claim)
            finally:
                self.writing.leave()
        finally:
            self._release_range(fenced)

    async def _write_data(self, be, plan, claimed, claim) -> None:
        """The plan's data writes without the lock, then commit or abort what it allocated."""
        try:
            written = False
            try:
                await self._data_writes(be, plan)
                written = True
            finally:
                self.queue.inflight -= 1
                if claim is not None:
                    with trio.CancelScope(shield=True):  # commit or abort, whatever happens
                        await self._settle_plan(be, plan, written)
        finally:
            if claim is not None:
                self.allocating.release(claimed, claim)

    # -------------------------------------------------------------- the data plane's allocations

    async def _settle_range(self, be, first: int, count: int):
        """Caller holds write_lock: return, still holding it, once nothing else may change guest
        clusters [first, first+count): no allocation of ours in flight there (InFlight), and none
        of the data plane's, which is claimed out of the range and whose earlier allocations are
        adopted. Returns the claim, for :meth:`_release_range` once the caller's change is made."""
        lender = self.plane_hooks.lender
        claim = lender.claim(first, count)
        try:
            await lender.copies_done(first, count)  # C's copies on write there logged (dp_cow.c)
            await self.adopt_logged(be)
            await self.allocating.settle(self.write_lock, first, count)
        except BaseException:
            self._release_range(claim)
            raise
        return claim

    def _release_range(self, claim) -> None:
        if claim is not None:
            self.plane_hooks.lender.unclaim(claim)

    async def adopt_logged(self, be) -> None:
        """Caller holds write_lock: C's logged allocations become L2 updates (Engine.adopt).

        Not a :meth:`remap`: adopting is the first step of every remap's _settle_range (C's
        entries are the image's before anything plans against them), and the lent clusters
        need no commit (their refcounts are durable; a fresh one's data needs no ordering, a
        copy's waits in the queue for the data item: Engine.adopt)."""
        lender = self.plane_hooks.lender
        durable = lender.durable_logged()  # read first: C's sync may complete meanwhile, never undo
        pairs = lender.peek_log()
        if pairs:
            copies = await self._core(self.engine.adopt(pairs, durable), be)
            lender.drop_log(len(pairs))
            lender.adopted_clusters(v for v, _ in pairs)
            if copies:
                lender.adopted_copies(copies)  # the old clusters' frees wait for C's reads of them
            self._remap_ticket = self.commits.ticket()  # not durable until the next flush
            self._zcache = None

    async def refill_reservation(self, be, count: int) -> None:
        """Caller holds write_lock: ``count`` more reserved clusters, for the data plane to
        allocate into (dataplane/lending.py; MetaQueue.refill: no sync)."""
        be = self.backends.batch(be.mode)
        await self._core(self.queue.refill(count), be, _QueueIO(self, be))

    async def sync_for_plane(self) -> None:
        """Write-through writes the data plane parked (dp_park.c): their data and new mappings
        durable, in one flush shared with every other flush and write-through write."""
        async with self.backends.in_use():
            await self._shared_flush(self.backends.batch(self._concrete(None)), reserve=True)

    async def adopt_fast_allocations(self, be=None) -> None:
        """Before Python reads a mapping (a read, lseek): what C allocated is adopted."""
        if self.plane_hooks.lender.logged():
            async with self.write_lock:
                await self.adopt_logged(be or self.backend)

    # -------------------------------------------------------------- changing the mapping

    async def remap(self, be, first: int, end: int, planner: Planner, *,
                    before_commit: Callable[[WritePlan], Awaitable[None]] | None = None) -> WritePlan:
        """Change the mapping of guest clusters [first, end) with ``planner``, on ``be``.

        The one sequence every change of L2 entries but a guest write follows (discard,
        write-zeroes and preallocation in sparse.py, compressed_writes.py), under the write lock:

        1. settle the range (_settle_range): no allocation in flight there, ours or C's;
        2. ``planner()``: a core generator returning the WritePlan whose updates are committed
           (a compressed placement changes its entries itself and returns one with none);
        3. ``before_commit(plan)``: the I/O the new entries need first (preallocation's
           fallocate, full fill clusters); if it fails, the plan is aborted;
        4. commit; then what follows every change of the mapping (_committed).

        Steps 2 to 4 are shielded: a cancel between an allocation, or a placement, and the entry
        that refers to it would leak the cluster.
        """
        async with self.write_lock:
            claim = await self._settle_range(be, first, end - first)
            try:
                with trio.CancelScope(shield=True):
                    plan = await self._core(planner(), be)
                    await self._commit(be, plan, before_commit)
            finally:
                self._release_range(claim)
                self._zcache = None  # whatever the planner changed, even if the commit failed
            await self._committed(be, plan)
        return plan

    async def new_generation(self, planner: GenerationPlanner):
        """Replace the image's metadata by a new generation (qcow2/generation.py): a snapshot
        created, deleted or applied, or shared L2 tables made private. Returns the Generation, or
        None when the planner had nothing to change.

        The snapshot point (issue 23): holding the write lock, nothing new plans; the range is
        settled (no allocation in flight, ours or C's, and C's log adopted) and every data write
        already planned has finished (``writing``), so each guest write is wholly before the
        point or wholly after it. Then everything queued is made durable, the generation is
        planned from the durable state, written, synced, and switched to with one header write
        (a crash leaves one generation or the other: leaks at most). The caller keeps C out of
        this image meanwhile (FastPaths.paused): C writes in place through mappings this changes.
        """
        async with self.backends.in_use():
            be = self.backends.batch(self.backend.mode)
            async with self.write_lock:
                claim = await self._settle_range(be, 0, -(-self.size // self.engine.cs))
                try:
                    with trio.CancelScope(shield=True):
                        await self.writing.drained()
                        return await self._switch_generation(be, planner)
                finally:
                    self._release_range(claim)
                    self._zcache = None

    async def _switch_generation(self, be, planner: GenerationPlanner):
        """Caller holds write_lock, shielded, nothing in flight: durable now, then the new generation."""
        for _ in range(4):  # a writeout may apply frees at its end, which dirties refcount blocks again
            await self._run_queue(be, self.queue.make_durable())
            if not self.queue.dirty_items() and not self.queue.needs_sync:
                break
        else:
            raise CorruptImage(f"{self.path}: the metadata does not settle for a snapshot point")
        if self.sync_error is not None:
            raise OSError(self.sync_error, f"{self.path}: an earlier fdatasync failed")
        engine = self.engine
        gen = await self._core(planner(engine.current_header(), be.size(), engine.alloc_from), be)
        if gen is None:
            return None
        await self.plane_hooks.fence_frees()  # no fast request still uses what the switch frees
        await self._core(write_generation(gen), be, _QueueIO(self, be))
        engine.switch_generation(gen)
        self.file_at_least = max(self.file_at_least, gen.end)
        self._remap_ticket = self.commits.ticket()
        for first, count in runs_of(gen.freed):  # their space back, as a free at refcount 0
            await _QueueIO(self, be).discard(first * engine.cs, count * engine.cs)
        return gen

    async def query(self, gen, be=None):
        """Run a core generator that only looks at the mapping (an L2 entry, SEEK_DATA) through
        the corruption boundary (_core). Changes go through :meth:`remap`."""
        return await self._core(gen, be or self.backend)

    async def _commit(self, be, plan, before_commit=None) -> None:
        """Caller holds write_lock, shielded: the I/O the plan needs first, then its entries; if
        that I/O failed, give back what the plan allocated (nothing points at it)."""
        try:
            if before_commit is not None:
                await before_commit(plan)
        except BaseException:
            await self._core(self.engine.abort(plan), be)
            raise
        await self._core(self.engine.commit(plan), be)

    async def _committed(self, be, plan) -> None:
        """Caller holds write_lock: after a change of the mapping."""
        if any(u.new_cluster is not None for u in plan.updates):
            self.plane_hooks.lender.python_allocated()  # C may run low: refill now
        if self.engine.cache.over_budget:
            # A cache full of dirty tables is written out now, not at the next flush (_run_queue
            # adopts C's log first: a flush in C may have written entries into these tables).
            await self._run_queue(be, self.queue.writeout_early())

    async def _settle_plan(self, be, plan, written: bool) -> None:
        """Under the lock again: publish the L2 entries of a plan whose data is written, or give
        back what a failed one allocated (nothing points at it)."""
        async with self.write_lock:
            if not written:
                await self._core(self.engine.abort(plan), be)
                return
            await self._commit(be, plan)
            self._zcache = None
            await self._committed(be, plan)

    async def _data_writes(self, be, plan) -> None:
        try:
            for w in plan.data_writes:
                await be.pwrite(w.host_offset, w.data if w.fill is None else await self._cow_body(be, w))
        finally:
            # Through an O_DSYNC descriptor (an overwrite in place in writethrough) the data is
            # durable already: no flush needs to sync it, so the queue is not made dirty.
            if plan.data_writes and not be.dsync:
                self.queue.data_written()

    async def _cow_body(self, be, w) -> bytearray:
        """A deferred copy on write's whole new cluster (Engine.plan_write ``defer_cow``), its old
        bytes read now, without the lock: the guest cluster is claimed (``allocating``), and the old
        host cluster is not freed while this write is in flight (``queue.inflight``)."""
        f, cs = w.fill, self.engine.cs
        if f.source is CowSource.BACKING:
            if self.backing is None:
                raise OSError(errno.EIO, "the backing file of this range is not open")
            old = await self.backing.read(f.offset, f.length)
        else:
            old = await self._reader(be).pread(f.offset, f.length)
            if f.source is CowSource.COMPRESSED:
                old = self.engine.decompress(f.compressed, bytes(old))
        return f.body(old, w.data, cs)

    async def truncate(self, size: int) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "image is read-only")
        async with self.backends.in_use(), self.write_lock:
            await self.adopt_logged(self.backend)
            # A refused size raises UnsupportedOperation: EOPNOTSUPP at fuse/operations.py.
            await self._core(self.engine.resize(size), self.backend)

    # -------------------------------------------------------------- flush

    async def _run_queue(self, be, gen):
        """Carry out what the metadata queue asks, on ``be``. Caller holds write_lock.

        On a write-through mode's batch twin (BackendSet.batch): the queue's rounds end in a
        sync each, so O_DSYNC would only add a device sync per metadata write.
        """
        be = self.backends.batch(be.mode)
        await self.adopt_logged(be)  # a flush covers what C allocated before it (dataplane/lending.py)
        hooks = self.plane_hooks
        await hooks.fence_frees()  # no fast request still uses a host cluster this run frees
        result = await self._core(gen, be, _QueueIO(self, be))
        hooks.queue_ran()  # mapping: mappings that became durable may be written in C now
        return result

    async def make_durable(self, be) -> None:
        async with self.write_lock:
            await self._run_queue(be, self.queue.make_durable())

    async def _write_through_done(self, be) -> None:
        """A write-through write returned: one fdatasync, shared, makes it durable with its metadata.

        Group commit as for guest flushes (Image._shared_flush): writers that finish while a
        sync runs share the next one. The flush reserves ahead (metaqueue.prepare_flush), so the
        next writes' L2 entries point at clusters whose refcounts are durable already and need
        no round of their own: one sync per write, as DESIGN.md section 3 asks of a flush.
        Nothing to do when no write is unsynced and every mapping change is durable (an
        overwrite in place through the O_DSYNC descriptor, on a mapping made durable earlier):
        an overwrite through a mapping another writer has committed but not yet made durable
        must wait for that writer's sync, or its acknowledged data would hang off an L2 entry
        a crash can still lose. Queued refcount drops (frees) wait: they can only leak.
        """
        if self.backends.unsynced or not self.commits.covered(self._remap_ticket):
            await self._shared_flush(self.backends.batch(be.mode), reserve=True)

    def _remapped(self, change) -> None:
        # ticket(): a flush running now may have chosen its writes already, so the next one.
        self._remap_ticket = self.commits.ticket()

    async def _flush_durable(self, be, *, reserve: bool) -> None:
        async with self.write_lock:
            await self._run_queue(be, self.queue.flush(reserve=reserve))

    async def _close_writeout(self, be) -> None:
        async with self.write_lock:
            self.plane_hooks.lender.take_back()  # unused lent clusters: the reservation gives them up
            self.compressed.fill.close()  # its held frees apply: a clean close leaves no leak
            await self._run_queue(be, self.queue.close())


class _QueueIO:
    """The metadata queue's requests, done on one descriptor (plan.py).

    A sync goes through the image: it is skipped when no completed write
    needs one (an O_DSYNC descriptor), and a failure is sticky.
    """

    __slots__ = ("image", "be")

    def __init__(self, image: Image, be) -> None:
        self.image, self.be = image, be

    def pwrite(self, offset: int, data):
        return self.be.pwrite(offset, data)

    def sync(self):
        return self.image.sync(self.be)

    async def discard(self, offset: int, length: int) -> None:
        if await sparse.punch(self.be, offset, length):
            self.image.guest.bytes_punched += length

    async def truncate(self, size: int, grow: bool) -> None:
        # Every flush asks that the file cover the reservation; it only ever grows meanwhile
        # (a clean close shrinks it), so a size known to be reached needs no fstat.
        if grow and size <= self.image.file_at_least:
            return
        now = self.be.size()
        if (now < size) if grow else (now > size):
            await self.be.truncate(size)
        self.image.file_at_least = max(now, size) if grow else 0


def _nothing() -> None:
    pass


class UncontendedLock:
    """A trio.Lock whose acquire does not yield to the scheduler when the lock is free.

    ``on_acquire`` runs once the lock is held, ``on_release`` just before it is let go (the
    image's: the data plane's flush gate, dataplane/cflush.py).

    trio.Lock.acquire always passes a checkpoint, a full scheduler round even
    when nobody holds the lock, and every in-place write takes this lock once
    (issue 10, hot path). A free trio.Lock has no waiters (release hands it
    straight to the first one), so taking it at once is fair; a contended
    acquire queues as before.
    """

    def __init__(self, on_acquire=_nothing, on_release=_nothing) -> None:
        self._lock = trio.Lock()
        self._on_acquire, self._on_release = on_acquire, on_release

    def locked(self) -> bool:
        return self._lock.locked()

    async def acquire(self) -> None:
        await self.__aenter__()

    def release(self) -> None:
        try:
            self._on_release()
        finally:
            self._lock.release()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        self._on_acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()
