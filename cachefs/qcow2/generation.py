"""Snapshot operations as new metadata generations, switched by one header write. Sans-I/O.

What it owns: creating, deleting and applying internal snapshots, and giving
shared active L2 tables private copies (``unshare``), each so that a crash at
any point leaves the old image or the new one, never a mix.

Why not QEMU's way: qcow2_snapshot_create and friends (block/qcow2-snapshot.c)
update refcounts and COPIED flags in place, so a crash half way leaves
"ERROR OFLAG_COPIED" for ``qemu-img check`` (a corruption). Here nothing old is
modified. An operation computes, in memory, a complete new generation: the
active L1 table, the active L2 tables that change, the snapshot table, and the
whole refcount structure (spec "Host cluster management"), all in fresh
clusters at or past ``alloc_from``. :func:`write_generation` writes them, syncs,
and then writes the header's first sector, which names the new tables
(l1_table_offset, l1_size, refcount_table_offset, refcount_table_clusters,
nb_snapshots, snapshots_offset and size all lie in its first 104 bytes), and
syncs again. A crash before that sector lands leaves the old generation, whose
refcounts never counted the new clusters: they are past its end or free. After
it, the new generation is exact.

The refcounts (the invariant every operation keeps): for each host cluster,
``new = current + R_new - R_old``, where R is the full reference count of a
generation as qemu-img check counts it (check.py). Keeping ``current`` keeps
whatever the live engine holds that nothing references (its reservation,
clusters lent to the data plane, frees not yet applied), so its bookkeeping
stays valid across the switch (Engine.switch_generation). R_new - R_old is
built from the parts that change: each L1 table's references
(check.layer_references), the snapshot table's clusters, the refcount
structure's own.

COPIED (spec "L1 table", "L2 table": set when the refcount is exactly one):
every active L2 table of a new generation is private, and its entries' flags
follow the new refcounts; a table that is shared, or whose flags would change,
gets a fresh copy. Inactive (snapshot) tables keep their flags: the spec has
readers ignore them there, and qemu-img check does not look.
"""

from __future__ import annotations

import struct

import attrs

from cachefs.errors import CachefsError, CorruptImage, SnapshotExists, UnsupportedImage, UnsupportedOperation
from cachefs.qcow2 import bitmaps, check, snapshots
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.plan import ReadRequest, SyncRequest, WriteRequest
from cachefs.qcow2.snapshots import SnapshotEntry

#: The header bytes a generation switch writes: one sector, atomic on the disks QEMU assumes too.
HEADER_SECTOR = 512
#: spec "Header": where the fields a generation changes live (all inside the first 72 bytes).
SIZE_AT, L1_AT, REFTABLE_AT, SNAPSHOTS_AT = 24, 36, 48, 60


@attrs.frozen
class Generation:
    header: fmt.Header          # the new header
    l1: list[int]               # the new active L1 table (entries)
    reftable: list[int]         # the new refcount table (entries)
    writes: tuple[tuple[int, bytes], ...]   # new structures (all at clusters >= alloc_from)
    freed: tuple[int, ...]      # host clusters whose refcount becomes 0
    end: int                    # bytes: the file must be at least this long after the writes
    snapshot: SnapshotEntry | None  # the entry created/deleted/applied
    # The on-disk first sector with the new fields patched in: the switch (write_generation).
    header_sector: bytes = attrs.field(default=b"", repr=False)


def write_generation(gen: Generation):
    """Generator: the new structures, a sync, then the header sector that switches to them, a sync."""
    for offset, data in gen.writes:
        yield WriteRequest(offset, data)
    yield SyncRequest()
    yield WriteRequest(0, gen.header_sector)
    yield SyncRequest()


# ---------------------------------------------------------------- the operations

def create_snapshot(hdr: fmt.Header, file_size: int, alloc_from: int, name: str, now_ns: int):
    """Generator: a new snapshot ``name`` of the active layer (qemu-img snapshot -c).

    The snapshot takes the current active L1 table where it is (its COPIED flags do not matter
    once inactive); the new active L1 points at private copies of every L2 table.
    """
    _refuse(hdr, "create")
    if not name:
        raise CachefsError("a snapshot needs a name")
    b = yield from _Builder.load(hdr, file_size, alloc_from)
    if any(e.is_named(name) for e in b.entries):
        raise SnapshotExists(f"a snapshot named '{name}' exists already")
    if len(b.entries) >= fmt.MAX_SNAPSHOTS:
        raise UnsupportedOperation(f"the image has {fmt.MAX_SNAPSHOTS} snapshots, the most qcow2 allows")
    entry = snapshots.new_entry(snapshots.next_id(b.entries), name, hdr.l1_table_offset, hdr.l1_size,
                                hdr.size, now_ns)
    tables: dict[int, list[int]] = {}
    active = yield from check.layer_references(hdr, file_size, hdr.l1_table_offset, hdr.l1_size, tables)
    b.count(active, +1)  # the snapshot's L1 (the old active one) and what it references
    b.rebuild_active(b.l1, tables, (hdr.l1_table_offset, hdr.l1_size), hdr.l1_size, move=True)
    b.write_snapshots([*b.entries, entry])
    return b.finish(entry)


def delete_snapshot(hdr: fmt.Header, file_size: int, alloc_from: int, name_or_id: str):
    """Generator: drop a snapshot (qemu-img snapshot -d); what only it held is freed."""
    _refuse(hdr, "delete")
    b = yield from _Builder.load(hdr, file_size, alloc_from)
    entry = snapshots.find(b.entries, name_or_id)
    gone = yield from check.layer_references(hdr, file_size, entry.l1_offset, entry.l1_size)
    b.count(gone, -1)
    tables: dict[int, list[int]] = {}
    yield from check.layer_references(hdr, file_size, hdr.l1_table_offset, hdr.l1_size, tables)
    b.rebuild_active(b.l1, tables, (hdr.l1_table_offset, hdr.l1_size), hdr.l1_size, move=False)
    b.write_snapshots([e for e in b.entries if e is not entry])
    return b.finish(entry)


def apply_snapshot(hdr: fmt.Header, file_size: int, alloc_from: int, name_or_id: str):
    """Generator: revert the active layer to a snapshot (qemu-img snapshot -a).

    The active L1 becomes private copies of the snapshot's L2 tables and the virtual size the
    snapshot's (when it recorded one, spec "Snapshot table": disk_size); the old active tables
    are freed. The snapshot table stays where it is.
    """
    _refuse(hdr, "apply")
    b = yield from _Builder.load(hdr, file_size, alloc_from)
    entry = snapshots.find(b.entries, name_or_id)
    old = yield from check.layer_references(hdr, file_size, hdr.l1_table_offset, hdr.l1_size)
    b.count(old, -1)
    tables: dict[int, list[int]] = {}
    source = yield from check.layer_references(hdr, file_size, entry.l1_offset, entry.l1_size, tables)
    b.count(source, +1)
    size = hdr.size if entry.disk_size is None else entry.disk_size
    l1 = fmt.decode_table(bytes((yield ReadRequest(entry.l1_offset, entry.l1_size * 8))))
    l1_size = max(entry.l1_size, fmt.max_l1_entries(size, hdr.cluster_bits))
    b.rebuild_active(l1, tables, (entry.l1_offset, entry.l1_size), l1_size, move=True)
    b.size = size
    return b.finish(entry)


def unshare(hdr: fmt.Header, file_size: int, alloc_from: int):
    """Generator: private copies of the shared active L2 tables (no logical change), so the image
    can be written (cluster.ClusterMap.table_for_write); None when no active table is shared."""
    _refuse(hdr, "unshare")
    l1 = fmt.decode_table(bytes((yield ReadRequest(hdr.l1_table_offset, hdr.l1_size * 8))))
    if all(e & fmt.L1_COPIED for e in l1 if e & fmt.OFFSET_MASK):
        return None
    b = yield from _Builder.load(hdr, file_size, alloc_from)
    tables: dict[int, list[int]] = {}
    yield from check.layer_references(hdr, file_size, hdr.l1_table_offset, hdr.l1_size, tables)
    b.rebuild_active(b.l1, tables, (hdr.l1_table_offset, hdr.l1_size), hdr.l1_size, move=False)
    return b.finish(None)


def _refuse(hdr: fmt.Header, op: str) -> None:
    """What no snapshot operation may touch, one line each."""
    if hdr.crypt_method:
        raise UnsupportedImage("encrypted images are not supported")
    if hdr.incompatible & fmt.INCOMPAT_DATA_FILE:
        raise UnsupportedImage("internal snapshots are not supported with an external data file")
    if hdr.incompatible & fmt.INCOMPAT_EXTL2:
        raise UnsupportedImage("images with extended L2 entries (subclusters) are not supported")
    if hdr.corrupt:
        raise CorruptImage("the image is marked corrupt; run 'cachefs check --repair all'")
    if op == "create" and hdr.version < 3:
        raise UnsupportedImage("internal snapshots need a qcow2 v3 image (compat=1.1); this one is v2")
    if op != "unshare" and bitmaps.count(hdr):
        # A bitmap tracks changes to the active layer; a snapshot operation would make it lie.
        raise UnsupportedImage("the image has persistent dirty bitmaps; internal snapshots are not "
                               "supported with them")


# ---------------------------------------------------------------- building a generation

@attrs.define
class _Builder:
    """One generation in the making: ``rc`` holds the new refcounts as they are worked out
    (``current`` plus the changes counted so far), ``next`` the first unused fresh cluster."""

    hdr: fmt.Header
    file_size: int
    current: list[int]
    rc: list[int]
    next: int
    entries: list[SnapshotEntry]
    l1: list[int]
    sector: bytes
    writes: list = attrs.Factory(list)
    new_l1: list[int] = attrs.Factory(list)
    l1_offset: int = 0
    snapshots_offset: int = 0
    nb_snapshots: int = 0
    size: int = 0

    @classmethod
    def load(cls, hdr: fmt.Header, file_size: int, alloc_from: int):
        """Generator: the old generation checked (a snapshot is not taken of a damaged image) and
        its refcounts read, every cluster's, past the end of the file too (a live reservation)."""
        result = yield from check.check_header(hdr, file_size)
        if result.corruptions or result.errors:
            why = result.corruptions[0] if result.corruptions else "refcounts that cannot be read"
            raise CorruptImage(f"the image has errors ({why}); run 'cachefs check --repair all'")
        current = yield from _read_refcounts(hdr, result.reftable)
        entries = yield from snapshots.read_entries(hdr, file_size)
        l1 = fmt.decode_table(bytes((yield ReadRequest(hdr.l1_table_offset, hdr.l1_size * 8))))
        sector = bytes((yield ReadRequest(0, min(HEADER_SECTOR, hdr.cluster_size))))
        used = next((c + 1 for c in range(len(current) - 1, -1, -1) if current[c]), 0)
        first = max(alloc_from, used, -(-file_size // hdr.cluster_size),
                    result.image_end_offset // hdr.cluster_size)
        # Room for every cluster a layer's references may name (check's arrays: one past the file).
        current += [0] * (max(first, -(-file_size // hdr.cluster_size) + 1) - len(current))
        b = cls(hdr, file_size, current, list(current), first, entries, l1, sector,
                snapshots_offset=hdr.snapshots_offset, nb_snapshots=hdr.nb_snapshots, size=hdr.size)
        b.l1_offset = hdr.l1_table_offset
        b.forget(hdr.refcount_table_offset, hdr.refcount_table_clusters * hdr.cluster_size)
        for entry in result.reftable:
            if entry & check.REFT_OFFSET_MASK:
                b.forget(entry & check.REFT_OFFSET_MASK, hdr.cluster_size)
        return b

    # ------------------------------------------------------------ counting

    def count(self, refs, sign: int) -> None:
        """Add (or take away) one layer's references (check.layer_references)."""
        rc = self.rc
        for c, n in enumerate(refs):
            if n:
                rc[c] += sign * n

    def forget(self, offset: int, nbytes: int) -> None:
        """One reference less to each cluster of [offset, offset+nbytes): a structure the new
        generation no longer uses."""
        cb = self.hdr.cluster_bits
        if nbytes > 0:
            for c in range(offset >> cb, (offset + nbytes - 1 >> cb) + 1):
                self.rc[c] -= 1

    def place(self, data: bytes) -> int:
        """Put a new structure in fresh clusters (counted once each); returns its offset."""
        cs = self.hdr.cluster_size
        n = max(1, -(-len(data) // cs))
        first, self.next = self.next, self.next + n
        self.rc.extend([0] * (self.next - len(self.rc)))
        for c in range(first, first + n):
            self.rc[c] += 1
        self.writes.append((first * cs, bytes(data).ljust(n * cs, b"\0")))
        return first * cs

    # ------------------------------------------------------------ the active layer

    def rebuild_active(self, source: list[int], tables: dict[int, list[int]], held: tuple[int, int],
                       l1_size: int, *, move: bool) -> None:
        """The new active L1, pointing at ``source``'s L2 tables (counted already, with the data
        they name, and ``held``, the L1 table that counted them: its clusters are not the active
        L1's any more). A table that is shared or whose COPIED flags change gets a private copy;
        the L1 stays where it is if nothing in it changes and ``move`` is not asked."""
        self.forget(held[0], held[1] * 8)
        cb = self.hdr.cluster_bits
        new = [0] * l1_size
        for i, entry in enumerate(source[:l1_size]):
            off = entry & fmt.OFFSET_MASK
            if not off:
                continue
            old = tables[off]
            want = self.flagged(old)
            if self.rc[off >> cb] != 1 or want != old:
                self.rc[off >> cb] -= 1  # the active L1 points at the copy instead
                off = self.place(fmt.encode_table(want))
            new[i] = off | fmt.L1_COPIED
        self.new_l1 = new
        if not move and new == self.l1:
            self.rc_add_range(self.hdr.l1_table_offset, len(new) * 8)
            return
        self.l1_offset = self.place(fmt.encode_table(new))

    def rc_add_range(self, offset: int, nbytes: int) -> None:
        cb = self.hdr.cluster_bits
        for c in range(offset >> cb, (offset + max(nbytes, 1) - 1 >> cb) + 1):
            self.rc[c] += 1

    def flagged(self, entries: list[int]) -> list[int]:
        """An L2 table's entries with COPIED as the new refcounts say (spec "L2 table": refcount
        exactly one); compressed and unallocated entries stay as they are."""
        cb, rc, out = self.hdr.cluster_bits, self.rc, []
        for e in entries:
            off = e & fmt.OFFSET_MASK
            if e & fmt.L2_COMPRESSED or not off:
                out.append(e)
            else:
                out.append(e | fmt.L2_COPIED if rc[off >> cb] == 1 else e & ~fmt.L2_COPIED)
        return out

    def write_snapshots(self, entries: list[SnapshotEntry]) -> None:
        """A new snapshot table in fresh clusters (the old one's clusters are not referenced any more)."""
        if self.hdr.nb_snapshots:
            old = len(snapshots.encode_table(self.entries))
            self.forget(self.hdr.snapshots_offset, old)
        self.nb_snapshots = len(entries)
        self.snapshots_offset = self.place(snapshots.encode_table(entries)) if entries else 0

    # ------------------------------------------------------------ the refcount structure

    def finish(self, entry: SnapshotEntry | None) -> Generation:
        limit = (1 << self.hdr.refcount_bits) - 1
        bad = next((c for c, n in enumerate(self.rc) if not 0 <= n <= limit), None)
        if bad is not None:
            if self.rc[bad] > limit:
                raise UnsupportedOperation(f"cluster {bad} would need a refcount of {self.rc[bad]}, more than "
                                           f"refcount_bits={self.hdr.refcount_bits} can hold")
            raise CorruptImage(f"cluster {bad} would get a refcount of {self.rc[bad]}")
        table, offset, clusters = self.refcount_structure()
        hdr = attrs.evolve(self.hdr, size=self.size, l1_size=len(self.new_l1), l1_table_offset=self.l1_offset,
                           refcount_table_offset=offset, refcount_table_clusters=clusters,
                           nb_snapshots=self.nb_snapshots, snapshots_offset=self.snapshots_offset)
        freed = tuple(c for c, n in enumerate(self.current) if n and not self.rc[c])
        return Generation(header=hdr, l1=self.new_l1, reftable=table, writes=tuple(self.writes), freed=freed,
                          end=self.next * self.hdr.cluster_size, snapshot=entry, header_sector=self.patched(hdr))

    def refcount_structure(self):
        """A refcount table and blocks for ``rc`` that count themselves too: grown until they
        cover their own clusters (QEMU's rebuild_refcount_structure reaches the same fixpoint).
        Returns (entries, offset, clusters) and adds the writes; ``next`` is then the end."""
        hdr, cs = self.hdr, self.hdr.cluster_size
        per, k = hdr.refblock_entries, self.next
        rc = self.rc
        used = {i for i in range(-(-k // per)) if any(rc[i * per:(i + 1) * per])}
        rt, nb = max(1, hdr.refcount_table_clusters), 0
        for _ in range(64):
            needed = used | {c // per for c in range(k, k + rt + nb)}
            need_rt = -(-(max(needed) + 1) * 8 // cs)
            if len(needed) == nb and need_rt <= rt:
                break
            nb, rt = len(needed), max(rt, need_rt)
        else:
            raise CorruptImage("the refcount structure does not converge")
        end = k + rt + nb
        rc.extend([0] * (end - len(rc)))
        for c in range(k, end):
            rc[c] += 1
        table = [0] * (rt * cs // 8)
        for j, i in enumerate(sorted(needed)):
            table[i] = (k + rt + j) * cs
        self.writes.append((k * cs, fmt.encode_table(table)))
        for j, i in enumerate(sorted(needed)):
            entries = rc[i * per:(i + 1) * per]
            entries += [0] * (per - len(entries))
            self.writes.append(((k + rt + j) * cs, fmt.RefcountBlock.encode(entries, hdr.refcount_order)))
        self.next = end
        return table, k * cs, rt

    def patched(self, hdr: fmt.Header) -> bytes:
        """The first sector as it is on disk with the new generation's fields: the rest of the
        header (extensions, the backing name, unknown fields) stays byte for byte."""
        out = bytearray(self.sector)
        struct.pack_into(">Q", out, SIZE_AT, hdr.size)
        struct.pack_into(">IQ", out, L1_AT, hdr.l1_size, hdr.l1_table_offset)
        struct.pack_into(">QI", out, REFTABLE_AT, hdr.refcount_table_offset, hdr.refcount_table_clusters)
        struct.pack_into(">IQ", out, SNAPSHOTS_AT, hdr.nb_snapshots, hdr.snapshots_offset)
        return bytes(out)


def _read_refcounts(hdr: fmt.Header, reftable):
    """Generator: every cluster's refcount as stored, up to the last block's end (the image
    passed check.check_header, so every block is aligned and inside the image)."""
    per, cs = hdr.refblock_entries, hdr.cluster_size
    last = max((i for i, e in enumerate(reftable) if e & check.REFT_OFFSET_MASK), default=-1)
    out = [0] * ((last + 1) * per)
    for i in range(last + 1):
        off = reftable[i] & check.REFT_OFFSET_MASK
        if off:
            buf = bytes((yield ReadRequest(off, cs)))
            if len(buf) < cs:
                raise CorruptImage(f"refcount block {i} at {off:#x} is truncated")
            out[i * per:(i + 1) * per] = fmt.RefcountBlock.decode(buf, hdr.refcount_order)
    return out
