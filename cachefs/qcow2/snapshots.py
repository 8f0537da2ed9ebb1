"""The internal snapshot table, read for `cachefs info` (spec "Snapshot table"). Sans-I/O.

cachefs serves the active layer of an image with snapshots read-only and does
not write snapshots yet; `info` lists them as `qemu-img info` does. The
generator yields :class:`~cachefs.qcow2.plan.ReadRequest`; input is
untrusted, and a table that leaves the file raises :class:`CorruptImage`.
"""

from __future__ import annotations

import struct

import attrs

from cachefs.errors import CorruptImage
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.plan import ReadRequest

ENTRY = struct.Struct(">QIHHIIQII")  # spec "Snapshot table entry", bytes 0-39
EXTRA = struct.Struct(">QQQ")        # extra data: vm_state_size_large, disk_size, icount
MAX_EXTRA = 1024                     # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA (block/qcow2.h)


@attrs.frozen
class Snapshot:
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    icount: int | None  # None: not recorded (icount -1, or no field)


def read_table(hdr: fmt.Header, file_size: int):
    """Generator: the snapshots, in table order ([] when there are none)."""
    out, pos = [], hdr.snapshots_offset
    for n in range(hdr.nb_snapshots):
        pos = (pos + 7) & ~7  # spec: each entry is padded to a multiple of 8
        head = bytes((yield ReadRequest(pos, ENTRY.size)))
        if len(head) < ENTRY.size:
            raise CorruptImage(f"snapshot table entry {n} lies outside the file")
        _, _, id_len, name_len, date_sec, date_nsec, clock, state, extra_len = ENTRY.unpack(head)
        # The extra data is read whole, below; QEMU refuses more too (qcow2_read_snapshots). Found by fuzz/.
        if extra_len > MAX_EXTRA:
            raise CorruptImage(f"snapshot table entry {n} has {extra_len} bytes of extra data, over {MAX_EXTRA}")
        rest = bytes((yield ReadRequest(pos + ENTRY.size, extra_len + id_len + name_len)))
        pos += ENTRY.size + extra_len + id_len + name_len
        if len(rest) < extra_len + id_len + name_len or pos > file_size:
            raise CorruptImage(f"snapshot table entry {n} lies outside the file")
        extra = rest[:extra_len].ljust(EXTRA.size, b"\0")
        large, _, icount = EXTRA.unpack_from(extra)
        out.append(Snapshot(
            id=rest[extra_len:extra_len + id_len].decode(errors="replace"),
            name=rest[extra_len + id_len:].decode(errors="replace"),
            date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=clock,
            vm_state_size=large if extra_len >= 8 else state,
            icount=icount if extra_len >= 24 and icount != (1 << 64) - 1 else None))
    return out
