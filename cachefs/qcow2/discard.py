"""Discard, write-zeroes and SEEK_DATA/SEEK_HOLE planned on the mapping. No I/O, no trio.

What it owns (docs/design.md, "Discard, write-zeroes, SEEK_DATA"):

- :func:`plan_clear`: the L2 updates that make whole guest clusters read as
  zeros without their host clusters. A discard (``fallocate -p``, a guest's
  TRIM) makes them unallocated: with no backing file an unallocated cluster
  reads as zeros, which is all a discard promises. With a backing file it
  would read the backing file's bytes (spec "Cluster mapping"), so there a
  discard makes zero clusters (v3), and a v2 image, which has no zero flag,
  refuses discard and write-zeroes (EOPNOTSUPP: the client writes zeros,
  as QEMU falls back to). A write-zeroes (``fallocate -z``) makes them zero clusters in
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
  clusters are holes, and so is the guest's end, as for any file. In an
  image with a backing file, clusters unallocated here are neither: the
  answer there is the backing image's, so the first such run is returned as
  :class:`SeekBacking` for the caller to ask the backing chain about.
- :func:`plan_map`: the guest disk as qemu-img map runs; clusters unallocated
  in an image with a backing file are ``MappingKind.BACKING``.

Partial clusters at the edges of a range are the caller's: it writes zeros
there through the ordinary write path (image/base.py), where they are needed.
"""

from __future__ import annotations

import attrs

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


def reads_as_zeros(entry: int, *, backed: bool = False) -> bool:
    """A zero cluster (with or without a preallocated host cluster), or unallocated in an image
    without a backing file (``backed``: with one, unallocated reads the backing chain)."""
    if entry & fmt.L2_COMPRESSED:
        return False
    return bool(entry & fmt.L2_ZERO or not (entry & fmt.OFFSET_MASK or backed))


def refuse_v2_backed(engine, what: str) -> None:
    if engine.backed and engine.header.hdr.version < 3:
        raise UnsupportedOperation(f"{what} in a qcow2 v2 image with a backing file would uncover the "
                                   f"backing file's data (v2 has no zero flag)")


def plan_clear(engine, first: int, count: int, *, zero: bool):
    """Generator: a WritePlan (no data writes) clearing guest clusters [first, first + count),
    all in one L2 table. Caller holds the image's write lock, then commits it.

    A range with no L2 table is left alone: it is unallocated already, and
    creating a table to say "zero" would allocate for nothing. Not over a
    backing file: there both make zero clusters (a discard drops the host
    cluster, a write-zeroes keeps it as for any image); v2 refuses.
    """
    engine.overlap.check_writable()
    refuse_v2_backed(engine, "write-zeroes" if zero else "discard")
    m, backed = engine.map, engine.backed
    _one_table(m, first, count, "plan_clear")
    if m.l2_offset(first // m.l2_entries) == 0 and not backed:
        return WritePlan((), ())
    zero_flag = (zero or backed) and engine.header.hdr.version >= 3
    table, idx = yield from m.table_for_write(first)
    updates = []
    for i, entry in _valid_entries(m, table, idx, first, count):
        new = _cleared(entry, zero_flag, keep_space=zero, backed=backed)
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


def _cleared(entry: int, zero_flag: bool, *, keep_space: bool, backed: bool) -> int:
    """The entry that makes one whole cluster read as zeros.

    Discard (and v2, which has no zero flag): unallocated, or over a backing
    file (v3) a zero cluster without a host cluster. Write-zeroes
    (``keep_space``) in v3: a zero cluster that keeps an exclusively owned
    host cluster (spec "zero cluster with a host offset": preallocated, as
    QEMU's write-zeroes without MAY_UNMAP and fallocate's ZERO_RANGE on a
    local filesystem keep the space, so a later write there allocates
    nothing); a compressed or shared one is dropped. An entry that reads as
    zeros with nothing to drop is left as it is.
    """
    off = entry & fmt.OFFSET_MASK
    if reads_as_zeros(entry, backed=backed) and (not off or (zero_flag and keep_space)):
        return entry
    if zero_flag and keep_space and off and entry & fmt.L2_COPIED and not entry & fmt.L2_COMPRESSED:
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

    Refused over a backing file: a zero cluster would hide the backing file's
    bytes, and preallocation must not change what the guest reads (qemu-img
    refuses preallocation with a backing file for the same reason).
    """
    engine.overlap.check_writable()
    if engine.backed:
        raise UnsupportedOperation("preallocating clusters of an image with a backing file would hide its data")
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


@attrs.frozen
class SeekBacking:
    """plan_seek's answer when guest bytes [start, end) come first: unallocated here in an image
    with a backing file, so the seek's answer in that range is the backing chain's.

    The caller seeks the backing chain from ``start`` (past the backing image's end it reads
    zeros: a hole). An answer below ``end`` is the answer; otherwise it seeks here again from
    ``end``, or, when ``end`` is the guest's size, answers as at the end of a file (SEEK_HOLE:
    the size; SEEK_DATA: ENXIO).
    """

    start: int  # >= the offset asked about
    end: int    # a cluster boundary, or the guest's size


def plan_seek(engine, offset: int, *, data: bool):
    """Generator: the first guest offset >= ``offset`` that is data (``data``) or a hole; None
    when SEEK_DATA finds no data before the guest's end (lseek's ENXIO); a SeekBacking when a
    range unallocated over a backing file comes first. ``offset`` is below the guest's size (the
    caller answers ENXIO otherwise).

    A missing L2 table is a hole (or a backing run) of a whole table's span,
    skipped in one step; a loaded table is scanned in one pass over its
    entries (a SEEK_HOLE across a full 1 TiB disk reads every table once).
    The entries' bits decide, without validation: a damaged one that claims
    data counts as data (reading it fails, it holds no zeros), and so does a
    damaged L1 entry's whole range.
    """
    cs = engine.cs
    hit = yield from _find(engine, offset // cs, MappingKind.ZERO if data else MappingKind.DATA)
    if hit is None:
        return None if data else engine.size
    at, kind = hit
    if kind is not MappingKind.BACKING:
        return max(offset, at * cs)
    end = yield from _find(engine, at, MappingKind.BACKING)
    return SeekBacking(max(offset, at * cs), engine.size if end is None else end[0] * cs)


def _find(engine, vcl: int, skip: MappingKind):
    """Generator: (guest cluster, kind) of the first cluster >= ``vcl`` whose seek kind
    (_seek_kind) is not ``skip``, or None before the guest's end."""
    nclusters, per = -(-engine.size // engine.cs), engine.map.l2_entries
    while vcl < nclusters:
        l1_idx, idx = divmod(vcl, per)
        hit = yield from _scan(engine, l1_idx, idx, min(per, nclusters - l1_idx * per), skip)
        if hit is not None:
            return l1_idx * per + hit[0], hit[1]
        vcl = (l1_idx + 1) * per
    return None


def _scan(engine, l1_idx: int, lo: int, hi: int, skip: MappingKind):
    """Generator: (index, kind) of the first entry in [lo, hi) of one L2 table whose kind is not
    ``skip``, or None. No table: every entry is a hole (or backing); a damaged L1 entry: data."""
    m, backed = engine.map, engine.backed
    try:
        off = m.l2_offset(l1_idx)
    except DamagedMetadata:
        off = -1
    if off <= 0:
        kind = MappingKind.DATA if off < 0 else MappingKind.BACKING if backed else MappingKind.ZERO
        return None if kind is skip else (lo, kind)
    entries = (yield from m.load_l2(off, l1_idx)).entries
    for i in range(lo, hi):
        kind = _seek_kind(entries[i], backed)
        if kind is not skip:
            return i, kind
    return None


def _seek_kind(entry: int, backed: bool) -> MappingKind:
    """DATA (a read takes it from the file), ZERO (a hole), or BACKING (unallocated over a backing file)."""
    if entry & fmt.L2_COMPRESSED:
        return MappingKind.DATA
    if entry & fmt.L2_ZERO:
        return MappingKind.ZERO
    if entry & fmt.OFFSET_MASK:
        return MappingKind.DATA
    return MappingKind.BACKING if backed else MappingKind.ZERO


def plan_map(engine):
    """Generator: the guest disk as runs (start, length, kind, offset) in qemu-img map's terms:
    ``kind`` a MappingKind (UNALLOCATED, ZERO, DATA, COMPRESSED; BACKING instead of UNALLOCATED
    in an image with a backing file: ask the backing image), ``offset`` the host offset where
    qemu-img map gives one (plain data, preallocated zero clusters), else None.

    Runs join as qemu-img map joins its entries: the same kind, an offset on
    both or neither, and offsets that continue. A missing L2 table is one
    unallocated run; a loaded table is read in one pass.
    """
    m, cs = engine.map, engine.cs
    nclusters, per = -(-engine.size // cs), m.l2_entries
    unallocated = MappingKind.BACKING if engine.backed else MappingKind.UNALLOCATED
    runs: list[list] = []
    for l1_idx in range(-(-nclusters // per)):
        first = l1_idx * per
        n = min(per, nclusters - first)
        off = m.l2_offset(l1_idx)
        if off == 0:
            _join(runs, first * cs, n * cs, unallocated, None)
            continue
        entries = (yield from m.load_l2(off, l1_idx)).entries
        for i in range(n):
            e = entries[i]
            if e:
                m.validate(e, first + i)  # a damaged entry: DamagedMetadata, one line from the CLI
            _join(runs, (first + i) * cs, cs, *_kind(e, unallocated))
    if runs:
        runs[-1][1] = engine.size - runs[-1][0]  # the last cluster may pass the guest's end
    return [tuple(r) for r in runs]


def _kind(entry: int, unallocated: MappingKind) -> tuple[MappingKind, int | None]:
    if entry & fmt.L2_COMPRESSED:
        return MappingKind.COMPRESSED, None
    off = entry & fmt.OFFSET_MASK
    if entry & fmt.L2_ZERO:
        return MappingKind.ZERO, off or None
    return (MappingKind.DATA, off) if off else (unallocated, None)


def _join(runs: list[list], start: int, length: int, kind: MappingKind, host: int | None) -> None:
    if runs:
        last = runs[-1]
        if last[2] is kind and (last[3] is None) == (host is None) and (host is None or last[3] + last[1] == host):
            last[1] += length
            return
    runs.append([start, length, kind, host])
