"""Fault injection on the data plane's fast path (issue 11): EIO and ENOSPC from the backing file.

- **EIO from below.** There is no device-mapper in CI, so the image directory
  is a FUSE passthrough of our own (tests/faultyfs.py) that fails READs or
  WRITEs in a byte range of the image file once armed. cachefs mounts that
  lower filesystem, so its backend descriptors, and the C data plane's
  io_uring requests on them, hit it. A fast read and a fast write that meet
  the failing host range get EIO, counted in ``fast_errors`` (C's counter:
  Python's path never sees them), the neighbouring bytes still read right,
  the failed write changed nothing, and once disarmed everything works
  again; after unmounting, ``qemu-img check`` is clean. On the way it shows
  that what cachefs needs from its image directory works on a FUSE lower
  layer: O_DIRECT opens (the kernel's FUSE direct I/O path) and QEMU's OFD
  image locks (kept by the kernel on the FUSE inode).
- **ENOSPC from a hole in a reserved cluster.** A qcow2 image on a small
  tmpfs: a flush reserves clusters (the file grows over them, as a hole), a
  4 KiB write into a fresh guest cluster takes one of them and writes only
  those 4 KiB (engine.py ``_cow``, "Never written"), and the rest of the
  cluster stays a hole. With the filesystem full, a fast write into that
  hole is the first thing that needs a block: ENOSPC reaches the client,
  while writes into the cluster's written part still succeed. So does
  Python's half, a 4 KiB write that takes a fresh reserved cluster.
- **A failed fdatasync after fast writes.** The flush fdatasyncs for writes
  C served; when that fails from below, the client's fsync gets EIO, and
  every later one (the sticky error) until a remount.
- **ENOBUFS from the socket to libfuse.** A forwarded 1 MiB WRITE is one
  unix datagram, a ~1 MiB contiguous kernel allocation that fragmented memory
  refuses (ENOBUFS); C sends it again after a pause instead of answering EIO
  (tests/sendfail.py makes the daemon's sendmsg fail).
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import threading
import time
from pathlib import Path

import pytest

import sendfail
from conftest import cachefs, is_mounted, qemu_img, qemu_io, run
from lowerfs import faulty  # noqa: F401 (a fixture: the image directory on faultyfs)
from mounting import C_SERVES, needs_dataplane

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 4096
CLUSTER = 64 * KiB
NAME = "disk.raw"  # how cachefs serves disk.qcow2, and disk.raw itself


def fast(m, name: str = NAME) -> dict[str, int]:
    """C's counters of one image, read from its xattrs (cheap: no CLI run)."""
    return {k: int(os.getxattr(m / name, f"user.cachefs.stats.{k}"))
            for k in ("fast_reads", "fast_writes", "fast_errors")}


def aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


def pread(fd: int, size: int, offset: int) -> bytes:
    buf = mmap.mmap(-1, size)
    return buf[:os.preadv(fd, [buf], offset)]


def expect_errno(code: int, fn, *args) -> None:
    with pytest.raises(OSError) as exc:
        fn(*args)
    assert exc.value.errno == code, exc.value


def host_offset(image: Path, fmt: str, guest: int) -> int:
    """Where guest byte `guest` lives in the image file (qemu-img map: an allocated cluster)."""
    if fmt == "raw":
        return guest
    for e in json.loads(qemu_img("map", "--output=json", "-f", fmt, image).stdout):
        if e["start"] <= guest < e["start"] + e["length"]:
            assert e["data"] and "offset" in e, e
            return e["offset"] + guest - e["start"]
    raise AssertionError(f"guest offset {guest} not in the map")


GUEST = 2 * MiB  # a 64 KiB read here fails; the 4 KiB before its bad block do not
FAR = 6 * MiB    # another cluster, far from the failing range


@needs_dataplane
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("mode", ["none", "writeback"])
def test_eio_from_the_backing_file(faulty, mounted, workdir, fmt, mode):
    """cache=none: the backend is O_DIRECT on the lower file (the kernel's FUSE direct I/O);
    writeback: buffered (the lower answers FOPEN_DIRECT_IO, so no lower page hides the failure)."""
    image = workdir / "src" / f"disk.{fmt}"
    make_written_image(image, fmt)
    host = host_offset(image, fmt, GUEST)
    bad = [[host + 2 * BLOCK, host + 3 * BLOCK]]  # the third 4 KiB block of GUEST's cluster, on the host
    low = faulty()
    m = mounted(low.path, "--cache", mode, *C_SERVES)  # C's error path and counters are the point
    assert os.getxattr(m.path, "user.cachefs.dataplane") == b"on"
    a_fuse_lower_layer_serves(low, image, fmt, mode)

    fd = os.open(m / NAME, os.O_RDWR | os.O_DIRECT)
    try:
        assert pread(fd, CLUSTER, GUEST) == b"\x11" * CLUSTER  # qcow2: its L2 table is cached and published
        warm = fast(m)
        assert pread(fd, CLUSTER, GUEST) == b"\x11" * CLUSTER
        before = fast(m)
        assert before["fast_reads"] == warm["fast_reads"] + 1, "not served in C"
        armed, after, lower = only_the_failing_block_fails(fd, m, low, bad, image.name, before)

        low.disarm()
        # The failed write changed nothing; the one beside it is there.
        assert pread(fd, CLUSTER, GUEST) == b"\x11" * BLOCK + b"\x44" * BLOCK + b"\x11" * (CLUSTER - 2 * BLOCK)
        os.pwrite(fd, aligned(b"\x55" * BLOCK), GUEST + 3 * BLOCK)
        assert fast(m) == {"fast_reads": after["fast_reads"] + 1, "fast_writes": after["fast_writes"] + 1,
                           "fast_errors": armed["fast_errors"]}
        assert low.state()["failed_reads"] == lower["failed_reads"]
    finally:
        os.close(fd)
    m.umount()
    if fmt == "qcow2":
        assert "No errors were found on the image." in qemu_img("check", image).stdout
    qemu_io(image, f"read -P 0x11 {GUEST} 4k", f"read -P 0x44 {GUEST + BLOCK} 4k",
            f"read -P 0x11 {GUEST + 2 * BLOCK} 4k", f"read -P 0x55 {GUEST + 3 * BLOCK} 4k",
            f"read -P 0x11 {GUEST + 4 * BLOCK} {CLUSTER - 4 * BLOCK}", f"read -P 0x22 {FAR} 64k", fmt=fmt)


def make_written_image(image: Path, fmt: str) -> None:
    """A 64 MiB image whose first 8 MiB are allocated (0x11, then 0x22): C may write them."""
    if fmt == "qcow2":
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", image, "64M")
    else:
        with open(image, "wb") as f:
            f.truncate(64 * MiB)
    qemu_io(image, "write -P 0x11 0 4M", "write -P 0x22 4M 4M", fmt=fmt)


def a_fuse_lower_layer_serves(low, image: Path, fmt: str, mode: str) -> None:
    """What cachefs needs of its image directory works on FUSE: QEMU's OFD lock bytes (kept by the
    kernel on the FUSE inode) keep qemu-img out of a served image, and cache=none opens O_DIRECT."""
    r = qemu_io(low.path / image.name, "read 0 4k", fmt=fmt, check=False)  # a writer: wants "write"
    assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr, r
    assert (low.state()["direct_opens"] > 0) == (mode == "none"), low.state()


def only_the_failing_block_fails(fd: int, m, low, bad: list, name: str, before: dict) -> tuple[dict, dict, dict]:
    """Armed: fast requests that meet the bad block get EIO (C's fast_errors), their neighbours and
    the rest of the disk work. Returns C's counters armed and after, and the lower layer's state."""
    low.arm(read=bad, write=bad, file=name)
    expect_errno(errno.EIO, pread, fd, CLUSTER, GUEST)
    expect_errno(errno.EIO, pread, fd, BLOCK, GUEST + 2 * BLOCK)
    expect_errno(errno.EIO, os.pwrite, fd, aligned(b"\x33" * BLOCK), GUEST + 2 * BLOCK)
    armed = fast(m)
    assert armed == {**before, "fast_errors": before["fast_errors"] + 3}, (before, armed)
    # Only the requests that met the failing block: its neighbours and the rest of the disk work.
    assert pread(fd, 2 * BLOCK, GUEST) == b"\x11" * 2 * BLOCK
    assert pread(fd, CLUSTER - 3 * BLOCK, GUEST + 3 * BLOCK) == b"\x11" * (CLUSTER - 3 * BLOCK)
    assert pread(fd, CLUSTER, FAR) == b"\x22" * CLUSTER
    os.pwrite(fd, aligned(b"\x44" * BLOCK), GUEST + BLOCK)
    after = fast(m)
    assert after == {"fast_reads": before["fast_reads"] + 3, "fast_writes": before["fast_writes"] + 1,
                     "fast_errors": armed["fast_errors"]}, (armed, after)
    lower = low.state()
    assert lower["failed_reads"] >= 2 and lower["failed_writes"] >= 1, lower
    return armed, after, lower


@needs_dataplane
def test_a_failed_fdatasync_after_fast_writes_reaches_the_client_and_sticks(faulty, mounted, workdir):
    """Fast writes never pass ModeBackend.pwrite; the flush still fdatasyncs for them (C's unsynced
    count), and when that fdatasync fails from below the client's fsync gets EIO, and every later one
    too (the sticky error: the failed pages may be gone) until a remount."""
    image = workdir / "src" / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", image, "64M")
    qemu_io(image, "write -P 0x11 0 1M")
    low = faulty()
    m = mounted(low.path, "--cache", "writeback")
    fd = os.open(m / NAME, os.O_RDWR | os.O_DIRECT)
    try:
        assert pread(fd, BLOCK, 0) == b"\x11" * BLOCK  # its L2 table is cached and published
        before = fast(m)
        os.pwrite(fd, aligned(b"\x22" * BLOCK), 0)
        assert fast(m)["fast_writes"] == before["fast_writes"] + 1, "not served in C"
        low.arm(fsync=True, file=image.name)
        expect_errno(errno.EIO, os.fsync, fd)
        low.disarm()
        expect_errno(errno.EIO, os.fsync, fd)
        os.pwrite(fd, aligned(b"\x33" * BLOCK), BLOCK)  # still serving
        expect_errno(errno.EIO, os.fsync, fd)
        assert fast(m) == {**before, "fast_writes": before["fast_writes"] + 2}
        assert low.state()["failed_fsyncs"] == 1, low.state()
    finally:
        os.close(fd)
    r = cachefs("umount", m.path, check=False)  # its last flush fails the same way, and it says so
    assert r.returncode == 1 and "failed" in r.stderr, r
    assert not is_mounted(m.path)
    m._wait_daemon_gone()
    m.check_log()
    assert "No errors were found on the image." in qemu_img("check", image).stdout
    m = mounted(low.path, "--cache", "writeback")  # a remount starts clean
    fd = os.open(m / NAME, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, aligned(b"\x44" * BLOCK), 2 * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.umount()
    assert "No errors were found on the image." in qemu_img("check", image).stdout
    qemu_io(image, "read -P 0x22 0 4k", "read -P 0x33 4k 4k", "read -P 0x44 8k 4k", "read -P 0x11 12k 1012k")


def fill(path: Path) -> None:
    """Write `path` until its filesystem has no block left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (b"\xff" * MiB, b"\xff" * BLOCK):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, chunk)
    finally:
        os.close(fd)
    assert os.statvfs(path).f_bavail == 0


def image_stat(m, key: str) -> int:
    return int(os.getxattr(m / NAME, f"user.cachefs.stats.{key}"))


def block(value: int) -> mmap.mmap:
    """An aligned 4 KiB block of ``value`` bytes."""
    return aligned(bytes([value]) * BLOCK)


@needs_dataplane
def test_enospc_from_a_hole_in_a_reserved_cluster(mounted, workdir):
    fs = workdir / "small"
    fs.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", fs)
    try:
        (fs / "images").mkdir()
        image = fs / "images" / "disk.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", image, "64M")
        m = mounted(fs / "images", "--cache", "none")
        fd = os.open(m / NAME, os.O_RDWR | os.O_DIRECT)
        filler = fs / "filler"
        try:
            before = holes_in_reserved_clusters(fd, m)
            fill(filler)
            full = enospc_for_writes_into_holes(fd, m, before)
            # Still serving: reads, and writes into blocks the file has.
            assert pread(fd, BLOCK, 3 * CLUSTER) == bytes([3]) * BLOCK
            assert pread(fd, BLOCK, 3 * CLUSTER + 8 * BLOCK) == bytes(BLOCK)
            os.pwrite(fd, block(0x31), 3 * CLUSTER)
            os.pwrite(fd, block(0x21), 2 * CLUSTER + 4 * BLOCK)
            assert fast(m) == {"fast_reads": full["fast_reads"] + 2, "fast_writes": full["fast_writes"] + 2,
                               "fast_errors": full["fast_errors"]}

            filler.unlink()
            os.pwrite(fd, block(0x30), 3 * CLUSTER + 8 * BLOCK)  # room again
            assert fast(m)["fast_writes"] == full["fast_writes"] + 3
            os.pwrite(fd, block(0x60), 6 * CLUSTER)
        finally:
            os.close(fd)
            filler.unlink(missing_ok=True)
        m.umount()
        assert "No errors were found on the image." in qemu_img("check", image).stdout
        qemu_io(image, "read -P 1 0 4k", f"read -P 0 {BLOCK} {CLUSTER - BLOCK}",
                f"read -P 2 {2 * CLUSTER} 4k", f"read -P 0x21 {2 * CLUSTER + 4 * BLOCK} 4k",
                f"read -P 0x31 {3 * CLUSTER} 4k", f"read -P 0x30 {3 * CLUSTER + 8 * BLOCK} 4k",
                f"read -P 0 {3 * CLUSTER + 9 * BLOCK} {CLUSTER - 9 * BLOCK}",
                f"read -P 5 {5 * CLUSTER} 4k", f"read -P 0x60 {6 * CLUSTER} 4k",
                f"read -P 0 {6 * CLUSTER + BLOCK} {CLUSTER - BLOCK}", f"read -P 0 {7 * CLUSTER} 1M")
    finally:
        run("umount", "-l", fs, check=False)


def holes_in_reserved_clusters(fd: int, m) -> dict[str, int]:
    """Guest clusters 2..5 take reserved clusters and write 4 KiB of each: the rest stays a hole;
    then C writes into one while there is room. Returns C's counters before that write."""
    os.pwrite(fd, block(1), 0)
    os.fsync(fd)  # the flush reserves clusters for the next interval: the file covers them, as a hole
    taken = image_stat(m, "from_reservation")
    for k in range(2, 6):  # a fresh guest cluster each, from the reservation: 4 KiB written of 64
        os.pwrite(fd, block(k), k * CLUSTER)
    assert image_stat(m, "from_reservation") == taken + 4
    before = fast(m)
    os.pwrite(fd, block(0x20), 2 * CLUSTER + 4 * BLOCK)  # into the hole while there is room: C
    assert fast(m)["fast_writes"] == before["fast_writes"] + 1, "not served in C"
    return before


def enospc_for_writes_into_holes(fd: int, m, before: dict[str, int]) -> dict[str, int]:
    """With the filesystem full, C's writes that need a block get ENOSPC. Returns C's counters after."""
    expect_errno(errno.ENOSPC, os.pwrite, fd, block(0x30), 3 * CLUSTER + 8 * BLOCK)
    full = fast(m)
    assert full["fast_errors"] == before["fast_errors"] + 1 and full["fast_writes"] == before["fast_writes"] + 1
    # An allocating write (issue 14: C takes a lent cluster), its 4 KiB the first block needed.
    expect_errno(errno.ENOSPC, os.pwrite, fd, block(0x60), 6 * CLUSTER)
    assert fast(m) == {**full, "fast_errors": full["fast_errors"] + 1}
    assert pread(fd, BLOCK, 6 * CLUSTER) == bytes(BLOCK)  # allocated in C, but a hole: zeros
    return fast(m)


@needs_dataplane
def test_a_freed_cluster_waits_for_the_fast_read_still_using_it(faulty, mounted, workdir):
    """The free fence (cachefs/dataplane/mapping.py), made deterministic: a fast read of guest cluster X is held
    in the lower filesystem for a second while X becomes a zero cluster, a flush applies the free of
    its host cluster H, and a new cluster Y takes H (the lowest free one: no reservation yet) with
    other bytes. Without the fence, the held read reads H after Y's bytes landed there and hands
    them to the client as X's; with it, the flush waits for the read, which sees X's old bytes."""
    image = workdir / "src" / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", image, "64M")
    qemu_io(image, "write -P 0x11 0 4M")
    x, y = GUEST, 8 * MiB  # Y: unallocated until the end
    h = host_offset(image, "qcow2", x)
    low = faulty()
    m = mounted(low.path, "--cache", "none")
    fd = os.open(m / NAME, os.O_RDWR | os.O_DIRECT)
    try:
        assert pread(fd, BLOCK, x) == b"\x11" * BLOCK  # X's table is cached: C serves X now
        low.arm(slow_read=[[h, h + BLOCK, 1.0]], file=image.name)
        held: list[bytes] = []
        reader = threading.Thread(target=lambda: held.append(pread(fd, BLOCK, x)))
        before = fast(m)
        reader.start()
        deadline = time.monotonic() + 10
        while low.state()["slow_reads"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert low.state()["slow_reads"] == 1, "the read did not reach the lower filesystem"
        os.pwrite(fd, aligned(bytes(CLUSTER)), x)  # forwarded: X becomes a zero cluster, H is to be freed
        os.fsync(fd)                               # the writeout that applies the free
        os.pwrite(fd, aligned(b"\x99" * CLUSTER), y)  # allocates: H, the one free cluster
        reader.join(timeout=30)
        assert fast(m)["fast_reads"] == before["fast_reads"] + 1  # the held read was C's
        assert held == [b"\x11" * BLOCK], held[0][:16] if held else "no result"
        assert pread(fd, BLOCK, x) == bytes(BLOCK) and pread(fd, BLOCK, y) == b"\x99" * BLOCK
        assert int(os.getxattr(m / NAME, "user.cachefs.stats.fast_fences")) >= 1
    finally:
        low.disarm()
        os.close(fd)
    m.umount()
    assert "No errors were found on the image." in qemu_img("check", image).stdout
    assert host_offset(image, "qcow2", y) == h  # Y did take X's old host cluster


@needs_dataplane
def test_write_through_waits_for_the_mapping_before_writing_in_c(faulty, mounted, workdir):
    """directsync (writethrough alike): a write acknowledged by C is durable (O_DSYNC), but only
    if the mapping it went through is durable too. A cluster just allocated by writer A is mapped in memory at
    once, and durable only when A's shared fdatasync (held 1 s in the lower filesystem) ends.
    Writer B, writing in that cluster meanwhile, must not be acknowledged before it: C holds the
    new mapping read-only (mapping, "Durable before writable"), so B goes to Python, which waits
    for the sync. Once it ended, C writes the cluster again. (O_DIRECT handles: the kernel sends
    their writes in parallel, FOPEN_PARALLEL_DIRECT_WRITES; a cached handle's writes to one inode
    are serialized by the kernel, so B could not overtake A's acknowledgement there.)"""
    image = workdir / "src" / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", image, "64M")
    qemu_io(image, "write -P 0x11 0 1M")
    x = 4 * MiB  # unallocated: A allocates it
    low = faulty()
    m = mounted(low.path, "--cache", "directsync")
    fd = os.open(m / NAME, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, aligned(b"\x22" * BLOCK), 0)  # warm: the tables are cached, the first reservation made
        os.fsync(fd)
        low.arm(slow_fsync=[1.0, 1], file=image.name)
        done: dict[str, float] = {}
        start = time.monotonic()

        def write(name: str, data: bytes, off: int) -> None:
            os.pwrite(fd, aligned(data), off)
            done[name] = time.monotonic() - start

        a = threading.Thread(target=write, args=("a", b"\xaa" * BLOCK, x))
        a.start()
        deadline = time.monotonic() + 10
        while low.state()["slow_fsyncs"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert low.state()["slow_fsyncs"] == 1, "A's sync did not reach the lower filesystem"
        before = fast(m)
        write("b", b"\xbb" * BLOCK, x + BLOCK)  # A's mapping exists in memory, not yet on disk
        a.join(timeout=30)
        assert done["b"] >= 0.9 * done["a"] - 0.05 and done["b"] > 0.5, done  # B waited for A's sync
        assert fast(m)["fast_writes"] == before["fast_writes"], "B was acknowledged by C"
        write("c", b"\xcc" * BLOCK, x + 2 * BLOCK)  # durable now: C writes it
        assert fast(m)["fast_writes"] == before["fast_writes"] + 1
        assert int(os.getxattr(m / NAME, "user.cachefs.stats.fast_settled")) >= 1
    finally:
        low.disarm()
        os.close(fd)
    m.umount()
    assert "No errors were found on the image." in qemu_img("check", image).stdout
    qemu_io(image, f"read -P 0xaa {x} 4k", f"read -P 0xbb {x + BLOCK} 4k", f"read -P 0xcc {x + 2 * BLOCK} 4k")


@needs_dataplane
def test_a_forwarded_write_survives_enobufs_from_the_socket(mounted, workdir, monkeypatch):
    """CI flake of test_fio_verify_under_each_submitter[plane-on-native-none]: a 1 MiB O_DIRECT write
    C forwarded (it had no lent clusters left) failed with EIO, nothing in the daemon's log. C sends a
    forwarded request to libfuse as one SOCK_SEQPACKET message, which the kernel allocates as one
    skb whose linear part is the whole message but 17 pages: a ~1 MiB contiguous allocation that a
    fragmented machine refuses with ENOBUFS. C answered that EIO, as for a dead socket; it must keep
    the request queued and send it again (dp_forward.c, dp_send_stalled). The shim fails the daemon's
    first three large sendmsg calls; a write whose first cluster is all zeros is always forwarded
    (DATAPLANE.md "Zero writes"), so it is the one that meets them."""
    so = sendfail.build(workdir)
    (workdir / "images").mkdir()
    image = workdir / "images" / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", image, "64M")
    with monkeypatch.context() as env:  # the daemon only: qemu-img and the test's own calls never see it
        for k, v in sendfail.env(so, fails=3).items():
            env.setenv(k, v)
        m = mounted(workdir / "images", "--aio", "native", "--cache", "none", "--dataplane", "on")
    data = bytes(CLUSTER) + b"forwarded write!" * ((MiB - CLUSTER) // 16)
    fd = os.open(m / NAME, os.O_RDWR | os.O_DIRECT)
    try:
        before = int(os.getxattr(m / NAME, "user.cachefs.stats.forwarded"))
        os.pwrite(fd, aligned(data), 8 * MiB)  # EIO without the retry
        conn = json.loads(os.getxattr(m.path, "user.cachefs.dataplane_counters"))
        assert conn["send_retries"] == 3 and conn["forward_errors"] == 0, conn
        assert int(os.getxattr(m / NAME, "user.cachefs.stats.forwarded")) > before
        os.pwrite(fd, aligned(data[::-1]), 16 * MiB)  # the shim is spent: sent at once
        assert pread(fd, MiB, 8 * MiB) == data and pread(fd, MiB, 16 * MiB) == data[::-1]
        os.fsync(fd)
    finally:
        os.close(fd)
    m.umount()
    assert "No errors were found on the image." in qemu_img("check", image).stdout
    flat = workdir / "flat.raw"
    qemu_img("convert", "-O", "raw", image, flat)
    with open(flat, "rb") as f:
        assert os.pread(f.fileno(), MiB, 8 * MiB) == data and os.pread(f.fileno(), MiB, 16 * MiB) == data[::-1]
