"""MemoryBackend: the backend protocol over a bytearray, for tests of the core.

Every call passes through one trio checkpoint so concurrent tasks interleave
as they would against a real file, but each operation is atomic.

``direct=True`` does not change what is stored; it only counts what an
O_DIRECT file would have had to bounce (``bounce_requests`` and padded
``direct_bytes``), so a core test can assert that a path does no
read-modify-write without a real disk (seed 003: compressed clusters are
written whole so an O_DIRECT backend does no RMW).
"""

from __future__ import annotations

import errno

import trio

from .base import IOCounters, align_down, align_up


class MemoryBackend:
    def __init__(self, data: bytes | bytearray | None = None, *, direct: bool = False) -> None:
        # A bytearray given here is used in place, so a test can inspect it.
        self.data = data if isinstance(data, bytearray) else bytearray(data or b"")
        self.direct = direct
        self.fd: int | None = None
        self.closed = False
        self.counters = IOCounters()

    def __repr__(self) -> str:
        return f"<MemoryBackend {len(self.data)} bytes{' direct' if self.direct else ''}>"

    def _check(self, offset: int, length: int = 0) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "backend is closed")
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, f"bad range {offset}+{length}")

    def _count_direct(self, offset: int, length: int) -> None:
        if not self.direct or length == 0:
            return
        lo, hi = align_down(offset), align_up(offset + length)
        if (lo, hi) != (offset, offset + length):
            self.counters.bounce_requests += 1
        self.counters.direct_bytes += hi - lo

    def size(self) -> int:
        self._check(0)
        return len(self.data)

    def close(self) -> None:
        self.closed = True

    async def pread(self, offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        self._check(offset, length)
        out = bytes(self.data[offset : offset + length])
        self._count_direct(offset, length)
        self.counters.reads += 1
        self.counters.bytes_read += len(out)
        return out

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        data = memoryview(data).cast("B") if isinstance(data, memoryview) else data
        self._check(offset)
        n = len(data)
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset : offset + n] = data
        self._count_direct(offset, n)
        self.counters.writes += 1
        self.counters.bytes_written += n

    async def fdatasync(self) -> None:
        await trio.lowlevel.checkpoint()
        self._check(0)
        self.counters.fdatasyncs += 1

    async def truncate(self, size: int) -> None:
        await trio.lowlevel.checkpoint()
        self._check(size)
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))
