"""An open image: backend descriptors + lock + counters, one object per image file.

This is where requests meet I/O. :class:`Image` owns what every format shares:
the cache modes and their descriptors, the counters, the flush protocol (group
commit by generation) and the live mode switch. A raw image passes requests
through (image/raw.py); the qcow2 half, the two-phase write around the engine's
plans and the metadata queue's rounds, is image/qcow2image.py. Which format a
file is served as is image/formats.py; opening it (lock, validation) is
image/opening.py.

A failed fdatasync is sticky (docs/design.md, "Errors"): the kernel may have
dropped the dirty pages it could not write, so no later flush of this image
may report success until it is opened again.

Every guest request carries the concrete cache mode of the handle it came
through (policy.py). The mode picks the backend descriptor (image/backends.py)
and answers the three questions asked here, each in one place:
``write_through`` after a write (``write``), ``honour_flush`` at a
flush (``flush``), ``direct`` only through the descriptor's flags. An
fdatasync is skipped when no completed write needs one (writes through an
O_DSYNC descriptor are durable already), which is how raw writethrough and
directsync images, and qcow2 overwrites in place, cost no fdatasync at all;
a qcow2 write that changes metadata costs one, shared (image/qcow2image.py).
"""

from __future__ import annotations

import errno
import logging
import os

import attrs
import trio

from cachefs.image import sparse
from cachefs.image.backends import BackendSet
from cachefs.image.hooks import NO_HOOKS, PlaneHooks
from cachefs.errors import CachefsError, UnsupportedOperation
from cachefs.image.locking import ImageLock
from cachefs.policy import WRITEBACK, CacheMode, Mode
from cachefs.qcow2.metaqueue import Generations

log = logging.getLogger("cachefs.image.base")


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
    bytes_punched: int = 0     # host bytes given back to the filesystem (image/sparse.py)


@attrs.define
class ModeCounters:
    """What guests asked of one concrete mode (the backend's IOCounters say what it cost)."""
    writes: int = 0
    flushes: int = 0
    flushes_ignored: int = 0


class Image:
    """What the FUSE layer sees; subclasses implement the format."""

    format = "raw"
    #: The compress-on-write algorithm ("zlib", "zstd") or None: only a qcow2 image can be one.
    compress: str | None = None
    compress_error: str | None = None  # why the last live compress change was refused (fuse/operations.py)
    #: The image below this one (image/backing.py: a qcow2 overlay's), or None.
    backing = None

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
        self._plane = NO_HOOKS  # the data plane's hooks: connect_plane
        self.backends.get(mode.default)     # fail now (e.g. no O_DIRECT here), not at first I/O

    # -------------------------------------------------------------- common

    @property
    def backend(self):
        """The descriptor for image-level work: the mode's default (writeback under auto)."""
        return self.backends.get(self.mode.default)

    @property
    def plane_hooks(self) -> PlaneHooks:
        """What the data plane asked to be told (image/hooks.py); NO_HOOKS until connect_plane."""
        return self._plane

    def connect_plane(self, hooks: PlaneHooks) -> None:
        """The data plane serves this image from now on (dataplane/handles.py, once per image).

        One call, made before C serves anything of the image: C's fast writes count
        for the next fdatasync (BackendSet.count_fast_writes) and the image calls the
        hooks at the points image/hooks.py names.
        """
        if self._plane is not NO_HOOKS:
            raise RuntimeError(f"{self.path}: a data plane serves this image already")
        self._plane = hooks
        self.backends.count_fast_writes(hooks.fast_writes, hooks.flushes.synced_writes)

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
        if self.sync_error is None:
            self.sync_error = self._plane.flushes.sync_error()  # C's own fdatasync failed: as sticky
        if self.sync_error is not None:
            raise OSError(self.sync_error, "an earlier fdatasync of this image failed; remount it")

    async def sync(self, be) -> None:
        """fdatasync, unless every completed write is durable already. A failure is sticky."""
        self._check_sync_error()
        if not self.backends.unsynced:
            return
        try:
            await be.fdatasync()
        except OSError as exc:
            self.sync_error = exc.errno or errno.EIO
            self._plane.flushes.sync_failed(self.sync_error)  # and every flush C would serve
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

    @property
    def read_only_reason(self) -> str | None:
        """Why the image itself refuses writes (one line), or None; a read-only mount is no reason
        of the image's. Shown at mount, in the log, in stats and as user.cachefs.read_only_reason."""
        return None

    def info(self) -> dict:
        out = {"format": self.format, "cluster_size": self.cluster_size, "virtual_size": self.size,
               "allocated": self.allocated_bytes(), "writable": self.writable}
        if self.read_only_reason:
            out["read_only_reason"] = self.read_only_reason
        return out

    async def grow_to(self, end: int) -> None:
        """Grow the disk (to whole sectors) for a write past its end, where the mount allows it
        (fuse/operations.py: ``-o growable``, or the handle that created the image: ``cp`` and backup tools
        write into a new file without an ftruncate first); also a fallocate past the end."""
        async with self._growing:  # two appenders must not race a grow into a refused shrink
            if end > self.size:
                await self.truncate(-(-end // 512) * 512)

    async def settle_unseen_growth(self, *, growable: bool) -> int:
        """Only a raw image's file can grow unseen (image/raw.py): the kernel writes it itself."""
        return 0

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
                await self._write_through_done(be)
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
                await self.make_durable(self.backends.get(old.default))
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
            await self.make_durable(self.backend)

    async def write_back_all(self) -> None:
        """What a close writes, without closing: everything, synced, nothing left reserved."""
        async with self.backends.in_use():
            await self._close_writeout(self.backend)

    # Discard, write-zeroes, preallocation, SEEK_DATA/SEEK_HOLE: image/sparse.py (fallocate and lseek).
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
    async def adopt_fast_allocations(self, be=None) -> None:
        """What the data plane allocated becomes this image's metadata (qcow2 only, dataplane/lending.py)."""

    async def _read(self, be, offset: int, length: int) -> bytes:
        raise NotImplementedError

    async def _write(self, be, offset: int, data) -> None:
        raise NotImplementedError

    async def make_durable(self, be) -> None:
        await self.sync(be)

    async def _write_through_done(self, be) -> None:
        """A write-through write returned: make it durable before the acknowledgement."""
        await self.make_durable(be)

    async def _flush_durable(self, be, *, reserve: bool) -> None:
        await self.make_durable(be)

    async def _close_writeout(self, be) -> None:
        await self.make_durable(be)


def zero_padded(view: memoryview, length: int):
    """``view`` zero-padded to ``length``: a backend read stops at the file's
    end, and the guest bytes past it read as zeros."""
    if len(view) >= length:
        return view
    return bytes(view) + bytes(length - len(view))
