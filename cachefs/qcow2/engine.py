"""The qcow2 engine: guest requests in, plans out. No I/O, no trio.

Reading: :meth:`Engine.plan_read` maps a guest range to extents (zero, data at
a host offset, compressed, or damaged).

Writing is two-phase, as in QEMU's qcow2-cluster.c: :meth:`Engine.plan_write`
decides where each cluster's bytes go, raising refcounts for new clusters, and
returns the data writes; the caller performs them, then calls
:meth:`Engine.commit` (publish the L2 entries) or :meth:`Engine.abort`. A reader
therefore never sees an L2 entry whose data is not yet written.

Durability: every metadata change marks a meta.MetaItem dirty with its
ordering edges. A flusher asks :meth:`Engine.writeout_batch` for every dirty
item whose dependencies are durable, writes them, syncs, reports
:meth:`Engine.synced`, and repeats until :attr:`Engine.dirty` is false.

All generators here yield plan.ReadRequest and are driven by plan.run_sync or
plan.run_async.
"""

from __future__ import annotations

import zlib

import attrs

from cachefs.errors import CorruptImage, DamagedMetadata, UnsupportedImage
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.meta import MetaItem, State, Table, TableCache, TableChunk
from cachefs.qcow2.plan import DataWrite, Extent, ExtentKind, L2Update, ReadRequest, WritePlan
from cachefs.qcow2.refcount import Refcounts

DEFAULT_CACHE_BYTES = 32 << 20


#: Reservation bounds (clusters are reserved in bytes' worth, see prepare_flush).
MIN_RESERVE_BYTES = 1 << 20
MAX_RESERVE_BYTES = 256 << 20


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


def open_engine(file_size: int, *, writable: bool, cache_bytes: int = DEFAULT_CACHE_BYTES):
    """Generator: read and validate the header and top-level tables, return an Engine."""
    hdr = yield from read_header(file_size)
    refuse = _unsupported(hdr)
    if refuse:
        raise UnsupportedImage(refuse)
    l1_buf = yield ReadRequest(hdr.l1_table_offset, hdr.l1_size * 8)
    rt_buf = yield ReadRequest(hdr.refcount_table_offset, hdr.refcount_table_clusters * hdr.cluster_size)
    if len(l1_buf) < hdr.l1_size * 8 or len(rt_buf) < hdr.refcount_table_clusters * hdr.cluster_size:
        raise CorruptImage("L1 or refcount table is truncated")
    eng = Engine(hdr, fmt.decode_table(bytes(l1_buf)), fmt.decode_table(bytes(rt_buf)), file_size,
                 writable=writable, cache_bytes=cache_bytes)
    if eng.writable:
        yield from eng.refs.scan_end()
    return eng


def read_header(file_size: int):
    """Generator: the validated header of an image file of file_size bytes.

    Two reads: the fixed fields tell the cluster size, and the header with
    its extensions may fill the whole first cluster (spec "Header extensions").
    """
    if file_size < fmt.V2_HEADER_LENGTH:
        raise CorruptImage("file too small to be a qcow2 image")
    head = bytes((yield ReadRequest(0, min(file_size, 512))))
    if head[:4] != fmt.MAGIC:
        raise CorruptImage("not a qcow2 image (bad magic)")
    cluster_bits = int.from_bytes(head[20:24], "big")
    if not fmt.MIN_CLUSTER_BITS <= cluster_bits <= fmt.MAX_CLUSTER_BITS:
        raise CorruptImage(f"cluster_bits {cluster_bits} out of range 9..21")
    first = yield ReadRequest(0, min(file_size, 1 << cluster_bits))
    return fmt.parse_header_untrusted(bytes(first), file_size)


def _unsupported(hdr: fmt.Header) -> str | None:
    """Why an image cannot be served at all (one line), or None."""
    if hdr.crypt_method:
        return "encrypted images are not supported"
    if hdr.incompatible & fmt.INCOMPAT_DATA_FILE:
        return "images with an external data file are not supported"
    if hdr.incompatible & fmt.INCOMPAT_EXTL2:
        return "images with extended L2 entries (subclusters) are not supported"
    if hdr.backing_file_offset:
        return "images with a backing file are not supported yet"
    return None


def _read_only_reason(hdr: fmt.Header) -> str | None:
    """Why an image we can read must not be written, or None."""
    if hdr.corrupt:
        return "the image is marked corrupt; run 'cachefs check --repair all'"
    if hdr.nb_snapshots:
        return "images with internal snapshots are served read-only"
    return None


class Engine:
    def __init__(self, hdr: fmt.Header, l1: list[int], reftable: list[int], file_size: int,
                 *, writable: bool, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.hdr = hdr
        self.cb = hdr.cluster_bits
        self.cs = hdr.cluster_size
        self.l2_entries = hdr.l2_entries
        self.l1 = l1
        self.l1_offset = hdr.l1_table_offset
        self.l1_chunks: dict[int, TableChunk] = {}
        self.cache = TableCache(cache_bytes // self.cs)
        self.refs = Refcounts(hdr, reftable, self.cache, file_size)
        self.refs.on_table_moved = self._reftable_moved
        self.header_item = MetaItem(name="header", kind="header")
        self.data_item = MetaItem(name="data", kind="data")
        self.counters = EngineCounters()
        self.zero_cluster = bytes(self.cs)
        # Invariant: no host byte at or past written_high was ever written, so
        # such clusters read as zeros (a hole or past EOF) without COW.
        self.written_high = file_size
        self._allocs_since_flush = 0
        # Invariant: every WRITTEN item is in this list (a sync makes them all CLEAN).
        self._awaiting_sync: list[MetaItem] = []
        self._moved_reftable = False
        self.marked_dirty = False  # we set the dirty bit (reservations); a clean close clears it
        self.read_only_reason = None if writable else "opened read-only"
        if writable:
            self.read_only_reason = _read_only_reason(hdr)
        self.l2_clusters = {(e & fmt.OFFSET_MASK) >> self.cb for e in l1 if e & fmt.OFFSET_MASK}
        if writable and self.read_only_reason is None and hdr.autoclear:
            # spec "autoclear_features": a writer that does not maintain these
            # features (bitmaps) must clear the bits before writing.
            self.hdr = attrs.evolve(self.hdr, autoclear=0)
            self.header_item.touch()

    # ------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        return self.hdr.size

    @property
    def writable(self) -> bool:
        return self.read_only_reason is None

    @property
    def needs_repair(self) -> bool:
        """Crashed under lazy refcounts: refcounts must be rebuilt before writing."""
        return self.hdr.dirty

    def current_header(self) -> fmt.Header:
        return attrs.evolve(self.hdr, l1_size=len(self.l1), l1_table_offset=self.l1_offset,
                            refcount_table_offset=self.refs.table_offset,
                            refcount_table_clusters=self.refs.table_clusters)

    # ------------------------------------------------------------ mapping

    def _l2_offset(self, l1_idx: int) -> int:
        if l1_idx >= len(self.l1):
            return 0
        entry = self.l1[l1_idx]
        off = entry & fmt.OFFSET_MASK
        if entry & fmt.L1_RESERVED or off & (self.cs - 1):
            raise DamagedMetadata(f"L1 entry {l1_idx} is invalid ({entry:#x})")
        if off and (off >> self.cb >= self.refs.end_cluster or off == 0 or self._owner(off >> self.cb) != "l2"):
            raise DamagedMetadata(f"L1 entry {l1_idx} points outside the file or at other metadata")
        return off

    def _load_l2(self, offset: int):
        table = self.cache.get(offset)
        if table is None:
            buf = yield ReadRequest(offset, self.cs)
            table = self.cache.get(offset)  # loaded by another task meanwhile
            if table is None:
                entries = fmt.decode_table(bytes(buf).ljust(self.cs, b"\0"))
                table = self.cache.put(Table(name=f"l2@{offset:#x}", kind="l2", offset=offset, entries=entries))
        return table

    def _entry(self, vcluster: int):
        """(table or None, index, validated L2 entry) for a guest cluster."""
        l1_idx, idx = divmod(vcluster, self.l2_entries)
        off = self._l2_offset(l1_idx)
        if off == 0:
            return None, idx, 0
        table = yield from self._load_l2(off)
        entry = table.entries[idx]
        self._validate_l2(entry, vcluster)
        return table, idx, entry

    def _validate_l2(self, entry: int, vcluster: int) -> None:
        if entry & fmt.L2_COMPRESSED:
            desc = fmt.decode_compressed(entry, self.cb)
            if entry & fmt.L2_COPIED or desc.offset == 0 or desc.offset >= self.refs.end_cluster * self.cs:
                raise DamagedMetadata(f"compressed L2 entry for guest cluster {vcluster} is invalid")
            return
        off = entry & fmt.OFFSET_MASK
        if entry & fmt.L2_STD_RESERVED or off & (self.cs - 1):
            raise DamagedMetadata(f"L2 entry for guest cluster {vcluster} has reserved bits or is unaligned")
        if entry & fmt.L2_ZERO and self.hdr.version < 3:
            raise DamagedMetadata(f"L2 entry for guest cluster {vcluster} has the v3 zero flag in a v2 image")
        if off and (off >> self.cb >= self.refs.end_cluster or self._owner(off >> self.cb)):
            raise DamagedMetadata(f"L2 entry for guest cluster {vcluster} points outside the file or at metadata")

    def _owner(self, cluster: int) -> str | None:
        """Which metadata lives in a host cluster (QEMU's overlap check), or None."""
        if cluster == 0:
            return "header"
        if self.l1_offset >> self.cb <= cluster < (self.l1_offset + len(self.l1) * 8 + self.cs - 1) >> self.cb:
            return "l1"
        rt = self.refs.table_offset >> self.cb
        if rt <= cluster < rt + self.refs.table_clusters:
            return "reftable"
        if cluster in self.l2_clusters:
            return "l2"
        if cluster in self.refs.block_clusters:
            return "refblock"
        if self.hdr.nb_snapshots and cluster == self.hdr.snapshots_offset >> self.cb:
            return "snapshots"
        return None

    def plan_read(self, offset: int, length: int):
        """Generator: the extents that make up guest bytes [offset, offset+length)."""
        out: list[Extent] = []
        pos, end = offset, min(offset + length, self.size)
        while pos < end:
            vcl, inc = divmod(pos, self.cs)
            n = min(self.cs - inc, end - pos)
            try:
                _, _, entry = yield from self._entry(vcl)
                ext = self._extent(pos, n, inc, entry)
            except DamagedMetadata:
                ext = Extent(pos, n, ExtentKind.DAMAGED)
            prev = out[-1] if out else None
            if prev and prev.kind is ext.kind and ext.kind in (ExtentKind.ZERO, ExtentKind.DAMAGED) \
                    or prev and prev.kind is ext.kind is ExtentKind.DATA \
                    and prev.host_offset + prev.length == ext.host_offset:
                out[-1] = attrs.evolve(prev, length=prev.length + n)
            else:
                out.append(ext)
            pos += n
        return out

    def _extent(self, pos: int, n: int, inc: int, entry: int) -> Extent:
        if entry & fmt.L2_COMPRESSED:
            return Extent(pos, n, ExtentKind.COMPRESSED, compressed=fmt.decode_compressed(entry, self.cb),
                          in_cluster=inc)
        off = entry & fmt.OFFSET_MASK
        if entry & fmt.L2_ZERO or off == 0:
            return Extent(pos, n, ExtentKind.ZERO)
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

    def _check_writable(self) -> None:
        if self.read_only_reason:
            raise UnsupportedImage(f"read-only: {self.read_only_reason}")

    def _l2_for_write(self, vcluster: int):
        """The L2 table for a guest cluster, created (empty, dirty) if missing."""
        l1_idx, idx = divmod(vcluster, self.l2_entries)
        off = self._l2_offset(l1_idx)
        if off:
            if not self.l1[l1_idx] & fmt.L1_COPIED:
                raise UnsupportedImage("shared L2 tables (internal snapshots) cannot be written")
            return (yield from self._load_l2(off)), idx
        a = yield from self.refs.alloc()
        cluster = a.cluster
        self._count_alloc(a)
        off = cluster << self.cb
        self._claim(cluster, "l2")
        # A new table is unreachable until its L1 entry is written, so it needs
        # no edges itself; the L1 chunk waits for the table and its refcount.
        table = self.cache.put(Table(name=f"l2@{off:#x}", kind="l2", offset=off,
                                     entries=[0] * self.l2_entries, state=State.DIRTY))
        self.written_high = max(self.written_high, off + self.cs)
        self.l1[l1_idx] = off | fmt.L1_COPIED
        table.new = True
        self._l1_chunk(l1_idx * 8 // self.cs).touch(table, *(yield from self._counted(cluster)))
        return table, idx

    def _claim(self, cluster: int, owner: str) -> None:
        if self._owner(cluster):
            self._mark_corrupt(f"allocator returned cluster {cluster}, which holds {self._owner(cluster)}")
        if owner == "l2":
            self.l2_clusters.add(cluster)

    def _l1_chunk(self, index: int) -> TableChunk:
        c = self.l1_chunks.get(index)
        if c is None:
            c = self.l1_chunks[index] = TableChunk(name=f"l1[{index}]", kind="l1", index=index)
        return c

    def plan_write(self, offset: int, data):
        """Generator: a WritePlan for guest bytes at offset. Caller holds the image's write lock."""
        self._check_writable()
        mv = memoryview(data).cast("B")
        if offset + len(mv) > self.size:
            raise ValueError("write beyond the virtual size")
        writes: list[DataWrite] = []
        updates: list[L2Update] = []
        pos = 0
        run_start = None  # guest position where writes[-1], a slice of mv, starts
        while pos < len(mv):
            vcl, inc = divmod(offset + pos, self.cs)
            n = min(self.cs - inc, len(mv) - pos)
            chunk = mv[pos:pos + n]
            table, idx = yield from self._l2_for_write(vcl)
            entry = table.entries[idx]
            self._validate_l2(entry, vcl)
            before = len(writes)
            yield from self._plan_cluster(vcl, inc, chunk, table, idx, entry, writes, updates)
            if len(writes) == before + 1 and writes[-1].data is chunk:
                # Guest bytes landing right after the previous slice on the host
                # too become one slice of the caller's buffer: one backend write,
                # and no join (a copy) to make it.
                prev = writes[-2] if before and run_start is not None else None
                if prev is not None and prev.host_offset + len(prev.data) == writes[-1].host_offset:
                    writes[-2:] = [DataWrite(prev.host_offset, mv[run_start:pos + n])]
                else:
                    run_start = pos
            else:
                run_start = None
            pos += n
        return WritePlan(tuple(writes), tuple(updates))

    def _all_zero(self, chunk) -> bool:
        """A whole cluster of zeros? bytes.startswith compares a memoryview
        with memcmp; ``memoryview == bytes`` goes element by element, 60x
        slower (measured 132 us per 64 KiB cluster)."""
        return len(chunk) == self.cs and self.zero_cluster.startswith(chunk)

    def _plan_cluster(self, vcl, inc, chunk, table, idx, entry, writes, updates):
        cs = self.cs
        off = entry & fmt.OFFSET_MASK
        compressed = bool(entry & fmt.L2_COMPRESSED)
        is_zero = not compressed and (entry & fmt.L2_ZERO or off == 0)
        full = len(chunk) == cs
        if full and self.hdr.version >= 3 and self._all_zero(chunk):
            # Zero detection is our discard (DESIGN.md section 5): pyfuse3 has
            # no fallocate, so a full zero cluster becomes a zero cluster.
            if not is_zero:
                self.counters.zero_writes += 1
                updates.append(L2Update(vcl, fmt.L2_ZERO, entry, None, table, idx, data_first=False))
            return
        if full and off == 0 and not compressed and self._all_zero(chunk):
            return  # v2: an unallocated cluster already reads as zeros
        if not compressed and off and entry & fmt.L2_COPIED:
            # Exclusively owned (refcount 1): overwrite in place. A preallocated
            # zero cluster needs its untouched bytes zeroed before it is exposed.
            if entry & fmt.L2_ZERO:
                body = bytearray(cs)
                body[inc:inc + len(chunk)] = chunk
                writes.append(DataWrite(off, body))
                updates.append(L2Update(vcl, off | fmt.L2_COPIED, entry, None, table, idx))
            else:
                writes.append(DataWrite(off + inc, chunk))
            return
        # Copy-on-write into a fresh cluster: the head and tail come from the
        # old contents (compressed, shared, or zeros).
        source = None
        if compressed:
            desc = fmt.decode_compressed(entry, self.cb)
            raw = yield ReadRequest(desc.offset, desc.max_length)
            source = self.decompress(desc, bytes(raw))
            self.counters.cow_reads += 1
        elif off and not entry & fmt.L2_ZERO:
            source = bytes((yield ReadRequest(off, cs)))
            self.counters.cow_reads += 1
        a = yield from self.refs.alloc()
        cluster = a.cluster
        self._count_alloc(a)
        self._claim(cluster, "data")
        host = cluster << self.cb
        if full:
            writes.append(DataWrite(host, chunk))
        elif source is None and (a.fresh or host >= self.written_high):
            # Never written: the rest of the cluster already reads as zeros.
            writes.append(DataWrite(host + inc, chunk))
        else:
            body = bytearray(source if source is not None else cs)
            body[inc:inc + len(chunk)] = chunk
            writes.append(DataWrite(host, body))
        self.written_high = max(self.written_high, host + cs)
        # Invariant 3 needs the data durable before the entry unless a crash
        # cannot expose wrong bytes. A reserved cluster is a hole inside the
        # file (prepare_flush made the file cover it, durably, before anything
        # could point at it), so it reads as zeros: what an unallocated
        # cluster held. Old data copied in (compressed or shared source), a
        # recycled cluster's stale bytes, or a cluster past EOF (qemu-img check
        # calls a reference past EOF corruption) all need the data first.
        data_first = source is not None or not a.fresh
        self.counters.data_first += data_first
        updates.append(L2Update(vcl, host | fmt.L2_COPIED, entry, cluster, table, idx, data_first))

    def _count_alloc(self, a) -> None:
        self.counters.allocations += 1
        self.counters.from_reservation += a.fresh
        self._allocs_since_flush += 1

    def prepare_flush(self):
        """Generator: reserve clusters for the next interval, so its flush needs one sync.

        Sized from the allocations since the last flush (twice that, within
        MIN/MAX_RESERVE_BYTES): a guest that allocated nothing reserves
        nothing, so an idle flush writes nothing.
        """
        recent, self._allocs_since_flush = self._allocs_since_flush, 0
        if not recent or self.read_only_reason:
            return
        lo, hi = max(1, MIN_RESERVE_BYTES >> self.cb), max(2, MAX_RESERVE_BYTES >> self.cb)
        want = min(max(2 * recent, lo), hi)
        before = len(self.refs.reservation)
        yield from self.refs.reserve(want)
        self.counters.reserved += len(self.refs.reservation) - before
        self._mark_dirty()

    def _mark_dirty(self) -> None:
        """Set the header's dirty bit while reserved clusters may leak (spec "dirty bit").

        After a crash the unused reservation is leaked refcount; QEMU, and
        our own open (image.open_image), rebuild refcounts on a writable open
        of a dirty image, so the leaks are reclaimed at the next mount. It
        rides in the same round as the reservation: no extra sync. v2 has no
        feature bits; its leaks wait for ``cachefs check --repair leaks``.
        """
        if self.hdr.version >= 3 and not self.hdr.dirty:
            self.hdr = attrs.evolve(self.hdr, incompatible=self.hdr.incompatible | fmt.INCOMPAT_DIRTY)
            self.header_item.touch()
            self.marked_dirty = True

    @property
    def min_file_size(self) -> int:
        """The file must be at least this long before the next sync: it covers the reservation.

        Reserved clusters must be inside the file by the time an L2 entry can
        point at them (a reference past EOF is corruption to qemu-img check);
        extending the file in the flush that raises their refcounts does it.
        """
        return self.refs.reservation[-1] + 1 << self.cb if self.refs.reservation else 0

    @property
    def allocated_end(self) -> int:
        """Bytes up to the end of the last cluster with a refcount (for trimming at close)."""
        return self.refs.end_cluster << self.cb

    def release_reservation(self):
        """Generator: a clean close gives unused reserved clusters back (no leaks)."""
        if self.read_only_reason is None:
            yield from self.refs.release_reservation()
        if self.marked_dirty:
            # Clean again only once everything else is durable: the header goes last.
            self.hdr = attrs.evolve(self.hdr, incompatible=self.hdr.incompatible & ~fmt.INCOMPAT_DIRTY)
            self.header_item.touch(*[i for i in self._dirty_items() if i is not self.header_item])
            self.marked_dirty = False

    def data_written(self) -> None:
        """Guest data reached the backend: the next flush must sync it."""
        self.data_item.touch()

    def commit(self, plan: WritePlan):
        """Generator: publish a plan's L2 entries after its data writes completed."""
        for u in plan.updates:
            table = u.table
            table.entries[u.index] = u.new_entry
            deps = [self.data_item] if u.data_first else []
            if u.new_cluster is not None:
                deps.extend((yield from self._counted(u.new_cluster)))
            table.touch(*deps)
            self.cache.put(table)
            if u.old_entry & fmt.L2_COMPRESSED or \
                    (u.old_entry & fmt.OFFSET_MASK) != (u.new_entry & fmt.OFFSET_MASK):
                # A preallocated zero cluster written in place keeps its host
                # cluster: only a reference the new entry no longer holds is dropped.
                self._free_entry(u.old_entry, table)

    def _free_entry(self, entry: int, after: MetaItem) -> None:
        """Drop the references an L2 entry held, once `after` (its replacement) is durable."""
        if entry & fmt.L2_COMPRESSED:
            for c in fmt.decode_compressed(entry, self.cb).host_clusters(self.cb):
                self.refs.defer_free(c, after)
                self.counters.frees += 1
        elif entry & fmt.OFFSET_MASK:
            self.refs.defer_free((entry & fmt.OFFSET_MASK) >> self.cb, after)
            self.counters.frees += 1

    def abort(self, plan: WritePlan):
        """Generator: give back what a failed plan allocated (nothing points at it)."""
        for u in plan.updates:
            if u.new_cluster is not None:
                yield from self.refs.change(u.new_cluster, -1)

    # ------------------------------------------------------------ resize

    def resize(self, new_size: int):
        """Generator: grow the virtual size (shrinking is refused, as qemu-img does without --shrink)."""
        self._check_writable()
        if new_size < self.size:
            raise UnsupportedImage("shrinking an image is not supported")
        new_size = -(-new_size // 512) * 512
        need = fmt.max_l1_entries(new_size, self.cb)
        deps: list[MetaItem] = []
        if need > len(self.l1):
            old = range(self.l1_offset >> self.cb, (self.l1_offset + len(self.l1) * 8 + self.cs - 1) >> self.cb)
            clusters = -(-need * 8 // self.cs)
            if need * 8 > fmt.MAX_L1_BYTES:
                raise UnsupportedImage("the new size needs an L1 table beyond 32 MiB")
            first, blocks = yield from self.refs.alloc_at_end(clusters)
            self.l1.extend([0] * (need - len(self.l1)))
            self.l1_offset = first << self.cb
            self.written_high = max(self.written_high, (first + clusters) << self.cb)
            for i in range(clusters):
                chunk = self._l1_chunk(i)
                chunk.touch(*self._pointed_l2(i))
                deps.append(chunk)
            deps.extend(blocks)
            for c in old:
                self.refs.defer_free(c, self.header_item)
        self.hdr = attrs.evolve(self.hdr, size=new_size)
        self.header_item.touch(*deps)

    def _pointed_l2(self, chunk_index: int):
        """The L2 tables a relocated L1 chunk points at that are not on disk yet."""
        per = self.cs // 8
        for e in self.l1[chunk_index * per:(chunk_index + 1) * per]:
            t = self.cache.get(e & fmt.OFFSET_MASK) if e & fmt.OFFSET_MASK else None
            if t is not None and t.new:
                yield t

    def _counted(self, cluster: int):
        """Generator: what must be durable before anything may point at ``cluster`` (invariant 1).

        Not just the refcount block that counts it: a new block counts only
        once it is reachable, through its refcount-table entry, and through
        the header if the table moved. (Found by tests/test_fault_matrix.py:
        an L2 entry durable before the reftable entry of its new block is
        "refcount=0 reference=1" to qemu-img check.)
        """
        block_idx = cluster // self.refs.per_block
        block = yield from self.refs.load_block(self.refs.block_offset(block_idx))
        deps = [block, self.refs.chunk(block_idx * 8 // self.cs)]
        if self._reftable_moving:
            deps.append(self.header_item)
        return deps

    @property
    def _reftable_moving(self) -> bool:
        """The refcount table moved and the header pointing at it is not durable yet."""
        if self._moved_reftable and self.header_item.durable:
            self._moved_reftable = False
        return self._moved_reftable

    def _reftable_moved(self, deps: list[MetaItem], old: range) -> None:
        self.header_item.touch(*deps)
        self._moved_reftable = True
        for c in old:
            self.refs.defer_free(c, self.header_item)

    def _mark_corrupt(self, why: str) -> None:
        """QEMU's rule: corruption marks the image and makes it read-only (STYLE.md habit 4)."""
        self.read_only_reason = f"corruption detected: {why}"
        if self.hdr.version >= 3:
            self.hdr = attrs.evolve(self.hdr, incompatible=self.hdr.incompatible | fmt.INCOMPAT_CORRUPT)
            self.header_item.touch()
        raise CorruptImage(why)

    # ------------------------------------------------------------ flushing

    def _dirty_items(self) -> list[MetaItem]:
        items: list[MetaItem] = [t for t in self.cache.values() if t.state is State.DIRTY]
        items += [c for c in self.l1_chunks.values() if c.state is State.DIRTY]
        items += [c for c in self.refs.chunks.values() if c.state is State.DIRTY]
        items += [i for i in (self.header_item, self.data_item) if i.state is State.DIRTY]
        return items

    @property
    def dirty(self) -> bool:
        """Anything not yet durable: dirty items, written-but-unsynced ones, or pending frees."""
        return bool(self._dirty_items()) or self.needs_sync or bool(self.refs.pending)

    @property
    def needs_sync(self) -> bool:
        return bool(self._awaiting_sync)

    def _all_items(self):
        yield from self.cache.values()
        yield from self.l1_chunks.values()
        yield from self.refs.chunks.values()
        yield self.header_item
        yield self.data_item

    def writeout_batch(self) -> list[tuple[MetaItem, int, bytes]]:
        """Every dirty item whose ordering edges are satisfied, encoded, overlap-checked."""
        batch = []
        for item in self._dirty_items():
            if not item.ready():
                continue
            if item.kind == "data":
                batch.append((item, -1, b""))
                continue
            offset, payload = self._encode(item)
            self._check_overlap(item, offset, len(payload))
            batch.append((item, offset, payload))
        batch.sort(key=lambda b: b[1])
        return batch

    def _encode(self, item: MetaItem) -> tuple[int, bytes]:
        if isinstance(item, Table):
            return item.offset, item.encode()
        if item.kind == "l1":
            per = self.cs // 8
            entries = self.l1[item.index * per:(item.index + 1) * per]
            return self.l1_offset + item.index * self.cs, fmt.encode_table(entries)
        if item.kind == "reftable":
            return self.refs.encode_chunk(item.index)
        return 0, self.current_header().encode()

    def _check_overlap(self, item: MetaItem, offset: int, length: int) -> None:
        expect = {"l2": "l2", "refblock": "refblock", "l1": "l1", "reftable": "reftable", "header": "header"}[item.kind]
        for c in range(offset >> self.cb, (offset + max(length, 1) - 1 >> self.cb) + 1):
            owner = self._owner(c)
            if owner != expect:
                self._mark_corrupt(f"refusing to write {item.name} over {owner or 'unowned'} cluster {c}")

    def written(self, batch) -> None:
        for item, offset, payload in batch:
            item.state = State.WRITTEN
            item.deps.clear()
            self._awaiting_sync.append(item)
            if payload:
                self.counters.metadata_writes += 1
                self.counters.metadata_bytes += len(payload)
                self.written_high = max(self.written_high, offset + len(payload))
        if batch:
            self.counters.batches += 1

    def synced(self, *, apply_frees: bool = True):
        """Generator: a backend sync completed; WRITTEN items are durable. Applies due frees."""
        # The list, not the cache: a WRITTEN table may have been evicted (writeout_early).
        for item in self._awaiting_sync:
            if item.state is State.WRITTEN:
                item.state = State.CLEAN
                if isinstance(item, Table):
                    item.new = False  # on disk now
        self._awaiting_sync.clear()
        if apply_frees:
            yield from self.refs.apply_frees()
