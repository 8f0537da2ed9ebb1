"""FALLOCATE, LSEEK and FSYNC: the requests the data plane takes from the kernel and Python serves.

pyfuse3 registers no FUSE fallocate or lseek handler, so libfuse would
answer ENOSYS, and after one ENOSYS the kernel never sends that opcode again
on the connection (fs/fuse/file.c: ``no_fallocate``, ``no_lseek``):
fallocate(2) then fails with EOPNOTSUPP for good, and SEEK_DATA/SEEK_HOLE
fall back to "all data". FSYNC, a guest flush, comes the same way because
it is frequent and its work is all in the image's group flush: libfuse and
pyfuse3 would only add their request handling to its latency. The data plane
sees every request before libfuse, so it keeps these three (dp_pyq.c): it copies each
into a bounded table and writes to an eventfd; :class:`DirectRequests` takes them,
serves each in a trio task through the image (image/sparse.py) and answers it
itself, one write to /dev/fuse from this thread (``dp_pyq_reply``).

Rules kept here:

- every request taken gets exactly one answer, whatever happens; never
  ENOSYS (it would switch the opcode off), EOPNOTSUPP instead;
- a request runs to its end once started (shielded): an INTERRUPT is
  dropped in C, and a discard half applied at shutdown would be neither;
- a FALLOCATE without KEEP_SIZE that reaches past the end is what a write
  past the end is (fs.write): ENOSPC, unless the mount is ``-o growable`` or
  the handle created the image; then it grows the disk first, with the image
  paused in C.
"""

from __future__ import annotations

import errno
import logging
import os

import trio

from cachefs.dataplane.plane import DirectRequest
from cachefs.errors import CachefsError
from cachefs.fuse.failures import errno_of, image_named, reason
from cachefs.image.sparse import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE

log = logging.getLogger("cachefs.fuse.direct_requests")

FUSE_FSYNC = 20  # <linux/fuse.h>
FUSE_FALLOCATE = 43
FUSE_LSEEK = 46


class DirectRequests:
    """Serves the data plane's Python-served requests for one mount, for the mount's life."""

    def __init__(self, plane, ops) -> None:
        self.plane = plane
        self.ops = ops

    async def serve(self) -> None:
        fd = self.plane.direct_requests_fd()
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
                for req in self.plane.take_direct_requests():
                    nursery.start_soon(self._one, req)

    async def _one(self, req: DirectRequest) -> None:
        offset, err = 0, 0
        with trio.CancelScope(shield=True):
            try:
                offset = await self._serve(req)
            except (OSError, CachefsError) as exc:
                err = errno_of(exc)
                if err != errno.ENXIO:  # ENXIO: SEEK_DATA past the last data, an answer, not a problem
                    self._warn(req, reason(exc))
            except Exception:
                err = errno.EIO
                log.exception("%s failed", self._describe(req))
                self._warn(req, "EIO: internal error (a traceback is in the log)", logged=True)
            if err == errno.ENOSYS:
                err = errno.EOPNOTSUPP  # ENOSYS would turn the opcode off for the connection
            rc = self.plane.answer_direct(req.unique, err, offset or 0)
            if rc < 0 and rc not in (-errno.ENOENT, -errno.ENODEV):
                log.warning("reply to %s: %s", _name(req), os.strerror(-rc))

    async def _serve(self, req: DirectRequest) -> int:
        h = self.ops.handles.get(req.fh)
        if h is None:
            raise OSError(errno.EBADF, "no such handle")
        img = h.image
        if req.opcode == FUSE_FSYNC:
            await self.ops.sync_handle(req.fh, h)
            return 0
        if req.opcode == FUSE_LSEEK:
            if req.mode == os.SEEK_DATA:
                return await img.seek_data(req.offset)
            if req.mode == os.SEEK_HOLE:
                return await img.seek_hole(req.offset)
            raise OSError(errno.EINVAL, f"lseek whence {req.mode}")
        if self.ops.read_only or not img.writable:
            raise OSError(errno.EROFS, "read-only")
        await self._fallocate(h, req)
        h.wrote = True  # its close flushes, as after a write
        return 0

    async def _fallocate(self, h, req: DirectRequest) -> None:
        img, mode, end = h.image, req.mode, req.offset + req.length
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise OSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
        if not mode & FALLOC_FL_KEEP_SIZE and end > img.size:
            if not (self.ops.growable or h.created):  # as a write past the end (fuse/operations.py _past_the_end)
                raise OSError(errno.ENOSPC, f"fallocate to {end} goes past the end of the "
                                            f"disk ({img.size} bytes; resize it with truncate, or mount -o growable)")
            async with self.ops.fast.paused(h.inode):  # the size C serves changes
                await img.grow_to(end)
        if mode & FALLOC_FL_PUNCH_HOLE:
            await img.discard(req.offset, req.length, h.mode)
        elif mode & FALLOC_FL_ZERO_RANGE:
            await img.zero_range(req.offset, req.length, h.mode)
        else:
            await img.allocate(req.offset, req.length, h.mode)

    def _describe(self, req: DirectRequest) -> str:
        h = self.ops.handles.get(req.fh)
        what = image_named(h.entry) if h is not None else f"handle {req.fh} (closed)"
        return f"{_name(req)} of {what} at guest offset {req.offset}, {req.length} bytes, from pid {req.pid}"

    def _warn(self, req: DirectRequest, why: str, *, logged: bool = False) -> None:
        """One line naming the request, its image and range (as fuse/operations.py's), kept as the mount's last failure."""
        line = f"{self._describe(req)}: {why}"
        if not logged:
            log.warning("%s", line)
        self.ops.failures.record(line)


def _name(req: DirectRequest) -> str:
    if req.opcode == FUSE_FSYNC:
        return "fsync"
    if req.opcode == FUSE_LSEEK:
        return {os.SEEK_DATA: "SEEK_DATA", os.SEEK_HOLE: "SEEK_HOLE"}.get(req.mode, "lseek")
    return f"fallocate({req.mode:#x})"
