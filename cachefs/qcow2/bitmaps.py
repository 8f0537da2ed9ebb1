"""Persistent dirty bitmaps: what an image holds, and the host clusters they occupy. Sans-I/O.

cachefs does not maintain bitmaps yet (docs/design.md, "Open-time policy"):
an image with valid bitmaps is served read-only, or, with ``-o drop_bitmaps``,
writable with its bitmaps deleted and their clusters freed. Both need what
this module reads: the bitmaps extension, the bitmap directory and the bitmap
tables (spec "Bitmaps extension", "Bitmap directory", "Bitmap table").

The bitmaps are *valid* only while the autoclear bit says so (spec
"autoclear_features", bit 0): without it the extension is stale, left by a
writer lacking bitmap support, and ignored here as QEMU ignores it.

The generators yield :class:`~cachefs.qcow2.plan.ReadRequest` and are driven
by ``plan.run_sync`` / ``plan.run_async``. Input is untrusted: a bad
directory or table raises :class:`CorruptImage` with a one-line message.
"""

from __future__ import annotations

import struct

import attrs

from cachefs.errors import CorruptImage
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.plan import ReadRequest

EXTENSION = struct.Struct(">IIQQ")        # spec "Bitmaps extension": nb_bitmaps, reserved, size, offset
ENTRY = struct.Struct(">QIIBBHI")         # spec "Bitmap directory", bytes 0-23
MAX_DIRECTORY = 64 << 20                  # QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE
MAX_TABLE_ENTRIES = 0x8000000             # QEMU's BME_MAX_TABLE_SIZE
FLAG_IN_USE = 1 << 0                      # spec: "The bitmap was not saved correctly"
FLAG_AUTO = 1 << 1                        # spec: "must reflect all changes of the virtual disk"
TABLE_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # spec "Bitmap table": bits 9-55
TABLE_RESERVED = 0xFF00_0000_0000_01FE     # bits 1-8 and 56-63


@attrs.frozen
class Bitmap:
    """One bitmap directory entry."""

    name: str
    granularity: int
    flags: int
    table_offset: int
    table_size: int

    @property
    def flag_names(self) -> list[str]:
        """qemu-img info's names (Qcow2BitmapInfoFlags), in bit order."""
        return [n for bit, n in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto")) if self.flags & bit]


def count(hdr: fmt.Header) -> int:
    """How many valid bitmaps the header announces (0: none, or a stale extension)."""
    ext = hdr.extension(fmt.EXT_BITMAPS)
    if ext is None or len(ext) < EXTENSION.size or not hdr.autoclear & fmt.AUTOCLEAR_BITMAPS:
        return 0
    return EXTENSION.unpack_from(ext)[0]


def read_directory(hdr: fmt.Header, file_size: int):
    """Generator: the valid bitmaps of the image, in directory order ([] when there are none)."""
    if not count(hdr):
        return []
    nb, _, size, offset = EXTENSION.unpack_from(hdr.extension(fmt.EXT_BITMAPS))
    cs = hdr.cluster_size
    if offset % cs or size > MAX_DIRECTORY or not offset or offset + size > file_size:
        raise CorruptImage(f"bitmap directory at {offset:#x}+{size} is invalid")
    directory = bytes((yield ReadRequest(offset, size)))
    out, pos = [], 0
    for n in range(nb):
        if pos + ENTRY.size > len(directory):
            raise CorruptImage(f"bitmap directory is truncated at entry {n}")
        table_off, table_size, flags, _, gbits, name_len, extra = ENTRY.unpack_from(directory, pos)
        name = directory[pos + ENTRY.size + extra:pos + ENTRY.size + extra + name_len]
        if table_off % cs or table_size > MAX_TABLE_ENTRIES or table_off + table_size * 8 > file_size \
                or gbits > 63 or len(name) != name_len:
            raise CorruptImage(f"bitmap directory entry {n} is invalid")
        out.append(Bitmap(name.decode(errors="replace"), 1 << gbits, flags, table_off, table_size))
        pos += -(-(ENTRY.size + extra + name_len) // 8) * 8
    return out


def clusters(hdr: fmt.Header, bitmaps: list[Bitmap], file_size: int):
    """Generator: every host cluster the bitmaps (read_directory's) occupy, sorted: the
    directory's, each bitmap table's and each data cluster a table names (spec "Bitmap table")."""
    if not bitmaps:
        return []
    cb, cs = hdr.cluster_bits, hdr.cluster_size
    _, _, size, offset = EXTENSION.unpack_from(hdr.extension(fmt.EXT_BITMAPS))
    out = set(_span(offset, size, cb))
    for bm in bitmaps:
        out.update(_span(bm.table_offset, bm.table_size * 8, cb))
        table = fmt.decode_table(bytes((yield ReadRequest(bm.table_offset, bm.table_size * 8))))
        for entry in table:
            off = entry & TABLE_OFFSET_MASK
            if entry & TABLE_RESERVED or off and (entry & 1 or off % cs or off + cs > file_size):
                raise CorruptImage(f"bitmap {bm.name!r}: table entry {entry:#x} is invalid")
            if off:
                out.add(off >> cb)
    return sorted(out)


def _span(offset: int, length: int, cluster_bits: int) -> range:
    return range(offset >> cluster_bits, (offset + length - 1 >> cluster_bits) + 1) if length else range(0)


def without_bitmaps(hdr: fmt.Header) -> dict:
    """Header fields once the bitmaps are deleted: no extension, the autoclear bit clear."""
    return {"autoclear": hdr.autoclear & ~fmt.AUTOCLEAR_BITMAPS,
            "extensions": tuple(e for e in hdr.extensions if e[0] != fmt.EXT_BITMAPS)}
