"""Dirty metadata as data: items, their ordering edges, and the bounded table cache.

Every metadata change in cachefs marks a :class:`MetaItem` dirty and names the
items that must be *durable* before this one may be written (``deps``). The
crash invariants (docs/design.md, "Crash invariants") are then plain edges:

- an L2 table that points at a new cluster depends on the refcount block that
  raised that cluster's refcount, and on the ``data`` item (the guest data,
  COW head and tail included, must be durable first: invariant 3);
- an L1 chunk that points at a new L2 table depends on that table;
- a refcount-table chunk that points at a new refcount block depends on it;
- the header depends on a relocated L1 or refcount table.

Refcount *decrements* are never edges: they are deferred until the L2 change
that dropped the reference is durable (invariant 2), see refcount.py.

Items form a DAG by kind (refblock/data < reftable/l2 < l1 < header), so a
flusher that repeatedly writes every dirty item whose deps are durable and then
syncs always terminates (metaqueue.py). QEMU's qcow2-cache.c stores the same
ordering as cache dependencies; we store it per item so a reviewer can read it
off. Each item also knows where its bytes go (:meth:`MetaItem.placed`), so the
queue writes items without knowing what they are.
"""

from __future__ import annotations

import collections
import enum
import weakref
from typing import Any

import attrs

from cachefs.qcow2 import format as fmt


class State(enum.Enum):
    CLEAN = "clean"      # durable (or never changed)
    DIRTY = "dirty"      # changed in memory, not yet written
    WRITTEN = "written"  # written to the backend, not yet covered by a sync


@attrs.define(eq=False)
class MetaItem:
    name: str
    kind: str  # "l2" | "refblock" | "l1" | "reftable" | "header" | "data"
    state: State = State.CLEAN
    # Invariant: every item in deps was not CLEAN when it was added; the item
    # may be written only once all of them are CLEAN again.
    deps: set = attrs.field(factory=set, repr=False)

    @property
    def durable(self) -> bool:
        return self.state is State.CLEAN

    def ready(self) -> bool:
        return all(d.durable for d in self.deps)

    def touch(self, *deps: "MetaItem") -> None:
        self.state = State.DIRTY
        self.deps.update(d for d in deps if d is not None and not d.durable and d is not self)

    def placed(self) -> tuple[int, bytes]:
        """(host offset, bytes) to write. The ``data`` item has none: it is
        guest data already written, waiting only for the sync."""
        return -1, b""


#: The unit a changed table is written in: a page, so an O_DIRECT backend writes it without
#: reading first, and a write-through write rewrites 4 KiB of its L2 table, not a cluster.
WRITE_UNIT = 4096


@attrs.define(eq=False)
class Table(MetaItem):
    """An L2 table or a refcount block: one cluster of entries.

    Only the pages whose entries changed since the table was last written are
    written again (``touch(index=...)``), unless the table is new (its cluster
    on disk holds nothing of it yet) or changed as a whole.
    """

    offset: int = 0
    entries: list = attrs.field(factory=list, repr=False)
    order: int = 0  # refcount_order, for refblocks
    new: bool = False  # created here and never yet durable (a new L2 table)
    # An L2 table: the L1 index that points at it, so its guest clusters are
    # [l1_index * entries, ...). -1 for refcount blocks.
    l1_index: int = -1
    # What differs from the table's bytes on disk: everything (a table made here), or the
    # entries [dirty_lo, dirty_hi). A table read from disk starts equal to it.
    whole: bool = True
    dirty_lo: int = 0
    dirty_hi: int = 0

    def __attrs_post_init__(self) -> None:
        if self.state is State.CLEAN and not self.new:
            self.whole = False

    def touch(self, *deps: MetaItem, index: int | None = None) -> None:
        """Dirty after ``deps``; ``index``: the one entry that changed (else all of them may have)."""
        if index is None:
            self.whole = True
        elif self.dirty_hi <= self.dirty_lo:
            self.dirty_lo, self.dirty_hi = index, index + 1
        else:
            self.dirty_lo, self.dirty_hi = min(self.dirty_lo, index), max(self.dirty_hi, index + 1)
        super().touch(*deps)

    def encode(self, lo: int = 0, hi: int | None = None) -> bytes:
        entries = self.entries if lo == 0 and hi is None else self.entries[lo:hi]
        if self.kind == "refblock":
            return fmt.RefcountBlock.encode(entries, self.order)
        return fmt.encode_table(entries)

    def placed(self) -> tuple[int, bytes]:
        bits = (1 << self.order) if self.kind == "refblock" else 64
        per_unit = WRITE_UNIT * 8 // bits
        if self.whole or self.new or len(self.entries) <= per_unit or self.dirty_hi <= self.dirty_lo:
            return self.offset, self.encode()
        lo = self.dirty_lo // per_unit * per_unit
        hi = min(len(self.entries), -(-self.dirty_hi // per_unit) * per_unit)
        return self.offset + lo * bits // 8, self.encode(lo, hi)

    def written(self) -> None:
        """Its bytes are on disk (not yet synced): nothing differs any more."""
        self.whole = False
        self.dirty_lo = self.dirty_hi = 0


@attrs.define(eq=False)
class TableChunk(MetaItem):
    """One cluster-sized slice of the in-memory L1 table or refcount table.

    ``owner`` holds the whole table (cluster.ClusterMap, refcount.Refcounts)
    and knows where it lives now: a table can move while a chunk is dirty.
    """

    index: int = 0
    owner: Any = attrs.field(default=None, repr=False)

    def placed(self) -> tuple[int, bytes]:
        return self.owner.encode_chunk(self.index)


@attrs.define(eq=False)
class HeaderItem(MetaItem):
    """The image header: the fields we change (size, feature bits) live here.

    ``locate`` fills in where the L1 and refcount tables are now: those move
    with their owners (resize, refcount-table growth), and the header on disk
    must follow only once it is written.
    """

    hdr: Any = attrs.field(default=None, repr=False)  # format.Header
    locate: Any = attrs.field(default=None, repr=False)  # Header -> Header with current table locations

    def update(self, *deps: MetaItem, **fields) -> None:
        """Change header fields; the header is written once ``deps`` are durable."""
        self.hdr = attrs.evolve(self.hdr, **fields)
        self.touch(*deps)

    def current(self) -> fmt.Header:
        return self.locate(self.hdr) if self.locate is not None else self.hdr

    def placed(self) -> tuple[int, bytes]:
        # The whole first cluster, as QEMU's qcow2_update_header writes it:
        # an O_DIRECT backend then writes it without reading it first (seed
        # 003: no read-modify-write), and nothing but the header lives there.
        hdr = self.current()
        return 0, hdr.encode().ljust(hdr.cluster_size, b"\0")


class TableCache:
    """Bounded LRU of L2 tables and refcount blocks, keyed by host offset.

    Only tables that are not dirty are evicted; dirty ones stay until
    written. The metadata queue watches :attr:`over_budget` and writes the
    ready metadata out early, without a sync, when too much of the cache is
    dirty, so memory stays bounded whatever the image size.
    """

    def __init__(self, capacity: int):
        self.capacity = max(4, capacity)
        self._tables: collections.OrderedDict[int, Table] = collections.OrderedDict()
        # Told when a table enters or leaves the cache: the data plane publishes
        # the mappings of cached L2 tables only, so its memory is bounded as
        # this cache is (DATAPLANE.md, "The mapping contract").
        self.listeners: list = []
        # Invariant: at most one live Table object per offset. A plan may still
        # hold a table the LRU dropped; a later lookup must find that same
        # object, not load a second copy whose update would be lost.
        self._live: weakref.WeakValueDictionary[int, Table] = weakref.WeakValueDictionary()

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, offset: int) -> Table | None:
        table = self._tables.get(offset)
        if table is None:
            table = self._live.get(offset)
            if table is not None:
                self.put(table)
        if table is not None:
            self._tables.move_to_end(offset)
        return table

    def put(self, table: Table) -> Table:
        """Insert (or re-insert after an eviction) and trim clean tables."""
        entering = table.offset not in self._tables
        self._tables[table.offset] = table
        self._tables.move_to_end(table.offset)
        self._live[table.offset] = table
        if entering:
            for listener in self.listeners:
                listener.entered(table)
        self._trim(keep=table)
        return table

    def _left(self, table: Table) -> None:
        for listener in self.listeners:
            listener.left(table)

    def _trim(self, keep: Table | None = None) -> None:
        # A WRITTEN table may go too: its bytes are in the file, and the engine
        # keeps it (awaiting the sync) so a reload finds this same object.
        if len(self._tables) > self.capacity:
            for off in [o for o, t in self._tables.items() if t.state is not State.DIRTY and t is not keep]:
                if len(self._tables) <= self.capacity:
                    break
                self._left(self._tables.pop(off))

    def trim(self) -> None:
        """Evict what may be evicted now (after an early writeout)."""
        self._trim()

    def clear(self) -> None:
        """Forget every table (a new metadata generation replaced them all); none may be dirty."""
        for off in list(self._tables):
            assert self._tables[off].state is not State.DIRTY, f"dropping dirty table {off:#x}"
            self.drop(off)
        self._live.clear()

    def drop(self, offset: int) -> None:
        table = self._tables.pop(offset, None)
        self._live.pop(offset, None)
        if table is not None:
            self._left(table)

    @property
    def over_budget(self) -> bool:
        return len(self._tables) > self.capacity

    def values(self):
        return list(self._tables.values())
