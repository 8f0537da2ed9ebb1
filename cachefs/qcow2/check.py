"""qcow2 consistency check with ``qemu-img check`` semantics. Sans-I/O.

What it owns: recounting every reference an image makes to its host clusters
and comparing the count with the stored refcounts, exactly as QEMU's
``qcow2_check_refcounts`` (block/qcow2-refcount.c) does, so that our verdict
and ``qemu-img check``'s agree: the same clusters are called leaked or
corrupt, and the exit codes match (:meth:`CheckResult.exit_code`).

A reference is counted for (spec "Host cluster management"): the header
cluster, the active L1 table, every L2 table it names and every data cluster
those name (a compressed descriptor counts once for each host cluster it
spans), the same for every internal snapshot's L1 table, the snapshot table,
the refcount table, every refcount block, the LUKS header and the persistent
bitmaps (when the autoclear bit says they are valid).

Like the engine, :func:`check_image` is a generator that yields
:class:`~cachefs.qcow2.plan.ReadRequest` and is driven by ``plan.run_sync`` /
``plan.run_async``. Repairing what it finds is repair.py's work.

Memory: L2 tables are streamed one at a time. Two arrays of one refcount-width
integer per host cluster (stored and recounted) are kept; that is QEMU's
in-memory refcount table too.
"""

from __future__ import annotations

import struct
from array import array

import attrs

from cachefs.errors import CorruptImage, UnsupportedImage
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.plan import ReadRequest

# qemu-img check's exit codes (qemu-img.c img_check).
EXIT_CLEAN = 0
EXIT_CHECK_ERRORS = 1  # the check itself could not complete
EXIT_CORRUPT = 2
EXIT_LEAKS = 3

REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00  # QEMU: a reftable entry's offset bits
MAX_REQUEST_END = (1 << 63) - (1 << 31)    # about QEMU's BDRV_MAX_LENGTH: reads past it fail (EIO)
INT64_MAX = (1 << 63) - 1                  # QEMU's file offsets (and os.pread's off_t)
BME_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00   # spec "Bitmap table": bits 9-55
MAX_BITMAP_DIRECTORY_SIZE = 1024 * 65535  # QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE (block/qcow2.h)
BME_RESERVED = 0xFF00_0000_0000_01FE
BME_ALL_ONES = 1
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # spec "Snapshot table", bytes 0-39
BITMAP_ENTRY = struct.Struct(">QIIBBHI")      # spec "Bitmap directory", bytes 0-23


@attrs.frozen
class CheckResult:
    """What ``qemu-img check`` would report, plus what :func:`repair` needs."""

    header: fmt.Header = attrs.field(repr=False)
    file_size: int
    corruptions: tuple[str, ...]   # one line each, QEMU's wording where it has one
    leaks: tuple[int, ...]         # host clusters whose refcount exceeds their references
    errors: int                    # refcounts that could not be read (qemu's check_errors)
    allocated_clusters: int        # guest clusters of the active layer with host storage
    compressed_clusters: int
    total_clusters: int            # guest clusters in the virtual disk
    image_end_offset: int
    # Invariant: for every cluster c not in mismatches, stored refcount == references[c].
    references: array = attrs.field(eq=False, repr=False)
    mismatches: tuple[tuple[int, int, int], ...] = attrs.field(eq=False, repr=False)  # (cluster, refcount, reference)
    reftable: tuple[int, ...] = attrs.field(eq=False, repr=False)
    # Corruptions that rewriting refcounts and COPIED flags cannot fix.
    structural: int = 0
    # The refcount structure itself is damaged: only a rebuild (not done here) helps.
    rebuild_needed: bool = False
    # Allocated clusters of the active layer not contiguous with the one before in their L2
    # table, and every compressed one (qemu-img check's fragmented-clusters).
    fragmented_clusters: int = 0

    @property
    def leaked_clusters(self) -> int:
        return len(self.leaks)

    @property
    def refcount_errors(self) -> tuple[tuple[int, int, int], ...]:
        """(cluster, refcount, reference) where the refcount is too low: corruption."""
        return tuple(m for m in self.mismatches if m[1] < m[2])

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.errors)

    def exit_code(self) -> int:
        """qemu-img check's mapping: 1 check errors, 2 corruptions, 3 leaks only, 0 clean."""
        if self.errors:
            return EXIT_CHECK_ERRORS
        if self.corruptions:
            return EXIT_CORRUPT
        if self.leaks:
            return EXIT_LEAKS
        return EXIT_CLEAN


def _typecode(refcount_order: int) -> str:
    return "B" if refcount_order <= 3 else "H" if refcount_order == 4 else "I" if refcount_order == 5 else "Q"


def read_header(file_size: int):
    """Generator: the validated header. Raises CorruptImage/UnsupportedImage (qemu-img: exit 1)."""
    hdr = yield from fmt.read_header(file_size)
    if hdr.incompatible & fmt.INCOMPAT_EXTL2:
        raise UnsupportedImage("checking images with extended L2 entries is not supported")
    if hdr.incompatible & fmt.INCOMPAT_DATA_FILE:
        raise UnsupportedImage("checking images with an external data file is not supported")
    return hdr


def check_image(file_size: int):
    """Generator: check the image, return a :class:`CheckResult`."""
    hdr = yield from read_header(file_size)
    return (yield from check_header(hdr, file_size))


def check_header(hdr: fmt.Header, file_size: int):
    """Generator: check the image whose (validated) header is ``hdr``: a :class:`CheckResult`."""
    walk = _Walk(hdr, file_size)
    yield from walk.run()
    return walk.result()


def layer_references(hdr: fmt.Header, file_size: int, l1_offset: int, l1_size: int,
                     tables: dict[int, list[int]] | None = None):
    """Generator: the references one L1 table makes, as qemu-img check counts them (its own
    clusters, one per L1 entry for the L2 table it names, one per L2 entry for each host
    cluster it names; check_refcounts_l1). Returns an array indexed by host cluster, of
    ``file_size`` clusters plus one. ``tables``, if given, gets each L2 table's entries by
    offset (snapshot operations copy them: qcow2/generation.py).

    The image must have passed :func:`check_header`: a corruption found here raises CorruptImage.
    """
    walk = _Walk(hdr, file_size, tables=tables)
    yield from walk.walk_l1(l1_offset, l1_size, active=False)
    if walk.corruptions:
        raise CorruptImage(walk.corruptions[0])
    return walk.refs


@attrs.define
class _Walk:
    """One check run's state: the recount (QEMU's in-memory refcount table) and findings."""

    hdr: fmt.Header
    file_size: int
    cb: int = 0
    cs: int = 0
    nb_clusters: int = 0
    # Invariant: imrt_size <= nb_clusters + 1 (a reference may overhang EOF by
    # less than one cluster, as in QEMU); both arrays have nb_clusters + 1 slots.
    imrt_size: int = 0
    refs: array = None
    stored: array = None
    bad_blocks: set = attrs.Factory(set)   # refblock indices whose refcounts cannot be read
    reftable: list = attrs.Factory(list)
    corruptions: list = attrs.Factory(list)
    structural: int = 0
    rebuild: bool = False
    allocated: int = 0
    compressed: int = 0
    fragmented: int = 0
    leaks: list = attrs.Factory(list)
    mismatches: list = attrs.Factory(list)
    errors: int = 0
    highest: int = 0
    tables: dict | None = None  # offset -> entries of every L2 table walked, when asked for

    def __attrs_post_init__(self):
        self.cb, self.cs = self.hdr.cluster_bits, self.hdr.cluster_size
        self.nb_clusters = self.imrt_size = -(-self.file_size // self.cs)
        zeros = bytes((self.nb_clusters + 1) * array(_typecode(self.hdr.refcount_order)).itemsize)
        self.refs = array(_typecode(self.hdr.refcount_order), zeros)
        self.stored = array(_typecode(self.hdr.refcount_order), zeros)

    def corrupt(self, msg: str, *, structural: bool = True) -> None:
        self.corruptions.append(msg)
        self.structural += structural

    # ------------------------------------------------------------ order of QEMU's calculate_refcounts

    def run(self):
        hdr = self.hdr
        rt_bytes = hdr.refcount_table_clusters * self.cs
        raw = yield ReadRequest(hdr.refcount_table_offset, rt_bytes)
        self.reftable = fmt.decode_table(bytes(raw).ljust(rt_bytes, b"\0"))
        yield from self.load_stored()
        self.inc(0, self.cs)
        yield from self.walk_l1(hdr.l1_table_offset, hdr.l1_size, active=True)
        snapshots_size = yield from self.walk_snapshots()
        self.inc(hdr.snapshots_offset, snapshots_size)
        self.inc(hdr.refcount_table_offset, rt_bytes)
        crypto = hdr.extension(fmt.EXT_CRYPTO)
        if crypto is not None and len(crypto) >= 16:
            self.inc(*struct.unpack_from(">QQ", crypto))
        yield from self.walk_bitmaps()
        self.check_refblocks()
        self.compare()

    def inc(self, offset: int, size: int) -> None:
        """Count one reference to every cluster of [offset, offset+size) (qcow2_inc_refcounts_imrt)."""
        if size <= 0:
            return
        if offset + size - self.file_size >= self.cs:
            self.corrupt(f"ERROR: counting reference for region exceeding the end of the file by one "
                         f"cluster or more: offset {offset:#x} size {size:#x}")
            return
        refs, top = self.refs, (1 << self.hdr.refcount_bits) - 1
        for k in range(offset >> self.cb, ((offset + size - 1) >> self.cb) + 1):
            self.imrt_size = max(self.imrt_size, k + 1)
            if refs[k] == top:
                self.corrupt(f"ERROR: overflow cluster offset={k << self.cb:#x}")
                continue
            refs[k] += 1

    def stored_refcount(self, cluster: int) -> int | None:
        """The refcount on disk, or None when its block cannot be read."""
        if cluster // self.hdr.refblock_entries in self.bad_blocks:
            return None
        return self.stored[cluster] if cluster < len(self.stored) else 0

    def load_stored(self):
        per, n = self.hdr.refblock_entries, len(self.stored)
        code = _typecode(self.hdr.refcount_order)
        for idx, entry in enumerate(self.reftable):
            base = idx * per
            if base >= n:
                break
            off = entry & REFT_OFFSET_MASK
            if not off:
                continue
            if off & (self.cs - 1) or off + self.cs > MAX_REQUEST_END:
                self.bad_blocks.add(idx)  # qemu-img check: EIO for each cluster it covers
                continue
            count = min(per, n - base)
            need = -(-(count << self.hdr.refcount_order) // 8)  # decode only the entries in use
            buf = bytes((yield ReadRequest(off, need))).ljust(need, b"\0")
            self.stored[base:base + count] = array(code, fmt.RefcountBlock.decode(buf, self.hdr.refcount_order)[:count])

    # ------------------------------------------------------------ L1 / L2

    def walk_l1(self, offset: int, size: int, *, active: bool):
        """check_refcounts_l1 (+ check_oflag_copied for the active table)."""
        if not size:
            return
        self.inc(offset, size * 8)
        # Only the entries inside the file: past its end they read as zeros (unallocated), which
        # the loop skips. A snapshot's L1 may claim 4M entries there (fuzz/: 0.7 s per image).
        raw = bytes((yield ReadRequest(offset, max(0, min(size * 8, self.file_size - offset)))))
        l1 = fmt.decode_table(raw[:len(raw) // 8 * 8])
        for i, entry in enumerate(l1):
            if not entry:
                continue
            if entry & fmt.L1_RESERVED:
                self.corrupt(f"ERROR found L1 entry with reserved bits set: {entry:x}")
            l2_off = entry & fmt.OFFSET_MASK
            self.inc(l2_off, self.cs)
            if l2_off & (self.cs - 1):
                self.corrupt(f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted")
            # An entry with flags but offset 0 makes QEMU walk the header as an
            # L2 table; so do we, so that both report the same corruptions.
            if active and l2_off:
                refcount = self.stored_refcount(l2_off >> self.cb)
                if refcount is not None and (refcount == 1) != bool(entry & fmt.L1_COPIED):
                    self.corrupt(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={entry:x} "
                                 f"refcount={refcount}", structural=False)
            yield from self.walk_l2(l2_off, active=active, copied=active and bool(l2_off))

    def walk_l2(self, l2_off: int, *, active: bool, copied: bool):
        """check_refcounts_l2; with copied, also the data half of check_oflag_copied."""
        cs, cb = self.cs, self.cb
        buf = bytes((yield ReadRequest(l2_off, cs))).ljust(cs, b"\0")
        next_contiguous = 0  # check_refcounts_l2's fragmentation count, per L2 table
        entries = fmt.decode_table(buf)
        if self.tables is not None:
            self.tables[l2_off] = entries
        for entry in entries:
            if not entry:
                continue
            if entry & fmt.L2_COMPRESSED:
                if entry & fmt.L2_COPIED:
                    self.corrupt(f"ERROR: coffset={entry & ((1 << fmt.compressed_shift(cb)) - 1):#x}: "
                                 "copied flag must never be set for compressed clusters")
                desc = fmt.decode_compressed(entry, cb)
                self.inc(desc.offset, desc.max_length)
                if active:
                    self.allocated += 1
                    self.compressed += 1
                    self.fragmented += 1  # QEMU: compressed clusters are fragmented by nature
                continue
            if entry & fmt.L2_STD_RESERVED:
                self.corrupt(f"ERROR found l2 entry with reserved bits set: {entry:x}")
            off = entry & fmt.OFFSET_MASK
            if not off:
                continue  # unallocated or a plain zero cluster
            if off & (cs - 1):
                self.corrupt(f"ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted.")
            if active:
                self.allocated += 1
                self.fragmented += bool(next_contiguous and off != next_contiguous)
                next_contiguous = off + cs
            if copied:
                refcount = self.stored_refcount(off >> cb)
                if refcount is not None and (refcount == 1) != bool(entry & fmt.L2_COPIED):
                    self.corrupt(f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}",
                                 structural=False)
            self.inc(off, cs)

    # ------------------------------------------------------------ snapshots, bitmaps

    def walk_snapshots(self):
        """Walk each snapshot's L1 table; return the snapshot table's size in bytes.

        spec "Snapshot table": entries start 8-byte aligned; each is a 40-byte
        header (l1_table_offset at 0, l1_size at 8, id and name lengths at 12
        and 14, extra data size at 36), then extra data, id, name.
        """
        hdr = self.hdr
        pos = start = hdr.snapshots_offset
        for n in range(hdr.nb_snapshots):
            pos = (pos + 7) & ~7
            head = bytes((yield ReadRequest(pos, SNAPSHOT_HEADER.size)))
            if len(head) < SNAPSHOT_HEADER.size:
                self.corrupt(f"ERROR snapshot table entry {n} lies outside the file")
                break
            l1_off, l1_size, id_len, name_len, _, _, _, _, extra = SNAPSHOT_HEADER.unpack(head)
            pos += SNAPSHOT_HEADER.size + extra
            names = bytes((yield ReadRequest(pos, id_len + name_len)))
            pos += id_len + name_len
            if pos > self.file_size:
                self.corrupt(f"ERROR snapshot table entry {n} lies outside the file")
                break
            label = f"{names[:id_len].decode(errors='replace')} ({names[id_len:].decode(errors='replace')})"
            if l1_off & (self.cs - 1):
                self.corrupt(f"ERROR snapshot {label} l1_offset={l1_off:#x}: L1 table is not cluster aligned; "
                             "snapshot table entry corrupted")
                continue
            if l1_size > fmt.MAX_L1_BYTES // 8:
                self.corrupt(f"ERROR snapshot {label} l1_size={l1_size:#x}: L1 table is too large; "
                             "snapshot table entry corrupted")
                continue
            if l1_off > INT64_MAX - l1_size * 8:  # qcow2_validate_table's bound; found by fuzz/
                self.corrupt(f"ERROR snapshot {label} l1_offset={l1_off:#x}: L1 table offset invalid; "
                             "snapshot table entry corrupted")
                continue
            yield from self.walk_l1(l1_off, l1_size, active=False)
        return pos - start

    def walk_bitmaps(self):
        """qcow2_check_bitmaps_refcounts: only bitmaps the autoclear bit vouches for count."""
        ext = self.hdr.extension(fmt.EXT_BITMAPS)
        if ext is None or len(ext) < 24 or not self.hdr.autoclear & fmt.AUTOCLEAR_BITMAPS:
            return
        nb, _, dir_size, dir_off = struct.unpack_from(">IIQQ", ext)
        if not nb:
            return
        # The directory is read whole, at an off_t. QEMU refuses to open an image past these
        # limits (qcow2_read_extensions), so qemu-img check stops here too. Found by fuzz/.
        if dir_size > MAX_BITMAP_DIRECTORY_SIZE:
            raise CorruptImage(f"bitmap directory size {dir_size} exceeds the limit {MAX_BITMAP_DIRECTORY_SIZE}")
        if dir_off & (self.cs - 1) or dir_off > INT64_MAX - dir_size:
            raise CorruptImage(f"bitmap directory offset {dir_off:#x} is invalid")
        self.inc(dir_off, dir_size)
        directory = bytes((yield ReadRequest(dir_off, dir_size)))
        pos = 0
        for _ in range(nb):
            if pos + BITMAP_ENTRY.size > len(directory):
                self.corrupt("ERROR bitmap directory is truncated")
                return
            table_off, table_size, _, _, _, name_len, extra = BITMAP_ENTRY.unpack_from(directory, pos)
            pos += -(-(BITMAP_ENTRY.size + extra + name_len) // 8) * 8
            if table_off + table_size * 8 > self.file_size:
                self.corrupt(f"ERROR bitmap table at {table_off:#x} lies outside the file")
                continue
            self.inc(table_off, table_size * 8)
            table = fmt.decode_table(bytes((yield ReadRequest(table_off, table_size * 8))).ljust(table_size * 8, b"\0"))
            for entry in table:
                off = entry & BME_OFFSET_MASK
                if entry & BME_RESERVED or off and (entry & BME_ALL_ONES or off & (self.cs - 1)):
                    self.corrupt(f"ERROR bitmap table entry {entry:#x} is invalid")
                elif off:
                    self.inc(off, self.cs)

    # ------------------------------------------------------------ refcount structure

    def check_refblocks(self) -> None:
        for i, entry in enumerate(self.reftable):
            if not entry:
                continue
            off = entry & REFT_OFFSET_MASK
            if entry & fmt.REFTABLE_RESERVED:
                self.corrupt(f"ERROR refcount table entry {i} has reserved bits set")
                self.rebuild = True
                continue
            if off & (self.cs - 1):
                self.corrupt(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                self.rebuild = True
                continue
            if off >> self.cb >= self.imrt_size:
                self.corrupt(f"ERROR refcount block {i} is outside image")
                self.rebuild = True
                continue
            if off:
                self.inc(off, self.cs)
                if self.refs[off >> self.cb] != 1:
                    self.corrupt(f"ERROR refcount block {i} refcount={self.refs[off >> self.cb]}")
                    self.rebuild = True

    def compare(self) -> None:
        """compare_refcounts: refcount < references is corruption, > is a leak."""
        per, n = self.hdr.refblock_entries, self.imrt_size
        stored, refs = self.stored, self.refs
        for base in range(0, n, per):
            end = min(base + per, n)
            if base // per in self.bad_blocks:
                self.errors += end - base
                continue
            if stored[base:end] == refs[base:end]:
                continue
            for i in range(base, end):
                r1, r2 = stored[i], refs[i]
                if r1 == r2:
                    continue
                self.mismatches.append((i, r1, r2))
                if r1 < r2:
                    self.corrupt(f"ERROR cluster {i} refcount={r1} reference={r2}", structural=False)
                else:
                    self.leaks.append(i)
        for i in range(n - 1, -1, -1):
            if (stored[i] or refs[i]) and i // per not in self.bad_blocks:
                self.highest = i
                break

    def result(self) -> CheckResult:
        hdr = self.hdr
        return CheckResult(
            header=hdr, file_size=self.file_size, corruptions=tuple(self.corruptions),
            leaks=tuple(self.leaks), errors=self.errors, allocated_clusters=self.allocated,
            compressed_clusters=self.compressed, total_clusters=-(-hdr.size // self.cs),
            image_end_offset=(self.highest + 1) * self.cs, references=self.refs,
            mismatches=tuple(self.mismatches), reftable=tuple(self.reftable),
            structural=self.structural, rebuild_needed=self.rebuild or bool(self.bad_blocks),
            fragmented_clusters=self.fragmented,
        )
