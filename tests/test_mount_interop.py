"""Interop matrix: images made by qemu-img/qemu-io, served by a real mount, checked by qemu-img.

For each variant (the design brief: "cachefs reads, byte for byte, any
image that qemu-img create or convert makes" and "every image cachefs
writes passes qemu-img check"):

1. build the image with qemu-img and fill it with qemu-io patterns and zero
   ranges (or convert a random raw file, compressed);
2. mount, read the whole NAME.raw and compare its hash with
   ``qemu-img convert -O raw`` of the image;
3. writable variants: ~200 random pwrites through the mount (aligned and
   unaligned, 1 B to 300 KiB, some full zero clusters), mirrored into a
   model raw file; read back through the mount; unmount;
4. ``qemu-img check`` exits 0 and ``qemu-img compare IMG MODEL`` exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import threading
import time

import pytest

from conftest import cachefs, is_mounted, make_random_raw, qemu_img, qemu_io, sha256
from interop import check_clean, compare, fill_commands, random_writes, read_hash, to_raw
from mounting import kill_daemon

pytestmark = pytest.mark.both_planes  # issue 11: with the data plane on and off

KiB, MiB = 1 << 10, 1 << 20


# name -> (qemu-img create options, virtual size, cluster size)
CREATE_VARIANTS = {
    "v2": (["-o", "compat=0.10"], 32 * MiB, 64 * KiB),
    "v3": (["-o", "compat=1.1"], 32 * MiB, 64 * KiB),
    "cs512": (["-o", "cluster_size=512"], 16 * MiB, 512),
    "cs4k": (["-o", "cluster_size=4k"], 32 * MiB, 4 * KiB),
    "cs64k": (["-o", "cluster_size=64k"], 32 * MiB, 64 * KiB),
    "cs2m": (["-o", "cluster_size=2M"], 64 * MiB, 2 * MiB),
    "rb1": (["-o", "refcount_bits=1"], 32 * MiB, 64 * KiB),
    "rb16-cs16k": (["-o", "refcount_bits=16,cluster_size=16k"], 32 * MiB, 16 * KiB),
    "rb64": (["-o", "refcount_bits=64"], 32 * MiB, 64 * KiB),
    "v2-cs4k": (["-o", "compat=0.10,cluster_size=4k"], 16 * MiB, 4 * KiB),
    "prealloc-metadata": (["-o", "preallocation=metadata"], 32 * MiB, 64 * KiB),
    "lazy-refcounts": (["-o", "lazy_refcounts=on"], 32 * MiB, 64 * KiB),
}
# name -> (compression type, extra -o options); made by `qemu-img convert -c` from a random raw file.
COMPRESSED_VARIANTS = {
    "compressed-zlib": ("zlib", ""),
    "compressed-zstd": ("zstd", ""),
    "compressed-v2": ("zlib", ",compat=0.10"),  # v2 has no compression_type field: always deflate
}


def build_created(workdir, name: str, seed: int):
    opts, vsize, cs = CREATE_VARIANTS[name]
    img = workdir / "images" / f"{name}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *opts, img, str(vsize))
    qemu_io(img, *fill_commands(random.Random(seed), vsize))
    return img, cs


def build_compressed(workdir, name: str, seed: int):
    src = make_random_raw(workdir / f"{name}.src", 24 * MiB, seed)
    img = workdir / "images" / f"{name}.qcow2"
    ctype, extra = COMPRESSED_VARIANTS[name]
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}{extra}", src, img)
    src.unlink()
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    return img, info["cluster-size"]


# ---------------------------------------------------------------- the matrix

MATRIX = sorted(CREATE_VARIANTS) + sorted(COMPRESSED_VARIANTS)


def build(workdir, variant: str):
    """(image, cluster size, model raw file = qemu-img convert -O raw of the image, its sha256)."""
    seed = MATRIX.index(variant) + 1
    (workdir / "images").mkdir()
    if variant in CREATE_VARIANTS:
        img, cs = build_created(workdir, variant, seed)
    else:
        img, cs = build_compressed(workdir, variant, seed)
    model = workdir / f"{variant}.model.raw"
    return img, cs, model, to_raw(img, model)


@pytest.mark.parametrize("variant", MATRIX)
def test_read_matches_qemu(workdir, mounted, variant):
    img, cs, model, expect = build(workdir, variant)
    before = sha256(img)
    m = mounted(workdir / "images")
    fuse = m / f"{variant}.raw"
    assert os.listdir(m.path) == [f"{variant}.raw"]
    assert os.stat(fuse).st_size == os.path.getsize(model)
    got, n = read_hash(fuse)
    assert n == os.path.getsize(model)
    assert got == expect, f"{variant}: mount content differs from qemu-img convert -O raw"
    # Unaligned reads that straddle cluster boundaries.
    rng = random.Random(5)
    with open(fuse, "rb", buffering=0) as f, open(model, "rb") as ref:
        for _ in range(50):
            off, length = rng.randrange(0, n - 1), rng.randrange(1, 3 * cs + 1000)
            assert os.pread(f.fileno(), length, off) == os.pread(ref.fileno(), length, off), (off, length)
    x = m.stats()["images"][f"{variant}.raw"]
    assert (x["format"], int(x["cluster_size"]), x["writable"]) == ("qcow2", cs, True)
    m.umount()
    assert sha256(img) == before, "reading must not change the image"
    check_clean(img)


@pytest.mark.parametrize("variant", MATRIX)
def test_random_writes_match_qemu(workdir, mounted, variant):
    img, cs, model, _ = build(workdir, variant)
    m = mounted(workdir / "images")
    fuse = m / f"{variant}.raw"
    random_writes(fuse, model, cs, MATRIX.index(variant) + 1)
    got, _ = read_hash(fuse)
    assert got == sha256(model), f"{variant}: read-back through the mount differs from the model"
    m.umount()
    check_clean(img)
    compare(img, model)


def test_write_into_preallocated_zero_cluster(workdir, mounted):
    """A write into a "preallocated zero" cluster (L2 entry offset | COPIED | ZERO flag) keeps its
    host cluster referenced. qemu-io `write -z` over data leaves such entries, and with
    preallocation=metadata the matrix's random writes land on many of them. (Regression:
    the write used to free the host cluster it kept using: refcount=0 reference=1.)"""
    d = workdir / "images"
    d.mkdir()
    img = d / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_io(img, "write -P 1 0 64k", "write -z 0 64k")
    mapping = json.loads(qemu_img("map", "--output=json", img).stdout)
    assert mapping[0]["zero"] and "offset" in mapping[0], mapping  # allocated, reads as zeros
    m = mounted(d)
    fd = os.open(m / "vm.raw", os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 512, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.umount()
    check_clean(img)
    expect = workdir / "expect.raw"
    with open(expect, "wb") as f:
        f.write(b"x" * 512)
        f.truncate(16 * MiB)
    compare(img, expect)


def test_raw_image_keeps_its_name(workdir, mounted):
    (workdir / "images").mkdir()
    img = make_random_raw(workdir / "images" / "disk.img", 8 * MiB, 7)
    model = workdir / "model.raw"
    shutil.copyfile(img, model)
    m = mounted(workdir / "images")
    assert os.listdir(m.path) == ["disk.img"]
    assert read_hash(m / "disk.img")[0] == sha256(model)
    random_writes(m / "disk.img", model, 512, 7, count=60)
    m.umount()
    assert sha256(img) == sha256(model)


def test_internal_snapshot_served_writable_active_layer(workdir, mounted):
    """Since issue 23 an image with internal snapshots is served writable (qcow2/generation.py);
    the mount shows its active layer and leaves the snapshot as it was."""
    (workdir / "images").mkdir()
    img = workdir / "images" / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "32M")
    rng = random.Random(99)
    qemu_io(img, *fill_commands(rng, 32 * MiB))
    qemu_img("snapshot", "-c", "s1", img)
    # Overwrite part of what s1 holds (COW of shared clusters), plus new data and zeros.
    qemu_io(img, *fill_commands(rng, 32 * MiB, n=10))
    assert "s1" in qemu_img("snapshot", "-l", img).stdout
    expect = to_raw(img, workdir / "active.raw")
    s1 = workdir / "s1.raw"
    qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", img, s1)
    s1_hash = sha256(s1)

    m = mounted(workdir / "images")
    fuse = m / "snap.raw"
    assert read_hash(fuse)[0] == expect, "the mount must show the active layer, not snapshot s1"
    assert m.stats()["images"]["snap.raw"]["writable"] is True
    m.umount()

    check_clean(img)
    assert to_raw(img, workdir / "after.raw") == expect
    qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", img, s1)
    assert sha256(s1) == s1_hash


# ---------------------------------------------------------------- resize

@pytest.mark.parametrize("cluster_size,new_size", [(64 * KiB, 1 * 1024 * MiB + 5 * MiB), (512, 40 * MiB)])
def test_truncate_grow(workdir, mounted, cluster_size, new_size):
    (workdir / "images").mkdir()
    img = workdir / "images" / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", img, "16M")
    qemu_io(img, "write -P 0x5a 0 1M", "write -P 0xa5 15M 1M")
    model = workdir / "model.raw"
    to_raw(img, model)

    m = mounted(workdir / "images")
    fuse = m / "vm.raw"
    os.truncate(fuse, new_size)
    assert os.stat(fuse).st_size == new_size
    os.truncate(model, new_size)
    # Data beyond the old end, including the very last bytes of the new size.
    fd, mfd = os.open(fuse, os.O_RDWR), os.open(model, os.O_RDWR)
    try:
        for off, data in [(16 * MiB - 100, b"\x77" * 300), (new_size - 3 * MiB, os.urandom(MiB)),
                          (new_size - 777, b"\x42" * 777)]:
            os.pwrite(fd, data, off)
            os.pwrite(mfd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.close(mfd)
    # Spot checks here (the whole disk is compared after unmounting): old data,
    # new data, and never-written space beyond the old end.
    with open(fuse, "rb", buffering=0) as f, open(model, "rb") as ref:
        for off in (0, 15 * MiB, 16 * MiB - 4096, 16 * MiB + 4096, new_size // 2, new_size - 3 * MiB,
                    new_size - 8192):
            assert os.pread(f.fileno(), 8192, off) == os.pread(ref.fileno(), 8192, off), off
    m.umount()

    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["virtual-size"] == new_size
    check_clean(img)
    compare(img, model)


def test_truncate_shrink_refused(workdir, mounted):
    (workdir / "images").mkdir()
    img = workdir / "images" / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_io(img, "write -P 0x5a 0 1M", "write -P 0xa5 15M 1M")
    m = mounted(workdir / "images")
    with pytest.raises(OSError):
        os.truncate(m / "vm.raw", 8 * MiB)
    assert os.stat(m / "vm.raw").st_size == 16 * MiB
    m.umount()
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["virtual-size"] == 16 * MiB
    check_clean(img)


# ---------------------------------------------------------------- naming, stat

def test_name_clash_refused(workdir):
    d = workdir / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "a.qcow2", "16M")
    qemu_img("create", "-q", "-f", "raw", d / "a.raw", "16M")
    mnt = workdir / "mnt"
    mnt.mkdir()
    r = cachefs("mount", d, mnt, "--log", workdir / "log", check=False)
    try:
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "a.qcow2" in lines[0] and "a.raw" in lines[0], lines[0]
        assert "Traceback" not in r.stderr
        assert not is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)])


def test_stat_size_and_blocks(workdir, mounted):
    d = workdir / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "vm.qcow2", "1G")
    m = mounted(d)
    fuse = m / "vm.raw"
    st = os.stat(fuse)
    assert st.st_size == 1 << 30
    assert st.st_blocks * 512 < 4 * MiB, "an empty image occupies little"
    ls = subprocess.run(["ls", "-ls", "--block-size=1", str(m.path)], capture_output=True, text=True)
    line = [ln for ln in ls.stdout.splitlines() if ln.endswith("vm.raw")][0]
    assert str(1 << 30) in line.split()
    with open(fuse, "r+b", buffering=0) as f:
        for i in range(8):
            f.seek(i * 100 * MiB)
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    st2 = os.stat(fuse)
    assert st2.st_size == 1 << 30
    assert st2.st_blocks * 512 >= st.st_blocks * 512 + 8 * MiB, (st.st_blocks, st2.st_blocks)
    allocated = int(os.getxattr(fuse, "user.cachefs.allocated"))
    assert allocated >= 8 * MiB
    m.umount()
    check_clean(d / "vm.qcow2")


# ---------------------------------------------------------------- growth, crashes

def test_small_clusters_grow_the_refcount_table(workdir, mounted):
    """24 MiB of data in 512-byte clusters outgrows the one-cluster refcount table qemu-img made."""
    d = workdir / "images"
    d.mkdir()
    img = d / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "24M")
    with open(img, "rb") as f:
        rt_clusters_before = int.from_bytes(f.read(60)[56:60], "big")
    model = make_random_raw(workdir / "model.raw", 24 * MiB, 11)
    m = mounted(d)
    with open(model, "rb") as src, open(m / "vm.raw", "r+b", buffering=0) as dst:
        while block := src.read(1 * MiB):
            dst.write(block)
        os.fsync(dst.fileno())
    assert read_hash(m / "vm.raw")[0] == sha256(model)
    m.umount()
    with open(img, "rb") as f:
        rt_clusters_after = int.from_bytes(f.read(60)[56:60], "big")
    assert rt_clusters_after > rt_clusters_before, "the test must make the refcount table grow"
    check_clean(img)
    compare(img, model)


def test_dirty_lazy_refcounts_image_from_killed_qemu(workdir, mounted):
    """qemu-io killed after allocating writes under lazy_refcounts leaves the dirty bit and
    stale refcounts; a read-write mount repairs them before writing (QEMU does the same)."""
    d = workdir / "images"
    d.mkdir()
    img = d / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "32M")
    # stdbuf: qemu-io's stdout is a pipe, so without it every line waits in a buffer.
    proc = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(30, proc.kill)
    watchdog.start()
    try:
        # One command at a time (qemu-io drops what arrives while a command runs):
        # each finished command prints the next "qemu-io> " prompt. The flush
        # writes the L2 tables but, with lazy refcounts, not the refcounts.
        out = ""
        cmds = ["write -P 0x33 0 1M", "write -P 0x44 5M 300k", "flush", "read -P 0x44 5M 4k"]
        for n, cmd in enumerate(cmds, start=1):
            proc.stdin.write(cmd + "\n")
            proc.stdin.flush()
            while out.count("qemu-io> ") < n + 1:
                chunk = os.read(proc.stdout.fileno(), 4096).decode()
                assert chunk, f"qemu-io exited early:\n{out}"
                out += chunk
        assert "read 4096/4096" in out and "fail" not in out.lower(), out
    finally:
        watchdog.cancel()
        proc.kill()  # our own qemu-io: a crash with the image still open
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    with open(img, "rb") as f:
        assert int.from_bytes(f.read(80)[72:80], "big") & 1, "qemu-io should have left the dirty bit set"
    assert qemu_img("check", img, check=False).returncode != 0, "the crash should have left stale refcounts"
    model = workdir / "model.raw"
    qemu_img("convert", "-O", "raw", img, model)

    m = mounted(d)
    assert read_hash(m / "vm.raw")[0] == sha256(model)
    random_writes(m / "vm.raw", model, 64 * KiB, 12, count=60)
    m.umount()
    check_clean(img)
    compare(img, model)
    with open(img, "rb") as f:
        assert not int.from_bytes(f.read(80)[72:80], "big") & 1, "a clean unmount clears the dirty bit"


# ---------------------------------------------------------------- daemon crash


def test_daemon_killed_after_fsync_keeps_flushed_data(workdir, mounted):
    """Crash invariant 4 (docs/design.md) (for a process crash): what a completed fsync covered survives
    SIGKILL, and qemu-img check then finds at most leaks (exit 0 or 3), never corruption."""
    d = workdir / "images"
    d.mkdir()
    img = d / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "64M")
    model = workdir / "model.raw"
    to_raw(img, model)
    half = 32 * MiB
    m = mounted(d)
    # Flushed writes in the lower half (random_writes ends with an fsync)...
    with open(model, "r+b") as f:
        f.truncate(half)
    random_writes(m / "vm.raw", model, 4 * KiB, 21, count=150)
    # ...then unflushed allocating writes in the upper half, which may or may not survive.
    fd = os.open(m / "vm.raw", os.O_RDWR)
    rng = random.Random(22)
    for _ in range(50):
        os.pwrite(fd, rng.randbytes(rng.randint(1, 64 * KiB)), half + rng.randrange(0, half - 64 * KiB))
    kill_daemon(m)  # before close(): closing a handle that wrote would flush it
    with contextlib.suppress(OSError):
        os.close(fd)

    r = qemu_img("check", img, check=False)
    assert r.returncode in (0, 3), f"qemu-img check after a crash: exit {r.returncode}\n{r.stdout}{r.stderr}"
    after = workdir / "after.raw"
    qemu_img("convert", "-O", "raw", img, after)
    with open(after, "rb") as f:
        assert hashlib.sha256(f.read(half)).hexdigest() == sha256(model), "flushed data was lost"


def test_daemon_killed_during_fio_leaves_no_corruption(workdir, mounted):
    d = workdir / "images"
    d.mkdir()
    img = d / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "64M")
    m = mounted(d)
    fio = subprocess.Popen(["fio", "--name=k", f"--filename={m / 'vm.raw'}", "--rw=randwrite", "--bs=4k",
                            "--size=64M", "--fsync=8", "--ioengine=psync", "--time_based", "--runtime=20",
                            "--verify_state_save=0"], cwd=workdir, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while int(os.getxattr(m / "vm.raw", "user.cachefs.stats.guest_writes")) < 2000:
            assert fio.poll() is None and time.monotonic() < deadline, "fio did not get going"
            time.sleep(0.05)
        kill_daemon(m)
    finally:
        try:
            fio.wait(timeout=30)  # its next request fails on the dead mount
        except subprocess.TimeoutExpired:
            fio.kill()
            fio.wait()
    r = qemu_img("check", img, check=False)
    assert r.returncode in (0, 3), f"qemu-img check after a crash: exit {r.returncode}\n{r.stdout}{r.stderr}"
