"""Repair on a file descriptor: qcow2/repair.py's requests carried out with os calls.

Two callers: ``cachefs check --repair`` (cli/check.py) and the open of an
image not closed cleanly (its dirty bit: lazy refcounts, or a cachefs mount's
reservation; opening.open_image), which rebuilds refcounts
before its first write, as QEMU does. Neither imports the other: this module
is below both. The I/O is synchronous and buffered (never O_DIRECT: the
repair reads and writes unaligned ranges); the image layer runs it in a
worker thread.
"""

from __future__ import annotations

import os

from cachefs.qcow2 import repair as qrepair
from cachefs.qcow2.plan import run_sync


def reader(fd: int, progress=None):
    """A plan.py ``pread`` on ``fd``; ``progress(n)`` is told every read's length."""
    def pread(off: int, n: int) -> bytes:
        if progress is not None:
            progress(n)
        return os.pread(fd, n, off)
    return pread


class FileIO:
    """plan.py's write requests on a file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def pwrite(self, offset: int, data) -> None:
        os.pwrite(self.fd, data, offset)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def truncate(self, size: int, grow: bool) -> None:
        now = os.fstat(self.fd).st_size
        if (now < size) if grow else (now > size):
            os.ftruncate(self.fd, size)


def apply_writes(fd: int, writes) -> int:
    """Apply repair writes in qcow2.repair.repair's order, then make them durable. Returns their number."""
    return run_sync(qrepair.write_repair(writes), reader(fd), FileIO(fd))


def repair_fd(fd: int, result, mode: str) -> int:
    """Repair what ``result`` (a check of ``fd``) found, in ``mode`` ("leaks" or "all")."""
    writes = run_sync(qrepair.repair(result, mode), reader(fd))
    return apply_writes(fd, writes)


def repair_dirty_sync(fd: int) -> None:
    """An image that was not closed cleanly (dirty bit set): rebuild refcounts, clear the dirty bit.

    QEMU does the same on read-write open (qcow2_check_refcounts with
    BDRV_FIX_ERRORS | BDRV_FIX_LEAKS). Raises CorruptImage if it cannot.
    """
    size = os.fstat(fd).st_size
    writes = run_sync(qrepair.rebuild_refcounts(size), reader(fd))
    apply_writes(fd, writes)
