"""The internal snapshot table (spec "Snapshot table"). Sans-I/O.

What it owns: decoding the table from untrusted bytes (:func:`read_entries`,
one :class:`CorruptImage` line for anything that would make later offset math
unsafe), encoding it back (:func:`encode_table`), and QEMU's rules for naming:
lookup by ID first, then by name (:func:`find`, as block/qcow2-snapshot.c's
find_snapshot_by_id_or_name), and the next ID (:func:`next_id`).

Changing the table is generation.py's work: a snapshot operation writes a new
table in fresh clusters and switches to it with the header.

:func:`read_table` is the summary `cachefs info` lists (qemu-img info's
columns); it tolerates what info need not judge (an L1 table outside the
file), as qemu-img info does. The generators yield
:class:`~cachefs.qcow2.plan.ReadRequest`.
"""

from __future__ import annotations

import struct

import attrs

from cachefs.errors import CorruptImage, SnapshotNotFound
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.plan import ReadRequest

ENTRY = struct.Struct(">QIHHIIQII")  # spec "Snapshot table entry", bytes 0-39
EXTRA = struct.Struct(">QQQ")        # extra data: vm_state_size_large, disk_size, icount
MAX_EXTRA = 1024                     # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA (block/qcow2.h)
NO_ICOUNT = (1 << 64) - 1            # spec: icount -1, "not recorded"


@attrs.frozen
class Snapshot:
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    icount: int | None  # None: not recorded (icount -1, or no field)


@attrs.frozen
class SnapshotEntry:
    """One entry as stored. ``id`` and ``name`` keep undecodable bytes (surrogateescape), so a
    rewritten table carries them unchanged; ``extra`` is the raw extra data, preserved on
    rewrite (spec: unknown extra data must be kept), from which ``disk_size`` and ``icount`` are
    read (None: not recorded)."""

    id: str
    name: str
    l1_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None
    extra: bytes = attrs.field(repr=False)

    def is_named(self, name: str) -> bool:
        """Is ``name`` this snapshot's name (not its ID: find() tries IDs first)?"""
        return name == self.name

    def summary(self) -> Snapshot:
        return Snapshot(id=_shown(self.id), name=_shown(self.name), date_sec=self.date_sec,
                        date_nsec=self.date_nsec, vm_clock_nsec=self.vm_clock_nsec,
                        vm_state_size=self.vm_state_size, icount=self.icount)

    def encode(self) -> bytes:
        """The entry's bytes, unpadded (encode_table aligns the next one)."""
        ident, name = _raw(self.id), _raw(self.name)
        head = ENTRY.pack(self.l1_offset, self.l1_size, len(ident), len(name), self.date_sec, self.date_nsec,
                          self.vm_clock_nsec, self.vm_state_size & 0xFFFF_FFFF, len(self.extra))
        return head + self.extra + ident + name


def new_entry(ident: str, name: str, l1_offset: int, l1_size: int, disk_size: int, now_ns: int) -> SnapshotEntry:
    """A disk-only snapshot as qemu-img snapshot -c records it (qcow2_snapshot_create): no VM
    state, VM clock 0, the extra data's 24 bytes with the disk size and icount "not recorded"."""
    return SnapshotEntry(id=ident, name=name, l1_offset=l1_offset, l1_size=l1_size,
                         date_sec=now_ns // 10**9 & 0xFFFF_FFFF, date_nsec=now_ns % 10**9, vm_clock_nsec=0,
                         vm_state_size=0, disk_size=disk_size, icount=None,
                         extra=EXTRA.pack(0, disk_size, NO_ICOUNT))


def _raw(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def _shown(text: str) -> str:
    return _raw(text).decode("utf-8", errors="replace")


def encode_table(entries) -> bytes:
    """The table's bytes: each entry starts 8-byte aligned (spec "Snapshot table"), and the
    last one is not padded, as qcow2_write_snapshots lays it out."""
    out = b""
    for e in entries:
        out += b"\0" * (-len(out) % 8) + e.encode()
    return out


def find(entries, name_or_id: str) -> SnapshotEntry:
    """The snapshot with this ID, else the first with this name (find_snapshot_by_id_or_name)."""
    for e in entries:
        if e.id == name_or_id:
            return e
    for e in entries:
        if e.is_named(name_or_id):
            return e
    raise SnapshotNotFound(f"no snapshot with ID or name '{name_or_id}'")


def next_id(entries) -> str:
    """One more than the largest numeric ID (find_new_snapshot_id: strtoul, so a non-numeric ID is 0)."""
    def numeric(ident: str) -> int:
        digits = ident[:len(ident) - len(ident.lstrip("0123456789"))]
        return int(digits) if digits else 0
    return str(max((numeric(e.id) for e in entries), default=0) + 1)


def read_entries(hdr: fmt.Header, file_size: int):
    """Generator: the snapshot entries, in table order, each L1 table validated to lie inside the
    file (qcow2_validate_table's checks), so a snapshot operation may read and walk it."""
    out = yield from _parse_untrusted(hdr, file_size)
    cs = hdr.cluster_size
    for n, e in enumerate(out):
        if e.l1_offset % cs:
            raise CorruptImage(f"snapshot {n} has an L1 table offset {e.l1_offset:#x} that is not cluster-aligned")
        if e.l1_size * 8 > fmt.MAX_L1_BYTES:
            raise CorruptImage(f"snapshot {n} has an L1 table of {e.l1_size} entries, over the limit")
        if e.l1_size and (e.l1_offset == 0 or e.l1_offset + e.l1_size * 8 > file_size):
            raise CorruptImage(f"snapshot {n} has an L1 table at {e.l1_offset:#x} outside the file")
    return out


def read_table(hdr: fmt.Header, file_size: int):
    """Generator: the snapshots' summaries, in table order ([] when there are none)."""
    return [e.summary() for e in (yield from _parse_untrusted(hdr, file_size))]


def _parse_untrusted(hdr: fmt.Header, file_size: int):
    out, pos = [], hdr.snapshots_offset
    for n in range(hdr.nb_snapshots):
        pos = (pos + 7) & ~7  # spec: each entry is padded to a multiple of 8
        head = bytes((yield ReadRequest(pos, ENTRY.size)))
        if len(head) < ENTRY.size:
            raise CorruptImage(f"snapshot table entry {n} lies outside the file")
        l1_off, l1_size, id_len, name_len, date_sec, date_nsec, clock, state, extra_len = ENTRY.unpack(head)
        # The extra data is read whole, below; QEMU refuses more too (qcow2_read_snapshots). Found by fuzz/.
        if extra_len > MAX_EXTRA:
            raise CorruptImage(f"snapshot table entry {n} has {extra_len} bytes of extra data, over {MAX_EXTRA}")
        rest = bytes((yield ReadRequest(pos + ENTRY.size, extra_len + id_len + name_len)))
        pos += ENTRY.size + extra_len + id_len + name_len
        if len(rest) < extra_len + id_len + name_len or pos > file_size:
            raise CorruptImage(f"snapshot table entry {n} lies outside the file")
        extra = rest[:extra_len]
        large, disk_size, icount = EXTRA.unpack_from(extra.ljust(EXTRA.size, b"\0"))
        out.append(SnapshotEntry(
            id=rest[extra_len:extra_len + id_len].decode(errors="surrogateescape"),
            name=rest[extra_len + id_len:].decode(errors="surrogateescape"),
            l1_offset=l1_off, l1_size=l1_size, date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=clock,
            vm_state_size=large if extra_len >= 8 else state,
            disk_size=disk_size if extra_len >= 16 else None,
            icount=icount if extra_len >= 24 and icount != NO_ICOUNT else None, extra=extra))
    return out
