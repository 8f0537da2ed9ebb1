"""FileBackend: the ``threads`` submitter, blocking syscalls off the trio thread.

pyfuse3 runs every handler on the trio thread, so a blocking pread there
would stall every request of every image. Each syscall therefore runs in a
worker thread via ``trio.to_thread.run_sync``, under a CapacityLimiter wide
enough for a deep guest queue (64, like a typical virtio queue depth) but
bounded so a flood cannot spawn unbounded threads.

Buffered or O_DIRECT; what O_DIRECT needs (aligned bounce buffers,
read-modify-write under the range and end-of-file locks) is
``base.BackingFile``'s. This module gives it the syscalls, each run in a
worker thread.
"""

from __future__ import annotations

import errno
import os

import trio

from .base import ALIGN, BackingFile, open_backing

#: Worker threads that may be in a syscall at once, per backend.
MAX_THREADS = 64


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


def write_all(fd: int, buf: memoryview, offset: int, direct: bool) -> None:
    """Write all of ``buf`` at ``offset`` with pwritev (blocking: a worker thread's)."""
    done = 0
    while done < len(buf):
        n = os.pwritev(fd, [buf[done:]], offset + done)
        if n == 0 or (direct and n % ALIGN):
            # Continuing would need an unaligned O_DIRECT write; a short write
            # here means the device ran out of something it did not name.
            raise OSError(errno.EIO, f"short write at offset {offset + done}")
        done += n


# ---------------------------------------------------------------- the backend


class FileBackend(BackingFile):
    """A backing file opened for the backend protocol (see cachefs.backend)."""

    def __init__(self, fd: int, path: str, *, direct: bool, sync: bool, writable: bool) -> None:
        super().__init__(fd, path, direct=direct, sync=sync, writable=writable)
        self._limiter = trio.CapacityLimiter(MAX_THREADS)

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

    async def _run(self, fn, *args):
        self.counters.started()
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        finally:
            self.counters.in_flight -= 1

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    async def fdatasync(self) -> None:
        await self._run(os.fdatasync, self._fd())
        self.counters.fdatasyncs += 1

    # -------------------------------------------------------------- what BackingFile builds on

    async def _pread_buffered_view(self, fd: int, offset: int, length: int) -> memoryview:
        return memoryview(await self._run(_read_bytes, fd, offset, length))

    async def _pwrite_buffered(self, fd: int, mv: memoryview, offset: int) -> None:
        await self._run(write_all, fd, mv, offset, False)

    async def _direct_read(self, fd: int, buf: memoryview, offset: int) -> int:
        return await self._run(_read_into, fd, buf, offset, True)

    async def _direct_write(self, fd: int, buf: memoryview, offset: int, *, extends: bool) -> None:
        await self._run(write_all, fd, buf, offset, True)

    async def _truncate_fd(self, fd: int, size: int) -> None:
        await self._run(os.ftruncate, fd, size)
