"""An image over recorded memory, and what a power cut of it may leave (plain helper module).

A qcow2 image (or a raw one) runs over an in-memory file whose every write
and fdatasync a :class:`RecordingBackend` records, through one
:class:`ModeView` per cache mode (write-through emulated as a sync after each
write). A workload's requests are :class:`Op` records, stamped with how many
events had been recorded when each was issued and when it returned; from
those, :func:`guaranteed` and :func:`promised` say which writes a cut must
keep, and :func:`cut_state` and :func:`durable_state` build the file a cut
leaves. Used by tests/test_cache_modes.py, the power-cut simulations
(tests/test_powercut*.py, tests/test_compress_powercut.py) and the core tests
that need a real image over memory.
"""

from __future__ import annotations

import random

import attrs
import trio

from cachefs.backend import IOCounters, MemoryBackend, RecordingBackend, replay
from cachefs.backend.faulty import FaultyBackend, Sync, Write
from cachefs.image.backends import BackendSet
from cachefs.image.raw import RawImage
from cachefs.image.qcow2image import Qcow2Image
from cachefs.policy import CacheMode
from cachefs.qcow2.create import new_image
from cachefs.qcow2.engine import open_engine
from cachefs.qcow2.plan import run_async


class ModeView:
    """What one mode's descriptor is, over a shared recorded file.

    ``write_through`` emulates O_DSYNC: a write is durable when it returns,
    recorded as a Sync right after it. Own counters, as a real descriptor.
    """

    def __init__(self, inner, mode: CacheMode):
        self.inner, self.mode = inner, mode
        self.counters = IOCounters()
        self.fd = None
        self.direct = mode.direct

    def size(self):
        return self.inner.size()

    def close(self):
        pass

    async def pread(self, offset, length):
        return await self.inner.pread(offset, length)

    async def pwrite(self, offset, data):
        await self.inner.pwrite(offset, data)
        self.counters.writes += 1
        if self.mode.write_through:
            await self.inner.fdatasync()

    async def truncate(self, size):
        await self.inner.truncate(size)

    async def fdatasync(self):
        await self.inner.fdatasync()
        self.counters.fdatasyncs += 1


def fresh_qcow2(size: int, cluster_bits: int = 16) -> bytearray:
    buf = bytearray()
    for off, data in new_image(size, cluster_bits=cluster_bits):
        if len(buf) < off + len(data):
            buf.extend(bytes(off + len(data) - len(buf)))
        buf[off:off + len(data)] = data
    return buf


async def open_recorded(buf: bytearray, mode, *, faulty: bool = False, raw: bool = False,
                        cache_bytes: int | None = None):
    store = MemoryBackend(buf)
    inner = FaultyBackend(store) if faulty else store
    rec = RecordingBackend(inner)
    backends = BackendSet(lambda m: ModeView(rec, m))
    if raw:
        return RawImage("mem.raw", backends, None, True, mode), rec, inner
    be = backends.get(mode.default)
    kw = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    engine = await run_async(open_engine(len(buf), writable=True, **kw), be.pread)
    return Qcow2Image("mem.qcow2", backends, None, True, engine, mode), rec, inner


@attrs.frozen
class Op:
    kind: str              # "write" | "flush"
    offset: int = 0
    data: bytes = b""
    started: int = 0       # events recorded when the op was issued
    done: int = 0          # events recorded when it returned


def guaranteed(ops: list[Op], cut: int, mode: CacheMode) -> set[int]:
    """Indexes of the writes the mode promises are durable once ``cut`` events happened."""
    safe: set[int] = set()
    if mode.write_through:
        safe |= {i for i, op in enumerate(ops) if op.kind == "write" and op.done <= cut}
    if mode.honour_flush:
        covered_upto = max((i for i, op in enumerate(ops) if op.kind == "flush" and op.done <= cut),
                           default=-1)
        safe |= {i for i in range(covered_upto) if ops[i].kind == "write"}
    return safe


def cut_state(base: bytes, events: list, cut: int, rng: random.Random) -> bytearray:
    """The file after a power cut once ``cut`` events happened: the durable prefix plus a random subset."""
    last_sync = next((i for i in range(cut - 1, -1, -1) if isinstance(events[i], Sync)), None)
    durable = events[:events[last_sync].covers] if last_sync is not None else []
    maybe = [e for e in events[len(durable):cut] if isinstance(e, Write)]
    return replay(base, list(durable) + [e for e in maybe if rng.random() < 0.5])


class YieldingView(ModeView):
    """Every write and sync lets the other writers run first (and, for syncs, complete writes)."""

    async def pwrite(self, offset, data):
        await trio.sleep(0)
        await super().pwrite(offset, data)

    async def fdatasync(self):
        await trio.sleep(0)
        await super().fdatasync()


def durable_state(base: bytes, events: list, cut: int, rng: random.Random) -> bytearray:
    """The durable prefix (the widest a completed sync covers) plus a random subset of the rest."""
    covers = max((e.covers for e in events[:cut] if isinstance(e, Sync)), default=0)
    maybe = [e for e in events[covers:cut] if isinstance(e, Write)]
    return replay(base, list(events[:covers]) + [e for e in maybe if rng.random() < 0.5])


def promised(ops: list[Op], cut: int, write_through: bool) -> set[int]:
    if write_through:
        return {i for i, op in enumerate(ops) if op.kind == "write" and op.done <= cut}
    flushes = [op.started for op in ops if op.kind == "flush" and op.done <= cut]
    start = max(flushes, default=-1)
    return {i for i, op in enumerate(ops) if op.kind == "write" and op.done <= start}
