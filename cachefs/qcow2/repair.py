"""qcow2 repair with ``qemu-img check -r`` semantics, from what check.py found. Sans-I/O.

:func:`repair` turns a :class:`~cachefs.qcow2.check.CheckResult` into the
``(offset, bytes)`` writes that fix the image, in a safe order (refcount
blocks, then L1/L2 entries, then the header); :func:`write_repair` is those
writes as plan.py requests, with one sync; :func:`rebuild_refcounts` is the
check and the repair a dirty lazy-refcounts image needs before its first
write. Like the checker, these are generators driven by ``plan.run_sync``
(cachefs/repair.py does it on a file descriptor).
"""

from __future__ import annotations

import struct

from cachefs.errors import CorruptImage
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.check import REFT_OFFSET_MASK, CheckResult, check_image
from cachefs.qcow2.plan import ReadRequest, SyncRequest, WriteRequest


def repair(result: CheckResult, mode: str):
    """Generator: the (offset, bytes) writes that repair what check found.

    mode "leaks" lowers refcounts that exceed the references (``qemu-img check
    -r leaks``); "all" also raises refcounts that are too low, fixes OFLAG_COPIED
    and, when nothing is left broken, clears the dirty and corrupt bits.

    Apply the writes in the order given: refcount blocks first (a sync there
    makes a crash mid-repair harmless), then L1/L2 entries, then the header.
    Refuses (CorruptImage) what would need new clusters: a damaged refcount
    structure, or a too-low refcount whose refcount block does not exist.
    """
    if mode not in ("leaks", "all"):
        raise ValueError(f"repair mode must be 'leaks' or 'all', not {mode!r}")
    hdr = result.header
    if result.rebuild_needed:
        raise CorruptImage("the refcount structure itself is damaged and must be rebuilt; "
                           "cachefs cannot do that: run 'qemu-img check -r all'")
    top = (1 << hdr.refcount_bits) - 1
    targets = {c: ref for c, rc, ref in result.mismatches if (rc > ref or mode == "all") and ref <= top}
    writes = yield from _refblock_writes(result, targets)
    fixed_all = len(targets) == len(result.mismatches)
    stored = {c: rc for c, rc, _ in result.mismatches}

    def final(cluster: int) -> int:
        if cluster in targets:
            return targets[cluster]
        if cluster in stored:
            return stored[cluster]
        return result.references[cluster] if cluster < len(result.references) else 0

    copied_safe = mode == "all" or (fixed_all and not result.structural and not result.errors)
    if copied_safe:
        writes += yield from _copied_writes(result, final)
    if mode == "all" and hdr.version >= 3 and fixed_all:
        incompat = hdr.incompatible & ~fmt.INCOMPAT_DIRTY
        if not result.structural:
            incompat &= ~fmt.INCOMPAT_CORRUPT
        if incompat != hdr.incompatible:
            writes.append((72, struct.pack(">Q", incompat)))
    return writes


def write_repair(writes):
    """Generator: apply repair writes in the order given, then one sync (plan.py requests).

    Returns how many writes there were.
    """
    for offset, data in writes:
        yield WriteRequest(offset, data)
    yield SyncRequest()
    return len(writes)


def rebuild_refcounts(file_size: int):
    """Generator: check, then the writes of repair(mode="all") (a dirty lazy-refcounts image's open path)."""
    result = yield from check_image(file_size)
    return (yield from repair(result, "all"))


def _refblock_writes(result: CheckResult, targets: dict[int, int]):
    hdr = result.header
    per, cs = hdr.refblock_entries, hdr.cluster_size
    by_block: dict[int, dict[int, int]] = {}
    for cluster, value in targets.items():
        by_block.setdefault(cluster // per, {})[cluster % per] = value
    writes = []
    for idx in sorted(by_block):
        off = result.reftable[idx] & REFT_OFFSET_MASK if idx < len(result.reftable) else 0
        if not off:
            raise CorruptImage(f"repairing cluster {idx * per + min(by_block[idx])} needs a new refcount block; "
                               "cachefs cannot allocate one during repair: run 'qemu-img check -r all'")
        block = bytearray((yield ReadRequest(off, cs))).ljust(cs, b"\0")
        for i, value in by_block[idx].items():
            _set_refcount(block, i, value, hdr.refcount_order)
        writes.append((off, bytes(block)))
    return writes


def _set_refcount(block: bytearray, index: int, value: int, order: int) -> None:
    """Patch one entry in place, with format.RefcountBlock's packing (LSB first below 8 bits)."""
    bits = 1 << order
    if bits >= 8:
        width = bits // 8
        block[index * width:(index + 1) * width] = value.to_bytes(width, "big")
        return
    byte, shift = divmod(index * bits, 8)
    mask = ((1 << bits) - 1) << shift
    block[byte] = block[byte] & ~mask & 0xFF | value << shift


def _copied_writes(result: CheckResult, final):
    """check_oflag_copied's repair: COPIED set exactly when the (repaired) refcount is 1."""
    hdr = result.header
    cs, cb = hdr.cluster_size, hdr.cluster_bits
    l1_bytes = hdr.l1_size * 8
    l1 = fmt.decode_table(bytes((yield ReadRequest(hdr.l1_table_offset, l1_bytes))).ljust(l1_bytes, b"\0"))
    writes = []
    for i, entry in enumerate(l1):
        l2_off = entry & fmt.OFFSET_MASK
        if not l2_off or l2_off & (cs - 1) or l2_off + cs > result.file_size or entry & fmt.L1_RESERVED:
            continue  # a broken L1 entry is structural damage: leave it alone
        want = fmt.L1_COPIED if final(l2_off >> cb) == 1 else 0
        if entry & fmt.L1_COPIED != want:
            writes.append((hdr.l1_table_offset + 8 * i, struct.pack(">Q", entry ^ fmt.L1_COPIED)))
        table = fmt.decode_table(bytes((yield ReadRequest(l2_off, cs))))
        for j, e in enumerate(table):
            off = e & fmt.OFFSET_MASK
            if not off or e & fmt.L2_COMPRESSED:
                continue
            want = fmt.L2_COPIED if final(off >> cb) == 1 else 0
            if e & fmt.L2_COPIED != want:
                writes.append((l2_off + 8 * j, struct.pack(">Q", e ^ fmt.L2_COPIED)))
    return writes
