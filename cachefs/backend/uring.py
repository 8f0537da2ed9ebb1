"""UringBackend: the ``io_uring`` submitter, buffered or O_DIRECT, no thread per request.

Issue 5. The same model as AioBackend (the batcher and reaper of
``eventfd.EventfdBackend``: one io_uring_submit per scheduler batch,
completions on an eventfd trio awaits), on an io_uring instead of an AIO
context. What io_uring changes:

- Buffered I/O is asynchronous too. A read the page cache holds completes
  inside io_uring_submit; one that misses waits for the page without
  blocking the trio thread; a buffered write or an fsync the kernel cannot do
  without blocking is punted to io_uring's own kernel workers (io-wq). So
  this backend serves every cache mode: writeback, writethrough and unsafe
  buffered, none and directsync with O_DIRECT, where Linux AIO only does
  the direct ones.
- A direct write that moves end-of-file does not stall the trio thread: the
  submission is non-blocking (IOCB_NOWAIT), ext4 answers -EAGAIN for an
  extending write under it, and io_uring punts the write to io-wq. So
  there is no ``extend_via_thread`` here, unlike AioBackend.
- fdatasync is IORING_OP_FSYNC with IORING_FSYNC_DATASYNC, available since
  Linux 5.1, so there is no thread fallback for it either. ftruncate (rare:
  image growth, O_DIRECT tail trimming) still runs in a worker thread.

O_DIRECT descriptors follow the rules of ``base.BackingFile`` (aligned
bounce buffers, read-modify-write under
``_ranges`` and ``_eof_lock``). Buffered descriptors need no alignment:
reads land in a buffer and are copied out once (callers want bytes),
writes go from the caller's memory with no copy.

When io_uring cannot be had (module built without liburing, or the kernel
refuses the ring: kernel.io_uring_disabled, a seccomp filter, a kernel
without CONFIG_IO_URING), ``open`` raises UringUnavailable with one line
naming the reason; the mount is then refused rather than served by
another submitter the user did not ask for.
"""

from __future__ import annotations

import errno
import os

from .. import native
from .base import open_backing
from .eventfd import EventfdBackend, Request, SubmitterUnavailable

#: SQ ring entries (= requests in flight) per backend; the CQ ring gets twice that.
DEFAULT_DEPTH = 128


class UringUnavailable(SubmitterUnavailable):
    """io_uring cannot be used: no compiled module or liburing, or the kernel refused the ring."""


class UringBackend(EventfdBackend):
    """A backing file, buffered or O_DIRECT, driven by io_uring (the Backend protocol)."""

    OP_READ = native.IORING_OP_READ
    OP_WRITE = native.IORING_OP_WRITE
    label = "io_uring"

    #: The UringContext (``ctx``).
    uring = property(lambda self: self.ctx)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        writable: bool,
        direct: bool = False,
        sync: bool = False,
        create: bool = False,
        depth: int = DEFAULT_DEPTH,
    ) -> UringBackend:
        """Open ``path`` (plus O_DIRECT / O_DSYNC) with an io_uring of ``depth`` entries.

        Raises UringUnavailable when io_uring cannot be used here,
        DirectIOUnsupported (an UnsupportedImage) when ``direct`` and the
        filesystem refuses O_DIRECT, else OSError.
        """
        path = os.fspath(path)
        ring = open_ring(path, depth)  # first: nothing to undo if the kernel says no
        try:
            fd = open_backing(path, writable=writable, direct=direct, sync=sync, create=create)
        except BaseException:
            ring.close()
            raise
        return cls(ring, fd, path, direct=direct, sync=sync, writable=writable)

    # -------------------------------------------------------------- protocol

    async def fdatasync(self) -> None:
        fd = self._fd()
        await self._io(fd, native.IORING_OP_FSYNC, None, 0, abortable=True, flags=native.IORING_FSYNC_DATASYNC)
        self.counters.fdatasyncs += 1

    async def _pread_buffered_view(self, fd: int, offset: int, length: int) -> memoryview:
        # Unzeroed: only the bytes the kernel filled are looked at.
        buf = memoryview(native.aligned_buffer(length, zero=False))
        done = 0
        while done < length:
            n = await self._io(fd, self.OP_READ, buf[done:], offset + done, abortable=True)
            if n == 0:
                break  # EOF
            done += n
        return buf[:done]

    async def _pwrite_buffered(self, fd: int, mv: memoryview, offset: int) -> None:
        await self._write_loop(fd, mv, offset, direct=False)  # from the caller's memory, no copy

    # -------------------------------------------------------------- O_DIRECT

    async def _direct_write(self, fd: int, buf, offset: int, *, extends: bool = False) -> None:
        await self._write_loop(fd, buf, offset, direct=True)  # extending ones too (module docstring)

    def _request(self, op: Request) -> native.UringRequest:
        return native.UringRequest(op.opcode, op.fd, op.buf, op.offset, op, op.flags)


def open_ring(path: str, depth: int = DEFAULT_DEPTH) -> native.UringContext:
    """A UringContext, or UringUnavailable saying in one line why there is none."""
    why = native.uring_available()
    if why is not None:
        raise UringUnavailable(f"{path}: --aio io_uring is not available: {why}; use --aio threads")
    try:
        return native.UringContext(depth)
    except OSError as exc:
        hint = {
            errno.EPERM: "io_uring is disabled here (sysctl kernel.io_uring_disabled, or a seccomp filter)",
            errno.ENOSYS: "this kernel has no io_uring (CONFIG_IO_URING)",
            errno.ENOMEM: "not enough locked memory for the ring (ulimit -l)",
        }.get(exc.errno, "the kernel refused the ring")
        raise UringUnavailable(
            f"{path}: --aio io_uring is not available: io_uring_setup failed ({os.strerror(exc.errno)}): "
            f"{hint}; use --aio threads"
        ) from None
