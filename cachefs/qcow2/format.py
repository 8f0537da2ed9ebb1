"""qcow2 on-disk codecs: header, L1/L2 entries, refcount blocks, compressed descriptors.

Everything here is pure: bytes in, values out (and back). Functions whose
input comes from an image file say so with ``_untrusted`` and raise only
:class:`CorruptImage` or :class:`UnsupportedImage`, each with a one-line
message; so does :func:`read_header`, the generator (plan.py's ReadRequest)
that fetches a header's bytes for them. The field layout follows QEMU's ``docs/interop/qcow2.rst``
(cited below as "spec").
"""

from __future__ import annotations

import struct

import attrs

from cachefs.errors import CorruptImage, UnsupportedImage
from cachefs.qcow2.plan import ReadRequest

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # spec: QEMU's 2 MiB implementation limit; we keep it
MAX_L1_BYTES = 32 << 20  # spec: QEMU's 32 MiB limit on the L1 table
MAX_REFTABLE_BYTES = 8 << 20 << 3  # QEMU's QCOW_MAX_REFTABLE_SIZE (8 MiB entries * 8)
MAX_SNAPSHOTS = 65536
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # spec: bits 9-55 of L1/L2/reftable entries

# Incompatible feature bits (spec "incompatible_features").
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

# Header extension types (spec "Header extensions").
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA  # spec "Header extensions": the backing file's format name
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
# cachefs's own: the image is compress-on-write (docs/design.md, "Compress-on-write
# images"). The spec lets a reader ignore an unknown extension, and QEMU keeps
# unknown ones when it rewrites the header (qcow2.c: unknown_header_ext).
EXT_CACHEFS_COMPRESS = 0x63667A31  # "cfz1"

# L1 entry: bit 63 COPIED, bits 9-55 offset, the rest reserved (spec "L1 table").
L1_COPIED = 1 << 63
L1_RESERVED = ~(L1_COPIED | OFFSET_MASK) & 0xFFFF_FFFF_FFFF_FFFF
# L2 entry: bit 63 COPIED, bit 62 compressed (spec "L2 table").
L2_COPIED = 1 << 63
L2_COMPRESSED = 1 << 62
L2_ZERO = 1 << 0  # spec "Standard Cluster Descriptor", bit 0 (v3 only)
L2_STD_RESERVED = 0x3F00_0000_0000_01FE  # bits 1-8 and 56-61
REFTABLE_RESERVED = 0x1FF  # bits 0-8 of a refcount table entry
MAX_BACKING_NAME = 1023  # spec "Header", backing_file_size: "must not be longer than 1023 bytes"


@attrs.frozen
class BackingName:
    """What an image's header says about its backing file: the name as stored (resolving it to a
    file is the image layer's business) and its format (None: the extension is absent)."""

    name: str
    format: str | None


@attrs.frozen
class Header:
    """The parsed, validated qcow2 header (v2 or v3) plus what its extensions say."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    # Where a parsed header had its backing file name: layout, not meaning (encode() lays the
    # name out again, after the extensions), so not compared.
    backing_file_offset: int = attrs.field(default=0, eq=False)
    backing_file_size: int = attrs.field(default=0, eq=False)
    crypt_method: int = 0
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = COMPRESSION_DEFLATE
    extensions: tuple[tuple[int, bytes], ...] = ()
    # The backing file name (None: no backing file). encode() writes it after the header
    # extensions and sets backing_file_offset/size to match.
    backing_name: str | None = None

    @property
    def backing(self) -> BackingName | None:
        if self.backing_name is None:
            return None
        raw = self.extension(EXT_BACKING_FORMAT)  # validated UTF-8 by the parser
        return BackingName(self.backing_name, raw.decode() or None if raw is not None else None)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def refblock_entries(self) -> int:
        return self.cluster_size * 8 // self.refcount_bits

    @property
    def reftable_entries(self) -> int:
        return self.refcount_table_clusters * self.cluster_size // 8

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible & COMPAT_LAZY_REFCOUNTS)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible & INCOMPAT_CORRUPT)

    def extension(self, kind: int) -> bytes | None:
        for k, data in self.extensions:
            if k == kind:
                return data
        return None

    def encode(self) -> bytes:
        """The header, its extensions and the backing file name, ready to write at offset 0.

        The name goes right after the end-of-extensions marker, as QEMU's qcow2_update_header
        puts it (spec "Header extensions": the name lives in the space after the extension area,
        where nothing else may be stored, so it moves when the extensions change).
        Refused (ValueError) when it all does not fit in the first cluster.
        """
        tail = b"".join(_encode_extension(kind, data) for kind, data in self.extensions)
        tail += struct.pack(">II", EXT_END, 0)
        name = b"" if self.backing_name is None else self.backing_name.encode()
        fixed = V2_HEADER_LENGTH if self.version == 2 else self.header_length
        name_off = fixed + len(tail) if name else 0
        fields = struct.pack(
            ">4sIQIIQIIQQIIQ",
            MAGIC, self.version, name_off, len(name),
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset,
            self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset,
        )
        if self.version == 2:
            out = fields
        else:
            out = fields + struct.pack(
                ">QQQII", self.incompatible, self.compatible, self.autoclear,
                self.refcount_order, self.header_length,
            )
            if self.header_length > V3_HEADER_LENGTH:
                extra = bytes([self.compression_type])
                out += extra.ljust(self.header_length - V3_HEADER_LENGTH, b"\0")
        out += tail + name
        if len(out) > self.cluster_size:
            raise ValueError(f"the header, its extensions and the backing file name take {len(out)} bytes, "
                             f"more than the first cluster ({self.cluster_size})")
        return out


def _encode_extension(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data + b"\0" * (-len(data) % 8)


def max_l1_entries(size: int, cluster_bits: int) -> int:
    """How many L1 entries a virtual size needs (spec: one per L2 table's reach)."""
    reach = 1 << (2 * cluster_bits - 3)
    return -(-size // reach)


def read_header(file_size: int):
    """Generator: the validated header of an image file of file_size bytes.

    Two reads: the fixed fields tell the cluster size, and the header with
    its extensions may fill the whole first cluster (spec "Header extensions").
    """
    if file_size < V2_HEADER_LENGTH:
        raise CorruptImage("file too small to be a qcow2 image")
    head = bytes((yield ReadRequest(0, min(file_size, 512))))
    if head[:4] != MAGIC:
        raise CorruptImage("not a qcow2 image (bad magic)")
    cluster_bits = int.from_bytes(head[20:24], "big")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImage(f"cluster_bits {cluster_bits} out of range 9..21")
    first = yield ReadRequest(0, min(file_size, 1 << cluster_bits))
    return parse_header_untrusted(bytes(first), file_size)


def parse_header_untrusted(buf: bytes, file_size: int) -> Header:
    """Decode and validate a header read from the start of an image file.

    Refuses (one line each) anything that would make later offset math unsafe:
    the tables it names must be aligned, inside sane bounds and inside the file.
    """
    if len(buf) < V2_HEADER_LENGTH or buf[:4] != MAGIC:
        raise CorruptImage("not a qcow2 image (bad magic)")
    (_, version, backing_off, backing_size, cluster_bits, size, crypt, l1_size,
     l1_off, rt_off, rt_clusters, nb_snap, snap_off) = struct.unpack_from(">4sIQIIQIIQQIIQ", buf)
    if version not in (2, 3):
        raise UnsupportedImage(f"qcow2 version {version} is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImage(f"cluster_bits {cluster_bits} out of range 9..21")
    cs = 1 << cluster_bits
    kw = _v3_fields_untrusted(buf, cs) if version == 3 else dict(header_length=V2_HEADER_LENGTH)
    hlen = kw["header_length"]
    _check_table("L1 table", l1_off, l1_size * 8, cs, file_size, MAX_L1_BYTES)
    if l1_size < max_l1_entries(size, cluster_bits):
        raise CorruptImage(f"L1 table has {l1_size} entries, too few for virtual size {size}")
    if rt_clusters == 0:
        raise CorruptImage("refcount table has no clusters")
    _check_table("refcount table", rt_off, rt_clusters * cs, cs, file_size, MAX_REFTABLE_BYTES)
    if nb_snap:
        if nb_snap > MAX_SNAPSHOTS:
            raise CorruptImage(f"{nb_snap} snapshots exceed the limit")
        _check_table("snapshot table", snap_off, 1, cs, file_size, None)
    if backing_off:
        if backing_size > MAX_BACKING_NAME or backing_off + backing_size > cs:
            raise CorruptImage("backing file name is outside the first cluster")
    exts = _parse_extensions_untrusted(buf, hlen, cs, backing_off)
    backing_name = _backing_name_untrusted(buf, backing_off, backing_size) if backing_off else None
    fmt_name = dict(exts).get(EXT_BACKING_FORMAT)
    if fmt_name is not None:
        _text_untrusted(fmt_name, "backing file format name")
    return Header(
        version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size,
        l1_table_offset=l1_off, refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
        snapshots_offset=snap_off, backing_file_offset=backing_off,
        backing_file_size=backing_size, crypt_method=crypt, extensions=exts,
        backing_name=backing_name, **kw,
    )


def check_backing(name: str | None, fmt_name: str | None) -> None:
    """Refuse (ValueError, one line) a backing name or format a header cannot hold."""
    if name is None:
        if fmt_name is not None:
            raise ValueError("a backing file format needs a backing file name")
        return
    if not name or "\0" in name or len(name.encode()) > MAX_BACKING_NAME:
        raise ValueError(f"a backing file name must be 1 to {MAX_BACKING_NAME} bytes without NUL")
    if fmt_name is not None and (not fmt_name or "\0" in fmt_name):
        raise ValueError("a backing file format name must be non-empty, without NUL")


def with_backing(header_cluster: bytes, name: str | None, fmt_name: str | None) -> bytes:
    """The first cluster of an image rewritten to name another backing file (``cachefs rebase -u``).

    ``name`` None: no backing file (the format extension goes too). Every other
    extension stays as it is and where it is; the fixed header fields are copied
    byte for byte (unknown additional v3 fields included, spec "Additional
    fields": preserve them), only backing_file_offset/size change. Refused
    (ValueError) when the result does not fit in the cluster; ``CorruptImage``
    when the cluster is not a valid header.
    """
    check_backing(name, fmt_name)
    buf = bytes(header_cluster)
    # Only the header cluster is at hand, not the file: the table bounds it names are not ours to
    # judge here (the image was opened or checked before), so the file is taken as large enough.
    hdr = parse_header_untrusted(buf, 1 << 63)
    cs = hdr.cluster_size
    if len(buf) < cs:
        raise CorruptImage(f"the header cluster is {len(buf)} bytes, not {cs}")
    exts = [e for e in hdr.extensions if e[0] != EXT_BACKING_FORMAT or fmt_name is not None]
    if fmt_name is not None:
        new = (EXT_BACKING_FORMAT, fmt_name.encode())
        at = next((i for i, e in enumerate(exts) if e[0] == EXT_BACKING_FORMAT), None)
        if at is None:
            exts.insert(0, new)  # where qemu-img puts it
        else:
            exts[at] = new
    tail = b"".join(_encode_extension(k, d) for k, d in exts) + struct.pack(">II", EXT_END, 0)
    raw = b"" if name is None else name.encode()
    name_off = hdr.header_length + len(tail) if raw else 0
    out = buf[:8] + struct.pack(">QI", name_off, len(raw)) + buf[20:hdr.header_length] + tail + raw
    if len(out) > cs:
        raise ValueError(f"the header, its extensions and the backing file name need {len(out)} bytes, "
                         f"more than the first cluster ({cs})")
    return out.ljust(cs, b"\0")


def _backing_name_untrusted(buf: bytes, offset: int, size: int) -> str:
    """The backing file name stored at [offset, offset+size) of the first cluster (spec "Header":
    not NUL-terminated, at most 1023 bytes). Bytes in, a string out: what it names is not ours."""
    if size == 0:
        raise CorruptImage("backing file name is empty while its offset is set")
    if offset + size > len(buf):
        raise CorruptImage("backing file name lies past the end of the file")
    return _text_untrusted(buf[offset:offset + size], "backing file name")


def _text_untrusted(raw: bytes, what: str) -> str:
    if b"\0" in raw:
        raise CorruptImage(f"{what} contains a NUL byte")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptImage(f"{what} is not valid UTF-8") from None


def _v3_fields_untrusted(buf: bytes, cs: int) -> dict:
    """The header fields v3 adds (spec "Header", bytes 72 onwards), validated."""
    if len(buf) < V3_HEADER_LENGTH:
        raise CorruptImage("truncated v3 header")
    incompat, compat, autoclear, rorder, hlen = struct.unpack_from(">QQQII", buf, 72)
    if hlen < V3_HEADER_LENGTH or hlen % 8 or hlen > cs or hlen > len(buf):
        raise CorruptImage(f"header_length {hlen} is invalid")
    if rorder > 6:
        raise CorruptImage(f"refcount_order {rorder} exceeds 6")
    unknown = incompat & ~KNOWN_INCOMPAT
    if unknown:
        raise UnsupportedImage(f"unknown incompatible feature bits {unknown:#x}")
    ctype = buf[104] if hlen > 104 else COMPRESSION_DEFLATE
    if bool(incompat & INCOMPAT_COMPRESSION) != (ctype != COMPRESSION_DEFLATE):
        raise CorruptImage("compression type field and feature bit disagree")
    if ctype not in (COMPRESSION_DEFLATE, COMPRESSION_ZSTD):
        raise UnsupportedImage(f"unknown compression type {ctype}")
    return dict(incompatible=incompat, compatible=compat, autoclear=autoclear,
                refcount_order=rorder, header_length=hlen, compression_type=ctype)


def _check_table(what: str, offset: int, nbytes: int, cs: int, file_size: int, limit: int | None) -> None:
    if offset % cs:
        raise CorruptImage(f"{what} offset {offset:#x} is not cluster-aligned")
    if limit is not None and nbytes > limit:
        raise CorruptImage(f"{what} size {nbytes} exceeds the limit {limit}")
    if nbytes and (offset == 0 or offset + nbytes > file_size):
        raise CorruptImage(f"{what} at {offset:#x}+{nbytes} lies outside the file ({file_size} bytes)")


def _parse_extensions_untrusted(buf: bytes, start: int, cs: int, backing_off: int) -> tuple[tuple[int, bytes], ...]:
    end = min(len(buf), cs, backing_off or cs)
    pos, out = start, []
    while True:
        if pos + 8 > end:
            raise CorruptImage("header extensions run past the first cluster")
        kind, length = struct.unpack_from(">II", buf, pos)
        pos += 8
        if kind == EXT_END:
            return tuple(out)
        if pos + length > end:
            raise CorruptImage(f"header extension {kind:#x} runs past the first cluster")
        out.append((kind, bytes(buf[pos:pos + length])))
        pos += length + (-length % 8)


# ---------------------------------------------------------------- L2 entries

@attrs.frozen
class Compressed:
    """A compressed cluster descriptor (spec "Compressed Clusters Descriptor")."""

    offset: int      # byte offset of the compressed data in the image file
    nb_sectors: int  # 512-byte sectors the data may span, counted from offset's sector

    @property
    def max_length(self) -> int:
        return self.nb_sectors * 512 - (self.offset & 511)

    def host_clusters(self, cluster_bits: int) -> range:
        """Host clusters holding this data: each one carries one refcount for it."""
        first = self.offset >> cluster_bits
        last = (self.offset + self.max_length - 1) >> cluster_bits
        return range(first, last + 1)


def compressed_shift(cluster_bits: int) -> int:
    """spec: x = 62 - (cluster_bits - 8); bits 0..x-1 hold the host offset."""
    return 62 - (cluster_bits - 8)


def decode_compressed(entry: int, cluster_bits: int) -> Compressed:
    x = compressed_shift(cluster_bits)
    offset = entry & ((1 << x) - 1)
    extra = (entry & ((1 << 62) - 1)) >> x
    return Compressed(offset=offset, nb_sectors=extra + 1)


def encode_compressed(offset: int, length: int, cluster_bits: int) -> int:
    """The L2 entry of ``length`` compressed bytes at host ``offset`` (spec
    "Compressed Clusters Descriptor"): the sector count is the fewest
    512-byte sectors from offset's sector that cover the data, so the host
    clusters a reader (and qemu-img check) counts are exactly those the
    bytes touch. The COPIED bit stays clear: compressed clusters never have it."""
    extra = (offset % 512 + length - 1) // 512
    return L2_COMPRESSED | extra << compressed_shift(cluster_bits) | offset


def encode_table(entries) -> bytes:
    return struct.pack(f">{len(entries)}Q", *entries)


def decode_table(buf: bytes) -> list[int]:
    return list(struct.unpack(f">{len(buf) // 8}Q", buf))


# ----------------------------------------------------------- refcount blocks

class RefcountBlock:
    """One refcount block's entries as a list of ints, with the spec's packing.

    spec "Host cluster management": refcount_bits = 1 << refcount_order; for
    widths below 8 bits QEMU packs entries starting at the least significant
    bit of each byte (qcow2-refcount.c get_refcount_ro0..ro2).
    """

    @staticmethod
    def decode(buf: bytes, order: int) -> list[int]:
        bits = 1 << order
        if bits >= 8:
            fmt = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
            return list(struct.unpack(f">{len(buf) * 8 // bits}{fmt}", buf))
        per_byte, mask = 8 // bits, (1 << bits) - 1
        return [(byte >> (bits * i)) & mask for byte in buf for i in range(per_byte)]

    @staticmethod
    def encode(entries: list[int], order: int) -> bytes:
        bits = 1 << order
        if bits >= 8:
            fmt = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
            return struct.pack(f">{len(entries)}{fmt}", *entries)
        per_byte = 8 // bits
        out = bytearray(len(entries) // per_byte)
        for idx, value in enumerate(entries):
            if value:
                out[idx // per_byte] |= value << (bits * (idx % per_byte))
        return bytes(out)
