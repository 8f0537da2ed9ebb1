"""Hostile images: damaged headers are skipped, damaged table entries fail only their range.

The design brief: "An image that cannot be opened is skipped (listed under skipped
with a one-line reason); a damaged table entry makes just that guest range
return EIO." In every case the mount itself succeeds, a good image next to
the hostile one keeps working, the daemon logs no traceback, and the hostile
file is byte-for-byte unchanged afterwards (cachefs never "repairs" what it
refused or could not read).

Field offsets follow the qcow2 spec's header layout (docs/interop/qcow2.rst).
"""

from __future__ import annotations

import errno
import os
import struct

import pytest

from conftest import cachefs, qemu_img, qemu_io, sha256

KiB, MiB = 1 << 10, 1 << 20

# Header fields: name -> (offset, struct format).
FIELDS = {
    "magic": (0, ">I"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
    "crypt_method": (32, ">I"), "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"), "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"), "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"),
    "header_length": (100, ">I"), "compression_type": (104, ">B"),
}
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COPIED = 1 << 63
BEYOND_EOF = 1 << 40


def get(d: bytearray, field: str) -> int:
    off, f = FIELDS[field]
    return struct.unpack_from(f, d, off)[0]


def put(d: bytearray, field: str, value: int) -> bytearray:
    off, f = FIELDS[field]
    struct.pack_into(f, d, off, value)
    return d


def setter(field, value):
    return lambda d: put(d, field, value(d) if callable(value) else value)


# name -> mutation of the whole image file (bytearray -> bytes)
HEADER_MUTATIONS = {
    "bad-magic": setter("magic", 0x514649FC),
    "version-1": setter("version", 1),
    "version-4": setter("version", 4),
    "cluster-bits-8": setter("cluster_bits", 8),
    "cluster-bits-22": setter("cluster_bits", 22),
    "l1-too-small-for-size": setter("size", 4 << 30),  # needs 8 L1 entries at 64 KiB clusters; has 1
    "l1-size-zero": setter("l1_size", 0),
    "l1-offset-unaligned": setter("l1_table_offset", lambda d: get(d, "l1_table_offset") + 8),
    "l1-offset-beyond-eof": setter("l1_table_offset", BEYOND_EOF),
    "l1-offset-zero": setter("l1_table_offset", 0),
    "l1-size-huge": setter("l1_size", 0x0FFF_FFFF),
    "reftable-offset-unaligned": setter("refcount_table_offset", lambda d: get(d, "refcount_table_offset") + 512),
    "reftable-offset-beyond-eof": setter("refcount_table_offset", BEYOND_EOF),
    "reftable-clusters-huge": setter("refcount_table_clusters", 0xFFFF_FFFF),
    "reftable-clusters-zero": setter("refcount_table_clusters", 0),
    "incompat-bit-7": setter("incompatible_features", 1 << 7),
    "incompat-extl2": setter("incompatible_features", 1 << 4),
    "incompat-data-file": setter("incompatible_features", 1 << 2),
    "refcount-order-7": setter("refcount_order", 7),
    "header-length-huge": setter("header_length", 0xFFFF_FFF8),
    "header-length-unaligned": setter("header_length", 105),
    "header-length-short": setter("header_length", 96),
    "truncated-50-bytes": lambda d: d[:50],
    "compression-type-without-bit": setter("compression_type", 1),
    "compression-bit-without-type": setter("incompatible_features", 1 << 3),
    "compression-type-unknown": lambda d: put(put(d, "compression_type", 7), "incompatible_features", 1 << 3),
    "encrypted": setter("crypt_method", 1),
    "snapshots-beyond-eof": lambda d: put(put(d, "nb_snapshots", 1), "snapshots_offset", BEYOND_EOF),
    "backing-name-outside-cluster": lambda d: put(put(d, "backing_file_offset", 1 << 20), "backing_file_size", 8),
    "extension-runs-past-cluster": lambda d: d[:112] + struct.pack(">II", 0x1234, 1 << 20) + d[120:],
}


def make_base(path, cluster_size="64k", size="16M", writes=("write -P 0x11 0 64k", "write -P 0x22 1M 100k",
                                                              "write -P 0x33 10M 4k", "write -z 1M 64k")):
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, size)
    qemu_io(path, *writes)
    return path


@pytest.fixture
def good(workdir):
    """A directory holding one good image (good.qcow2); returns (dir, sha256 of its raw content)."""
    d = workdir / "images"
    d.mkdir()
    make_base(d / "good.qcow2", writes=("write -P 0x77 0 1M",))
    qemu_img("convert", "-O", "raw", d / "good.qcow2", workdir / "good.raw")
    return d, sha256(workdir / "good.raw")


def test_base_image_is_clean(workdir):
    """The mutations start from an image qemu-img considers clean (else the matrix proves nothing)."""
    img = make_base(workdir / "base.qcow2")
    d = bytearray(img.read_bytes())
    assert (get(d, "version"), get(d, "cluster_bits"), get(d, "l1_size"), get(d, "header_length")) == (3, 16, 1, 112)
    qemu_img("check", img)


@pytest.mark.parametrize("mutation", sorted(HEADER_MUTATIONS))
def test_header_mutation_is_skipped(workdir, mounted, good, mutation):
    d, good_hash = good
    hostile = d / "hostile.qcow2"
    base = bytearray(make_base(workdir / "base.qcow2").read_bytes())
    hostile.write_bytes(bytes(HEADER_MUTATIONS[mutation](base)))
    before = sha256(hostile)

    m = mounted(d)
    assert sorted(os.listdir(m.path)) == ["good.raw"]
    assert sha256(m / "good.raw") == good_hash
    stats = m.stats()
    assert list(stats["images"]) == ["good.raw"]
    reason = stats["skipped"].get("hostile.raw")
    assert reason, stats["skipped"]
    assert "\n" not in reason and "Traceback" not in reason, reason
    # The good image stays writable next to a hostile one.
    with open(m / "good.raw", "r+b", buffering=0) as f:
        f.write(b"still fine")
        os.fsync(f.fileno())
    m.umount()

    assert sha256(hostile) == before, f"{mutation}: a skipped image must not be modified"
    qemu_img("check", d / "good.qcow2")


@pytest.mark.parametrize("mutation", sorted(HEADER_MUTATIONS))
def test_info_refuses_hostile_header(workdir, mutation):
    img = workdir / "hostile.qcow2"
    base = bytearray(make_base(workdir / "base.qcow2").read_bytes())
    img.write_bytes(bytes(HEADER_MUTATIONS[mutation](base)))
    before = sha256(img)
    r = cachefs("info", img, check=False)
    assert r.returncode != 0, f"cachefs info accepted {mutation}:\n{r.stdout}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"{mutation}: expected one line on stderr, got:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    assert sha256(img) == before


# ---------------------------------------------------------------- table-entry damage

CS = 4 * KiB                      # 512 L2 entries per table -> one L1 entry per 2 MiB
L2_REACH = CS // 8 * CS
DAMAGE_SIZE = 16 * MiB


def damage_base(path):
    """A 4 KiB-cluster image with data in every 2 MiB region (so every L1 entry has an L2 table)."""
    writes = [f"write -P {0x40 + i:#x} {i * L2_REACH + 8 * KiB} {40 * KiB}" for i in range(DAMAGE_SIZE // L2_REACH)]
    writes += ["write -P 0x99 3M 8k", "write -z 3M 4k"]
    return make_base(path, cluster_size="4k", size="16M", writes=writes)


def l1_entries(d: bytes) -> list[int]:
    n, off = get(d, "l1_size"), get(d, "l1_table_offset")
    return list(struct.unpack_from(f">{n}Q", d, off))


def l2_slot(d: bytes, guest_offset: int) -> int:
    """File offset of the L2 entry that maps guest_offset."""
    l1 = l1_entries(d)[guest_offset // L2_REACH]
    return (l1 & OFFSET_MASK) + (guest_offset % L2_REACH) // CS * 8


def l1_slot(d: bytes, guest_offset: int) -> int:
    return get(d, "l1_table_offset") + guest_offset // L2_REACH * 8


def set_entry(slot_of, guest_offset, new):
    """Mutation: replace the L1/L2 entry for guest_offset with new(old)."""
    def mutate(d: bytearray) -> bytearray:
        slot = slot_of(d, guest_offset)
        old = struct.unpack_from(">Q", d, slot)[0]
        assert old & OFFSET_MASK, "the damaged entry must have been allocated"
        struct.pack_into(">Q", d, slot, new(old, d))
        return d
    return mutate


DATA_AT = 2 * L2_REACH + 8 * KiB  # an allocated guest cluster in the third 2 MiB region

# name -> (mutation, damaged guest range [start, end))
DAMAGE = {
    "l1-entry-beyond-eof": (set_entry(l1_slot, 4 * MiB, lambda o, d: COPIED | BEYOND_EOF), (4 * MiB, 6 * MiB)),
    "l1-entry-reserved-bits": (set_entry(l1_slot, 6 * MiB, lambda o, d: o | 1 << 1), (6 * MiB, 8 * MiB)),
    "l1-entry-unaligned": (set_entry(l1_slot, 8 * MiB, lambda o, d: o + 512), (8 * MiB, 10 * MiB)),
    "l1-entry-points-at-refcount-table": (
        set_entry(l1_slot, 10 * MiB, lambda o, d: COPIED | get(d, "refcount_table_offset")), (10 * MiB, 12 * MiB)),
    "l1-entry-copied-without-offset": (set_entry(l1_slot, 12 * MiB, lambda o, d: COPIED), None),
    "l2-entry-reserved-bits": (set_entry(l2_slot, DATA_AT, lambda o, d: o | 1 << 56), (DATA_AT, DATA_AT + CS)),
    "l2-entry-reserved-low-bit": (set_entry(l2_slot, DATA_AT, lambda o, d: o | 1 << 3), (DATA_AT, DATA_AT + CS)),
    "l2-entry-beyond-eof": (set_entry(l2_slot, DATA_AT, lambda o, d: COPIED | BEYOND_EOF), (DATA_AT, DATA_AT + CS)),
    "l2-entry-unaligned": (set_entry(l2_slot, DATA_AT, lambda o, d: o + 512), (DATA_AT, DATA_AT + CS)),
    "l2-entry-points-at-l1-table": (set_entry(l2_slot, DATA_AT, lambda o, d: COPIED | get(d, "l1_table_offset")),
                                    (DATA_AT, DATA_AT + CS)),
    "l2-compressed-beyond-eof": (set_entry(l2_slot, DATA_AT, lambda o, d: 1 << 62 | BEYOND_EOF),
                                 (DATA_AT, DATA_AT + CS)),
}


def _expected_after(name, reference: bytes) -> bytes:
    if name == "l1-entry-copied-without-offset":  # offset 0 is "unallocated": the region reads as zeros
        return reference[:12 * MiB] + bytes(2 * MiB) + reference[14 * MiB:]
    return reference


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_entry_fails_only_its_range(workdir, mounted, good, name):
    d, good_hash = good
    mutate, bad = DAMAGE[name]
    base = damage_base(workdir / "base.qcow2")
    qemu_img("convert", "-O", "raw", base, workdir / "base.raw")
    reference = _expected_after(name, (workdir / "base.raw").read_bytes())
    img = d / "damaged.qcow2"
    img.write_bytes(bytes(mutate(bytearray(base.read_bytes()))))
    before = sha256(img)

    m = mounted(d)
    assert sorted(os.listdir(m.path)) == ["damaged.raw", "good.raw"]
    assert m.stats()["skipped"] == {}
    fd = os.open(m / "damaged.raw", os.O_RDONLY)
    try:
        # No readahead: each pread asks the daemon for exactly the pages it covers.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if bad is not None:
            for off in (bad[0], bad[1] - 512, (bad[0] + bad[1]) // 2 // CS * CS + 100):
                with pytest.raises(OSError) as ei:
                    os.pread(fd, 512, off)
                assert ei.value.errno == errno.EIO, (name, off, ei.value)
        # Everything else reads correctly, in chunks that end at the damaged range.
        pos, chunk = 0, 256 * KiB
        while pos < DAMAGE_SIZE:
            if bad is not None and bad[0] <= pos < bad[1]:
                pos = bad[1]
                continue
            end = min(pos + chunk, DAMAGE_SIZE, bad[0] if bad is not None and pos < bad[0] else DAMAGE_SIZE)
            got = os.pread(fd, end - pos, pos)
            assert got == reference[pos:end], f"{name}: wrong data at {pos:#x}..{end:#x}"
            pos = end
    finally:
        os.close(fd)
    assert sha256(m / "good.raw") == good_hash
    m.umount()
    assert sha256(img) == before, f"{name}: reading a damaged image must not modify it"


@pytest.mark.parametrize("name", ["l1-entry-reserved-bits", "l2-entry-beyond-eof"])
def test_damaged_entry_write(workdir, mounted, good, name):
    """Writes behind a damaged entry fail with EIO; writes elsewhere land and survive a remount."""
    d, _ = good
    mutate, bad = DAMAGE[name]
    base = damage_base(workdir / "base.qcow2")
    img = d / "damaged.qcow2"
    img.write_bytes(bytes(mutate(bytearray(base.read_bytes()))))
    elsewhere = [(0, b"\xab" * 5000), (14 * MiB + 3, b"\xcd" * 70000)]

    m = mounted(d)
    fd = os.open(m / "damaged.raw", os.O_RDWR)
    try:
        for off in (bad[0], bad[0] + 100):
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"x" * 4096, off)
            assert ei.value.errno == errno.EIO
        for off, data in elsewhere:
            assert os.pwrite(fd, data, off) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.umount()

    m = mounted(d)
    fd = os.open(m / "damaged.raw", os.O_RDONLY)
    try:
        for off, data in elsewhere:
            assert os.pread(fd, len(data), off) == data
    finally:
        os.close(fd)
    m.umount()
