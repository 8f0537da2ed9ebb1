"""check.py against the reference: images made and damaged with qemu-img/qemu-io.

Every verdict is compared with ``qemu-img check --output=json`` on the same
file: exit code, corruption and leak counts, allocated clusters and image end.
Repairs are applied to the file and then judged by qemu-img, not by us.
"""

from __future__ import annotations

import json
import struct
import subprocess

import pytest
from hypothesis import assume, event, given, settings, strategies as st

from cachefs.errors import CorruptImage, UnsupportedImage
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.check import check_image
from cachefs.qcow2.repair import rebuild_refcounts, repair
from cachefs.qcow2.plan import run_sync

# qemu-img/qemu-io are installed by `make test`; a missing tool must fail, not skip.

WRITES = ["-c", "write -P 0x5a 0 1M", "-c", "write -z 2M 64k"]

CREATE_VARIANTS = {
    "v2": "compat=0.10",
    "v3": "compat=1.1",
    "c512": "cluster_size=512",
    "c2M": "cluster_size=2M",
    "rc1": "refcount_bits=1",
    "rc64": "refcount_bits=64",
    "v2-c512": "compat=0.10,cluster_size=512",
    "c512-rc1": "cluster_size=512,refcount_bits=1",
    "lazy": "lazy_refcounts=on",
}
CONVERT_VARIANTS = {
    "zlib": "compression_type=zlib",
    "zstd": "compression_type=zstd",
    "zlib-c512": "compression_type=zlib,cluster_size=512",
    "zstd-c2M-rc64": "compression_type=zstd,cluster_size=2M,refcount_bits=64",
}
ALL_VARIANTS = [*CREATE_VARIANTS, *CONVERT_VARIANTS]


def run(*args):
    subprocess.run(args, check=True, capture_output=True)


def make_image(tmp_path, variant: str, size: str = "4M") -> str:
    path = str(tmp_path / f"{variant}.qcow2")
    if variant in CREATE_VARIANTS:
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", CREATE_VARIANTS[variant], path, size)
        run("qemu-io", *WRITES, path)
    else:
        src = str(tmp_path / "src.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", src, size)
        run("qemu-io", *WRITES, "-c", "write -P 0x33 3M 100k", src)
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", CONVERT_VARIANTS[variant], src, path)
    return path


def qemu_check(path: str) -> tuple[int, dict]:
    p = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True, text=True)
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else {}


def our_check(path: str):
    buf = open(path, "rb").read()
    return run_sync(check_image(len(buf)), lambda off, n: buf[off:off + n])


def assert_agrees(path: str):
    """Our verdict equals qemu-img's, field by field; returns both."""
    rc, q = qemu_check(path)
    ours = our_check(path)
    detail = (ours.corruptions[:5], ours.leaks[:5], q)
    assert ours.exit_code() == rc, detail
    assert len(ours.corruptions) == q.get("corruptions", 0), detail
    assert ours.leaked_clusters == q.get("leaks", 0), detail
    assert ours.errors == q.get("check-errors", 0), detail
    assert ours.allocated_clusters == q.get("allocated-clusters", 0), detail
    assert ours.total_clusters == q["total-clusters"], detail
    if "image-end-offset" in q:
        assert ours.image_end_offset == q["image-end-offset"], detail
    return rc, ours


def apply(path: str, writes) -> None:
    with open(path, "r+b") as f:
        for off, data in writes:
            f.seek(off)
            f.write(data)


def run_repair(path: str, mode: str):
    buf = open(path, "rb").read()
    result = run_sync(check_image(len(buf)), lambda off, n: buf[off:off + n])
    return run_sync(repair(result, mode), lambda off, n: buf[off:off + n])


# ---------------------------------------------------------------- image surgery

class Image:
    """Just enough qcow2 parsing to damage an image in a chosen way."""

    def __init__(self, path: str):
        self.path = path
        self.buf = bytearray(open(path, "rb").read())
        self.hdr = fmt.parse_header_untrusted(self._head(), len(self.buf))
        h = self.hdr
        self.reftable = fmt.decode_table(bytes(self.buf[h.refcount_table_offset:
                                                        h.refcount_table_offset + h.reftable_entries * 8]))

    def _head(self) -> bytes:
        cb = int.from_bytes(self.buf[20:24], "big")
        return bytes(self.buf[:1 << cb])

    def save(self) -> None:
        open(self.path, "wb").write(self.buf)

    def _block(self, cluster: int):
        per = self.hdr.refblock_entries
        off = self.reftable[cluster // per]
        assert off, "no refcount block covers that cluster"
        raw = bytes(self.buf[off:off + self.hdr.cluster_size])
        return off, fmt.RefcountBlock.decode(raw, self.hdr.refcount_order), cluster % per

    def refcount(self, cluster: int) -> int:
        _, entries, i = self._block(cluster)
        return entries[i]

    def set_refcount(self, cluster: int, value: int) -> None:
        off, entries, i = self._block(cluster)
        entries[i] = value
        self.buf[off:off + self.hdr.cluster_size] = fmt.RefcountBlock.encode(entries, self.hdr.refcount_order)

    def first_l2_entry(self) -> tuple[int, int]:
        """(file offset, value) of the first allocated entry of the active layer."""
        h = self.hdr
        for l1e in fmt.decode_table(bytes(self.buf[h.l1_table_offset:h.l1_table_offset + h.l1_size * 8])):
            l2 = l1e & fmt.OFFSET_MASK
            if not l2:
                continue
            for j, e in enumerate(fmt.decode_table(bytes(self.buf[l2:l2 + h.cluster_size]))):
                if e & fmt.L2_COMPRESSED or e & fmt.OFFSET_MASK:
                    return l2 + 8 * j, e
        raise AssertionError("no allocated cluster")

    def data_cluster(self) -> int:
        _, e = self.first_l2_entry()
        if e & fmt.L2_COMPRESSED:
            return fmt.decode_compressed(e, self.hdr.cluster_bits).offset >> self.hdr.cluster_bits
        return (e & fmt.OFFSET_MASK) >> self.hdr.cluster_bits

    def put_u64(self, off: int, value: int) -> None:
        self.buf[off:off + 8] = struct.pack(">Q", value)

    def leak_one(self) -> None:
        """Raise one refcount with no reference behind it (and nothing else wrong)."""
        if self.hdr.refcount_bits > 1:
            self.set_refcount(0, self.refcount(0) + 1)  # the header: no COPIED flag to disagree
            return
        # 1-bit refcounts cannot go above 1: count a fresh cluster appended to the file.
        cluster = -(-len(self.buf) // self.hdr.cluster_size)
        self.buf.extend(bytes(cluster * self.hdr.cluster_size + self.hdr.cluster_size - len(self.buf)))
        self.set_refcount(cluster, 1)


# ---------------------------------------------------------------- clean images

@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_fresh_images_are_clean(tmp_path, variant):
    path = make_image(tmp_path, variant)
    rc, ours = assert_agrees(path)
    assert rc == 0 and ours.clean
    if variant in CONVERT_VARIANTS:
        assert ours.compressed_clusters > 0


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "cluster_size=512,refcount_bits=2"])
def test_snapshots_then_more_writes_are_clean(tmp_path, opts):
    path = str(tmp_path / "snap.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, "8M")
    run("qemu-io", "-c", "write -P 1 0 1M", path)
    run("qemu-img", "snapshot", "-c", "s1", path)
    run("qemu-io", "-c", "write -P 2 512k 1M", "-c", "write -z 0 64k", path)
    run("qemu-img", "snapshot", "-c", "a-longer-snapshot-name", path)
    run("qemu-io", "-c", "write -P 3 4M 64k", "-c", "write -P 4 100k 3k", path)
    rc, ours = assert_agrees(path)
    assert rc == 0 and ours.clean
    # Deleting a snapshot frees its private clusters: still clean.
    run("qemu-img", "snapshot", "-d", "s1", path)
    rc, _ = assert_agrees(path)
    assert rc == 0


def test_persistent_bitmaps_are_counted(tmp_path):
    path = make_image(tmp_path, "v3")
    run("qemu-img", "bitmap", "--add", path, "b0")
    run("qemu-io", "-c", "write -P 7 3M 128k", path)
    rc, ours = assert_agrees(path)
    assert rc == 0 and ours.clean


# ---------------------------------------------------------------- damage

@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_raised_refcount_is_a_leak_and_repair_leaks_fixes_it(tmp_path, variant):
    path = make_image(tmp_path, variant)
    img = Image(path)
    img.leak_one()
    img.save()
    rc, ours = assert_agrees(path)
    assert rc == 3 and ours.leaked_clusters == 1 and not ours.corruptions
    apply(path, run_repair(path, "leaks"))
    rc, ours = assert_agrees(path)
    assert rc == 0 and ours.clean


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_zeroed_refcount_is_corruption_and_repair_all_fixes_it(tmp_path, variant):
    path = make_image(tmp_path, variant)
    img = Image(path)
    img.set_refcount(img.data_cluster(), 0)
    img.save()
    rc, ours = assert_agrees(path)
    assert rc == 2 and ours.refcount_errors
    # -r leaks cannot fix a too-low refcount.
    apply(path, run_repair(path, "leaks"))
    assert qemu_check(path)[0] == 2
    apply(path, run_repair(path, "all"))
    rc, ours = assert_agrees(path)
    assert rc == 0 and ours.clean


# Not "zstd": its first entry is a compressed descriptor, which has no reserved bits.
@pytest.mark.parametrize("variant", ["v3", "c512", "rc1"])
@pytest.mark.parametrize("bit", [1, 8, 56, 61])
def test_reserved_l2_bit_is_corruption(tmp_path, variant, bit):
    path = make_image(tmp_path, variant)
    img = Image(path)
    off, entry = img.first_l2_entry()
    assert not entry & fmt.L2_COMPRESSED
    img.put_u64(off, entry | 1 << bit)
    img.save()
    rc, ours = assert_agrees(path)
    assert rc == 2 and ours.structural == 1
    assert any("reserved bits" in c for c in ours.corruptions)


@pytest.mark.parametrize("variant", ["v2", "v3", "c512", "rc64"])
def test_copied_flag_mismatch_is_corruption_and_repair_all_fixes_it(tmp_path, variant):
    path = make_image(tmp_path, variant)
    img = Image(path)
    off, entry = img.first_l2_entry()
    img.put_u64(off, entry & ~fmt.L2_COPIED)
    l1e = struct.unpack_from(">Q", img.buf, img.hdr.l1_table_offset)[0]
    img.put_u64(img.hdr.l1_table_offset, l1e & ~fmt.L1_COPIED)
    img.save()
    rc, ours = assert_agrees(path)
    assert rc == 2 and len(ours.corruptions) == 2 and ours.structural == 0
    apply(path, run_repair(path, "all"))
    rc, ours = assert_agrees(path)
    assert rc == 0


def test_data_refcount_raised_leaks_and_breaks_copied(tmp_path):
    """refcount 2 on a COPIED cluster: a leak and an OFLAG_COPIED error; -r leaks fixes both."""
    path = make_image(tmp_path, "v3")
    img = Image(path)
    c = img.data_cluster()
    img.set_refcount(c, 2)
    img.save()
    rc, ours = assert_agrees(path)
    assert rc == 2 and ours.leaks == (c,) and len(ours.corruptions) == 1
    apply(path, run_repair(path, "leaks"))
    rc, _ = assert_agrees(path)
    assert rc == 0


def test_reference_beyond_eof_is_corruption(tmp_path):
    path = make_image(tmp_path, "v3")
    img = Image(path)
    off, entry = img.first_l2_entry()
    img.put_u64(off, (entry & ~fmt.OFFSET_MASK) | (len(img.buf) + (4 << 16)))
    img.save()
    rc, ours = assert_agrees(path)
    assert rc == 2 and any("exceeding the end of the file" in c for c in ours.corruptions)


def test_snapshot_image_leak_is_repaired(tmp_path):
    path = make_image(tmp_path, "v3")
    run("qemu-img", "snapshot", "-c", "s1", path)
    run("qemu-io", "-c", "write -P 9 0 200k", path)
    img = Image(path)
    img.leak_one()
    img.save()
    rc, _ = assert_agrees(path)
    assert rc == 3
    apply(path, run_repair(path, "leaks"))
    rc, _ = assert_agrees(path)
    assert rc == 0


def test_damaged_refcount_table_refuses_repair(tmp_path):
    path = make_image(tmp_path, "v3")
    img = Image(path)
    img.put_u64(img.hdr.refcount_table_offset, img.reftable[0] | 0x100)
    img.save()
    rc, ours = assert_agrees(path)
    assert rc == 2 and ours.rebuild_needed
    with pytest.raises(CorruptImage, match="rebuilt"):
        run_repair(path, "all")


def test_missing_refcount_block_refuses_repair_all(tmp_path):
    """A too-low refcount whose block does not exist would need allocation: refused."""
    path = make_image(tmp_path, "c512")
    img = Image(path)
    off, entry = img.first_l2_entry()
    per = img.hdr.refblock_entries
    # Grow the file so a cluster past every refcount block exists, and point at it.
    target = (len(img.reftable) and per * sum(1 for e in img.reftable if e)) + 3
    img.buf.extend(bytes((target + 1) * img.hdr.cluster_size - len(img.buf)))
    img.put_u64(off, target << img.hdr.cluster_bits | fmt.L2_COPIED)
    img.save()
    rc, ours = assert_agrees(path)
    assert rc == 2
    with pytest.raises(CorruptImage, match="new refcount block"):
        run_repair(path, "all")


def test_lazy_refcounts_dirty_image_is_rebuilt(tmp_path):
    """A crash under lazy refcounts: refcounts lag the L2 tables, the dirty bit is set."""
    path = make_image(tmp_path, "lazy")
    img = Image(path)
    c = img.data_cluster()
    img.set_refcount(c, 0)  # as if the refcount update had not reached the disk
    incompat = struct.unpack_from(">Q", img.buf, 72)[0]
    img.put_u64(72, incompat | fmt.INCOMPAT_DIRTY)
    img.save()
    rc, _ = assert_agrees(path)
    assert rc == 2
    buf = open(path, "rb").read()
    writes = run_sync(rebuild_refcounts(len(buf)), lambda off, n: buf[off:off + n])
    apply(path, writes)
    rc, ours = assert_agrees(path)
    assert rc == 0 and not ours.header.dirty


def test_repair_rejects_unknown_mode(tmp_path):
    path = make_image(tmp_path, "v3")
    with pytest.raises(ValueError):
        run_repair(path, "everything")


def test_driven_by_run_async(tmp_path):
    import trio

    from cachefs.qcow2.plan import run_async

    path = make_image(tmp_path, "zstd")
    buf = open(path, "rb").read()

    async def pread(off, n):
        await trio.lowlevel.checkpoint()
        return buf[off:off + n]

    result = trio.run(run_async, check_image(len(buf)), pread)
    assert result == our_check(path) and result.clean


@pytest.mark.parametrize("order", range(7))
def test_refcount_patch_matches_the_codec(order):
    import random

    from cachefs.qcow2.repair import _set_refcount

    rnd = random.Random(order)
    n = 4096 * 8 >> order
    entries = [rnd.randrange(1 << (1 << order)) for _ in range(n)]
    block = bytearray(fmt.RefcountBlock.encode(entries, order))
    for _ in range(200):
        i, v = rnd.randrange(n), rnd.randrange(1 << (1 << order))
        entries[i] = v
        _set_refcount(block, i, v, order)
    assert bytes(block) == fmt.RefcountBlock.encode(entries, order)


# ---------------------------------------------------------------- random damage, same verdict

@pytest.fixture(scope="module")
def fuzz_images(tmp_path_factory):
    """Small images with snapshots, compression and bitmaps, and their metadata clusters."""
    d = tmp_path_factory.mktemp("fuzz")
    out = []
    for name, opts in [("snap", "cluster_size=4k,refcount_bits=2"), ("v2", "compat=0.10,cluster_size=4k")]:
        path = str(d / f"{name}.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, "4M")
        run("qemu-io", "-c", "write -P 1 0 300k", path)
        run("qemu-img", "snapshot", "-c", "s1", path)
        run("qemu-io", "-c", "write -P 2 100k 100k", "-c", "write -P 3 1M 64k", path)
        out.append(path)
    comp = str(d / "comp.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k,compression_type=zstd", out[0], comp)
    run("qemu-img", "bitmap", "--add", comp, "b0")
    out.append(comp)
    images = []
    for path in out:
        img = Image(path)
        h = img.hdr
        meta = {h.refcount_table_offset, h.l1_table_offset, h.snapshots_offset} | {e for e in img.reftable if e}
        for l1e in fmt.decode_table(bytes(img.buf[h.l1_table_offset:h.l1_table_offset + h.l1_size * 8])):
            if l1e & fmt.OFFSET_MASK:
                meta.add(l1e & fmt.OFFSET_MASK)
        images.append((bytes(img.buf), sorted(m for m in meta if m)))
    return images


@settings(max_examples=150, deadline=None, database=None)
@given(which=st.integers(0, 2),
       flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 511), st.integers(0, 7)),
                      min_size=1, max_size=3))
def test_random_metadata_damage_gets_qemus_verdict(fuzz_images, tmp_path_factory, which, flips):
    """Flip bits in tables: both checkers open it or both refuse, and report the same counts."""
    src, meta = fuzz_images[which]
    buf = bytearray(src)
    for table, byte, bit in flips:
        buf[meta[table % len(meta)] + byte] ^= 1 << bit
    path = str(tmp_path_factory.getbasetemp() / "damaged.qcow2")
    with open(path, "wb") as f:
        f.write(buf)
    rc, q = qemu_check(path)
    event(f"qemu-img check exit {rc}")
    try:
        ours = our_check(path)
    except (CorruptImage, UnsupportedImage):
        assert rc == 1  # neither could open it
        return
    # Some bit flips make qemu-img itself give up without a JSON verdict:
    # nothing to compare against, so the example is not informative.
    assume(q)
    assert (ours.exit_code(), len(ours.corruptions), ours.leaked_clusters, ours.errors) == \
        (rc, q.get("corruptions", 0), q.get("leaks", 0), q.get("check-errors", 0)), ours.corruptions[:5]
