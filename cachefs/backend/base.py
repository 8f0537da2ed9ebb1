"""What every file backend shares, whichever submitter carries its requests.

A *submitter* is what hands a backend's reads, writes and syncs to the
kernel, the thing ``--aio`` picks: ``threads`` (``FileBackend``, a worker
thread per syscall), ``native`` (``AioBackend``, Linux AIO) or ``io_uring``
(``UringBackend``). The word is kept apart from the qcow2 ``Engine``
(cachefs/qcow2/engine.py), which plans metadata and never does I/O.

This module owns, once for all three:

- ``ALIGN`` and the alignment helpers (aligned buffers, buffer addresses);
- ``IOCounters``, what a backend did;
- the ``Backend`` protocol, the contract every backend keeps;
- ``open_backing``, the one way an image file is opened;
- ``RangeLocks`` and ``BackingFile``, the shared class: the descriptor,
  ``pread``/``pwrite``/``truncate``, and O_DIRECT for any offset and length.

O_DIRECT (cache modes none and directsync) needs the file offset, the length
and the buffer address all aligned to the device's logical block size
(``ALIGN``). Callers may ask for anything, so:

- reads go into a freshly allocated aligned buffer covering the aligned
  range, and the caller's slice is returned;
- writes whose offset and length are aligned but whose buffer is not are
  copied into an aligned buffer;
- other writes are read-modify-write: read the partial head and tail
  blocks, patch the caller's bytes in, write the whole aligned range.

Two invariants make read-modify-write safe under concurrency:

- Invariant: every O_DIRECT write holds ``_ranges`` for its aligned range
  while it runs. Without it, two writes to different bytes of one block
  could each read the old block and the second would undo the first.
- Invariant: every O_DIRECT write that may move end-of-file holds
  ``_eof_lock``. Padding the tail block grows the file past the caller's
  end, so we truncate back afterwards; that is only correct if no other
  write extended the file meanwhile.

A filesystem that refuses O_DIRECT (ramfs; tmpfs before Linux 6.6) gets a
one-line DirectIOUnsupported naming the filesystem, never a silent fallback
to buffered I/O.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

import attrs
import trio

from .. import native
from ..errors import DirectIOUnsupported
from ..mountinfo import filesystem_type

#: O_DIRECT alignment of offsets, lengths and buffer addresses. 4096 covers
#: every logical block size a backing device is expected to have.
ALIGN = 4096

Buffer = bytes | bytearray | memoryview


# ---------------------------------------------------------------- alignment


def align_down(x: int) -> int:
    return x & ~(ALIGN - 1)


def align_up(x: int) -> int:
    return (x + ALIGN - 1) & ~(ALIGN - 1)


def aligned_memory(size: int, *, zero: bool = True) -> memoryview:
    """Writable memory at an ALIGN-aligned address, zeroed unless ``zero=False``.

    Comes from the native module's pool of aligned buffers when it is built
    (reused, not allocated per request), else an anonymous mmap
    (page-aligned, pages are multiples of 4096, always zeroed).
    """
    if native.available():
        return memoryview(native.aligned_buffer(size, ALIGN, zero=zero))
    return memoryview(mmap.mmap(-1, max(size, 1)))[:size]


def buffer_address(mv: memoryview) -> int | None:
    """Address of a contiguous buffer, or None if it cannot be known."""
    if native.available():
        return native.address_of(mv)
    if mv.readonly:
        return None  # ctypes only maps writable buffers; bounce instead
    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


def bytes_view(data: Buffer) -> memoryview:
    """``data`` as a flat view of bytes, so lengths and slices count bytes."""
    mv = memoryview(data)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def buffer_pool_stats() -> dict[str, int]:
    """Hits, misses and bytes of the pool the aligned buffers come from."""
    return native.POOL.stats()


# ---------------------------------------------------------------- counters and contract


@attrs.define
class IOCounters:
    """What a backend did, for stats, xattrs and tests.

    ``reads``/``writes`` count requests made *to* the backend (not syscalls);
    ``bytes_read``/``bytes_written`` count the caller's bytes.
    ``bounce_requests`` counts O_DIRECT requests that needed an aligned bounce
    buffer: an unaligned offset or length (padding, read-modify-write for
    writes), or a write whose buffer address was not aligned.
    ``direct_bytes`` counts bytes the kernel moved on the O_DIRECT file
    descriptor, padding and read-modify-write reads included, so
    ``direct_bytes - bytes_read - bytes_written`` is the bounce overhead.
    ``in_flight``/``peak_in_flight``: requests the submitter has handed to
    the kernel (or to a worker thread) and not yet seen complete; the peak
    shows whether a QD32 client really keeps 32 requests busy on the backend.
    """

    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    fdatasyncs: int = 0
    bounce_requests: int = 0
    direct_bytes: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0

    def started(self, n: int = 1) -> None:
        self.in_flight += n
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight


@runtime_checkable
class Backend(Protocol):
    """The contract every backend keeps, file or memory.

    - ``pread(offset, length)`` returns ``length`` bytes, or fewer only when
      the file ends first (never zero-padded: the caller pads, since only it
      knows whether reading past the end is legal).
    - ``pwrite(offset, data)`` writes all of ``data`` or raises OSError; a
      write past the end extends the file (the gap reads as zeros).
    - ``fdatasync()`` makes every *completed* ``pwrite`` durable.
    - ``size()`` is the current file size, cheap enough for the trio thread.
    - Errors are OSError with the kernel's errno; translating them is the
      job of the layer that knows what the bytes mean.
    """

    fd: int | None  # for locking and /proc fdinfo; None for in-memory backends
    direct: bool  # opened O_DIRECT (FileBackend) or emulating its alignment
    counters: IOCounters

    async def pread(self, offset: int, length: int) -> bytes: ...

    async def pwrite(self, offset: int, data: Buffer) -> None: ...

    async def fdatasync(self) -> None: ...

    async def truncate(self, size: int) -> None: ...

    def size(self) -> int: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- opening


def open_backing(path: str, *, writable: bool, direct: bool, sync: bool, create: bool,
                 needed_by: str = " (cache modes none and directsync need it)",
                 remedy: str = "use --cache writeback") -> int:
    """os.open an image file the way every backend does (O_CLOEXEC, plus
    O_DIRECT / O_DSYNC; ``create`` is O_CREAT | O_EXCL, so an existing image
    is never clobbered). A filesystem that refuses O_DIRECT raises
    DirectIOUnsupported naming it, with what needs O_DIRECT and the remedy."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    flags |= (os.O_DIRECT if direct else 0) | (os.O_DSYNC if sync else 0)
    flags |= os.O_CREAT | os.O_EXCL if create else 0
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if not (direct and exc.errno == errno.EINVAL):
            raise
        if create:  # Linux creates the file before refusing O_DIRECT; we made it
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise DirectIOUnsupported(
            f"{path}: the backing filesystem ({filesystem_type(path)}) does not support "
            f"O_DIRECT{needed_by}; {remedy} or put the images on ext4/xfs"
        ) from None


# ---------------------------------------------------------------- the shared class


class RangeLocks:
    """Exclusive locks on byte ranges [lo, hi); disjoint ranges do not wait."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int, trio.Event]] = []

    @contextlib.asynccontextmanager
    async def hold(self, lo: int, hi: int) -> AsyncIterator[None]:
        while True:
            clash = next((ev for a, b, ev in self._held if a < hi and lo < b), None)
            if clash is None:
                break
            await clash.wait()
        entry = (lo, hi, trio.Event())
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            entry[2].set()


class BackingFile:
    """An open image file behind the Backend protocol; subclasses are its submitters.

    This class owns the descriptor, the counters, ``pread``/``pwrite``/
    ``truncate``, and O_DIRECT for any offset and length under the two
    invariants of this module's docstring. A subclass carries requests to
    the kernel by providing ``_direct_read``, ``_direct_write``,
    ``_pread_buffered_view``, ``_pwrite_buffered``, ``_truncate_fd``,
    ``fdatasync`` and ``close``.
    """

    def __init__(self, fd: int, path: str, *, direct: bool, sync: bool, writable: bool) -> None:
        self.fd: int | None = fd
        self.path = path
        self.direct = direct
        self.sync = sync
        self.writable = writable
        self.counters = IOCounters()
        self._ranges = RangeLocks()
        self._eof_lock = trio.Lock()

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        extra = "".join([",direct" if self.direct else "", ",sync" if self.sync else ""])
        return f"<{type(self).__name__} {self.path!r} fd={self.fd} {mode}{extra}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def _fd(self) -> int:
        if self.fd is None:
            raise OSError(errno.EBADF, f"{self.path}: backend is closed")
        return self.fd

    def size(self) -> int:
        return os.fstat(self._fd()).st_size

    def drop_page_cache(self) -> None:
        """Ask the kernel to drop this file's clean cached pages (a switch to a direct mode)."""
        native.fadvise(self._fd(), 0, 0, os.POSIX_FADV_DONTNEED)

    async def truncate(self, size: int) -> None:
        fd = self._fd()
        async with self._eof_lock:
            await self._truncate_fd(fd, size)

    # -------------------------------------------------------------- reads

    async def pread_view(self, offset: int, length: int) -> memoryview:
        """``pread`` without the copy (issue 5, "copies"): an O_DIRECT read
        returns a view of the aligned buffer the kernel filled, which FUSE
        replies from directly. The buffer lives as long as the view."""
        fd = self._fd()
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, f"bad read range {offset}+{length}")
        if length == 0:
            view = memoryview(b"")
        elif self.direct:
            view = await self._pread_direct_view(fd, offset, length)
        else:
            view = await self._pread_buffered_view(fd, offset, length)
        self.counters.reads += 1
        self.counters.bytes_read += len(view)
        return view

    async def pread(self, offset: int, length: int) -> bytes:
        view = await self.pread_view(offset, length)
        # A buffered thread read already made bytes: hand those back, no copy.
        whole = view.obj if isinstance(view.obj, bytes) and len(view.obj) == len(view) else None
        return whole if whole is not None else bytes(view)

    async def _pread_direct_view(self, fd: int, offset: int, length: int) -> memoryview:
        lo, hi = align_down(offset), align_up(offset + length)
        if (lo, hi) != (offset, offset + length):
            self.counters.bounce_requests += 1
        # Unzeroed: only the bytes the kernel filled are looked at.
        buf = aligned_memory(hi - lo, zero=False)
        n = await self._direct_read(fd, buf, lo)
        self.counters.direct_bytes += n
        start = offset - lo
        return buf[start : min(n, start + length)] if n > start else memoryview(b"")

    # -------------------------------------------------------------- writes

    async def pwrite(self, offset: int, data: Buffer) -> None:
        fd = self._fd()
        mv = bytes_view(data)
        if offset < 0:
            raise OSError(errno.EINVAL, f"bad write offset {offset}")
        if len(mv) and not self.direct:
            await self._pwrite_buffered(fd, mv, offset)
        elif len(mv):
            await self._pwrite_direct(fd, offset, mv)
        self.counters.writes += 1
        self.counters.bytes_written += len(mv)

    async def _pwrite_direct(self, fd: int, offset: int, mv: memoryview) -> None:
        end = offset + len(mv)
        lo, hi = align_down(offset), align_up(end)
        async with self._ranges.hold(lo, hi):
            if hi <= self.size():
                await self._write_aligned(fd, offset, mv, lo, hi, extends=False)
                return
            async with self._eof_lock:
                old_size = self.size()
                await self._write_aligned(fd, offset, mv, lo, hi, extends=hi > old_size)
                # Padding the tail block moved EOF past the caller's end.
                want = max(old_size, end)
                if hi > want:
                    await self._truncate_fd(fd, want)

    async def _write_aligned(self, fd: int, offset: int, mv: memoryview, lo: int, hi: int, *,
                             extends: bool) -> None:
        end = offset + len(mv)
        if (lo, hi) == (offset, end):
            addr = buffer_address(mv)
            if addr is not None and addr % ALIGN == 0:
                await self._direct_write(fd, mv, offset, extends=extends)  # zero copy
                self.counters.direct_bytes += len(mv)
                return
        self.counters.bounce_requests += 1
        buf = aligned_memory(hi - lo)  # zeroed: a head/tail read past EOF leaves zeros
        head_read = offset != lo
        if head_read:  # partial head block
            self.counters.direct_bytes += await self._direct_read(fd, buf[:ALIGN], lo)
        tail_is_head = hi - ALIGN == lo
        if end != hi and not (tail_is_head and head_read):  # partial tail block
            self.counters.direct_bytes += await self._direct_read(fd, buf[hi - lo - ALIGN :], hi - ALIGN)
        buf[offset - lo : end - lo] = mv
        await self._direct_write(fd, buf, lo, extends=extends)
        self.counters.direct_bytes += hi - lo

    # -------------------------------------------------------------- what a submitter provides

    async def _pread_buffered_view(self, fd: int, offset: int, length: int) -> memoryview:
        raise NotImplementedError

    async def _pwrite_buffered(self, fd: int, mv: memoryview, offset: int) -> None:
        raise NotImplementedError

    async def _direct_read(self, fd: int, buf: memoryview, offset: int) -> int:
        raise NotImplementedError

    async def _direct_write(self, fd: int, buf: memoryview, offset: int, *, extends: bool) -> None:
        raise NotImplementedError

    async def _truncate_fd(self, fd: int, size: int) -> None:
        raise NotImplementedError
