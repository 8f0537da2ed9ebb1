"""The sans-I/O protocol between the qcow2 core and whoever does the I/O.

The core's generators yield requests and are sent back the results; their
return value is the plan. This keeps every decision in pure code (the h11
model; docs/design.md, "The core does no I/O") while the caller decides how
I/O happens: over a bytearray in tests and in ``cachefs check``, over an
async backend under trio in the image layer.

- :class:`ReadRequest`: the engine needs metadata (or COW source data) from
  the file; it is sent back the bytes.
- :class:`BackingReadRequest`: the engine needs guest bytes of the backing
  chain (the head and tail a partial write into a cluster unallocated here
  keeps); it is sent back exactly that many bytes, zeros past the backing
  image's end. The core never opens a backing file: the driver's ``backing``
  callable does.
- :class:`WriteRequest`, :class:`SyncRequest`, :class:`TruncateRequest`: the
  metadata queue (metaqueue.py) writes tables, makes them durable, and
  extends or trims the file. They are sent back nothing, except a
  WriteRequest that ``reports_failure``: it is sent back None, or the OSError
  its write raised, so the generator can go on with its other writes.

:func:`run_sync` and :func:`run_async` drive any of these generators: reads
go to ``pread``, backing reads to ``backing``, everything else to ``io`` (an
object with ``pwrite``, ``sync`` and ``truncate``; async ones for
:func:`run_async`).
"""

from __future__ import annotations

import enum
from typing import Any, Awaitable, Callable, Generator

import attrs


@attrs.frozen
class ReadRequest:
    offset: int
    length: int


@attrs.frozen
class BackingReadRequest:
    """Guest bytes [guest_offset, guest_offset+length) of the backing chain (spec "Cluster
    mapping": an unallocated cluster reads from the backing file, zeros past its end)."""

    guest_offset: int
    length: int


@attrs.frozen
class WriteRequest:
    offset: int
    data: Any  # bytes or memoryview
    # True: a failed write is sent back as its OSError instead of raising out
    # of the driver (a writeout tries every ready item, metaqueue.py).
    reports_failure: bool = attrs.field(default=False, kw_only=True)

    def perform(self, io):
        return io.pwrite(self.offset, self.data)


@attrs.frozen
class SyncRequest:
    """Make every completed write durable (fdatasync)."""

    def perform(self, io):
        return io.sync()


@attrs.frozen
class TruncateRequest:
    """Set the file's length to ``size``, but only in one direction.

    ``grow``: extend a shorter file (a hole: no disk space); otherwise cut a
    longer one. The queue knows how long the file must be, not how long it is
    (guest data writes past the end extend it too).
    """

    size: int
    grow: bool

    def perform(self, io):
        return io.truncate(self.size, self.grow)


@attrs.frozen
class DiscardRequest:
    """Give host bytes [offset, offset+length) back to the filesystem (punch a hole).

    Clusters whose refcount the queue just lowered to zero, so a guest's
    discard frees disk space as QEMU's discard=unmap does; only yielded when
    the queue was told its driver punches (``MetaQueue.punch_freed``).
    """

    offset: int
    length: int

    def perform(self, io):
        return io.discard(self.offset, self.length)


Request = ReadRequest | BackingReadRequest | WriteRequest | SyncRequest | TruncateRequest | DiscardRequest
Gen = Generator[Request, Any, Any]


def run_sync(gen: Gen, pread: Callable[[int, int], bytes], io=None,
             backing: Callable[[int, int], bytes] | None = None):
    """Drive a core generator with synchronous I/O (tests, the checker).

    ``backing(guest_offset, length)``: the backing chain's guest bytes, for an image that has one.
    """
    try:
        req = next(gen)
        while True:
            if type(req) is ReadRequest:
                req = gen.send(pread(req.offset, req.length))
                continue
            if type(req) is BackingReadRequest:
                req = gen.send(_no_backing(req) if backing is None else backing(req.guest_offset, req.length))
                continue
            try:
                data = req.perform(io)
            except OSError as exc:
                if not _reports(req):
                    raise
                data = exc
            req = gen.send(data)
    except StopIteration as stop:
        return stop.value


async def run_async(gen: Gen, pread: Callable[[int, int], Awaitable[bytes]], io=None,
                    backing: Callable[[int, int], Awaitable[bytes]] | None = None):
    """Drive a core generator with async I/O (the image layer); ``backing`` as for :func:`run_sync`."""
    try:
        req = next(gen)
        while True:
            if type(req) is ReadRequest:
                data = await pread(req.offset, req.length)
            elif type(req) is BackingReadRequest:
                data = _no_backing(req) if backing is None else await backing(req.guest_offset, req.length)
            else:
                try:
                    data = await req.perform(io)
                except OSError as exc:
                    if not _reports(req):
                        raise
                    data = exc
            req = gen.send(data)
    except StopIteration as stop:
        return stop.value


def _no_backing(req: BackingReadRequest):
    raise RuntimeError(f"the core asked for backing bytes at guest offset {req.guest_offset:#x}, "
                       f"but its driver was given no backing reader (a bug in the caller)")


def _reports(req: Request) -> bool:
    """Is a failure of ``req`` sent back to the generator (rather than raised out of the driver)?"""
    return type(req) is WriteRequest and req.reports_failure


# ---------------------------------------------------------------- plans

class ExtentKind(enum.Enum):
    ZERO = "zero"            # zero cluster, or unallocated without a backing file: reads as zeros
    # Unallocated in an image with a backing file: the backing chain's bytes at the same guest
    # offset, zeros past its end (spec "Cluster mapping"). The core never reads them itself.
    BACKING = "backing"
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

    def continued_by(self, nxt: Extent) -> bool:
        """Zeros, backing ranges and damage join their kind; data joins when it is contiguous on the host too."""
        if nxt.kind is not self.kind:
            return False
        if self.kind is ExtentKind.DATA:
            return self.host_offset + self.length == nxt.host_offset
        return self.kind is not ExtentKind.COMPRESSED

    @staticmethod
    def span(run: list[Extent], source=None) -> Extent:
        first = run[0]
        return attrs.evolve(first, length=sum(e.length for e in run))


@attrs.frozen
class DataWrite:
    """Guest data to put at a host offset before the plan's metadata may commit."""

    host_offset: int
    data: Any  # bytes, bytearray or memoryview
    # Where ``data`` starts in the guest request's buffer when it is a slice of
    # it (None: a buffer of its own, e.g. a COW body with old head and tail).
    at: int | None = None
    # A copy on write whose old bytes the caller reads (Engine.plan_write with defer_cow): the
    # whole new cluster is CowFill.body(old cluster's bytes, data), written at host_offset.
    fill: CowFill | None = None

    def continued_by(self, nxt: DataWrite) -> bool:
        return self.fill is None and nxt.fill is None and self.host_offset + len(self.data) == nxt.host_offset

    @staticmethod
    def span(run: list[DataWrite], source) -> DataWrite:
        """One write for a host-contiguous run: a slice of the request when
        the run is one (no copy), else the parts joined."""
        first, last = run[0], run[-1]
        if all(a.at is not None and b.at == a.at + len(a.data) for a, b in zip(run, run[1:])):
            return DataWrite(first.host_offset, source[first.at:last.at + len(last.data)], first.at)
        return DataWrite(first.host_offset, b"".join(w.data for w in run))


class CowSource(enum.Enum):
    DATA = "data"              # a host cluster of this image (shared with a snapshot)
    COMPRESSED = "compressed"  # a compressed cluster: read ``length`` bytes, then decompress
    BACKING = "backing"        # the backing chain's bytes at the same guest offset


@attrs.frozen
class CowFill:
    """Where the old bytes around a partial write come from, read by the caller without the
    image's lock (QEMU's qcow2 copies outside its lock too: the guest cluster is claimed, and the
    old host cluster is not freed while I/O is in flight, metaqueue.py)."""

    source: CowSource
    offset: int       # host offset (DATA, COMPRESSED) or guest offset (BACKING)
    length: int       # bytes to read there
    in_cluster: int   # where the new bytes go in the cluster
    compressed: Any = None  # format.Compressed, for COMPRESSED

    def body(self, old: bytes, data, cluster_size: int) -> bytearray:
        """The new cluster: the old bytes (zero padded) with ``data`` at in_cluster."""
        out = bytearray(old[:cluster_size]).ljust(cluster_size, b"\0")
        out[self.in_cluster:self.in_cluster + len(data)] = data
        return out


def merge_runs(pieces: list, source=None) -> list:
    """Adjacent pieces that continue each other become one (extents of a read,
    data writes of a write): one backend request per run, not per cluster.
    ``source``: the request buffer data writes may be slices of."""
    if len(pieces) < 2:
        return pieces
    out, run = [], [pieces[0]]
    for p in pieces[1:]:
        if run[-1].continued_by(p):
            run.append(p)
            continue
        out.append(run[0] if len(run) == 1 else type(p).span(run, source))
        run = [p]
    out.append(run[0] if len(run) == 1 else type(run[0]).span(run, source))
    return out


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
