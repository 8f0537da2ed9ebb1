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
data, shared (not COPIED)               read-only at host offset
unallocated, or the zero flag           reads as zeros (no backing files)
compressed, damaged, past the guest     absent: forwarded to Python
=====================================  ==========================

The invariant: C never writes to a host cluster Python has freed or given to
another guest cluster. A change swaps C's entry before it takes effect, but a
fast request planned earlier may still be running on the old host cluster.
That cluster is only *freed* later (metaqueue defers every free until the L2
change is durable), so the change records a drain ticket, and the image
awaits :meth:`MappingPublisher.fence` before it runs the metadata queue,
the only place a deferred free is applied (image.Image._run_queue). One drain
per writeout at most, and none when nothing changed.
"""

from __future__ import annotations

import logging

from cachefs.errors import DamagedMetadata
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.cluster import MappingChange, MappingKind

log = logging.getLogger("cachefs.dataplane")


class MappingPublisher:
    """Keeps C's copy of one qcow2 image's mapping; see the module docstring."""

    def __init__(self, plane, inode: int, engine) -> None:
        self._writable, self._readonly, self._zero = plane.map_states()
        self.plane = plane
        self.inode = inode
        self.engine = engine
        self.per_table = engine.map.l2_entries
        self.tables: set[int] = set()  # L1 indices whose table is published
        self.fence_ticket: int | None = None  # a drain owed before the next deferred free
        self.stopped = False
        self.published_tables = 0  # counters, for stats and tests
        self.fences = 0
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
        self.plane.map_clusters(self.inode, first, [self._state(e, first + i) for i, e in
                                                    enumerate(table.entries[:count])])
        self.tables.add(table.l1_index)
        self.published_tables += 1

    def left(self, table) -> None:
        if table.kind != "l2" or table.l1_index not in self.tables:
            return
        self.tables.discard(table.l1_index)
        if not self.stopped:
            # No drain: the mapping itself did not change, C only stops serving it.
            self.plane.unmap_clusters(self.inode, table.l1_index * self.per_table, self.per_table)

    def republish(self) -> None:
        """Publish every cached L2 table again (after a resize: the guest's size changed)."""
        for table in self.engine.cache.values():
            self.entered(table)

    def _guest_clusters(self) -> int:
        return -(-self.engine.size // self.engine.cs)

    def _state(self, entry: int, vcluster: int) -> int:
        """C's entry for an L2 entry: host offset | DP_MAP_* (0, absent, when C must not serve it)."""
        if entry == 0:
            return self._zero
        if entry & fmt.L2_COMPRESSED:
            return 0
        try:
            self.engine.map.validate(entry, vcluster)
        except DamagedMetadata:
            return 0  # Python answers EIO for that range only
        off = entry & fmt.OFFSET_MASK
        if entry & fmt.L2_ZERO or not off:
            return self._zero
        return off | (self._writable if entry & fmt.L2_COPIED else self._readonly)

    # ------------------------------------------------------------ mapping changes

    def changed(self, change: MappingChange) -> None:
        """Reported before the change: swap C's entries now, and owe a drain if C may use the old host."""
        if self.stopped or change.old.kind is MappingKind.OUTSIDE:
            return  # a grow: past the old size nothing was published (republish follows the resize)
        state = self._mapping_state(change)
        end = change.first + change.count
        for l1_index in range(change.first // self.per_table, (end - 1) // self.per_table + 1):
            if l1_index in self.tables:
                lo = max(change.first, l1_index * self.per_table)
                hi = min(end, (l1_index + 1) * self.per_table)
                self.plane.map_clusters(self.inode, lo, [state] * (hi - lo))
        if change.old.kind is MappingKind.DATA:
            # Tickets only grow: the newest covers every earlier change too.
            self.fence_ticket = self.plane.ticket()

    def _mapping_state(self, change: MappingChange) -> int:
        new = change.new
        if new.kind is MappingKind.DATA:
            return new.host_offset | (self._writable if new.owned else self._readonly)
        if new.kind in (MappingKind.ZERO, MappingKind.UNALLOCATED):
            return self._zero
        return 0

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
        self.tables.clear()
        self.fence_ticket = self.plane.ticket()
