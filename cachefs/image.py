"""An open image: engine + backend + lock + counters, one object per image file.

This is where plans meet I/O. A guest write is two-phase: under the image's
write lock the engine plans it; the data writes happen; then the plan commits
(or aborts). Writes that only overwrite exclusively owned clusters release the
lock before their data I/O, so they run concurrently; reads never take it.

A guest flush drives the engine's metadata queue (qcow2/metaqueue.py): every
dirty item whose ordering edges are durable, then one fdatasync, repeated
until nothing that was dirty remains. The queue decides; this layer does the
requests it yields on the flushing handle's descriptor (``_QueueIO``).

A failed fdatasync is sticky (docs/design.md, "Errors"): the kernel may have
dropped the dirty pages it could not write, so no later flush of this image
may report success until it is opened again.

Every guest request carries the concrete cache mode of the handle it came
through (policy.py). The mode picks the backend descriptor (backendset.py)
and answers the three questions asked here, each in one place:
``write_through`` after a write (``write``), ``honour_flush`` at a
flush (``flush``), ``direct`` only through the descriptor's flags. An
fdatasync is skipped when no completed write needs one (writes through an
O_DSYNC descriptor are durable already), which is how writethrough and
directsync cost no fdatasync at all.
"""

from __future__ import annotations

import errno
import logging
import os

import attrs
import trio

from cachefs import sparse
from cachefs.backendset import BackendSet, file_opener
from cachefs.compressedio import CompressedWrites, FillReader
from cachefs.errors import CachefsError, CorruptImage, UnsupportedImage, UnsupportedOperation
from cachefs.locking import ImageLock
from cachefs.policy import WRITEBACK, CacheMode, Mode
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.engine import Engine, open_engine
from cachefs.qcow2.metaqueue import Generations
from cachefs.qcow2.plan import ExtentKind, run_async
from cachefs.repairio import repair_dirty_sync

log = logging.getLogger("cachefs.image")


@attrs.define
class GuestCounters:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flush_failures: int = 0
    discards: int = 0          # fallocate PUNCH_HOLE (a guest's TRIM with discard=unmap)
    bytes_discarded: int = 0
    write_zeroes: int = 0      # fallocate ZERO_RANGE
    bytes_punched: int = 0     # host bytes given back to the filesystem (sparse.py)


@attrs.define
class ModeCounters:
    """What guests asked of one concrete mode (the backend's IOCounters say what it cost)."""
    writes: int = 0
    flushes: int = 0
    flushes_ignored: int = 0


#: The format follows from the file's name alone. Probing the content would be
#: QEMU's format-probing hazard: a guest that writes a qcow2 header into its
#: raw disk would be served that header's image at the next mount (and, once
#: backing files exist, read any host file it names).
FORMAT_BY_SUFFIX = {".qcow2": "qcow2", ".raw": "raw", ".img": "raw"}


def format_by_name(path: str) -> str | None:
    """"qcow2" or "raw" from the suffix, or None when the name says neither."""
    return next((kind for suffix, kind in FORMAT_BY_SUFFIX.items() if path.endswith(suffix)), None)


def _magic(path: str, magic: bytes | None) -> bytes:
    if magic is not None:
        return magic
    with open(path, "rb") as f:
        return f.read(4)


def image_format(path: str, magic: bytes | None = None, *, given: str | None = None) -> str:
    """The format to serve ``path`` as: ``given`` ("qcow2", "raw"), else the one its name says.

    ``given="probe"`` looks at the content; only ``cachefs info``/``check -f
    probe`` ask for that, because the user did. A qcow2 must carry qcow2's
    magic, otherwise CorruptImage; a raw image is raw whatever bytes it holds.
    ``magic``: the file's first bytes, when the caller read them itself (a
    direct mode reads them O_DIRECT, so no guest data enters the page cache).
    """
    if given == "probe":
        return "qcow2" if _magic(path, magic)[:4] == fmt.MAGIC else "raw"
    kind = given or format_by_name(path)
    if kind is None:
        raise UnsupportedImage(f"{path}: the name says no format (.qcow2, .raw or .img)")
    if kind == "qcow2" and _magic(path, magic)[:4] != fmt.MAGIC:
        raise CorruptImage(f"{path}: not a qcow2 image (bad magic)")
    return kind


class Image:
    """What the FUSE layer sees; subclasses implement the format."""

    format = "raw"
    #: The compress-on-write algorithm ("zlib", "zstd") or None: only a qcow2 image can be one.
    compress: str | None = None
    compress_error: str | None = None  # why the last live compress change was refused (fs.py)

    def __init__(self, path: str, backends: BackendSet, lock: ImageLock | None, writable: bool,
                 mode: Mode = WRITEBACK):
        self.path = path
        self.backends = backends
        self.lock = lock
        self.writable = writable
        self.mode = mode
        self.guest = GuestCounters()
        self.by_mode: dict[str, ModeCounters] = {}
        self.sync_error: int | None = None  # errno of the failed fdatasync, forever after
        self.switch_error: str | None = None  # why the last live mode switch was refused
        # Group commit: a flush that arrives while one runs waits for the
        # next, and all waiters share it. The numbers (qcow2: the queue's).
        self.commits = Generations()
        self._flush_running: trio.Event | None = None
        self._growing = trio.Lock()
        self.backends.get(mode.default)     # fail now (e.g. no O_DIRECT here), not at first I/O

    # -------------------------------------------------------------- common

    @property
    def backend(self):
        """The descriptor for image-level work: the mode's default (writeback under auto)."""
        return self.backends.get(self.mode.default)

    def _concrete(self, mode: CacheMode | None) -> CacheMode:
        return self.mode.default if mode is None else mode

    def _mode_counters(self, mode: CacheMode) -> ModeCounters:
        counters = self.by_mode.get(mode.name)  # not setdefault: it would build one per request
        if counters is None:
            counters = self.by_mode[mode.name] = ModeCounters()
        return counters

    @property
    def size(self) -> int:
        raise NotImplementedError

    @property
    def cluster_size(self) -> int:
        return 512

    def allocated_bytes(self) -> int:
        return os.fstat(self.backends.fd).st_blocks * 512

    def _check_sync_error(self) -> None:
        if self.sync_error is not None:
            raise OSError(self.sync_error, "an earlier fdatasync of this image failed; remount it")

    async def _sync(self, be) -> None:
        """fdatasync, unless every completed write is durable already. A failure is sticky."""
        self._check_sync_error()
        if not self.backends.unsynced:
            return
        try:
            await be.fdatasync()
        except OSError as exc:
            self.sync_error = exc.errno or errno.EIO
            self.guest.flush_failures += 1
            log.error("%s: fdatasync failed (%s); every later flush will fail until remount",
                      self.path, exc)
            raise

    def stats(self) -> dict:
        b = self.backends.counters
        total = lambda field: sum(getattr(c, field) for c in b.values())  # noqa: E731
        out = {
            "guest_reads": self.guest.reads, "guest_writes": self.guest.writes,
            "guest_flushes": self.guest.flushes, "guest_bytes_read": self.guest.bytes_read,
            "guest_bytes_written": self.guest.bytes_written,
            "backend_reads": total("reads"), "backend_writes": total("writes"),
            "backend_bytes_written": total("bytes_written"), "backend_fdatasyncs": total("fdatasyncs"),
            "direct_bytes": total("direct_bytes"), "bounce_requests": total("bounce_requests"),
            "flush_failures": self.guest.flush_failures, "flushes_merged": self.commits.merged,
            "discards": self.guest.discards, "bytes_discarded": self.guest.bytes_discarded,
            "write_zeroes": self.guest.write_zeroes, "bytes_punched": self.guest.bytes_punched,
            "descriptors": ",".join(self.backends.modes_open()),
            "aio": ",".join(f"{m}:{e}" for m, e in self.backends.submitters().items()),
        }
        for name in sorted(set(self.by_mode) | set(b)):
            g, io = self.by_mode.get(name, ModeCounters()), b.get(name)
            out.update({f"{name}.guest_writes": g.writes, f"{name}.guest_flushes": g.flushes,
                        f"{name}.flushes_ignored": g.flushes_ignored})
            if io is not None:
                out.update({f"{name}.fdatasyncs": io.fdatasyncs, f"{name}.direct_bytes": io.direct_bytes,
                            f"{name}.bounce_requests": io.bounce_requests,
                            f"{name}.peak_in_flight": io.peak_in_flight})
        return out

    def info(self) -> dict:
        return {"format": self.format, "cluster_size": self.cluster_size, "virtual_size": self.size,
                "allocated": self.allocated_bytes(), "writable": self.writable}

    async def grow_to(self, end: int) -> None:
        """A write past the end grows the disk (to whole sectors), as it grows any file:
        ``cp`` and backup tools write into a new file without an ftruncate first."""
        async with self._growing:  # two appenders must not race a grow into a refused shrink
            if end > self.size:
                await self.truncate(-(-end // 512) * 512)

    def _check_range(self, offset: int, length: int) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "image is read-only")
        if offset + length > self.size:
            raise OSError(errno.ENOSPC, "write beyond the end of the virtual disk")

    # -------------------------------------------------------------- requests

    async def read(self, offset: int, length: int, mode: CacheMode | None = None):
        """The guest bytes at ``offset``: bytes, or a memoryview of the engine's
        read buffer (no copy; pyfuse3 replies from any buffer). Copy it
        before keeping it beyond the request."""
        length = max(0, min(length, self.size - offset))
        self.guest.reads += 1
        async with self.backends.in_use():
            data = await self._read(self.backends.get(self._concrete(mode)), offset, length)
        self.guest.bytes_read += length
        return data

    async def write(self, offset: int, data, mode: CacheMode | None = None) -> None:
        mode = self._concrete(mode)
        self._check_range(offset, len(data))
        self.guest.writes += 1
        self._mode_counters(mode).writes += 1
        async with self.backends.in_use():
            be = self.backends.get(mode)
            await self._write(be, offset, data)
            if mode.write_through:
                # Acknowledged means durable, metadata included (seed 002).
                await self._make_durable(be)
        self.guest.bytes_written += len(data)

    async def flush(self, mode: CacheMode | None = None) -> None:
        mode = self._concrete(mode)
        self.guest.flushes += 1
        counters = self._mode_counters(mode)
        counters.flushes += 1
        self._check_sync_error()
        if not mode.honour_flush:
            counters.flushes_ignored += 1  # unsafe: acknowledged, nothing done (seed 001)
            return
        async with self.backends.in_use():
            await self._shared_flush(self.backends.get(mode), reserve=mode.queue_metadata)

    async def _shared_flush(self, be, *, reserve: bool) -> None:
        """Make everything acknowledged before this call durable, sharing the work with other flushes.

        The numbering and its invariant: metaqueue.Generations. Here only the
        waiting: one flush runs at a time, the others wait for its end.
        """
        commits = self.commits
        ticket = commits.ticket()
        started_own = False
        while not commits.covered(ticket):
            if self._flush_running is not None:
                await self._flush_running.wait()
                continue
            gen, self._flush_running, started_own = commits.begin(), trio.Event(), True
            try:
                await self._flush_durable(be, reserve=reserve)
            finally:
                done, self._flush_running = self._flush_running, None
                done.set()
            commits.end(gen)
        commits.merged += not started_own

    async def switch_mode(self, new: Mode) -> None:
        """Change the image's mode live: flush, then reopen the descriptors with the new flags.

        Nothing else runs meanwhile. If the new flags are refused (no O_DIRECT
        on this filesystem) the old mode stays, and the reason is kept in
        ``switch_error`` for ``getfattr`` and ``cachefs cache``.
        """
        if new == self.mode:
            return
        async with self.backends.quiesced():
            old = self.mode
            if self.writable:
                await self._make_durable(self.backends.get(old.default))
            self.backends.close_all()
            try:
                be = self.backends.get(new.default)
            except (CachefsError, OSError) as exc:
                self.switch_error = str(exc)
                self.backends.get(old.default)
                raise
            if new.default.direct and hasattr(be.inner, "drop_page_cache"):
                be.inner.drop_page_cache()  # nothing of this image stays in the host page cache
            self.mode, self.switch_error = new, None
            log.info("%s: cache mode %s -> %s", self.path, old.name, new.name)

    async def set_compress(self, algorithm: str | None) -> None:
        """Mark the image compress-on-write ("zlib", "zstd") or not (None), live and durably."""
        raise UnsupportedOperation(f"{self.format} images cannot be compressed (only qcow2)")

    async def close(self) -> None:
        """Write everything (whatever the mode: unsafe too), sync, release the lock."""
        try:
            if self.writable:
                await self.write_back_all()
        finally:
            if self.lock is not None:
                self.lock.release()
            self.backends.close()

    async def write_back(self) -> None:
        """Write and sync everything queued, reserving nothing (what a writethrough write does)."""
        async with self.backends.in_use():
            await self._make_durable(self.backend)

    async def write_back_all(self) -> None:
        """What a close writes, without closing: everything, synced, nothing left reserved."""
        async with self.backends.in_use():
            await self._close_writeout(self.backend)

    # Discard, write-zeroes, preallocation, SEEK_DATA/SEEK_HOLE: sparse.py (fallocate and lseek).
    async def discard(self, offset: int, length: int, mode: CacheMode | None = None) -> None:
        await sparse.discard(self, offset, length, self._concrete(mode))

    async def zero_range(self, offset: int, length: int, mode: CacheMode | None = None) -> None:
        await sparse.zero_range(self, offset, length, self._concrete(mode))

    async def allocate(self, offset: int, length: int, mode: CacheMode | None = None) -> None:
        await sparse.allocate(self, offset, length, self._concrete(mode))

    async def seek_data(self, offset: int) -> int:
        return await sparse.seek(self, offset, data=True)

    async def seek_hole(self, offset: int) -> int:
        return await sparse.seek(self, offset, data=False)

    # Format hooks.
    async def _read(self, be, offset: int, length: int) -> bytes:
        raise NotImplementedError

    async def _write(self, be, offset: int, data) -> None:
        raise NotImplementedError

    async def _make_durable(self, be) -> None:
        await self._sync(be)

    async def _flush_durable(self, be, *, reserve: bool) -> None:
        await self._make_durable(be)

    async def _close_writeout(self, be) -> None:
        await self._make_durable(be)


class RawImage(Image):
    """A raw image: bytes pass straight through to the backing file."""

    format = "raw"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._size = self.backend.size()

    @property
    def size(self) -> int:
        return self._size

    async def _read(self, be, offset: int, length: int):
        return _padded(await be.pread_view(offset, length), length)

    async def _write(self, be, offset: int, data) -> None:
        await be.pwrite(offset, data)

    async def truncate(self, size: int) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "image is read-only")
        if size < self.size:
            raise UnsupportedOperation("shrinking an image is refused")
        async with self.backends.in_use():
            await self.backend.truncate(size)
        self._size = size


class Qcow2Image(Image):
    """A qcow2 image served through the engine and its metadata queue."""

    format = "qcow2"

    def __init__(self, path, backends, lock, writable, engine: Engine, mode: Mode = WRITEBACK):
        self.engine = engine
        self.queue = engine.queue
        super().__init__(path, backends, lock, writable and engine.writable, mode)
        self.commits = self.queue.commits
        self.queue.punch_freed = True  # _QueueIO.discard: freed host clusters give their space back
        self.write_lock = UncontendedLock()
        self._zcache: tuple[int, bytes] | None = None  # last decompressed cluster
        self.compressed = CompressedWrites(self)  # compress-on-write (seed 003), if the header says so
        # The data plane's hooks (dpmap.MappingPublisher): awaited before the metadata queue
        # runs, the only place a deferred free is applied, so no fast request still uses a
        # host cluster being freed; and told when corruption makes the image read-only.
        self.free_fence = None
        self.on_read_only: list = []

    @property
    def size(self) -> int:
        return self.engine.size

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
        async with self.backends.in_use():
            await self.compressed.set_algorithm(algorithm)

    def _reader(self, be):
        """What the core reads through: host bytes still in the fill cache come from memory."""
        return FillReader(self.compressed.fill, be) if self.compressed.fill.pending else be

    @property
    def early_writeouts(self) -> int:
        return self.queue.early_writeouts

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
            return await run_async(gen, be.pread, io)
        except CorruptImage as exc:
            self.engine.overlap.corrupted(str(exc))
            log.error("%s: %s; the image is now read-only", self.path, exc)
            for callback in self.on_read_only:
                callback()
            raise

    # -------------------------------------------------------------- reads

    async def _read(self, be, offset: int, length: int):
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
            return _padded(await be.pread_view(ext.host_offset, ext.length), ext.length)
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
        await self._write_plain(be, offset, data)

    async def _write_plain(self, be, offset: int, data) -> None:
        eng = self.engine
        async with self.write_lock:
            plan = await self._core(eng.plan_write(offset, data), self._reader(be))
            if plan.needs_commit:
                try:
                    await self._data_writes(be, plan)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await self._core(eng.abort(plan), be)
                    raise
                await self._core(eng.commit(plan), be)
                self._zcache = None
                if eng.cache.over_budget:
                    await self._run_queue(be, self.queue.writeout_early())
                return
            # In place: the data I/O runs without the lock, counted so that no
            # free of these clusters is applied meanwhile.
            self.queue.inflight += 1
        try:
            await self._data_writes(be, plan)
        finally:
            self.queue.inflight -= 1

    async def _data_writes(self, be, plan) -> None:
        try:
            for w in plan.data_writes:
                await be.pwrite(w.host_offset, w.data)
        finally:
            if plan.data_writes:
                self.queue.data_written()

    async def truncate(self, size: int) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "image is read-only")
        async with self.backends.in_use(), self.write_lock:
            # A refused size raises UnsupportedOperation: EOPNOTSUPP at fs.py.
            await self._core(self.engine.resize(size), self.backend)

    # -------------------------------------------------------------- flush

    async def _run_queue(self, be, gen):
        """Carry out what the metadata queue asks, on ``be``. Caller holds write_lock."""
        if self.free_fence is not None:
            await self.free_fence()
        return await self._core(gen, be, _QueueIO(self, be))

    async def _make_durable(self, be) -> None:
        async with self.write_lock:
            await self._run_queue(be, self.queue.make_durable())

    async def _flush_durable(self, be, *, reserve: bool) -> None:
        async with self.write_lock:
            await self._run_queue(be, self.queue.flush(reserve=reserve))

    async def _close_writeout(self, be) -> None:
        async with self.write_lock:
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
        return self.image._sync(self.be)

    async def discard(self, offset: int, length: int) -> None:
        if await sparse.punch(self.be, offset, length):
            self.image.guest.bytes_punched += length

    async def truncate(self, size: int, grow: bool) -> None:
        now = self.be.size()
        if (now < size) if grow else (now > size):
            await self.be.truncate(size)


class UncontendedLock:
    """A trio.Lock whose acquire does not yield to the scheduler when the lock is free.

    trio.Lock.acquire always passes a checkpoint, a full scheduler round even
    when nobody holds the lock, and every in-place write takes this lock once
    (issue 10, hot path). A free trio.Lock has no waiters (release hands it
    straight to the first one), so taking it at once is fair; a contended
    acquire queues as before.
    """

    def __init__(self) -> None:
        self._lock = trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


def _padded(view: memoryview, length: int):
    """``view`` zero-padded to ``length``: a backend read stops at the file's
    end, and the guest bytes past it read as zeros."""
    if len(view) >= length:
        return view
    return bytes(view) + bytes(length - len(view))


def _repair_buffered(path: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # the repair does unaligned I/O: never O_DIRECT
    try:
        repair_dirty_sync(fd)
    finally:
        os.close(fd)


async def open_image(path: str, *, writable: bool, mode: Mode = WRITEBACK,
                     cache_bytes: int | None = None, aio: str = "threads") -> Image:
    """Open, lock and validate one image file. Raises CachefsError subclasses (one line)."""
    lock_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    backends = BackendSet(file_opener(path, writable, aio, via_fd=lock_fd), lock_fd)
    lock = None
    try:
        lock = ImageLock.acquire(lock_fd, path, writable)
        be = backends.get(mode.default)
        # The name decides the format; the content is read only to check a qcow2's magic.
        magic = await be.pread(0, 4) if format_by_name(path) == "qcow2" else None
        kind = image_format(path, magic)
        if kind == "raw":
            return RawImage(path, backends, lock, writable, mode)
        kw = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
        engine = await run_async(open_engine(be.size(), writable=writable, **kw), be.pread)
        if engine.needs_repair and writable and engine.writable:
            # Crashed under lazy refcounts: rebuild them before the first write, as QEMU does.
            log.warning("%s: dirty lazy-refcounts image, rebuilding refcounts", path)
            await trio.to_thread.run_sync(_repair_buffered, path)
            engine = await run_async(open_engine(be.size(), writable=writable, **kw), be.pread)
            if engine.needs_repair:
                raise CorruptImage("dirty lazy-refcounts image could not be repaired")
        return Qcow2Image(path, backends, lock, writable, engine, mode)
    except BaseException:
        if lock is not None:
            lock.release()
        backends.close()
        raise
