"""Test wrappers: FaultyBackend injects errors, RecordingBackend logs writes.

Both wrap any backend and pass everything else through, like an nbdkit
filter. They exist for the fault matrix (STYLE.md habit 8: every named
metadata write x {EIO, ENOSPC} x {once, always}) and for power-cut
simulation: replaying a prefix of the recorded writes onto the image as it
was at the last completed sync.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Iterable
from typing import Literal

import attrs
import trio

from .base import Backend, IOCounters

Op = Literal["pread", "pwrite", "fdatasync", "truncate"]
OPS: tuple[str, ...] = ("pread", "pwrite", "fdatasync", "truncate")


class _Wrapper:
    """Pass-through of the non-I/O parts of the protocol to ``inner``."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    @property
    def fd(self) -> int | None:
        return self.inner.fd

    @property
    def direct(self) -> bool:
        return self.inner.direct

    @property
    def counters(self) -> IOCounters:
        return self.inner.counters

    def size(self) -> int:
        return self.inner.size()

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------- faults


@attrs.define
class Fault:
    """One injected failure rule; ``inject`` returns it so a test can look."""

    op: str
    errno: int
    # Invariant: None means "always"; otherwise the calls left to fail (> 0
    # while the rule is armed; the rule is dropped when it reaches 0).
    times: int | None
    offset_range: tuple[int, int] | None  # [lo, hi): requests overlapping it
    hits: int = 0

    def matches(self, op: str, offset: int, length: int) -> bool:
        if op != self.op:
            return False
        if self.offset_range is None:
            return True
        lo, hi = self.offset_range
        return offset < hi and lo < max(offset + length, offset + 1)


class FaultyBackend(_Wrapper):
    """Makes chosen calls raise OSError(errno) instead of reaching ``inner``.

    A failing call does nothing to ``inner``: a failed pwrite wrote nothing.
    Rules are tried in the order they were added; the first match fires.
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.faults: list[Fault] = []
        self.injected = 0  # calls failed so far, all rules

    def inject(
        self,
        op: Op,
        errno: int = errno_mod.EIO,
        *,
        times: int | None = 1,
        offset_range: tuple[int, int] | None = None,
    ) -> Fault:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None, not {times}")
        if offset_range is not None and op in ("fdatasync", "truncate"):
            raise ValueError(f"{op} has no offset; offset_range applies to pread/pwrite")
        fault = Fault(op, errno, times, offset_range)
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()

    async def _maybe_fail(self, op: str, offset: int = 0, length: int = 0) -> None:
        for fault in self.faults:
            if fault.matches(op, offset, length):
                fault.hits += 1
                self.injected += 1
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times == 0:
                        self.faults.remove(fault)
                await trio.lowlevel.checkpoint()
                raise OSError(fault.errno, f"injected: {os.strerror(fault.errno)}")

    async def pread(self, offset: int, length: int) -> bytes:
        await self._maybe_fail("pread", offset, length)
        return await self.inner.pread(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self._maybe_fail("pwrite", offset, memoryview(data).nbytes)
        await self.inner.pwrite(offset, data)

    async def fdatasync(self) -> None:
        await self._maybe_fail("fdatasync")
        await self.inner.fdatasync()

    async def truncate(self, size: int) -> None:
        await self._maybe_fail("truncate")
        await self.inner.truncate(size)


# ---------------------------------------------------------------- recording


@attrs.frozen
class Write:
    offset: int
    data: bytes


@attrs.frozen
class Truncate:
    size: int


@attrs.frozen
class Sync:
    """A completed fdatasync.

    ``covers``: the number of events recorded when the sync was *issued*.
    Events before that index are durable once this one exists; events
    between ``covers`` and this one raced with the sync and may not be.
    """

    covers: int


Event = Write | Truncate | Sync


class RecordingBackend(_Wrapper):
    """Appends every completed pwrite, truncate and fdatasync to ``events``.

    A write is recorded when it completes (only completed writes are covered
    by a later sync). Failed calls are not recorded.
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.events: list[Event] = []

    def last_sync(self) -> int:
        """Index one past the newest Sync event (0 if none)."""
        for i in range(len(self.events) - 1, -1, -1):
            if isinstance(self.events[i], Sync):
                return i + 1
        return 0

    async def pread(self, offset: int, length: int) -> bytes:
        return await self.inner.pread(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        snapshot = bytes(data)  # the caller may reuse its buffer afterwards
        await self.inner.pwrite(offset, data)
        self.events.append(Write(offset, snapshot))

    async def truncate(self, size: int) -> None:
        await self.inner.truncate(size)
        self.events.append(Truncate(size))

    async def fdatasync(self) -> None:
        covers = len(self.events)
        await self.inner.fdatasync()
        self.events.append(Sync(covers))


def replay(base: bytes | bytearray, events: Iterable[Event]) -> bytearray:
    """The file after applying ``events`` (Sync is a no-op) to ``base``."""
    out = bytearray(base)
    for ev in events:
        if isinstance(ev, Write):
            end = ev.offset + len(ev.data)
            if ev.offset > len(out):
                out.extend(bytes(ev.offset - len(out)))
            out[ev.offset : end] = ev.data
        elif isinstance(ev, Truncate):
            if ev.size < len(out):
                del out[ev.size :]
            else:
                out.extend(bytes(ev.size - len(out)))
    return out
