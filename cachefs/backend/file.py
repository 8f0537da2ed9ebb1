"""FileBackend: the backing file, with blocking syscalls off the trio thread.

pyfuse3 runs every handler on the trio thread, so a blocking pread there
would stall every request of every image (DESIGN.md section 5). Each syscall
therefore runs in a worker thread via ``trio.to_thread.run_sync``, under a
CapacityLimiter wide enough for a deep guest queue (64, like a typical
virtio queue depth) but bounded so a flood cannot spawn unbounded threads.

O_DIRECT (cache modes none and directsync) needs the file offset, the length
and the buffer address all aligned to the device's logical block size
(``ALIGN``). Callers may ask for anything, so:

- reads go into a freshly allocated aligned buffer covering the aligned
  range, and the caller's slice is copied out;
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
one-line UnsupportedImage naming the filesystem, never a silent fallback to
buffered I/O (DESIGN.md section 2).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import AsyncIterator

import trio

from .. import native
from ..errors import DirectIOUnsupported
from ..mounts import filesystem_type
from . import ALIGN, IOCounters

#: Worker threads that may be in a syscall at once, per backend.
MAX_THREADS = 64

Buffer = bytes | bytearray | memoryview


def _down(x: int) -> int:
    return x & ~(ALIGN - 1)


def _up(x: int) -> int:
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


def buffer_pool_stats() -> dict[str, int]:
    """Hits, misses and bytes of the pool the aligned buffers come from."""
    return native.POOL.stats()


def _as_bytes_view(data: Buffer) -> memoryview:
    mv = memoryview(data)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


# ---------------------------------------------------------------- blocking calls
# These run in worker threads only.


def _read_into(fd: int, buf: memoryview, offset: int, direct: bool) -> int:
    """Fill ``buf`` from ``offset``; return bytes read (short only at EOF)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
        if direct and n % ALIGN:
            break  # O_DIRECT stops at EOF mid-block; the next offset is unaligned
    return done


def _read_bytes(fd: int, offset: int, length: int) -> bytes:
    first = os.pread(fd, length, offset)
    if len(first) == length or not first:
        return first
    parts, done = [first], len(first)
    while done < length:
        more = os.pread(fd, length - done, offset + done)
        if not more:
            break
        parts.append(more)
        done += len(more)
    return b"".join(parts)


def _write_all(fd: int, buf: memoryview, offset: int, direct: bool) -> None:
    done = 0
    while done < len(buf):
        n = os.pwritev(fd, [buf[done:]], offset + done)
        if n == 0 or (direct and n % ALIGN):
            # Continuing would need an unaligned O_DIRECT write; a short write
            # here means the device ran out of something it did not name.
            raise OSError(errno.EIO, f"short write at offset {offset + done}")
        done += n


# ---------------------------------------------------------------- range locks


class _RangeLocks:
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


# ---------------------------------------------------------------- the backend


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


class DirectWrites:
    """Reads, and O_DIRECT writes of any offset and length, on a backend's primitives.

    Shared by FileBackend (threads), AioBackend (Linux AIO) and UringBackend
    (io_uring): the subclass provides ``_direct_read``, ``_direct_write``,
    ``_truncate_fd``, ``_pread_buffered_view`` and ``close``, plus ``fd``,
    ``path``, ``counters``, ``_ranges`` and ``_eof_lock`` (the two invariants
    in this module's docstring). It gives them the descriptor, size and
    context-manager plumbing they would otherwise each repeat.
    """

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        extra = "".join([",direct" if self.direct else "", ",sync" if self.sync else ""])
        return f"<{type(self).__name__} {self.path!r} fd={self.fd} {mode}{extra}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fd(self) -> int:
        if self.fd is None:
            raise OSError(errno.EBADF, f"{self.path}: backend is closed")
        return self.fd

    def size(self) -> int:
        return os.fstat(self._fd()).st_size

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
        lo, hi = _down(offset), _up(offset + length)
        if (lo, hi) != (offset, offset + length):
            self.counters.bounce_requests += 1
        # Unzeroed: only the bytes the kernel filled are looked at.
        buf = aligned_memory(hi - lo, zero=False)
        n = await self._direct_read(fd, buf, lo)
        self.counters.direct_bytes += n
        start = offset - lo
        return buf[start : min(n, start + length)] if n > start else memoryview(b"")

    async def _pwrite_direct(self, fd: int, offset: int, mv: memoryview) -> None:
        end = offset + len(mv)
        lo, hi = _down(offset), _up(end)
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


class FileBackend(DirectWrites):
    """A backing file opened for the backend protocol (see cachefs.backend)."""

    def __init__(self, fd: int, path: str, *, direct: bool, sync: bool, writable: bool) -> None:
        self.fd: int | None = fd
        self.path = path
        self.direct = direct
        self.sync = sync
        self.writable = writable
        self.align = ALIGN
        self.counters = IOCounters()
        self._limiter = trio.CapacityLimiter(MAX_THREADS)
        self._ranges = _RangeLocks()
        self._eof_lock = trio.Lock()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        writable: bool,
        direct: bool = False,
        sync: bool = False,
        create: bool = False,
    ) -> FileBackend:
        """Open ``path`` (O_RDWR or O_RDONLY, plus O_DIRECT / O_DSYNC).

        ``create`` makes a new empty file (O_CREAT | O_EXCL, so an existing
        image is never clobbered). Raises OSError, or UnsupportedImage when
        the filesystem refuses O_DIRECT. Synchronous: it is called once per
        image at mount or command start, not per request.
        """
        path = os.fspath(path)
        fd = open_backing(path, writable=writable, direct=direct, sync=sync, create=create)
        return cls(fd, path, direct=direct, sync=sync, writable=writable)

    # -------------------------------------------------------------- helpers

    async def _run(self, fn, *args):
        self.counters.started()
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        finally:
            self.counters.in_flight -= 1

    # -------------------------------------------------------------- protocol

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    async def fdatasync(self) -> None:
        await self._run(os.fdatasync, self._fd())
        self.counters.fdatasyncs += 1

    def drop_page_cache(self) -> None:
        """Ask the kernel to drop this file's clean cached pages (a switch to a direct mode)."""
        native.fadvise(self._fd(), 0, 0, os.POSIX_FADV_DONTNEED)

    async def truncate(self, size: int) -> None:
        fd = self._fd()
        async with self._eof_lock:
            await self._run(os.ftruncate, fd, size)

    async def _pread_buffered_view(self, fd: int, offset: int, length: int) -> memoryview:
        return memoryview(await self._run(_read_bytes, fd, offset, length))

    async def pwrite(self, offset: int, data: Buffer) -> None:
        fd = self._fd()
        mv = _as_bytes_view(data)
        if offset < 0:
            raise OSError(errno.EINVAL, f"bad write offset {offset}")
        if len(mv) and not self.direct:
            await self._run(_write_all, fd, mv, offset, False)
        elif len(mv):
            await self._pwrite_direct(fd, offset, mv)
        self.counters.writes += 1
        self.counters.bytes_written += len(mv)

    # -------------------------------------------------------------- O_DIRECT

    # The O_DIRECT primitives DirectWrites builds on (worker threads here).

    async def _direct_read(self, fd: int, buf: memoryview, offset: int) -> int:
        return await self._run(_read_into, fd, buf, offset, True)

    async def _direct_write(self, fd: int, buf: memoryview, offset: int, *, extends: bool) -> None:
        await self._run(_write_all, fd, buf, offset, True)

    async def _truncate_fd(self, fd: int, size: int) -> None:
        await self._run(os.ftruncate, fd, size)
