"""Discard, write-zeroes and SEEK_DATA/SEEK_HOLE planned on the mapping. No I/O, no trio.

What it owns (docs/design.md, "Discard, write-zeroes, SEEK_DATA"):

- :func:`plan_clear`: the L2 updates that make whole guest clusters read as
  zeros without their host clusters. A discard (``fallocate -p``, a guest's
  TRIM) makes them unallocated: with no backing file (engine.py refuses
  those) an unallocated cluster reads as zeros, which is all a discard
  promises. A write-zeroes (``fallocate -z``) makes them zero clusters in
  v3 (spec "Standard Cluster Descriptor", bit 0) that keep their own host
  cluster (preallocated), unallocated in v2, which has no zero flag. The
  host clusters dropped are freed by ``ClusterMap.remap``,
  which the caller reaches through ``Engine.commit``: the mapping-change
  hook fires, and the metadata queue lowers each refcount only once the L2
  table that dropped it is durable (invariant 2) and no I/O still uses it,
  in the same writeout as everything else, so a discard costs no sync of
  its own.
- :func:`plan_seek`: the first data or hole offset at or after a guest
  offset, for lseek's SEEK_DATA and SEEK_HOLE. Data is what a read takes
  from the file (plain or compressed clusters); unallocated and zero
  clusters are holes, and so is the guest's end, as for any file.

Partial clusters at the edges of a range are the caller's: it writes zeros
there through the ordinary write path (image.py), where they are needed.
"""

from __future__ import annotations

from cachefs.errors import DamagedMetadata, UnsupportedOperation
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.plan import L2Update, WritePlan


def whole_clusters(offset: int, length: int, cluster_size: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(first cluster, count, edges): the clusters [offset, offset+length) covers whole, and the
    partial (offset, length) pieces around them, each inside one cluster."""
    end = offset + length
    first, last = -(-offset // cluster_size), end // cluster_size
    if first > last:  # inside one cluster
        return first, 0, [(offset, length)] if length else []
    # first == last: no whole cluster, but the range may still cross the boundary at first.
    edges = [(offset, first * cluster_size - offset), (last * cluster_size, end - last * cluster_size)]
    return first, last - first, [(o, n) for o, n in edges if n > 0]


def reads_as_zeros(entry: int) -> bool:
    """Unallocated, or a zero cluster (with or without a preallocated host cluster)."""
    return not entry & fmt.L2_COMPRESSED and bool(entry & fmt.L2_ZERO or not entry & fmt.OFFSET_MASK)


def plan_clear(engine, first: int, count: int, *, zero: bool):
    """Generator: a WritePlan (no data writes) clearing guest clusters [first, first + count),
    all in one L2 table. Caller holds the image's write lock, then commits it.

    A range with no L2 table is left alone: it is unallocated already, and
    creating a table to say "zero" would allocate for nothing.
    """
    engine.overlap.check_writable()
    m = engine.map
    if (first + count - 1) // m.l2_entries != first // m.l2_entries:
        raise ValueError("plan_clear covers one L2 table at a time")
    if m.l2_offset(first // m.l2_entries) == 0:
        return WritePlan((), ())
    zero_flag = zero and engine.header.hdr.version >= 3
    table, idx = yield from m.table_for_write(first)
    updates = []
    for i in range(count):
        entry = table.entries[idx + i]
        try:
            m.validate(entry, first + i)
        except DamagedMetadata:
            continue  # a damaged entry is not ours to interpret: reads of it keep failing
        new = _cleared(entry, zero_flag)
        if new != entry:
            updates.append(L2Update(first + i, new, entry, None, table, idx + i, data_first=False))
    return WritePlan((), tuple(updates))


def _cleared(entry: int, zero_flag: bool) -> int:
    """The entry that makes one whole cluster read as zeros.

    Discard (and v2, which has no zero flag): unallocated. Write-zeroes in
    v3: a zero cluster that keeps an exclusively owned host cluster (spec
    "zero cluster with a host offset": preallocated, as QEMU's write-zeroes
    without MAY_UNMAP and fallocate's ZERO_RANGE on a local filesystem keep
    the space, so a later write there allocates nothing); a compressed or
    shared one is dropped. An entry that reads as zeros with nothing to
    drop is left as it is.
    """
    off = entry & fmt.OFFSET_MASK
    if reads_as_zeros(entry) and (not off or zero_flag):
        return entry
    if zero_flag and off and entry & fmt.L2_COPIED and not entry & fmt.L2_COMPRESSED:
        return off | fmt.L2_ZERO | fmt.L2_COPIED
    return fmt.L2_ZERO if zero_flag else 0


def plan_allocate(engine, first: int, count: int):
    """Generator: a WritePlan preallocating guest clusters [first, first + count), all in one L2
    table (fallocate mode 0, qemu-img's preallocation=falloc). Caller holds the write lock, gives
    the new host clusters their space (the plan's updates name them), then commits, or aborts.

    Each cluster without a host cluster gets one, as a zero cluster with that
    offset (v3 only: v2 has no zero flag, refused with EOPNOTSUPP): it reads
    as zeros whatever the host cluster held, and a later write goes there in
    place (engine._in_place). Invariant 1 holds through Engine.commit (the
    refcount first). An entry may wait for the data item only when the host
    cluster was not reserved: the file's new length must be durable before a
    reference to a cluster past its old end (qemu-img check calls that
    corruption).
    """
    engine.overlap.check_writable()
    if engine.header.hdr.version < 3:
        raise UnsupportedOperation("preallocating clusters of a qcow2 v2 image needs a zero flag it has not")
    m = engine.map
    if (first + count - 1) // m.l2_entries != first // m.l2_entries:
        raise ValueError("plan_allocate covers one L2 table at a time")
    table, idx = yield from m.table_for_write(first)
    updates = []
    for i in range(count):
        entry = table.entries[idx + i]
        try:
            m.validate(entry, first + i)
        except DamagedMetadata:
            continue
        if entry & fmt.L2_COMPRESSED or entry & fmt.OFFSET_MASK:
            continue  # it has its space already
        a = yield from m.allocate("data")
        host = a.cluster << engine.cb
        engine.refs.note_written(host + engine.cs)
        updates.append(L2Update(first + i, host | fmt.L2_ZERO | fmt.L2_COPIED, entry, a.cluster, table, idx + i,
                                data_first=not a.fresh))
    return WritePlan((), tuple(updates))


def is_data(entry: int) -> bool:
    return not reads_as_zeros(entry)


def plan_seek(engine, offset: int, *, data: bool):
    """Generator: the first guest offset >= ``offset`` that is data (``data``) or a hole; None
    when SEEK_DATA finds no data before the guest's end (lseek's ENXIO). ``offset`` is below
    the guest's size (the caller answers ENXIO otherwise).

    A missing L2 table is a hole of a whole table's span, skipped in one step;
    a damaged entry counts as data (reading it fails, it holds no zeros).
    """
    m, cs, size = engine.map, engine.cs, engine.size
    vcl = offset // cs
    while vcl * cs < size:
        l1_idx = vcl // m.l2_entries
        try:
            has_table = m.l2_offset(l1_idx) != 0
        except DamagedMetadata:
            has_table = True
        if not has_table:
            if not data:
                return max(offset, vcl * cs)
            vcl = (l1_idx + 1) * m.l2_entries
            continue
        try:
            entry = yield from m.entry(vcl)
            here = is_data(entry)
        except DamagedMetadata:
            here = True
        if here == data:
            return max(offset, vcl * cs)
        vcl += 1
    return None if data else size


def plan_map(engine):
    """Generator: the guest disk as runs of (start, length, Mapping) in qemu-img map's terms.

    Runs join like qemu-img map's entries: same kind, and for data the host
    offsets continue. A missing L2 table is one unallocated run.
    """
    from cachefs.qcow2.cluster import Mapping, MappingKind
    m, cs, size = engine.map, engine.cs, engine.size
    runs: list[list] = []
    vcl = 0
    while vcl * cs < size:
        l1_idx = vcl // m.l2_entries
        if m.l2_offset(l1_idx) == 0:
            n = min((l1_idx + 1) * m.l2_entries, -(-size // cs)) - vcl
            _extend(runs, vcl * cs, n * cs, Mapping(MappingKind.UNALLOCATED))
            vcl += n
            continue
        entry = yield from m.entry(vcl)
        _extend(runs, vcl * cs, cs, Mapping.of(entry, engine.cb))
        vcl += 1
    if runs:
        runs[-1][1] = size - runs[-1][0]  # the last cluster may pass the guest's end
    return [tuple(r) for r in runs]


def has_offset(mapping) -> bool:
    """qemu-img map gives an offset for plain data and preallocated zero clusters (OFFSET_VALID)."""
    from cachefs.qcow2.cluster import MappingKind
    return mapping.kind in (MappingKind.DATA, MappingKind.ZERO) and bool(mapping.host_offset)


def _extend(runs: list[list], start: int, length: int, mapping) -> None:
    if runs:
        last = runs[-1]
        prev = last[2]
        if (prev.kind, has_offset(prev)) == (mapping.kind, has_offset(mapping)) and (
                not has_offset(mapping) or prev.host_offset + last[1] == mapping.host_offset):
            last[1] += length
            return
    runs.append([start, length, mapping])
