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
there through the ordinary write path (image/base.py), where they are needed.
"""

from __future__ import annotations

from cachefs.errors import DamagedMetadata, UnsupportedOperation
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.cluster import MappingKind
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
    _one_table(m, first, count, "plan_clear")
    if m.l2_offset(first // m.l2_entries) == 0:
        return WritePlan((), ())
    zero_flag = zero and engine.header.hdr.version >= 3
    table, idx = yield from m.table_for_write(first)
    updates = []
    for i, entry in _valid_entries(m, table, idx, first, count):
        new = _cleared(entry, zero_flag)
        if new != entry:
            updates.append(L2Update(first + i, new, entry, None, table, idx + i, data_first=False))
    return WritePlan((), tuple(updates))


def _one_table(m, first: int, count: int, who: str) -> None:
    if (first + count - 1) // m.l2_entries != first // m.l2_entries:
        raise ValueError(f"{who} covers one L2 table at a time")


def _valid_entries(m, table, idx: int, first: int, count: int):
    """(i, entry) of the table's entries for guest clusters first + i that validate. A damaged
    entry is not ours to interpret: it is left alone, and reads of it keep failing."""
    for i in range(count):
        entry = table.entries[idx + i]
        try:
            m.validate(entry, first + i)
        except DamagedMetadata:
            continue
        yield i, entry


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
    _one_table(m, first, count, "plan_allocate")
    table, idx = yield from m.table_for_write(first)
    updates = []
    for i, entry in list(_valid_entries(m, table, idx, first, count)):
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

    A missing L2 table is a hole of a whole table's span, skipped in one
    step; a loaded table is scanned in one pass over its entries (a
    SEEK_HOLE across a full 1 TiB disk reads every table once). The
    entries' bits decide, without validation: a damaged one that claims
    data counts as data (reading it fails, it holds no zeros), and so does a
    damaged L1 entry's whole range.
    """
    m, cs = engine.map, engine.cs
    vcl, nclusters, per = offset // cs, -(-engine.size // cs), m.l2_entries
    while vcl < nclusters:
        l1_idx, idx = divmod(vcl, per)
        stop = min(per, nclusters - l1_idx * per)
        try:
            off = m.l2_offset(l1_idx)
        except DamagedMetadata:
            off = -1
        if off <= 0:
            if (off < 0) == data:  # no table: a hole; a damaged L1 entry: data
                return max(offset, vcl * cs)
            vcl = (l1_idx + 1) * per
            continue
        entries = (yield from m.load_l2(off, l1_idx)).entries
        hit = next((i for i in range(idx, stop) if is_data(entries[i]) == data), None)
        if hit is not None:
            return max(offset, (l1_idx * per + hit) * cs)
        vcl = (l1_idx + 1) * per
    return None if data else engine.size


def plan_map(engine):
    """Generator: the guest disk as runs (start, length, kind, offset) in qemu-img map's terms:
    ``kind`` a MappingKind (UNALLOCATED, ZERO, DATA, COMPRESSED), ``offset`` the host offset
    where qemu-img map gives one (plain data, preallocated zero clusters), else None.

    Runs join as qemu-img map joins its entries: the same kind, an offset on
    both or neither, and offsets that continue. A missing L2 table is one
    unallocated run; a loaded table is read in one pass.
    """
    m, cs = engine.map, engine.cs
    nclusters, per = -(-engine.size // cs), m.l2_entries
    runs: list[list] = []
    for l1_idx in range(-(-nclusters // per)):
        first = l1_idx * per
        n = min(per, nclusters - first)
        off = m.l2_offset(l1_idx)
        if off == 0:
            _join(runs, first * cs, n * cs, MappingKind.UNALLOCATED, None)
            continue
        entries = (yield from m.load_l2(off, l1_idx)).entries
        for i in range(n):
            e = entries[i]
            if e:
                m.validate(e, first + i)  # a damaged entry: DamagedMetadata, one line from the CLI
            _join(runs, (first + i) * cs, cs, *_kind(e))
    if runs:
        runs[-1][1] = engine.size - runs[-1][0]  # the last cluster may pass the guest's end
    return [tuple(r) for r in runs]


def _kind(entry: int) -> tuple[MappingKind, int | None]:
    if entry & fmt.L2_COMPRESSED:
        return MappingKind.COMPRESSED, None
    off = entry & fmt.OFFSET_MASK
    if entry & fmt.L2_ZERO:
        return MappingKind.ZERO, off or None
    return (MappingKind.DATA, off) if off else (MappingKind.UNALLOCATED, None)


def _join(runs: list[list], start: int, length: int, kind: MappingKind, host: int | None) -> None:
    if runs:
        last = runs[-1]
        if last[2] is kind and (last[3] is None) == (host is None) and (host is None or last[3] + last[1] == host):
            last[1] += length
            return
    runs.append([start, length, kind, host])
