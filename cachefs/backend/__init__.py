"""The backend: async pread/pwrite/fdatasync on the file that holds an image.

This layer owns the backing file and nothing above it: it knows offsets and
bytes, not clusters, cache modes or FUSE. It must not import cachefs.qcow2
or pyfuse3 (tests/test_backend.py checks). The layers above talk to the
``Backend`` protocol, so a core test can swap the real file for
``MemoryBackend``, and a fault test can wrap either in ``FaultyBackend``.
Three backends drive a real file, one per *submitter*, what ``--aio``
picks to carry requests to the kernel: ``FileBackend`` (``threads``: a
thread per syscall, buffered or O_DIRECT), ``AioBackend`` (``native``:
Linux AIO, O_DIRECT only) and ``UringBackend`` (``io_uring``: buffered or
O_DIRECT). The last two complete into an eventfd, no thread per request,
through what they share, ``eventfd.EventfdBackend``.

Contract shared by every backend:

- ``pread(offset, length)`` returns ``length`` bytes, or fewer only when the
  file ends first (never zero-padded: the caller pads, since only it knows
  whether reading past the end is legal).
- ``pwrite(offset, data)`` writes all of ``data`` or raises OSError; a write
  past the end extends the file (the gap reads as zeros).
- ``fdatasync()`` makes every *completed* ``pwrite`` durable.
- ``size()`` is the current file size, cheap enough for the trio thread.
- Errors are OSError with the kernel's errno; translating them is the job of
  the layer that knows what the bytes mean.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs

#: O_DIRECT alignment of offsets, lengths and buffer addresses. 4096 covers
#: every logical block size a backing device is expected to have.
ALIGN = 4096


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

    def snapshot(self) -> IOCounters:
        return attrs.evolve(self)


@runtime_checkable
class Backend(Protocol):
    fd: int | None  # for locking and /proc fdinfo; None for in-memory backends
    direct: bool  # opened O_DIRECT (FileBackend) or emulating its alignment
    counters: IOCounters

    async def pread(self, offset: int, length: int) -> bytes: ...

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    async def fdatasync(self) -> None: ...

    async def truncate(self, size: int) -> None: ...

    def size(self) -> int: ...

    def close(self) -> None: ...


# Imported last: the implementations import ALIGN and IOCounters from here.
from .eventfd import SubmitterUnavailable  # noqa: E402
from .aio import AioBackend, AioUnavailable  # noqa: E402
from .uring import UringBackend, UringUnavailable  # noqa: E402
from .faulty import FaultyBackend, Fault, RecordingBackend, Sync, Truncate, Write, replay  # noqa: E402
from .file import FileBackend, buffer_pool_stats, filesystem_type  # noqa: E402
from .memory import MemoryBackend  # noqa: E402

__all__ = [
    "ALIGN",
    "Backend",
    "IOCounters",
    "buffer_pool_stats",
    "FileBackend",
    "AioBackend",
    "AioUnavailable",
    "UringBackend",
    "UringUnavailable",
    "SubmitterUnavailable",
    "filesystem_type",
    "MemoryBackend",
    "FaultyBackend",
    "Fault",
    "RecordingBackend",
    "Write",
    "Sync",
    "Truncate",
    "replay",
]
