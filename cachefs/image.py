"""An open image: engine + backend + lock + counters, one object per image file.

This is where plans meet I/O. A guest write is two-phase: under the image's
write lock the engine plans it; the data writes happen; then the plan commits
(or aborts). Writes that only overwrite exclusively owned clusters release the
lock before their data I/O, so they run concurrently; reads never take it.

A guest flush writes the metadata out in dependency order: every dirty item
whose ordering edges are durable, then one fdatasync, repeated until nothing
that was dirty remains (meta.py). Frees that became due are applied in memory
afterwards and go out with the next flush.

A failed fdatasync is sticky (DESIGN.md section 2): the kernel may have
dropped the dirty pages it could not write, so no later flush of this image
may report success until it is opened again.
"""

from __future__ import annotations

import errno
import logging
import os

import attrs
import trio

from cachefs.backend.file import FileBackend
from cachefs.errors import CorruptImage, DamagedMetadata, UnsupportedImage
from cachefs.locking import ImageLock
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.engine import Engine, open_engine
from cachefs.qcow2.plan import ExtentKind, run_async

log = logging.getLogger("cachefs.image")


@attrs.define
class GuestCounters:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flush_failures: int = 0


def image_format(path: str) -> str:
    """qcow2 when the file says so; otherwise raw (by name, never by probing a raw file's content)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == fmt.MAGIC:
        return "qcow2"
    if path.endswith(".qcow2"):
        raise CorruptImage("not a qcow2 image (bad magic)")
    return "raw"


class Image:
    """What the FUSE layer sees; subclasses implement the format."""

    format = "raw"

    def __init__(self, path: str, backend: FileBackend, lock: ImageLock | None, writable: bool):
        self.path = path
        self.backend = backend
        self.lock = lock
        self.writable = writable
        self.guest = GuestCounters()
        self.sync_error: int | None = None  # errno of the failed fdatasync, forever after
        self.inflight = 0                   # data I/O running outside the write lock

    # -------------------------------------------------------------- common

    @property
    def size(self) -> int:
        raise NotImplementedError

    @property
    def cluster_size(self) -> int:
        return 512

    def allocated_bytes(self) -> int:
        return os.fstat(self.backend.fd).st_blocks * 512

    async def _sync(self) -> None:
        if self.sync_error is not None:
            raise OSError(self.sync_error, "an earlier fdatasync of this image failed")
        try:
            await self.backend.fdatasync()
        except OSError as exc:
            self.sync_error = exc.errno or errno.EIO
            self.guest.flush_failures += 1
            log.error("%s: fdatasync failed (%s); every later flush will fail until remount",
                      self.path, exc)
            raise

    def stats(self) -> dict:
        b = self.backend.counters
        return {
            "guest_reads": self.guest.reads, "guest_writes": self.guest.writes,
            "guest_flushes": self.guest.flushes, "guest_bytes_read": self.guest.bytes_read,
            "guest_bytes_written": self.guest.bytes_written,
            "backend_reads": b.reads, "backend_writes": b.writes,
            "backend_bytes_written": b.bytes_written, "backend_fdatasyncs": b.fdatasyncs,
            "flush_failures": self.guest.flush_failures,
        }

    def info(self) -> dict:
        return {"format": self.format, "cluster_size": self.cluster_size, "virtual_size": self.size,
                "allocated": self.allocated_bytes(), "writable": self.writable}

    def _check_range(self, offset: int, length: int) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "image is read-only")
        if offset + length > self.size:
            raise OSError(errno.ENOSPC, "write beyond the end of the virtual disk")

    async def close(self) -> None:
        try:
            if self.writable:
                await self.flush()
        finally:
            if self.lock is not None:
                self.lock.release()
            self.backend.close()


class RawImage(Image):
    """A raw image: bytes pass straight through to the backing file."""

    format = "raw"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._size = self.backend.size()

    @property
    def size(self) -> int:
        return self._size

    async def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        self.guest.reads += 1
        data = await self.backend.pread(offset, length)
        self.guest.bytes_read += length
        return data.ljust(length, b"\0")

    async def write(self, offset: int, data) -> None:
        self._check_range(offset, len(data))
        self.guest.writes += 1
        await self.backend.pwrite(offset, data)
        self.guest.bytes_written += len(data)

    async def flush(self) -> None:
        self.guest.flushes += 1
        await self._sync()

    async def truncate(self, size: int) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "image is read-only")
        if size < self.size:
            raise OSError(errno.EOPNOTSUPP, "shrinking an image is refused")
        await self.backend.truncate(size)
        self._size = size


class Qcow2Image(Image):
    """A qcow2 image served through the engine."""

    format = "qcow2"

    def __init__(self, path, backend, lock, writable, engine: Engine):
        super().__init__(path, backend, lock, writable and engine.writable)
        self.engine = engine
        self.write_lock = trio.Lock()
        self._zcache: tuple[int, bytes] | None = None  # last decompressed cluster

    @property
    def size(self) -> int:
        return self.engine.size

    @property
    def cluster_size(self) -> int:
        return self.engine.cs

    def stats(self) -> dict:
        out = super().stats()
        c = self.engine.counters
        out.update(metadata_writes=c.metadata_writes, metadata_bytes=c.metadata_bytes,
                   metadata_batches=c.batches, allocations=c.allocations, frees=c.frees,
                   zero_writes=c.zero_writes, cow_reads=c.cow_reads,
                   queue_depth=len(self.engine._dirty_items()), pending_frees=len(self.engine.refs.pending),
                   cached_tables=len(self.engine.cache))
        return out

    def _meta_read(self, offset: int, length: int):
        return self.backend.pread(offset, length)

    # -------------------------------------------------------------- reads

    async def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        self.guest.reads += 1
        extents = await run_async(self.engine.plan_read(offset, length), self._meta_read)
        self.inflight += 1
        try:
            parts = [await self._read_extent(ext) for ext in extents]
        finally:
            self.inflight -= 1
        self.guest.bytes_read += length
        return b"".join(parts)

    async def _read_extent(self, ext) -> bytes:
        if ext.kind is ExtentKind.ZERO:
            return bytes(ext.length)
        if ext.kind is ExtentKind.DATA:
            data = await self.backend.pread(ext.host_offset, ext.length)
            return data.ljust(ext.length, b"\0")
        if ext.kind is ExtentKind.COMPRESSED:
            desc = ext.compressed
            if self._zcache is None or self._zcache[0] != desc.offset:
                raw = await self.backend.pread(desc.offset, desc.max_length)
                self._zcache = (desc.offset, self.engine.decompress(desc, raw))
            return self._zcache[1][ext.in_cluster:ext.in_cluster + ext.length]
        raise OSError(errno.EIO, "damaged image metadata for this range")

    # -------------------------------------------------------------- writes

    async def write(self, offset: int, data) -> None:
        self._check_range(offset, len(data))
        self.guest.writes += 1
        eng = self.engine
        async with self.write_lock:
            plan = await run_async(eng.plan_write(offset, data), self._meta_read)
            if plan.needs_commit:
                try:
                    await self._data_writes(plan)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await run_async(eng.abort(plan), self._meta_read)
                    raise
                await run_async(eng.commit(plan), self._meta_read)
                self._zcache = None
                if eng.cache.over_budget:
                    await self._writeout()
                self.guest.bytes_written += len(data)
                return
            self.inflight += 1
        try:
            await self._data_writes(plan)
        finally:
            self.inflight -= 1
        self.guest.bytes_written += len(data)

    async def _data_writes(self, plan) -> None:
        try:
            for host, payload in _merge(plan.data_writes):
                await self.backend.pwrite(host, payload)
        finally:
            if plan.data_writes:
                self.engine.data_written()

    async def truncate(self, size: int) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "image is read-only")
        async with self.write_lock:
            try:
                await run_async(self.engine.resize(size), self._meta_read)
            except UnsupportedImage as exc:
                raise OSError(errno.EOPNOTSUPP, str(exc)) from None

    # -------------------------------------------------------------- flush

    async def flush(self) -> None:
        self.guest.flushes += 1
        async with self.write_lock:
            await self._writeout()

    async def _writeout(self) -> None:
        """Write every dirty item in dependency order, one fdatasync per round.

        Caller holds write_lock. A round whose writes fail leaves the items
        dirty, so a later flush retries them; only a failed sync is sticky.
        """
        eng = self.engine
        for _ in range(64):
            batch = eng.writeout_batch()
            if not batch and not eng.needs_sync:
                break
            for item, offset, payload in batch:
                if payload:
                    await self.backend.pwrite(offset, payload)
            eng.written(batch)
            await self._sync()
            await run_async(eng.synced(apply_frees=False), self._meta_read)
        else:
            raise CorruptImage("metadata writeout does not converge")
        if self.inflight == 0:
            # The L2 changes that dropped these references are durable now and
            # no I/O that looked them up is still running (invariant 2).
            await run_async(eng.refs.apply_frees(), self._meta_read)

    async def close(self) -> None:
        try:
            if self.writable:
                async with self.write_lock:
                    for _ in range(8):  # frees applied in one round dirty refblocks for the next
                        await self._writeout()
                        if not self.engine.dirty:
                            break
        finally:
            if self.lock is not None:
                self.lock.release()
            self.backend.close()


def _merge(writes):
    """Coalesce data writes that are contiguous on the host into one pwrite."""
    run_start, parts = None, []
    for w in writes:
        if run_start is not None and run_start + sum(len(p) for p in parts) == w.host_offset:
            parts.append(w.data)
            continue
        if parts:
            yield run_start, parts[0] if len(parts) == 1 else b"".join(parts)
        run_start, parts = w.host_offset, [w.data]
    if parts:
        yield run_start, parts[0] if len(parts) == 1 else b"".join(parts)


async def open_image(path: str, *, writable: bool, direct: bool = False,
                     cache_bytes: int | None = None) -> Image:
    """Open, lock and validate one image file. Raises CachefsError subclasses (one line)."""
    kind = image_format(path)
    backend = FileBackend.open(path, writable=writable, direct=direct)
    lock = None
    try:
        lock = ImageLock.acquire(backend.fd, path, writable)
        if kind == "raw":
            return RawImage(path, backend, lock, writable)
        kw = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
        engine = await run_async(open_engine(backend.size(), writable=writable, **kw), backend.pread)
        if engine.needs_repair and writable and engine.writable:
            # Crashed under lazy refcounts: rebuild them before the first write, as QEMU does.
            from cachefs.checkcmd import repair_dirty_sync
            log.warning("%s: dirty lazy-refcounts image, rebuilding refcounts", path)
            await trio.to_thread.run_sync(repair_dirty_sync, backend.fd)
            engine = await run_async(open_engine(backend.size(), writable=writable, **kw), backend.pread)
            if engine.needs_repair:
                raise CorruptImage("dirty lazy-refcounts image could not be repaired")
        return Qcow2Image(path, backend, lock, writable, engine)
    except BaseException:
        if lock is not None:
            lock.release()
        backend.close()
        raise
