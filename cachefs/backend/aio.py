"""AioBackend: the ``native`` submitter, O_DIRECT file I/O through Linux AIO.

Seed 004: requests go to the kernel with io_submit and complete into an
eventfd whose readiness trio awaits, so a 4 KiB read costs no worker-thread
round trip. The batcher/reaper machinery (batching, cancellation, the
system task) is ``eventfd.EventfdBackend``, shared with the io_uring
backend; this module adds what is Linux AIO's own. The protocol, the
counters and the O_DIRECT bounce-buffer rules are ``base.BackingFile``'s:
unaligned reads read the covering aligned range and return the caller's
slice; unaligned writes are read-modify-write under the same two invariants
(``_ranges`` held over a write's aligned range, ``_eof_lock`` over any write
that may move end-of-file). Linux AIO is only asynchronous for O_DIRECT
(buffered io_submit silently blocks the trio thread), so O_DIRECT is
required, and BackingFile never calls the buffered primitives here.

Writes that move end-of-file go through a worker thread instead: ext4 runs
such a direct write synchronously *inside* io_submit (ext4_dio_write_iter:
IOMAP_DIO_FORCE_WAIT when ext4_extending_io), stalling the trio thread for a
whole device write (measured here: 0.6-0.9 ms in io_submit per 1 MiB append,
under 0.13 ms for an overwrite or a write into a hole below EOF). They hold
``_eof_lock`` already, so routing them is simple; ``extend_via_thread =
False`` keeps them on AIO (XFS, for one, updates the size at completion).
io_submit may still block briefly (block allocation, extent-tree reads, a
full device queue): that is Linux AIO as it is.
"""

from __future__ import annotations

import errno
import os

import trio

from .. import native
from .base import open_backing
from .eventfd import EventfdBackend, Request, SubmitterUnavailable
from .file import write_all

#: Requests in flight per backend. io_setup charges about twice this against
#: the system-wide fs.aio-max-nr (65536 by default).
DEFAULT_DEPTH = 128

# Read at call time (tests swap in an invalid opcode to force the fallback).
IOCB_CMD_FDSYNC = native.IOCB_CMD_FDSYNC


class AioUnavailable(SubmitterUnavailable):
    """Native AIO cannot be used: no compiled module, or io_setup refused."""


class AioBackend(EventfdBackend):
    """An O_DIRECT backing file driven by native AIO (the Backend protocol)."""

    OP_READ = native.IOCB_CMD_PREAD
    OP_WRITE = native.IOCB_CMD_PWRITE
    label = "aio"

    def __init__(self, fd: int, path: str, *, sync: bool, writable: bool, depth: int = DEFAULT_DEPTH) -> None:
        ctx = native.AioContext(depth)  # first: it may raise, and then holds nothing
        super().__init__(ctx, fd, path, direct=True, sync=sync, writable=writable)
        #: False: fdatasync runs os.fdatasync in a thread (IOCB_CMD_FDSYNC was refused).
        self.native_fdsync = True
        #: Writes that move EOF go through a thread (module docstring); counted.
        self.extend_via_thread = True
        self.thread_writes = 0

    #: The AioContext (``ctx``).
    aio = property(lambda self: self.ctx)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        writable: bool,
        sync: bool = False,
        create: bool = False,
        depth: int = DEFAULT_DEPTH,
    ) -> AioBackend:
        """Open ``path`` O_DIRECT (plus O_DSYNC with ``sync``) with an AIO context.

        Raises AioUnavailable without the native module or when io_setup
        fails, DirectIOUnsupported (an UnsupportedImage) when the filesystem
        refuses O_DIRECT, else OSError.
        """
        path = os.fspath(path)
        if not native.available():
            reason = native.unavailable_reason() or "disabled"
            raise AioUnavailable(
                f"{path}: native AIO needs the compiled cachefs.native module ({reason}); "
                "rebuild it (python cachefs/native/build.py) or use --aio threads"
            )
        fd = open_backing(path, writable=writable, direct=True, sync=sync, create=create,
                          needed_by=", which native AIO needs", remedy="use --aio threads")
        try:
            return cls(fd, path, sync=sync, writable=writable, depth=depth)
        except OSError as exc:
            os.close(fd)
            raise AioUnavailable(
                f"{path}: io_setup({depth}) failed ({exc.strerror}); "
                "raise fs.aio-max-nr or use --aio threads"
            ) from None

    # -------------------------------------------------------------- protocol

    async def fdatasync(self) -> None:
        fd = self._fd()
        if self.native_fdsync:
            try:
                await self._io(fd, IOCB_CMD_FDSYNC, None, 0, abortable=True)
            except OSError as exc:
                # IOCB_CMD_FDSYNC needs Linux 4.18 and a filesystem with
                # ->fsync; otherwise it is refused with EINVAL. A real EINVAL
                # from the sync itself is raised again by os.fdatasync.
                if exc.errno != errno.EINVAL:
                    raise
                self.native_fdsync = False
        if not self.native_fdsync:
            await trio.to_thread.run_sync(os.fdatasync, fd)
        self.counters.fdatasyncs += 1

    # -------------------------------------------------------------- O_DIRECT

    async def _direct_write(self, fd: int, buf, offset: int, *, extends: bool = False) -> None:
        if extends and self.extend_via_thread:
            self.thread_writes += 1
            await trio.to_thread.run_sync(write_all, fd, buf, offset, True)
            return
        await self._write_loop(fd, buf, offset, direct=True)

    def _request(self, op: Request) -> native.AioRequest:
        return native.AioRequest(op.opcode, op.fd, op.buf, op.offset, op)
