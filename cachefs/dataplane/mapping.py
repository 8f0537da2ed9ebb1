"""A qcow2 image's mapping, published to the data plane (DATAPLANE.md, "The mapping contract").

Python owns the mapping; C only reads it. This module keeps C's copy of one
qcow2 image's guest-cluster map true, following the two things the core
reports:

- **the table cache** (meta.TableCache listeners): an L2 table entering the
  cache publishes its clusters, one leaving it takes them back. C holds the
  mappings of cached tables only, so its memory is bounded by the L2 cache's
  (``l2-cache-size``), and a cluster whose table is not cached is forwarded.
- **mapping changes** (cluster.ClusterMap.remap, reported before the change
  takes effect): C gets the new state at once, in the same trio step, so no
  request can be planned against the old entry after the change.

What a cluster becomes in C (dp_abi.h):

=====================================  ==========================
L2 entry                                C state
=====================================  ==========================
data, COPIED (refcount 1)               writable at host offset
data, shared (not COPIED)               read-only at host offset; in a writable image
                                        (not compress-on-write) with DP_MAP_COW: C copies on
                                        write into a lent cluster (dp_cow.c, issue 23)
unallocated, or the zero flag           reads as zeros (no backing files); with
                                        no host cluster, C may allocate (dataplane/lending.py)
unallocated in an overlay               from backing (DP_MAP_BACKING): C reads the
                                        backing image's own published entries (issue 22)
compressed, damaged, past the guest     absent: forwarded to Python
=====================================  ==========================

A table its L1 entry does not point at (none allocated yet, the whole of a
fresh overlay) is not in the cache: C is given one entry for all of its
clusters (``dp_map_tables``: from backing, or zeros), taken back before the
table's own entries are published when one is made. That costs C 8 bytes per
L1 entry, so it stays bounded too.

The invariant: C never writes to a host cluster Python has freed or given to
another guest cluster. A change swaps C's entry before it takes effect, but a
fast request planned earlier may still be running on the old host cluster.
That cluster is only *freed* later (metaqueue defers every free until the L2
change is durable), so the change records a drain ticket, and the image
awaits :meth:`MappingPublisher.fence` before it runs the metadata queue,
the only place a deferred free is applied (image/qcow2image.py, where the queue runs). One drain
per writeout at most, and none when nothing changed.

Durable before writable: a fast write through an O_DSYNC descriptor
(writethrough, directsync) is acknowledged as durable the moment it completes.
Through a mapping that is not durable yet (a cluster just allocated, whose L2
entry the allocating writer's shared fdatasync has not covered), a crash would
lose that write with the mapping. So while a write-through handle is
published, a new or not-yet-durable owned cluster is published *read-only*
(its writes go to Python, which waits for the shared sync), and becomes
writable once the metadata queue has nothing dirty or unsynced
(:meth:`MappingPublisher.settle`, after each run of the queue). In writeback,
none and unsafe nothing waits: their writes are durable only at a flush, which
covers the mapping too.
"""

from __future__ import annotations

import logging

from cachefs.errors import DamagedMetadata
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.cluster import MappingChange, MappingKind

log = logging.getLogger("cachefs.dataplane.plane")

#: The low bits of a published entry that hold its state (dp_abi.h: host offsets are cluster aligned).
STATE_BITS = 3


class MappingPublisher:
    """Keeps C's copy of one qcow2 image's mapping; see the module docstring."""

    def __init__(self, plane, inode: int, engine, may_cow=lambda: False) -> None:
        self._writable, self._readonly, self._zero, self._alloc = plane.map_states()
        # Copy on write in C (issue 23): a shared data cluster is published read-only with
        # DP_MAP_COW while ``may_cow()`` (FastPaths: the image is writable and not compress-on-
        # write; never a snapshot's read-only view). Asked at each publication: a live switch to
        # compress-on-write also stops C's allocation (lending.allow), which forwards such writes.
        self._cow_flag = plane.cow_state()
        self._may_cow = may_cow
        self._shared = self._readonly
        self.plane = plane
        self.inode = inode
        self.engine = engine
        self.per_table = engine.map.l2_entries
        self._table_bits = self.per_table.bit_length() - 1
        # An overlay's unallocated clusters read from its backing image (issue 22): C reads them
        # from the backing image's own published entries (FastPaths links the two), never
        # allocates there (a partial write must copy on write: Python's), and forwards writes.
        backed = engine.backing is not None
        self._unallocated = plane.backing_state() if backed else self._zero | self._alloc
        # A cluster of a table that does not exist: the same, but never allocatable in C (Python
        # makes the table first).
        self._no_table = plane.backing_state() if backed else self._zero
        self.tables: dict[int, object] = {}  # L1 index -> its published L2 table (meta.Table)
        # L1 indexes whose clusters C holds as one entry each (dp_map_tables): no table there.
        # Invariant: none of them is in ``tables``; cleared before a table's own entries are published.
        self.tableless: set[int] = set()
        self.fence_ticket: int | None = None  # a drain owed before the next deferred free
        self.stopped = False
        self.published_tables = 0  # counters, for stats and tests
        self.fences = 0
        # Write-through (see "Durable before writable" above): set by FastPaths, True while a
        # published handle of the image writes through O_DSYNC in C.
        self.write_through = False
        # Clusters published read-only because their mapping is not durable yet.
        self.unsettled: set[int] = set()
        self.settled = 0
        engine.cache.listeners.append(self)
        engine.on_mapping_change(self.changed)

    # ------------------------------------------------------------ the table cache

    def entered(self, table) -> None:
        if table.kind != "l2" or table.l1_index < 0 or self.stopped:
            return
        first = table.l1_index * self.per_table
        count = min(self.per_table, self._guest_clusters() - first)
        if count <= 0:
            return
        self._shared = self._shared_state()
        states = [self._state(e, first + i) for i, e in enumerate(table.entries[:count])]
        if self.write_through and not self._durable(table):
            states = [self._hold(first + i, st) for i, st in enumerate(states)]
        if table.l1_index in self.tableless:  # a new table: its own entries from now on
            self.tableless.discard(table.l1_index)
            self.plane.map_tables(self.inode, self._table_bits, table.l1_index, [0])
        self.plane.map_clusters(self.inode, first, states)
        self.tables[table.l1_index] = table
        self.published_tables += 1

    def left(self, table) -> None:
        if table.kind != "l2" or table.l1_index not in self.tables:
            return
        del self.tables[table.l1_index]
        if not self.stopped:
            # No drain: the mapping itself did not change, C only stops serving it.
            self.plane.unmap_clusters(self.inode, table.l1_index * self.per_table, self.per_table)

    def republish(self) -> None:
        """Publish every cached L2 table again (after a resize: the guest's size changed, or a new
        metadata generation: a snapshot made every table new), and the tables that do not exist."""
        l1 = self.engine.map.l1
        for i in [i for i in self.tableless if i < len(l1) and l1[i]]:
            # A table exists there now (a snapshot applied): C holds nothing for it until Python
            # publishes the table's own entries (entered), so C forwards, never allocates there.
            self.tableless.discard(i)
            self.plane.map_tables(self.inode, self._table_bits, i, [0])
        for table in self.engine.cache.values():
            self.entered(table)
        if self.stopped:
            return
        n = -(-self._guest_clusters() // self.per_table)
        missing = [i for i in range(n) if i not in self.tables and i not in self.tableless
                   and (i >= len(l1) or l1[i] == 0)]
        for i in missing:  # few: one per 512 MiB of guest with 64 KiB clusters
            self.plane.map_tables(self.inode, self._table_bits, i, [self._no_table])
        self.tableless.update(missing)

    def _guest_clusters(self) -> int:
        return -(-self.engine.size // self.engine.cs)

    def _state(self, entry: int, vcluster: int) -> int:
        """C's entry for an L2 entry: host offset | DP_MAP_* (0, absent, when C must not serve it)."""
        if entry == 0:
            return self._unallocated  # C may allocate one (dataplane/lending.py); an overlay's: from backing
        if entry == fmt.L2_ZERO:
            return self._zero | self._alloc  # no host cluster: C may allocate one (dataplane/lending.py)
        if entry & fmt.L2_COMPRESSED:
            return 0
        try:
            self.engine.map.validate(entry, vcluster)
        except DamagedMetadata:
            return 0  # Python answers EIO for that range only
        off = entry & fmt.OFFSET_MASK
        if entry & fmt.L2_ZERO or not off:
            return self._zero
        return off | (self._writable if entry & fmt.L2_COPIED else self._shared)

    def _shared_state(self) -> int:
        """A shared data cluster's state: read-only, and C may copy on write while allowed."""
        return self._readonly | (self._cow_flag if self._may_cow() else 0)

    # ------------------------------------------------------------ mapping changes

    def changed(self, change: MappingChange) -> None:
        """Reported before the change: swap C's entries now, and owe a drain if C may use the old host."""
        if self.stopped or change.old.kind is MappingKind.OUTSIDE:
            return  # a grow: past the old size nothing was published (republish follows the resize)
        state = self._mapping_state(change)
        hold = self.write_through  # the change is not durable yet: it is being made
        end = change.first + change.count
        for l1_index in range(change.first // self.per_table, (end - 1) // self.per_table + 1):
            if l1_index in self.tables:
                lo = max(change.first, l1_index * self.per_table)
                hi = min(end, (l1_index + 1) * self.per_table)
                states = [self._hold(c, state) for c in range(lo, hi)] if hold else [state] * (hi - lo)
                self.plane.map_clusters(self.inode, lo, states)
        if change.old.kind is MappingKind.DATA:
            # Tickets only grow: the newest covers every earlier change too.
            self.fence_ticket = self.plane.ticket()

    def _mapping_state(self, change: MappingChange) -> int:
        new = change.new
        if new.kind is MappingKind.DATA:
            return new.host_offset | (self._writable if new.owned else self._shared_state())
        if new.kind is MappingKind.UNALLOCATED:
            return self._zero | self._alloc
        if new.kind is MappingKind.BACKING:  # the backing chain's (see __init__)
            return self._unallocated
        if new.kind is MappingKind.ZERO and not new.host_offset:
            return self._zero | self._alloc
        if new.kind is MappingKind.ZERO:
            return self._zero
        return 0

    # ------------------------------------------------------------ durable before writable

    def _hold(self, cluster: int, state: int) -> int:
        """A writable entry whose mapping may not be durable: read-only until it is (settle)."""
        if state & STATE_BITS != self._writable:
            return state
        self.unsettled.add(cluster)
        return state & ~STATE_BITS | self._readonly

    def _durable(self, table) -> bool:
        """The table and the L1 chunk that points at it are on disk and synced."""
        chunk = self.engine.map.l1_chunks.get(table.l1_index * 8 // self.engine.cs)
        return table.durable and (chunk is None or chunk.durable)

    def settle(self) -> None:
        """After the metadata queue ran: once nothing is dirty or unsynced, every mapping in
        memory is durable, and the clusters held read-only become writable in C."""
        q = self.engine.queue
        if not self.unsettled or self.stopped or q.needs_sync or q.dirty_items():
            return
        self._shared = self._shared_state()
        for cluster in sorted(self.unsettled):
            table = self.tables.get(cluster // self.per_table)
            if table is not None:
                entry = table.entries[cluster % self.per_table]
                self.plane.map_clusters(self.inode, cluster, [self._state(entry, cluster)])
                self.settled += 1
        self.unsettled.clear()

    async def fence(self) -> None:
        """Before deferred frees may be applied: every fast request that could still use a host
        cluster whose mapping changed has completed."""
        ticket, self.fence_ticket = self.fence_ticket, None
        if ticket is not None:
            self.fences += 1
            await self.plane.drain(ticket)

    def stop(self) -> None:
        """C serves nothing of this image any more (it went read-only on corruption, or closed)."""
        if self.stopped:
            return
        self.stopped = True
        for l1_index in sorted(self.tables):
            self.plane.unmap_clusters(self.inode, l1_index * self.per_table, self.per_table)
        for l1_index in sorted(self.tableless):
            self.plane.map_tables(self.inode, self._table_bits, l1_index, [0])
        self.tables.clear()
        self.tableless.clear()
        self.unsettled.clear()
        self.fence_ticket = self.plane.ticket()
