"""The sans-I/O protocol between the qcow2 engine and whoever does the I/O.

Engine methods that may need metadata from disk are generators: they yield a
:class:`ReadRequest` and are sent back the bytes; their return value is the
plan. This keeps every decision in pure code (STYLE.md, the h11 model) while
the caller decides how reads happen: from a bytearray in tests, or from an
async backend under trio.
"""

from __future__ import annotations

import enum
from typing import Any, Awaitable, Callable, Generator

import attrs


@attrs.frozen
class ReadRequest:
    offset: int
    length: int


Gen = Generator[ReadRequest, bytes, Any]


def run_sync(gen: Gen, pread: Callable[[int, int], bytes]):
    """Drive an engine generator with a synchronous reader (tests, the checker)."""
    try:
        req = next(gen)
        while True:
            req = gen.send(pread(req.offset, req.length))
    except StopIteration as stop:
        return stop.value


async def run_async(gen: Gen, pread: Callable[[int, int], Awaitable[bytes]]):
    """Drive an engine generator with an async reader (the image layer)."""
    try:
        req = next(gen)
        while True:
            data = await pread(req.offset, req.length)
            req = gen.send(data)
    except StopIteration as stop:
        return stop.value


class ExtentKind(enum.Enum):
    ZERO = "zero"            # unallocated or zero cluster: reads as zeros
    DATA = "data"            # plain host data at host_offset
    COMPRESSED = "compressed"
    DAMAGED = "damaged"      # the metadata behind this range is invalid: EIO


@attrs.frozen
class Extent:
    """A piece of a guest read: where its bytes come from."""

    guest_offset: int
    length: int
    kind: ExtentKind
    host_offset: int = 0          # DATA: host byte offset of guest_offset
    compressed: Any = None        # COMPRESSED: format.Compressed of the whole cluster
    in_cluster: int = 0           # COMPRESSED: offset of guest_offset inside its cluster


@attrs.frozen
class DataWrite:
    """Guest data to put at a host offset before the plan's metadata may commit."""

    host_offset: int
    data: Any  # bytes or memoryview


@attrs.frozen
class L2Update:
    """One L2 entry change, applied at commit (after the data writes finished)."""

    vcluster: int
    new_entry: int
    old_entry: int
    new_cluster: int | None   # host cluster index allocated for it (refcount already raised)
    table: Any = attrs.field(eq=False, repr=False)  # the L2 meta.Table holding the entry
    index: int = 0
    # The new entry may be written only once the data is durable (invariant
    # 3): the cluster held stale bytes, or the copied head/tail hold old data.
    data_first: bool = True


@attrs.frozen
class WritePlan:
    data_writes: tuple[DataWrite, ...]
    updates: tuple[L2Update, ...]

    @property
    def needs_commit(self) -> bool:
        return bool(self.updates)
