"""Host cluster refcounts: lookup, allocation, the reservation, table growth.

spec "Host cluster management": a two-level structure. The refcount table
(kept whole in memory, written back in cluster-sized chunks) points at
refcount blocks (cached, see meta.TableCache).

Allocation raises a refcount in memory and marks the block dirty; whoever then
points at the cluster records a dependency on what makes that refcount
durable and reachable (:meth:`Refcounts.counted`, invariant 1). Frees are
deferred by the metadata queue (metaqueue.py) until the L2 change that
dropped the reference is durable (invariant 2), and only then come back here
as a refcount change. Until then the cluster stays allocated, so it cannot be
handed out again while old metadata on disk may still point at it.

Reserve ahead (docs/design.md, "One fdatasync per guest flush"): at each
flush the queue raises the refcounts of a run of clusters past the end of the
file *before* anything points at them; that raise becomes durable with the
flush's one fdatasync. Allocations then come from the reservation, so the L2
entry that uses such a cluster has no refcount block to wait for (invariant 1
already holds) and the next flush needs one fdatasync, not two. Reserved
clusters were never written, so after a crash they read as zeros (a hole, or
past EOF): a reserved cluster is *fresh*. Unused reserved clusters after a
crash are leaks (allowed); a clean close gives them back. Because they may
lie past EOF, the end of the allocated space is taken from the refcounts, not
only from the file size (:meth:`Refcounts.scan_end`).
"""

from __future__ import annotations

import collections

import attrs

from cachefs.errors import CorruptImage, DamagedMetadata
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.meta import HeaderItem, State, Table, TableCache, TableChunk
from cachefs.qcow2.plan import ReadRequest


@attrs.frozen
class Allocation:
    cluster: int
    block: Table     # the refcount block counting it (durable already if from a reservation)
    fresh: bool      # never written since it entered the file: reads as zeros after a crash


class Refcounts:
    def __init__(self, header: HeaderItem, reftable: list[int], cache: TableCache, file_size: int):
        hdr = header.hdr
        self.header = header
        self.cluster_bits = hdr.cluster_bits
        self.cs = hdr.cluster_size
        self.order = hdr.refcount_order
        self.max_refcount = (1 << hdr.refcount_bits) - 1
        self.per_block = hdr.refblock_entries
        self.table = reftable
        self.table_offset = hdr.refcount_table_offset
        self.table_clusters = hdr.refcount_table_clusters
        self.chunks: dict[int, TableChunk] = {}
        self.block_clusters = {e >> hdr.cluster_bits for e in reftable if e and not e & fmt.REFTABLE_RESERVED}
        self.cache = cache
        # Invariant: no cluster at or past end_cluster is referenced or allocated.
        self.end_cluster = -(-file_size // self.cs)
        # Invariant: no host byte at or past written_high was ever written, so
        # such clusters read as zeros (a hole or past EOF) without COW.
        self.written_high = file_size
        self.free_hint = 0
        # Clusters being handed out as contiguous runs: a refcount block
        # created meanwhile must not land inside them. A list, because a run
        # can trigger refcount-table growth, which hands out a run of its own.
        self.handing_out: list[range] = []
        # The table moved and the header pointing at it is not durable yet.
        self._moved = False
        # callback(old_clusters) set by the engine: free the old table once the header is durable.
        self.on_table_moved = None
        # Invariant: every cluster here has refcount 1, nothing points at it,
        # and nothing was ever written to it (so it is fresh); ascending.
        self.reservation: collections.deque[int] = collections.deque()
        # Reserved clusters whose refcount raise is not known durable yet: a writeout that
        # ended with everything synced clears it (reserve_durable). A failed writeout keeps
        # them here, so whoever points at one still waits for its block (invariant 1).
        self._raising: set[int] = set()
        # Clusters handed out of the reservation with their raise durable, not yet pointed
        # at: counted() owes no dependency for them, so an L2 update does not wait for a
        # refcount block another change (a free, the next reservation) made dirty again.
        self._counted_durable: set[int] = set()
        # Clusters lent to the data plane (issue 14, dataplane/lending.py): taken from the reservation with
        # their raise durable; the data plane may write one and log it, and the L2 entry that
        # Python then adopts (Engine.adopt) owes no dependency. Unused ones come back (unlend).
        self.lent: set[int] = set()

    def adopt_table(self, table: list[int], offset: int, clusters: int, end: int) -> None:
        """A new metadata generation's refcount structure (Engine.switch_generation), durable
        already and covering ``end`` bytes. The reservation and lent clusters keep their counts
        (the generation carried them over), so they stay as they are."""
        self.table = table
        self.table_offset, self.table_clusters = offset, clusters
        self.block_clusters = {e >> self.cluster_bits for e in table if e and not e & fmt.REFTABLE_RESERVED}
        self.chunks.clear()  # the same dict: the queue tracks it (MetaQueue.track)
        self.end_cluster = max(self.end_cluster, -(-end // self.cs))
        self.note_written(end)
        self.free_hint = 0
        self._moved = False

    # ------------------------------------------------------------ lookup

    def block_offset(self, block_idx: int) -> int:
        if block_idx >= len(self.table):
            return 0
        entry = self.table[block_idx]
        if entry & fmt.REFTABLE_RESERVED or (entry & (self.cs - 1)):
            raise DamagedMetadata(f"refcount table entry {block_idx} is invalid ({entry:#x})")
        if entry >= self.end_cluster * self.cs:
            raise DamagedMetadata(f"refcount block {block_idx} lies beyond the end of the file")
        return entry

    def load_block(self, offset: int):
        table = self.cache.get(offset)
        if table is None:
            buf = yield ReadRequest(offset, self.cs)
            table = self.cache.get(offset)  # another task may have loaded it meanwhile
            if table is None:
                buf = bytes(buf).ljust(self.cs, b"\0")
                table = Table(name=f"refblock@{offset:#x}", kind="refblock", offset=offset,
                              entries=fmt.RefcountBlock.decode(buf, self.order), order=self.order)
                self.cache.put(table)
        return table

    def get(self, cluster: int):
        off = self.block_offset(cluster // self.per_block)
        if off == 0:
            return 0
        block = yield from self.load_block(off)
        return block.entries[cluster % self.per_block]

    # ------------------------------------------------------------ changes

    def _block_for(self, cluster: int):
        """The block holding cluster's refcount, created if missing (self-describing)."""
        block_idx = cluster // self.per_block
        if block_idx >= len(self.table):
            # Grow first: growth allocates clusters (and maybe this very block),
            # so the slot must exist before we decide anything about it.
            yield from self._grow_table(block_idx + 1)
        off = self.block_offset(block_idx)
        if off:
            return (yield from self.load_block(off))
        # A missing block means every cluster it covers is free (refcount 0),
        # so the block can live in one of them and describe itself, as in QEMU.
        first = block_idx * self.per_block
        at = next((c for c in range(first, first + self.per_block)
                   if c != cluster and c not in self.block_clusters
                   and not any(c in r for r in self.handing_out)), None)
        block = Table(name="refblock", kind="refblock",
                      entries=[0] * self.per_block, order=self.order, state=State.DIRTY)
        if at is None:
            # Its whole range is being handed out (a tiny block under a big
            # relocated table): put it past the end and count it elsewhere.
            at = self.end_cluster
            self.end_cluster += 1
            self._register(block_idx, block, at)
            # Counting it may grow the table, whose blocks must not land on it.
            run = range(at, at + 1)
            self.handing_out.append(run)
            try:
                yield from self.change(at, 1)
            finally:
                self.handing_out.remove(run)
            return block
        block.entries[at % self.per_block] = 1
        self._register(block_idx, block, at)
        self.end_cluster = max(self.end_cluster, at + 1)
        return block

    def _register(self, block_idx: int, block: Table, at: int) -> None:
        block.offset, block.name = at * self.cs, f"refblock@{at * self.cs:#x}"
        self.cache.put(block)
        self.block_clusters.add(at)
        self.table[block_idx] = at * self.cs
        self.chunk(block_idx * 8 // self.cs).touch(block)

    def chunk(self, index: int) -> TableChunk:
        c = self.chunks.get(index)
        if c is None:
            c = self.chunks[index] = TableChunk(name=f"reftable[{index}]", kind="reftable", index=index,
                                                owner=self)
        return c

    def counted(self, cluster: int):
        """Generator: what must be durable before anything may point at ``cluster`` (invariant 1).

        Not just the refcount block that counts it: a new block counts only
        once it is reachable, through its refcount-table entry, and through
        the header if the table moved. (Found by tests/test_fault_matrix.py:
        an L2 entry durable before the reftable entry of its new block is
        "refcount=0 reference=1" to qemu-img check.)
        """
        if cluster in self._counted_durable:
            self._counted_durable.discard(cluster)
            return []  # its count, block and reftable entry were durable when it was handed out
        block_idx = cluster // self.per_block
        block = yield from self.load_block(self.block_offset(block_idx))
        deps = [block, self.chunk(block_idx * 8 // self.cs)]
        if self._moved and self.header.durable:
            self._moved = False
        if self._moved:
            deps.append(self.header)
        return deps

    def note_written(self, end: int) -> None:
        """Host bytes up to ``end`` may have been written (see written_high)."""
        if end > self.written_high:
            self.written_high = end

    def change(self, cluster: int, delta: int):
        """Add delta to a refcount. Returns the block item that now holds it."""
        block = yield from self._block_for(cluster)
        self._counted_durable.discard(cluster)  # an aborted allocation, a release
        idx = cluster % self.per_block
        new = block.entries[idx] + delta
        if not 0 <= new <= self.max_refcount:
            raise CorruptImage(f"refcount of cluster {cluster} would become {new}")
        block.entries[idx] = new
        block.touch(index=idx)
        self.cache.put(block)  # re-insert in case it was evicted while clean
        if new == 0:
            self.free_hint = min(self.free_hint, cluster)
        return block

    def scan_end(self):
        """Generator: move end_cluster past the last cluster with a refcount.

        Clusters reserved before a crash keep refcount 1 past EOF; without
        this the allocator would hand them out again (refcount 2).
        """
        for block_idx in range(len(self.table) - 1, -1, -1):
            off = self.block_offset(block_idx)
            if not off:
                continue
            block = yield from self.load_block(off)
            last = next((i for i in range(len(block.entries) - 1, -1, -1) if block.entries[i]), None)
            if last is not None:
                self.end_cluster = max(self.end_cluster, block_idx * self.per_block + last + 1)
                return

    def alloc(self):
        """One cluster for a new reference: from the reservation if any. Returns an Allocation."""
        if self.reservation:
            cluster = self.reservation.popleft()
            block = yield from self._block_for(cluster)
            if cluster in self._raising:
                self._raising.discard(cluster)
            else:
                self._counted_durable.add(cluster)
            return Allocation(cluster, block, True)
        cluster, block = yield from self._alloc_free()
        return Allocation(cluster, block, False)

    def lend(self, count: int) -> list[int]:
        """Up to ``count`` reserved clusters for the data plane to allocate into (issue 14). They
        may be written from now on, so written_high covers them. A cluster whose raise is not
        durable yet stays in ``_raising``: the L2 entry adopted for it waits for its block
        (counted), as any allocation's; the next synced writeout makes it durable."""
        out: list[int] = []
        while self.reservation and len(out) < count:
            cluster = self.reservation.popleft()
            if cluster not in self._raising:
                self._counted_durable.add(cluster)
            self.lent.add(cluster)
            out.append(cluster)
        if out:
            self.note_written((max(out) + 1) * self.cs)
        return out

    def unlend(self, clusters: list[int]) -> None:
        """Lent clusters the data plane did not use: back to the front of the reservation."""
        back = [c for c in clusters if c in self.lent]
        self.lent.difference_update(back)
        self._counted_durable.difference_update(back)
        if back:  # the reservation stays ascending (its invariant)
            self.reservation = collections.deque(sorted([*back, *self.reservation]))

    def adopted(self, cluster: int) -> None:
        """The data plane allocated a lent cluster; an L2 entry points at it now (then ``counted``)."""
        if cluster not in self.lent:
            raise CorruptImage(f"the data plane allocated cluster {cluster}, which was not lent to it")
        self.lent.discard(cluster)
        self._raising.discard(cluster)

    def reserve(self, count: int):
        """Generator: top the reservation up to ``count`` fresh clusters past the end.

        Returns the refcount blocks that changed (dirty until the next sync).
        """
        need = count - len(self.reservation) - len(self.lent)
        if need <= 0:
            return []
        first, blocks = yield from self.alloc_at_end(need)
        self.reservation.extend(range(first, first + need))
        self._raising.update(range(first, first + need))
        return blocks

    def reserve_durable(self) -> None:
        """Everything written so far is durable (a writeout synced all of it): so is every
        reserved cluster's raise, with the block and reftable entry that make it reachable."""
        self._counted_durable.update(self._raising & self.lent)  # lent before their raise was durable
        self._raising.clear()

    def release_reservation(self):
        """Generator: give the unused reserved clusters back (a clean close leaves no leaks)."""
        while self.reservation:
            cluster = self.reservation.pop()
            self._raising.discard(cluster)
            yield from self.change(cluster, -1)
            if cluster == self.end_cluster - 1:
                self.end_cluster -= 1

    def _alloc_free(self):
        """The lowest free cluster, its refcount raised to 1. Returns (index, block item)."""
        while True:
            cluster = yield from self._find_free(self.free_hint)
            block_off = self.block_offset(cluster // self.per_block)
            if block_off == 0:
                # Creating the block occupies one cluster of its range; search again.
                yield from self._block_for(cluster)
                continue
            block = yield from self.change(cluster, 1)
            if block.entries[cluster % self.per_block] != 1:
                raise CorruptImage(f"cluster {cluster} was allocated twice")
            self.free_hint = cluster + 1
            self.end_cluster = max(self.end_cluster, cluster + 1)
            return cluster, block

    def _find_free(self, start: int):
        cluster = start
        while cluster < self.end_cluster:
            block_idx = cluster // self.per_block
            off = self.block_offset(block_idx)
            if off == 0:
                return cluster
            block = yield from self.load_block(off)
            entries = block.entries
            base = block_idx * self.per_block
            for i in range(cluster - base, self.per_block):
                if entries[i] == 0:
                    return base + i
            cluster = base + self.per_block
        return max(cluster, self.end_cluster)

    def alloc_at_end(self, count: int):
        """count contiguous clusters past the end of the file (for relocated tables).

        Returns (first cluster, the refcount blocks that now count them).
        """
        first = self.end_cluster
        run = range(first, first + count)
        self.handing_out.append(run)
        self.end_cluster = first + count
        try:
            blocks = []
            for cluster in run:
                blocks.append((yield from self.change(cluster, 1)))
        finally:
            self.handing_out.remove(run)
        return first, blocks

    # ------------------------------------------------------------ growth

    def _grow_table(self, min_entries: int):
        """Move the refcount table to the end of the file, larger.

        The header switch depends on every chunk of the new table and on the
        blocks counting its clusters; the old table is freed only after the
        header is durable (invariants 1 and 2).
        """
        per_cluster = self.cs // 8
        want = max(min_entries, len(self.table) + 1) * 3 // 2
        clusters = -(-want // per_cluster)
        for _ in range(3):  # the table must also cover the blocks that count its own clusters
            end = self.end_cluster + clusters + clusters // self.per_block + 4
            clusters = -(-max(want, end // self.per_block + 1) // per_cluster)
        old = range(self.table_offset // self.cs, self.table_offset // self.cs + self.table_clusters)
        self.table.extend([0] * (clusters * per_cluster - len(self.table)))
        first, blocks = yield from self.alloc_at_end(clusters)
        self.table_offset, self.table_clusters = first * self.cs, clusters
        for i in range(clusters):
            pointed = (self.cache.get(o) for o in self.table[i * per_cluster:(i + 1) * per_cluster] if o)
            self.chunk(i).touch(*[b for b in pointed if b is not None])
        self.header.touch(*[self.chunk(i) for i in range(clusters)], *blocks)
        self._moved = True
        if self.on_table_moved is not None:
            self.on_table_moved(old)

    def encode_chunk(self, index: int) -> tuple[int, bytes]:
        per = self.cs // 8
        entries = self.table[index * per:(index + 1) * per]
        return self.table_offset + index * self.cs, fmt.encode_table(entries)
