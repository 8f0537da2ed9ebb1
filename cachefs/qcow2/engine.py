"""The qcow2 engine: guest requests in, plans out. No I/O, no trio.

:class:`Engine` is a thin planner over the parts QEMU's qcow2 driver also
keeps apart (block/qcow2*.c):

- cluster.py: guest-to-host mapping through the L1 and L2 tables
  (qcow2-cluster.c), and the one place a mapping changes;
- refcount.py: host cluster refcounts and the reservation (qcow2-refcount.c);
- overlap.py: which metadata owns each host cluster, and the corrupt bit
  (qcow2_check_metadata_overlap);
- meta.py: dirty tables with their ordering edges, the table cache
  (qcow2-cache.c);
- metaqueue.py: writing the dirty metadata out in that order, one sync per
  round, and the reservation each flush makes.

Reading: :meth:`Engine.plan_read` maps a guest range to extents (zero, data at
a host offset, compressed, backing, or damaged).

Backing files (spec "Cluster mapping"): in an image with one, a cluster
unallocated here reads the backing chain's bytes at the same guest offset
(zeros past its end), and a zero cluster reads zeros. The core reports the
name (:attr:`Engine.backing`) and yields plan.BackingReadRequest when a write
must copy those bytes; it never opens the backing file or resolves its name.

Writing is two-phase, as in qcow2-cluster.c: :meth:`Engine.plan_write`
decides where each cluster's bytes go, raising refcounts for new clusters, and
returns the data writes; the caller performs them, then calls
:meth:`Engine.commit` (publish the L2 entries) or :meth:`Engine.abort`. A
reader therefore never sees an L2 entry whose data is not yet written.

All generators here yield plan.ReadRequest (and plan.BackingReadRequest) and
are driven by plan.run_sync or plan.run_async.
"""

from __future__ import annotations

import zlib

import attrs

from cachefs.errors import CorruptImage, DamagedMetadata, UnsupportedImage, UnsupportedOperation
from cachefs.qcow2 import bitmaps
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.cluster import ClusterMap
from cachefs.qcow2.meta import HeaderItem, TableCache
from cachefs.qcow2.metaqueue import MetaQueue
from cachefs.qcow2.overlap import Overlap
from cachefs.qcow2.plan import (BackingReadRequest, CowFill, CowSource, DataWrite, Extent, ExtentKind, L2Update,
                                ReadRequest, WritePlan, merge_runs)
from cachefs.qcow2.refcount import Allocation, Refcounts

DEFAULT_CACHE_BYTES = 32 << 20


@attrs.define
class EngineCounters:
    reserved: int = 0           # clusters taken into reservations
    from_reservation: int = 0   # allocations served by one
    data_first: int = 0         # L2 updates that had to wait for their data (an extra sync)
    metadata_writes: int = 0
    metadata_bytes: int = 0
    batches: int = 0
    allocations: int = 0
    frees: int = 0
    zero_writes: int = 0
    cow_reads: int = 0
    backing_cow_reads: int = 0  # partial writes that copied the rest of a cluster from the backing chain


def open_engine(file_size: int, *, writable: bool, cache_bytes: int = DEFAULT_CACHE_BYTES,
                drop_bitmaps: bool = False):
    """Generator: read and validate the header and top-level tables, return an Engine.

    ``drop_bitmaps``: an image with persistent bitmaps opens writable, and they are deleted
    (docs/design.md, "Open-time policy"); otherwise such an image opens read-only.
    """
    hdr = yield from fmt.read_header(file_size)
    refuse = _unsupported(hdr)
    if refuse:
        raise UnsupportedImage(refuse)
    l1_buf = yield ReadRequest(hdr.l1_table_offset, hdr.l1_size * 8)
    rt_buf = yield ReadRequest(hdr.refcount_table_offset, hdr.refcount_table_clusters * hdr.cluster_size)
    if len(l1_buf) < hdr.l1_size * 8 or len(rt_buf) < hdr.refcount_table_clusters * hdr.cluster_size:
        raise CorruptImage("L1 or refcount table is truncated")
    eng = Engine(hdr, fmt.decode_table(bytes(l1_buf)), fmt.decode_table(bytes(rt_buf)), file_size,
                 writable=writable, cache_bytes=cache_bytes, drop_bitmaps=drop_bitmaps)
    if eng.writable:
        yield from eng.refs.scan_end()
        if bitmaps.count(hdr):
            yield from eng.drop_bitmaps(file_size)
    return eng


def _unsupported(hdr: fmt.Header) -> str | None:
    """Why an image cannot be served at all (one line), or None."""
    if hdr.crypt_method:
        return "encrypted images are not supported"
    if hdr.incompatible & fmt.INCOMPAT_DATA_FILE:
        return "images with an external data file are not supported"
    if hdr.incompatible & fmt.INCOMPAT_EXTL2:
        return "images with extended L2 entries (subclusters) are not supported"
    return None


OPENED_READ_ONLY = "opened read-only"


def _read_only_reason(hdr: fmt.Header, drop_bitmaps: bool = False) -> str | None:
    """Why an image we can read must not be written, or None."""
    if hdr.corrupt:
        return "the image is marked corrupt; run 'cachefs check --repair all'"
    n = bitmaps.count(hdr)
    if n and not drop_bitmaps:
        return (f"it has {_count(n, 'persistent dirty bitmap')}, which cachefs does not maintain yet; "
                f"mount with -o drop_bitmaps to write it and delete {'them' if n > 1 else 'it'}")
    return None


def _holds_data(entry: int) -> bool:
    """Does a (validated) L2 entry name host bytes: compressed, or an allocated non-zero cluster?"""
    return bool(entry & fmt.L2_COMPRESSED or entry & fmt.OFFSET_MASK and not entry & fmt.L2_ZERO)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


@attrs.frozen
class _Chunk:
    """One guest cluster's part of a write."""

    vcluster: int
    in_cluster: int   # where in the cluster it starts
    at: int           # where in the request's buffer it starts
    data: memoryview  # a slice of that buffer


@attrs.frozen
class _Slot:
    """Where a guest cluster's L2 entry lives, and what it holds now."""

    vcluster: int
    table: object  # meta.Table
    index: int
    entry: int

    def update(self, new_entry: int, new_cluster: int | None = None, *, data_first: bool = True) -> L2Update:
        return L2Update(self.vcluster, new_entry, self.entry, new_cluster, self.table, self.index, data_first)


class Engine:
    def __init__(self, hdr: fmt.Header, l1: list[int], reftable: list[int], file_size: int,
                 *, writable: bool, cache_bytes: int = DEFAULT_CACHE_BYTES, drop_bitmaps: bool = False):
        self.header = HeaderItem(name="header", kind="header", hdr=hdr, locate=self._locate_tables)
        self.cb = hdr.cluster_bits
        self.cs = hdr.cluster_size
        self.counters = EngineCounters()
        self.zero_cluster = bytes(self.cs)
        # An unallocated cluster reads the backing chain, not zeros (spec "Cluster mapping").
        # Invariant: the header's backing name does not change while the engine is open
        # (``cachefs rebase -u`` rewrites a closed image: format.with_backing).
        self.backed = hdr.backing_name is not None
        reason = _read_only_reason(hdr, drop_bitmaps) if writable else OPENED_READ_ONLY
        self.refs = Refcounts(self.header, reftable, TableCache(cache_bytes // self.cs), file_size)
        self.overlap = Overlap(self.header, self.refs, reason)
        self.queue = MetaQueue(self.header, self.refs, self.overlap, self.counters)
        self.map = ClusterMap(self.header, l1, self.refs, self.overlap, self.queue)
        self.queue.track(self.map.l1_chunks, self.refs.chunks)
        self.refs.on_table_moved = self._free_after_header
        self.dropped_bitmaps: tuple[list[str], int] | None = None  # (names, clusters freed): drop_bitmaps
        keep = fmt.AUTOCLEAR_BITMAPS if bitmaps.count(hdr) else 0  # drop_bitmaps clears it (below)
        if writable and reason is None and hdr.autoclear & ~keep:
            # spec "autoclear_features": a writer may write an image only after clearing the
            # bits of the features it does not maintain (all of them here). As QEMU does at a
            # writable open; the image layer makes the header durable before serving.
            self.header.update(autoclear=hdr.autoclear & keep)

    def drop_bitmaps(self, file_size: int):
        """Generator: delete the persistent bitmaps (``-o drop_bitmaps``). The header loses the
        bitmaps extension and its autoclear bit (spec "Bitmaps extension"), and the directory's,
        tables' and data clusters are freed once that header is durable, as any dropped
        reference (invariant 2), so ``qemu-img check`` finds them neither used nor leaked."""
        found = yield from bitmaps.read_directory(self.hdr, file_size)
        clusters = yield from bitmaps.clusters(self.hdr, found, file_size)
        for c in clusters:
            if self.overlap.owner(c):
                raise CorruptImage(f"bitmap cluster {c} holds {self.overlap.owner(c)}")
        self.header.update(**bitmaps.without_bitmaps(self.hdr))
        for c in clusters:
            self.queue.defer_free(c, self.header)
        self.dropped_bitmaps = ([b.name for b in found], len(clusters))

    # ------------------------------------------------------------ properties

    @property
    def hdr(self) -> fmt.Header:
        return self.header.hdr

    @property
    def size(self) -> int:
        return self.header.hdr.size

    @property
    def backing(self) -> fmt.BackingName | None:
        """The backing file as the header names it (None: none); resolving it is the caller's job."""
        return self.header.hdr.backing

    @property
    def writable(self) -> bool:
        return self.overlap.writable

    @property
    def needs_repair(self) -> bool:
        """Crashed under lazy refcounts: refcounts must be rebuilt before writing."""
        return self.header.hdr.dirty

    @property
    def cache(self) -> TableCache:
        return self.refs.cache

    @property
    def needs_unshare(self) -> bool:
        """Does an active L1 entry name a shared L2 table (no COPIED: an internal snapshot made
        by qemu-img holds it too)? Such a table cannot be written in place
        (ClusterMap.table_for_write), so a writable image runs generation.unshare first."""
        return any(e & fmt.OFFSET_MASK and not e & fmt.L1_COPIED for e in self.map.l1)

    @property
    def alloc_from(self) -> int:
        """The first host cluster a new metadata generation (generation.py) may use: past the
        end of the allocated space, the reservation and every cluster lent to the data plane."""
        held = [*self.refs.reservation, *self.refs.lent]
        return max(self.refs.end_cluster, max(held, default=-1) + 1)

    def switch_generation(self, gen) -> None:
        """Adopt a metadata generation (generation.Generation) that write_generation made durable.

        The caller made everything durable before computing it (nothing is dirty) and holds the
        image's write lock. The reservation, lent clusters and pending frees stay: their
        refcounts were carried into the new refcount blocks (generation.py, "The refcounts").
        """
        assert not self.queue.dirty_items() and not self.queue.needs_sync, "switch_generation with dirty metadata"
        self.cache.clear()
        self.header.hdr = gen.header
        self.header.deps.clear()
        self.map.adopt_l1(list(gen.l1), gen.header.l1_table_offset)
        self.refs.adopt_table(list(gen.reftable), gen.header.refcount_table_offset,
                              gen.header.refcount_table_clusters, gen.end)

    def current_header(self) -> fmt.Header:
        return self.header.current()

    def on_mapping_change(self, callback) -> None:
        """Call ``callback(cluster.MappingChange)`` before any guest cluster's mapping changes."""
        self.map.on_change(callback)

    def _locate_tables(self, hdr: fmt.Header) -> fmt.Header:
        """The header as it must be written: pointing at the tables where they are now."""
        return attrs.evolve(hdr, l1_size=len(self.map.l1), l1_table_offset=self.map.l1_offset,
                            refcount_table_offset=self.refs.table_offset,
                            refcount_table_clusters=self.refs.table_clusters)

    def _free_after_header(self, clusters: range) -> None:
        """A moved table's old clusters are free once the header pointing elsewhere is durable."""
        for c in clusters:
            self.queue.defer_free(c, self.header)

    # ------------------------------------------------------------ reading

    def plan_read(self, offset: int, length: int):
        """Generator: the extents that make up guest bytes [offset, offset+length)."""
        pieces: list[Extent] = []
        cs = self.cs
        pos, end = offset, min(offset + length, self.size)
        while pos < end:
            vcl, inc = divmod(pos, cs)
            n = min(cs - inc, end - pos)
            try:
                entry = yield from self.map.entry(vcl)
                pieces.append(self._extent(pos, n, inc, entry))
            except DamagedMetadata:
                pieces.append(Extent(pos, n, ExtentKind.DAMAGED))
            pos += n
        return merge_runs(pieces)

    def _extent(self, pos: int, n: int, inc: int, entry: int) -> Extent:
        if entry & fmt.L2_COMPRESSED:
            return Extent(pos, n, ExtentKind.COMPRESSED, compressed=fmt.decode_compressed(entry, self.cb),
                          in_cluster=inc)
        off = entry & fmt.OFFSET_MASK
        if entry & fmt.L2_ZERO:
            return Extent(pos, n, ExtentKind.ZERO)
        if off == 0:
            return Extent(pos, n, ExtentKind.BACKING if self.backed else ExtentKind.ZERO)
        return Extent(pos, n, ExtentKind.DATA, host_offset=off + inc)

    def decompress(self, desc: fmt.Compressed, buf: bytes) -> bytes:
        """One compressed cluster's bytes (spec "Compressed Clusters Descriptor")."""
        try:
            if self.hdr.compression_type == fmt.COMPRESSION_ZSTD:
                import zstandard
                out = zstandard.ZstdDecompressor().decompressobj().decompress(buf)
            else:
                out = zlib.decompressobj(-15).decompress(buf, self.cs)
        except Exception as exc:  # zlib.error, zstandard.ZstdError: damaged data, not a bug
            raise DamagedMetadata(f"compressed cluster at {desc.offset:#x} does not decompress: {exc}") from None
        if len(out) < self.cs:
            raise DamagedMetadata(f"compressed cluster at {desc.offset:#x} is short ({len(out)} bytes)")
        return out[:self.cs]

    # ------------------------------------------------------------ writing

    def plan_write(self, offset: int, data, *, defer_cow: bool = False):
        """Generator: a WritePlan for guest bytes at offset. Caller holds the image's write lock.

        ``defer_cow``: a partial write into a cluster whose old bytes must be kept (shared with a
        snapshot, compressed, or the backing chain's) is planned without reading them: its
        DataWrite carries a plan.CowFill, and the caller reads the old bytes after letting the
        lock go (Qcow2Image._data_writes), so copies on write run concurrently."""
        self.overlap.check_writable()
        mv = memoryview(data).cast("B")
        if offset + len(mv) > self.size:
            raise ValueError("write beyond the virtual size")
        writes: list[DataWrite] = []
        updates: list[L2Update] = []
        pos = 0
        while pos < len(mv):
            vcl, inc = divmod(offset + pos, self.cs)
            n = min(self.cs - inc, len(mv) - pos)
            write, update = yield from self._plan_cluster(vcl, inc, pos, mv[pos:pos + n], defer_cow)
            if write is not None:
                writes.append(write)
            if update is not None:
                updates.append(update)
            pos += n
        # Guest bytes that land contiguously on the host become one backend
        # write, a slice of the caller's buffer where they can (no copy).
        return WritePlan(tuple(merge_runs(writes, mv)), tuple(updates))

    def all_zero(self, chunk) -> bool:
        """A whole cluster of zeros? bytes.startswith compares a memoryview
        with memcmp; ``memoryview == bytes`` goes element by element, 60x
        slower (measured 132 us per 64 KiB cluster)."""
        return len(chunk) == self.cs and self.zero_cluster.startswith(chunk)

    def _plan_cluster(self, vcluster: int, in_cluster: int, at: int, data, defer_cow: bool = False):
        """Generator: (DataWrite or None, L2Update or None) for one cluster's part of a write.

        ``data`` is the slice of the request's buffer that starts at ``at``
        and lands ``in_cluster`` bytes into guest cluster ``vcluster``.
        """
        table, idx = yield from self.map.table_for_write(vcluster)
        entry = table.entries[idx]
        self.map.validate(entry, vcluster)
        zeros = self.all_zero(data)
        if not zeros and entry & fmt.L2_COPIED and not entry & fmt.L2_ZERO and entry & fmt.OFFSET_MASK:
            # Exclusively owned (refcount 1): overwrite in place. The hot
            # path, so it builds nothing but the write.
            return DataWrite((entry & fmt.OFFSET_MASK) + in_cluster, data, at), None
        c, slot = _Chunk(vcluster, in_cluster, at, data), _Slot(vcluster, table, idx, entry)
        off, compressed = entry & fmt.OFFSET_MASK, bool(entry & fmt.L2_COMPRESSED)
        if zeros:
            # Zero detection is a discard too, for clients that never send
            # one (dd from /dev/zero, a guest without discard; fallocate
            # arrives through fuse/direct_requests.py): a full cluster of
            # zeros becomes a zero cluster (v3) and frees its host cluster.
            if self.header.hdr.version >= 3:
                return None, self._zeroed(slot)
            if off == 0 and not compressed and not self.backed:
                # v2: an unallocated cluster already reads as zeros. Not over a backing file:
                # v2 has no zero flag, so the zeros are written (the COW below, a whole cluster).
                return None, None
        if not compressed and off and entry & fmt.L2_COPIED:
            return self._in_place(c, slot)
        if defer_cow and (fill := self._cow_fill(c, slot)) is not None:
            return (yield from self._cow_deferred(c, slot, fill))
        return (yield from self._cow(c, slot))

    def _zeroed(self, slot: _Slot) -> L2Update | None:
        entry = slot.entry
        if not entry & fmt.L2_COMPRESSED and (entry & fmt.L2_ZERO or not (entry & fmt.OFFSET_MASK or self.backed)):
            return None  # reads as zeros already (unallocated over a backing file reads the backing file)
        self.counters.zero_writes += 1
        return slot.update(fmt.L2_ZERO, data_first=False)

    def _in_place(self, c: _Chunk, slot: _Slot):
        """Exclusively owned, the cases the hot path leaves: a preallocated
        zero cluster, which needs its untouched bytes zeroed before the entry
        exposes it, or a v2 cluster overwritten with zeros."""
        off = slot.entry & fmt.OFFSET_MASK
        if slot.entry & fmt.L2_ZERO:
            body = bytearray(self.cs)
            body[c.in_cluster:c.in_cluster + len(c.data)] = c.data
            return DataWrite(off, body), slot.update(off | fmt.L2_COPIED)
        return DataWrite(off + c.in_cluster, c.data, c.at), None

    def _cow(self, c: _Chunk, slot: _Slot):
        """Generator: copy-on-write into a fresh cluster. The head and tail
        come from the old contents (compressed, shared, the backing chain, or zeros)."""
        source = yield from self._cow_source(slot, len(c.data) == self.cs)
        a = yield from self.map.allocate("data")
        host, cs = a.cluster << self.cb, self.cs
        if len(c.data) == cs:
            write = DataWrite(host, c.data, c.at)
        elif source is None and (a.fresh or host >= self.refs.written_high):
            # Never written: the rest of the cluster already reads as zeros.
            write = DataWrite(host + c.in_cluster, c.data, c.at)
        else:
            body = bytearray(source if source is not None else cs)
            body[c.in_cluster:c.in_cluster + len(c.data)] = c.data
            write = DataWrite(host, body)
        self.refs.note_written(host + cs)
        # Invariant 3 needs the data durable before the entry unless a crash
        # cannot expose wrong bytes. A reserved cluster is a hole inside the
        # file (the flush that reserved it made the file cover it, durably,
        # before anything could point at it), so it reads as zeros: what an
        # unallocated cluster held. Old data copied in (compressed or shared
        # source), a recycled cluster's stale bytes, or a cluster past EOF
        # (qemu-img check calls a reference past EOF corruption) all need the
        # data first. So does a cluster that read the backing chain, even
        # written whole: a crash must not turn its old bytes into zeros.
        data_first = (source is not None or not a.fresh or self._reads_backing(slot.entry)
                      or _holds_data(slot.entry))
        self.counters.data_first += data_first
        return write, slot.update(host | fmt.L2_COPIED, a.cluster, data_first=data_first)

    def _cow_fill(self, c: _Chunk, slot: _Slot) -> CowFill | None:
        """Where a partial write's old bytes are (None: a whole cluster, or they read as zeros)."""
        entry, cs = slot.entry, self.cs
        if len(c.data) == cs:
            return None
        if entry & fmt.L2_COMPRESSED:
            desc = fmt.decode_compressed(entry, self.cb)
            return CowFill(CowSource.COMPRESSED, desc.offset, desc.max_length, c.in_cluster, desc)
        off = entry & fmt.OFFSET_MASK
        if off and not entry & fmt.L2_ZERO:
            return CowFill(CowSource.DATA, off, cs, c.in_cluster)
        if self._reads_backing(entry):
            return CowFill(CowSource.BACKING, slot.vcluster << self.cb, cs, c.in_cluster)
        return None

    def _cow_deferred(self, c: _Chunk, slot: _Slot, fill: CowFill):
        """Generator: _cow with the old bytes left for the caller to read (``fill``); always data
        first, since the new cluster holds old bytes."""
        a = yield from self.map.allocate("data")
        host = a.cluster << self.cb
        self.refs.note_written(host + self.cs)
        if fill.source is CowSource.BACKING:
            self.counters.backing_cow_reads += 1
        else:
            self.counters.cow_reads += 1
        self.counters.data_first += 1
        return DataWrite(host, c.data, None, fill), slot.update(host | fmt.L2_COPIED, a.cluster)

    def _cow_source(self, slot: _Slot, whole: bool):
        """Generator: the old contents a COW keeps around the new bytes, or None (zeros, or nothing
        to keep: a whole cluster is written)."""
        entry = slot.entry
        if whole:
            # Every byte is overwritten: nothing of the old cluster (compressed, or shared with a
            # snapshot) is kept, so it is not read. The caller still writes data first
            # (_holds_data): a crash must not turn the old bytes into a fresh cluster's zeros.
            return None
        if entry & fmt.L2_COMPRESSED:
            desc = fmt.decode_compressed(entry, self.cb)
            raw = yield ReadRequest(desc.offset, desc.max_length)
            source = self.decompress(desc, bytes(raw))
            self.counters.cow_reads += 1
            return source
        off = entry & fmt.OFFSET_MASK
        if off and not entry & fmt.L2_ZERO:
            source = bytes((yield ReadRequest(off, self.cs)))
            self.counters.cow_reads += 1
            return source
        if self._reads_backing(entry):
            # spec "Cluster mapping": unallocated here, so the bytes around the new ones are the
            # backing chain's; the whole cluster is copied (qcow2 has no subclusters here).
            source = yield BackingReadRequest(slot.vcluster << self.cb, self.cs)
            if len(source) != self.cs:
                raise RuntimeError(f"the backing reader returned {len(source)} bytes for {self.cs}")
            self.counters.backing_cow_reads += 1
            return bytes(source)
        return None

    def _reads_backing(self, entry: int) -> bool:
        """Does this (validated) entry's cluster read the backing chain? Unallocated, no zero flag."""
        return self.backed and not entry & (fmt.L2_ZERO | fmt.L2_COMPRESSED | fmt.OFFSET_MASK)

    def commit(self, plan: WritePlan):
        """Generator: publish a plan's L2 entries after its data writes completed."""
        for u in plan.updates:
            deps = [self.queue.data_item] if u.data_first else []
            if u.new_cluster is not None:
                deps.extend((yield from self.refs.counted(u.new_cluster)))
            # The table as cached now, not as planned: an allocating write lets the image's lock
            # go for its data I/O, and meanwhile a flush may write the table and the cache evict
            # it (a later lookup reads it back as another object, which other commits update).
            table, index = yield from self.map.table_for_write(u.vcluster)
            self.map.remap(u.vcluster, table, index, u.new_entry, deps)

    def adopt(self, allocations, durable: int = 0):
        """Generator: L2 entries for clusters the data plane allocated (issue 14, dp_alloc.c), or
        copied on write into (issue 23, dp_cow.c). Returns how many were copies.

        ``allocations`` are (guest cluster, host offset) pairs, host clusters that were lent
        (Refcounts.lend): fresh, with a durable refcount. Where the old entry was unallocated (or
        a zero cluster without a host cluster) the new entry waits for nothing: not the refcount
        (durable already), not the data (the cluster read as zeros before, as the unallocated
        cluster it replaces did; DESIGN.md section 3, a partial write into a fresh cluster needs
        no ordering). The caller adopts before it plans anything touching those clusters.

        Where the old entry was a shared data cluster (COPIED clear, not compressed: a snapshot
        holds it too), C copied the cluster's bytes into the lent one and logged the pair only once
        that write completed. Its entry replaces the old one, which loses one reference once the
        table is durable (remap's deferred free, invariant 2; the caller fences C's requests that
        may still read it: Lender.adopted_copies). Unlike a fresh allocation, the new entry must
        wait for the data (invariant 3): a crash that exposed it before the copy is durable would
        turn the old bytes into zeros. So the queue's data item is made dirty now (C's completed
        write is not synced yet, and a sync already running may have started before it), and the
        entry depends on it: a sync after C's write lands before the L2 table is written.

        The first ``durable`` pairs C wrote into their L2 tables itself and made durable (a guest
        flush served in C, dp_cflush.c): their entries are stored without making the table dirty.
        A pair C wrote whose sync had not completed is adopted as any other (the table is written
        again by the next flush); its table, loaded again since, may show C's entry already.
        """
        copies = 0
        for n, (vcluster, host) in enumerate(allocations):
            table, index = yield from self.map.table_for_write(vcluster)
            old = table.entries[index]
            if old == host | fmt.L2_COPIED and host >> self.cb not in self.refs.lent:
                continue  # adopted already (an adoption that failed half way is retried)
            written = old == host | fmt.L2_COPIED  # C wrote it (dp_cflush.c) and the table was read again
            copied = not written and self._shared_data(old) and (old & fmt.OFFSET_MASK) != host
            if n < durable and not copied and old in (0, fmt.L2_ZERO, host | fmt.L2_COPIED):
                cluster = host >> self.cb
                self.refs.adopted(cluster)
                self.overlap.claim(cluster, "data")
                self.map.on_disk(table, index, host | fmt.L2_COPIED)
                self.queue.allocated(Allocation(cluster, None, True), by_plane=True)
                continue
            if written:
                old = fmt.L2_ZERO if self.backed else 0  # what C's entry replaced had no host cluster
            if not copied and old not in (0, fmt.L2_ZERO) or host & (self.cs - 1) or self._reads_backing(old):
                # Over a backing file a fresh cluster is not what the unallocated one read: C must
                # not allocate there (its partial write would lose the backing bytes around it).
                raise CorruptImage(f"the data plane allocated guest cluster {vcluster} at {host:#x}, "
                                   f"but its L2 entry is {old:#x}")
            cluster = host >> self.cb
            self.refs.adopted(cluster)
            self.overlap.claim(cluster, "data")
            deps = yield from self.refs.counted(cluster)
            if copied:
                self.queue.data_written()
                deps.append(self.queue.data_item)
                self.counters.data_first += 1
                copies += 1
            self.map.remap(vcluster, table, index, host | fmt.L2_COPIED, deps, report=False)
            self.queue.allocated(Allocation(cluster, None, True), by_plane=True)
        return copies

    def _shared_data(self, entry: int) -> bool:
        """A data cluster a snapshot shares: allocated, not zero, not compressed, COPIED clear."""
        return bool(entry & fmt.OFFSET_MASK) and not entry & (fmt.L2_ZERO | fmt.L2_COMPRESSED | fmt.L2_COPIED)

    def abort(self, plan: WritePlan):
        """Generator: give back what a failed plan allocated (nothing points at it)."""
        for u in plan.updates:
            if u.new_cluster is not None:
                yield from self.refs.change(u.new_cluster, -1)

    def resize(self, new_size: int):
        """Generator: grow the virtual size (shrinking is refused, as qemu-img does without --shrink)."""
        self.overlap.check_writable()
        if new_size < self.size:
            raise UnsupportedOperation("shrinking an image is not supported")
        if self.backed and new_size > self.size:
            # The new clusters would be unallocated, so they would show the backing file's bytes
            # past the old end; QEMU (bdrv_co_truncate) writes zeros there instead. Not done yet.
            raise UnsupportedOperation("growing an image with a backing file is not supported yet")
        yield from self.map.grow(-(-new_size // 512) * 512)
