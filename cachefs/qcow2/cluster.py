"""Guest cluster mapping: the L1 and L2 tables (QEMU's qcow2-cluster.c).

What it owns:

- the L1 table, held whole in memory and written back in cluster-sized
  chunks, and its growth when the virtual disk grows (:meth:`ClusterMap.grow`);
- L2 lookup through the table cache, with every entry validated before use
  (a bad entry is ``DamagedMetadata``: only the guest range behind it fails);
- L2 allocation: a missing table is created empty on first write
  (:meth:`ClusterMap.table_for_write`);
- **the one place a guest cluster's mapping changes.** Allocation, COW,
  zero-writes (our discard), and the frees they cause go through
  :meth:`ClusterMap.remap`; growth of the virtual disk through
  :meth:`ClusterMap.grow`. Both report the change to subscribers first, as a
  :class:`MappingChange`, before it takes effect. The data plane follows
  these reports (docs/design.md, "Two planes": Python takes a mapping back,
  and drains what C was serving through it, before the change).

Ordering (docs/design.md, "Ordering stored as data"): a new L2 table needs no
edges of its own (nothing reaches it until its L1 entry is written); the L1
chunk that points at it waits for the table and for the refcount that counts
it. A changed L2 entry waits for what its caller names (the new cluster's
refcount, the data). A reference the new entry no longer holds is freed only
once the table is durable (invariant 2): the queue defers it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs

from cachefs.errors import DamagedMetadata, UnsupportedImage, UnsupportedOperation
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.meta import HeaderItem, MetaItem, State, Table, TableCache, TableChunk
from cachefs.qcow2.plan import ReadRequest


class MappingKind(enum.Enum):
    OUTSIDE = "outside"          # past the virtual size
    UNALLOCATED = "unallocated"  # no host cluster, reads as zeros (an image without a backing file)
    # No host cluster in an image with a backing file: reads the backing chain at the same guest
    # offset (spec "Cluster mapping"), so whoever serves it must ask the backing image.
    BACKING = "backing"
    ZERO = "zero"                # the zero flag: reads as zeros (host_offset: preallocated, or 0)
    DATA = "data"                # guest bytes at host_offset
    COMPRESSED = "compressed"    # a compressed cluster at host_offset (read-only: writes COW)


@attrs.frozen
class Mapping:
    """What one guest cluster maps to."""

    kind: MappingKind
    host_offset: int = 0
    # The COPIED flag: refcount 1, so a write may go there in place.
    owned: bool = False

    @classmethod
    def of(cls, entry: int, cluster_bits: int, backed: bool = False) -> Mapping:
        """The mapping an L2 entry states (the entry is already validated); ``backed``: the image
        has a backing file."""
        if entry & fmt.L2_COMPRESSED:
            return cls(MappingKind.COMPRESSED, fmt.decode_compressed(entry, cluster_bits).offset)
        off, owned = entry & fmt.OFFSET_MASK, bool(entry & fmt.L2_COPIED)
        if entry & fmt.L2_ZERO:
            return cls(MappingKind.ZERO, off, owned)
        if off:
            return cls(MappingKind.DATA, off, owned)
        return cls(MappingKind.BACKING if backed else MappingKind.UNALLOCATED)


@attrs.frozen
class MappingChange:
    """Guest clusters [first, first + count) go from ``old`` to ``new``.

    Reported before the change takes effect. The host cluster ``old`` named
    stays allocated until the change is durable and no I/O that looked it up
    is running (metaqueue.py), so whoever serves it may finish first.
    """

    first: int
    count: int
    old: Mapping
    new: Mapping


class ClusterMap:
    def __init__(self, header: HeaderItem, l1: list[int], refs, overlap, queue):
        hdr = header.hdr
        self.header = header
        self.cb = hdr.cluster_bits
        self.cs = hdr.cluster_size
        self.l2_entries = hdr.l2_entries
        self.l1 = l1
        self.l1_offset = hdr.l1_table_offset
        self.l1_chunks: dict[int, TableChunk] = {}
        self.cache: TableCache = refs.cache
        self.refs = refs
        self.overlap = overlap
        self.queue = queue
        self.subscribers: list[Callable[[MappingChange], None]] = []
        overlap.l1_clusters = self._l1_clusters()
        overlap.l2_clusters.update((e & fmt.OFFSET_MASK) >> self.cb for e in l1 if e & fmt.OFFSET_MASK)

    def _l1_clusters(self) -> range:
        return range(self.l1_offset >> self.cb, (self.l1_offset + len(self.l1) * 8 + self.cs - 1) >> self.cb)

    def adopt_l1(self, l1: list[int], offset: int) -> None:
        """A new metadata generation's active L1 table (Engine.switch_generation): written and
        durable already, so no chunk is dirty; the L2 tables it names are the active ones now."""
        self.l1 = l1
        self.l1_offset = offset
        self.l1_chunks.clear()  # the same dict: the queue tracks it (MetaQueue.track)
        self.overlap.l1_clusters = self._l1_clusters()
        self.overlap.l2_clusters.clear()
        self.overlap.l2_clusters.update((e & fmt.OFFSET_MASK) >> self.cb for e in l1 if e & fmt.OFFSET_MASK)

    # ------------------------------------------------------------ lookup

    def l2_offset(self, l1_idx: int) -> int:
        """The L2 table of an L1 index (0: none), validated."""
        if l1_idx >= len(self.l1):
            return 0
        entry = self.l1[l1_idx]
        off = entry & fmt.OFFSET_MASK
        if entry & fmt.L1_RESERVED or off & (self.cs - 1):
            raise DamagedMetadata(f"L1 entry {l1_idx} is invalid ({entry:#x})")
        if off and (off >> self.cb >= self.refs.end_cluster or self.overlap.owner(off >> self.cb) != "l2"):
            raise DamagedMetadata(f"L1 entry {l1_idx} points outside the file or at other metadata")
        if off >> self.cb in self.refs.block_clusters:
            # owner() says "l2" first, but the refcount table names this cluster too: the table
            # cache holds one table per offset, so L2 updates would land in the refcount block
            # (QEMU's check calls it an overlap, qcow2_check_metadata_overlap). Found by fuzz/.
            raise DamagedMetadata(f"L1 entry {l1_idx} points at refcount block {off:#x}")
        return off

    def load_l2(self, offset: int, l1_idx: int):
        table = self.cache.get(offset)
        if table is None:
            buf = yield ReadRequest(offset, self.cs)
            table = self.cache.get(offset)  # loaded by another task meanwhile
            if table is None:
                entries = fmt.decode_table(bytes(buf).ljust(self.cs, b"\0"))
                table = self.cache.put(Table(name=f"l2@{offset:#x}", kind="l2", offset=offset, entries=entries,
                                             l1_index=l1_idx))
        return table

    def entry(self, vcluster: int):
        """Generator: the validated L2 entry of a guest cluster (0 when it has no table)."""
        l1_idx, idx = divmod(vcluster, self.l2_entries)
        off = self.l2_offset(l1_idx)
        if off == 0:
            return 0
        table = yield from self.load_l2(off, l1_idx)
        entry = table.entries[idx]
        self.validate(entry, vcluster)
        return entry

    def validate(self, entry: int, vcluster: int) -> None:
        if entry & fmt.L2_COMPRESSED:
            desc = fmt.decode_compressed(entry, self.cb)
            if entry & fmt.L2_COPIED or desc.offset == 0 or desc.offset >= self.refs.end_cluster * self.cs:
                raise DamagedMetadata(f"compressed L2 entry for guest cluster {vcluster} is invalid")
            return
        off = entry & fmt.OFFSET_MASK
        if entry & fmt.L2_STD_RESERVED or off & (self.cs - 1):
            raise DamagedMetadata(f"L2 entry for guest cluster {vcluster} has reserved bits or is unaligned")
        if entry & fmt.L2_ZERO and self.header.hdr.version < 3:
            raise DamagedMetadata(f"L2 entry for guest cluster {vcluster} has the v3 zero flag in a v2 image")
        if off and (off >> self.cb >= self.refs.end_cluster or self.overlap.owner(off >> self.cb)):
            raise DamagedMetadata(f"L2 entry for guest cluster {vcluster} points outside the file or at metadata")

    # ------------------------------------------------------------ L2 allocation

    def table_for_write(self, vcluster: int):
        """Generator: (L2 table, index) for a guest cluster, the table created (empty, dirty) if missing."""
        l1_idx, idx = divmod(vcluster, self.l2_entries)
        off = self.l2_offset(l1_idx)
        if off:
            if not self.l1[l1_idx] & fmt.L1_COPIED:
                raise UnsupportedImage("shared L2 tables (internal snapshots) cannot be written")
            return (yield from self.load_l2(off, l1_idx)), idx
        a = yield from self.allocate("l2")
        off = a.cluster << self.cb
        # A new table is unreachable until its L1 entry is written, so it needs
        # no edges itself; the L1 chunk waits for the table and its refcount.
        table = self.cache.put(Table(name=f"l2@{off:#x}", kind="l2", offset=off,
                                     entries=[0] * self.l2_entries, state=State.DIRTY, l1_index=l1_idx))
        self.refs.note_written(off + self.cs)
        self.l1[l1_idx] = off | fmt.L1_COPIED
        table.new = True
        self.l1_chunk(l1_idx * 8 // self.cs).touch(table, *(yield from self.refs.counted(a.cluster)))
        return table, idx

    def allocate(self, owner: str):
        """Generator: a host cluster for ``owner`` ("l2" or "data"), counted. Returns refcount.Allocation."""
        a = yield from self.refs.alloc()
        self.queue.allocated(a)
        self.overlap.claim(a.cluster, owner)
        return a

    def l1_chunk(self, index: int) -> TableChunk:
        c = self.l1_chunks.get(index)
        if c is None:
            c = self.l1_chunks[index] = TableChunk(name=f"l1[{index}]", kind="l1", index=index, owner=self)
        return c

    def encode_chunk(self, index: int) -> tuple[int, bytes]:
        per = self.cs // 8
        # Padded to the whole cluster (the L1 table owns the rest of its last
        # one): an O_DIRECT backend writes it without a read-modify-write.
        table = fmt.encode_table(self.l1[index * per:(index + 1) * per]).ljust(self.cs, b"\0")
        return self.l1_offset + index * self.cs, table

    # ------------------------------------------------------------ mapping changes

    def on_change(self, callback: Callable[[MappingChange], None]) -> None:
        self.subscribers.append(callback)

    def _report(self, change: MappingChange) -> None:
        for callback in self.subscribers:
            callback(change)

    def remap(self, vcluster: int, table: Table, index: int, new_entry: int, deps: list[MetaItem],
              *, report: bool = True) -> None:
        """Point a guest cluster at ``new_entry``: every L2 entry change goes through here.

        Reports the change, stores the entry, marks the table dirty after
        ``deps``, and drops the references the old entry held that the new
        one does not, once the table is durable (invariant 2). A
        preallocated zero cluster written in place keeps its host cluster.
        ``report=False``: the subscribers know already (the data plane made this change itself,
        Engine.adopt).
        """
        old_entry = table.entries[index]
        if self.subscribers and report:
            backed = self.header.hdr.backing_name is not None
            self._report(MappingChange(vcluster, 1, Mapping.of(old_entry, self.cb, backed),
                                       Mapping.of(new_entry, self.cb, backed)))
        table.entries[index] = new_entry
        table.touch(*deps, index=index)
        self.cache.put(table)
        if old_entry & fmt.L2_COMPRESSED:
            dropped = list(fmt.decode_compressed(old_entry, self.cb).host_clusters(self.cb))
        elif old_entry & fmt.OFFSET_MASK and (old_entry & fmt.OFFSET_MASK) != (new_entry & fmt.OFFSET_MASK):
            dropped = [(old_entry & fmt.OFFSET_MASK) >> self.cb]
        else:
            return
        for c in dropped:
            self.queue.defer_free(c, table)
            self.queue.counters.frees += 1

    def on_disk(self, table: Table, index: int, new_entry: int) -> None:
        """An entry that is durable on disk already (the data plane wrote and synced it: dp_cflush.c)
        and replaces an entry with no host cluster: stored, the table not made dirty (its bytes on
        disk hold it), nothing to report (C made the change) and no reference dropped."""
        table.entries[index] = new_entry
        self.cache.put(table)

    def grow(self, new_size: int):
        """Generator: the virtual disk grows to ``new_size`` (a multiple of 512).

        The L1 table moves to the end of the file when it must grow; the
        header waits for the new table and the refcounts of its clusters,
        and the old table is freed only once the header is durable.
        """
        old_size = self.header.hdr.size
        need = fmt.max_l1_entries(new_size, self.cb)
        deps: list[MetaItem] = []
        if need > len(self.l1):
            deps = yield from self._move_l1(need)
        first, end = -(-old_size // self.cs), -(-new_size // self.cs)
        if end > first and self.subscribers:
            self._report(MappingChange(first, end - first, Mapping(MappingKind.OUTSIDE),
                                       Mapping(MappingKind.UNALLOCATED)))
        self.header.update(*deps, size=new_size)

    def _move_l1(self, need: int):
        if need * 8 > fmt.MAX_L1_BYTES:
            raise UnsupportedOperation("the new size needs an L1 table beyond 32 MiB")
        old = self._l1_clusters()
        clusters = -(-need * 8 // self.cs)
        first, _ = yield from self.refs.alloc_at_end(clusters)
        self.l1.extend([0] * (need - len(self.l1)))
        self.l1_offset = first << self.cb
        self.overlap.l1_clusters = self._l1_clusters()
        self.refs.note_written((first + clusters) << self.cb)
        deps: list[MetaItem] = []
        for i in range(clusters):
            chunk = self.l1_chunk(i)
            chunk.touch(*self._unwritten_l2(i))
            deps.append(chunk)
        # Invariant 1 for the new table's own clusters: not just the blocks that count them, but
        # what makes a new block reachable (its refcount-table entry: Refcounts.counted). Found by
        # the writethrough power cut: a header durable before the reftable entry of the block
        # counting the new L1 is "refcount=0 reference=1".
        for c in range(first, first + clusters):
            deps.extend((yield from self.refs.counted(c)))
        for c in old:
            self.queue.defer_free(c, self.header)
        return deps

    def _unwritten_l2(self, chunk_index: int):
        """The L2 tables a relocated L1 chunk points at that are not on disk yet."""
        per = self.cs // 8
        for e in self.l1[chunk_index * per:(chunk_index + 1) * per]:
            t = self.cache.get(e & fmt.OFFSET_MASK) if e & fmt.OFFSET_MASK else None
            if t is not None and t.new:
                yield t
