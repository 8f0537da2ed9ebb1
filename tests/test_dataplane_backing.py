"""Reads of backing-chain clusters served in C (issue 22, "Data plane").

An overlay's unallocated clusters are published "from backing" (DP_MAP_BACKING),
and C reads them through the image below's own published entries (dp_plan.c
dp_plan_backing): a raw base one to one, a qcow2 base through its mapping,
down the chain.

- the plan, without a mount: layers of different cluster sizes, zeros past a
  shorter base, a base's zero and absent clusters, a whole chain, the piece
  limit, a paused base, the descriptor each piece is read through;
- through real mounts (qemu-img built chains with data in the base): reads of
  base data are fast (``fast_backing_reads``) and equal ``qemu-img convert``;
  fio ``--verify`` writes (4k and whole clusters) on the overlay while another
  reader reads base data; the bases are unchanged and ``qemu-img check`` is
  clean; a served base written while no overlay is open is read anew by C.
"""

from __future__ import annotations

import mmap
import os
import threading

import pytest

from cachefs import native
from cachefs.dataplane import plane as dataplane
from conftest import make_random_raw, qemu_img, qemu_io, sha256
from fiojobs import FIO_DIRECT, fio
from interop import check_clean, to_raw
from mounting import image_stats, needs_dataplane, plane  # noqa: F401 (plane: a fixture)

KiB, MiB = 1 << 10, 1 << 20
FORWARD = None


def plan(p, fh, off, size, *, write=False, data=None):
    """(pieces as (fd, host, buffer offset, length), the buffer), or FORWARD; as the loop decides
    (dp_test_plan: the request is dispatched, its I/O never runs)."""
    ffi, lib = native.ffi, native.lib
    buf = ffi.new("char[]", size)
    ffi.memmove(buf, data if data is not None else b"\xee" * size, size)
    out = ffi.new("struct dp_test_plan *")
    lib.dp_test_plan(p._dp, fh, int(write), off, size, buf, out)
    if not out.fast:
        return FORWARD
    pieces = [(out.piece_fd[i], out.piece_host[i], out.piece_buf[i], out.piece_len[i]) for i in range(out.npieces)]
    return pieces, bytes(ffi.buffer(buf, size))


def states():
    lib = native.lib
    return lib.DP_MAP_WRITABLE, lib.DP_MAP_READONLY, lib.DP_MAP_ZERO, lib.DP_MAP_BACKING


@needs_dataplane
def test_an_overlay_reads_its_raw_base_one_to_one(plane):
    W, R, Z, B = states()
    cs = 64 * KiB
    plane.publish_image(20, size=4 * MiB, cluster_size=cs, identity=False)  # the overlay
    plane.publish_image(21, size=2 * MiB + 4096, identity=True)             # a shorter raw base
    plane.publish_handle(1, 20, 90, direct=False, fast_write=True, sync=False)
    plane.map_clusters(20, 0, [B, 5 * MiB | W, B, Z])
    assert plan(plane, 1, 0, 4096) is FORWARD  # no backing image linked: Python reads the chain
    plane.set_backing(20, 21)
    assert plan(plane, 1, 0, 4096) is FORWARD  # nor a descriptor to read it through
    plane.set_reader(21, 91, direct=False)
    # Its own data through the handle's descriptor (-1), the base's through the base's, same offsets.
    assert plan(plane, 1, cs - 4096, 3 * 4096)[0] == [(91, cs - 4096, 0, 4096), (-1, 5 * MiB, 4096, 8192)]
    assert plan(plane, 1, 2 * cs, cs)[0] == [(91, 2 * cs, 0, cs)]
    # Writes there are Python's (a partial one copies on write), whole clusters too.
    assert plan(plane, 1, 0, 4096, write=True, data=b"x" * 4096) is FORWARD
    assert plan(plane, 1, 0, cs, write=True, data=b"x" * cs) is FORWARD
    # Tables without an L2 table of their own: one entry for all their clusters (dp_map_tables).
    plane.map_tables(20, 13, 0, [0, B])  # 8192 clusters of 64 KiB per table: 512 MiB
    assert plan(plane, 1, 4 * cs, 4096) is FORWARD  # absent, and no table entry for table 0
    plane.map_tables(20, 13, 0, [B])
    assert plan(plane, 1, 4 * cs, 4096)[0] == [(91, 4 * cs, 0, 4096)]
    # Past the base's end: zeros, no I/O (a base shorter than its overlay).
    pieces, data = plan(plane, 1, 2 * MiB, cs)
    assert pieces == [(91, 2 * MiB, 0, 4096)] and data[4096:] == bytes(cs - 4096)
    pieces, data = plan(plane, 1, 3 * MiB, cs)
    assert pieces == [] and data == bytes(cs)
    # A base paused (a live mode switch reopening its descriptor): forwarded.
    plane.pause_image(21, True)
    assert plan(plane, 1, 0, 4096) is FORWARD
    plane.pause_image(21, False)
    # An O_DIRECT base descriptor takes aligned pieces only.
    plane.set_reader(21, 91, direct=True)
    assert plan(plane, 1, 512, 512) is FORWARD
    assert plan(plane, 1, 4096, 4096)[0] == [(91, 4096, 0, 4096)]
    # The base goes: its overlays forward what they read from it.
    assert native.lib.dp_image_remove(plane._dp, 21) == 0
    assert plan(plane, 1, 0, 4096) is FORWARD
    c = plane.image_counters(20)
    assert c["fast_backing_reads"] == 0  # counted when answered: dp_test_plan answers nothing


@needs_dataplane
def test_a_qcow2_base_is_read_through_its_own_mapping_down_the_chain(plane):
    W, R, Z, B = states()
    lib = native.lib
    plane.publish_image(30, size=MiB, cluster_size=64 * KiB, identity=False)  # overlay, 64 KiB
    plane.publish_image(31, size=MiB, cluster_size=4 * KiB, identity=False)   # mid, 4 KiB clusters
    plane.publish_image(32, size=MiB, identity=True)                          # root, raw
    for ino, fd in ((31, 81), (32, 82)):
        plane.set_reader(ino, fd, direct=False)
    plane.set_backing(30, 31)
    plane.set_backing(31, 32)
    plane.publish_handle(1, 30, 80, direct=False, fast_write=True, sync=False)
    plane.map_clusters(30, 0, [B, B])
    # The overlay's first cluster is 16 of mid's: data, shared data, zeros, from root, absent.
    mid = [(100 + i) * 4 * KiB | W for i in range(4)] + [7 * MiB | R, Z, B, B] + [(200 + i) * 4 * KiB | W for i in range(8)]
    plane.map_clusters(31, 0, mid)
    pieces, data = plan(plane, 1, 0, 64 * KiB)
    assert pieces == [(81, 100 * 4 * KiB, 0, 16 * KiB), (81, 7 * MiB, 16 * KiB, 4 * KiB),
                      (82, 24 * KiB, 24 * KiB, 8 * KiB), (81, 200 * 4 * KiB, 32 * KiB, 32 * KiB)]
    assert data[20 * KiB:24 * KiB] == bytes(4 * KiB)  # mid's zero cluster
    assert plan(plane, 1, 64 * KiB, 4096) is FORWARD  # mid's cluster 16 is absent (not cached)
    # Too many pieces for one request: forwarded whole.
    plane.map_clusters(31, 16, [(300 + 2 * i) * 4 * KiB | W for i in range(16)])
    assert len(plan(plane, 1, 64 * KiB, 64 * KiB)[0]) == 16
    plane.map_clusters(31, 0, [(400 + 2 * i) * 4 * KiB | W for i in range(16)])
    assert plan(plane, 1, 60 * KiB, 8 * KiB)[0] == [(81, (400 + 30) * 4 * KiB, 0, 4096),
                                                   (81, 300 * 4 * KiB, 4096, 4096)]
    assert plan(plane, 1, 0, 128 * KiB) is FORWARD  # 32 pieces > DP_MAXPIECE
    # A chain deeper than DP_MAXCHAIN is never followed to its end.
    inos = list(range(40, 40 + lib.DP_MAXCHAIN + 2))
    for ino in inos:
        plane.publish_image(ino, size=MiB, cluster_size=64 * KiB, identity=False)
        plane.set_reader(ino, 70, direct=False)
        plane.map_clusters(ino, 0, [B])
    for upper, lower in zip(inos, inos[1:]):
        plane.set_backing(upper, lower)
    plane.map_clusters(inos[-1], 0, [Z])
    plane.publish_handle(2, inos[0], 80, direct=False, fast_write=True, sync=False)
    assert plan(plane, 2, 0, 4096) is FORWARD
    plane.publish_handle(3, inos[2], 80, direct=False, fast_write=True, sync=False)
    assert plan(plane, 3, 0, 4096)[0] == []  # 16 deep: zeros from the last one


# ------------------------------------------------------------------ through a mount

def _qcow2(path, size: int, backing=None, fmt="qcow2", cluster: int = 65536) -> None:
    args = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}"]
    if backing is not None:
        args += ["-b", backing, "-F", fmt]
    qemu_img(*args, path, str(size))


def chain_qcow2_on_raw(d):
    make_random_raw(d / "base.raw", 32 * MiB, 1)
    _qcow2(d / "vm.qcow2", 32 * MiB, "base.raw", "raw")
    qemu_io(d / "vm.qcow2", "write -P 0x5a 1M 192k", "write -z 4M 64k")
    return ["base.raw"]


def chain_qcow2_on_qcow2(d):
    _qcow2(d / "base.qcow2", 32 * MiB, cluster=4096)  # smaller clusters than the overlay's
    qemu_io(d / "base.qcow2", "write -P 0x21 0 20M", "write -z 8M 1M", "write -P 0x22 9M 4k")
    _qcow2(d / "vm.qcow2", 40 * MiB, "base.qcow2")  # longer than its base: zeros past 32 MiB
    qemu_io(d / "vm.qcow2", "write -P 0x5a 1M 192k")
    return ["base.qcow2"]


def chain_depth_3(d):
    make_random_raw(d / "root.raw", 32 * MiB, 3)
    _qcow2(d / "mid.qcow2", 32 * MiB, "root.raw", "raw", cluster=16384)
    qemu_io(d / "mid.qcow2", "write -P 0x33 2M 3M", "write -z 6M 1M")
    _qcow2(d / "vm.qcow2", 32 * MiB, "mid.qcow2")
    qemu_io(d / "vm.qcow2", "write -P 0x5a 1M 192k")
    return ["root.raw", "mid.qcow2"]


CHAINS = {"qcow2-on-raw": chain_qcow2_on_raw, "qcow2-on-qcow2": chain_qcow2_on_qcow2, "depth-3": chain_depth_3}


def direct_read(path, *, start: int = 0, end: int | None = None, chunk: int = MiB) -> bytes:
    """The file's bytes [start, end), read with O_DIRECT in ``chunk``-sized requests."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)
    out = bytearray()
    try:
        end = os.fstat(fd).st_size if end is None else end
        for off in range(start, end, chunk):
            n = os.preadv(fd, [buf], off)
            out += buf[:min(n, end - off)]
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


@needs_dataplane
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_base_data_is_read_in_c(workdir, mounted, chain):
    d = workdir / "images"
    d.mkdir()
    bases = CHAINS[chain](d)
    before = {b: sha256(d / b) for b in bases}
    want = (workdir / "want.raw")
    to_raw(d / "vm.qcow2", want)
    want = want.read_bytes()
    m = mounted(d, "--dataplane", "on")
    try:
        assert direct_read(m / "vm.raw") == want  # the first pass loads a qcow2 base's tables
        first = image_stats(m, "vm.raw")
        assert direct_read(m / "vm.raw", chunk=64 * KiB) == want
        assert direct_read(m / "vm.raw", chunk=4 * KiB, end=8 * MiB) == want[:8 * MiB]
        s = image_stats(m, "vm.raw")
        reads = s["fast_reads"] - first["fast_reads"]
        # Every request of the later passes served in C, most of them from the chain. ("forwarded"
        # counts the xattr requests of the stats themselves.)
        assert reads == len(want) // (64 * KiB) + 2048, (first, s)
        assert s["fast_backing_reads"] - first["fast_backing_reads"] >= reads // 2, (first, s)
        assert s["fast_errors"] == 0, s
    finally:
        m.umount()
    check_clean(d / "vm.qcow2")
    assert {b: sha256(d / b) for b in bases} == before, "a base file changed"


@needs_dataplane
@pytest.mark.parametrize("chain", ["qcow2-on-raw", "qcow2-on-qcow2"])
def test_fio_verify_writes_on_the_overlay_while_base_data_is_read(workdir, mounted, chain):
    """Random 4k writes (copy on write from the base, Python's) and whole-cluster writes with
    crc32c verification over the first 16 MiB, while a reader keeps reading base data past it
    through C and comparing it with the chain's bytes."""
    d = workdir / "images"
    d.mkdir()
    bases = CHAINS[chain](d)
    before = {b: sha256(d / b) for b in bases}
    want = workdir / "want.raw"
    to_raw(d / "vm.qcow2", want)
    want = want.read_bytes()
    m = mounted(d, "--dataplane", "on", "--cache", "none")
    stop, bad, rounds = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            got = direct_read(m / "vm.raw", start=16 * MiB, end=32 * MiB, chunk=128 * KiB)
            if got != want[16 * MiB:32 * MiB]:
                bad.append(rounds[0])
            rounds[0] += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        try:
            fio(m / "vm.raw", *FIO_DIRECT, "--rw=randwrite", "--bs=4k", "--size=16M", "--number_ios=3000",
                "--do_verify=1")
            fio(m / "vm.raw", *FIO_DIRECT, "--rw=randwrite", "--bs=64k", "--size=16M", "--number_ios=300",
                "--do_verify=1")
            fio(m / "vm.raw", *FIO_DIRECT, "--rw=randrw", "--bs=4k", "--size=16M", "--number_ios=3000",
                "--do_verify=1")
        finally:
            stop.set()
            t.join()
        assert not bad and rounds[0] >= 1, (bad, rounds)
        assert direct_read(m / "vm.raw", start=16 * MiB) == want[16 * MiB:]
        s = image_stats(m, "vm.raw")
        assert s["fast_backing_reads"] > 0 and s["fast_errors"] == 0, s
    finally:
        m.umount()
    check_clean(d / "vm.qcow2")
    assert {b: sha256(d / b) for b in bases} == before, "a base file changed"
    after = workdir / "after.raw"
    to_raw(d / "vm.qcow2", after)
    assert after.read_bytes()[16 * MiB:] == want[16 * MiB:]


@needs_dataplane
def test_a_served_base_written_with_no_overlay_open_is_read_anew(workdir, mounted):
    """C reads a base through the base's own published entries, which Python keeps true as the
    base changes (its writes, COW, allocation in C): with no overlay open the base takes writes,
    and the overlay opened afterwards reads what the base holds now, in C."""
    d = workdir / "images"
    d.mkdir()
    chain_qcow2_on_qcow2(d)
    m = mounted(d, "--dataplane", "on")
    try:
        want = bytearray(direct_read(m / "vm.raw"))
        direct_read(m / "vm.raw")
        fd = os.open(m / "base.raw", os.O_RDWR)
        try:
            for off, data in ((10 * MiB, b"\x77" * 4096), (20 * MiB, b"\x78" * 65536), (8 * MiB + 512, b"\x79" * 512)):
                os.pwrite(fd, data, off)
                want[off:off + len(data)] = data
            os.fsync(fd)
        finally:
            os.close(fd)
        first = image_stats(m, "vm.raw")
        assert direct_read(m / "vm.raw") == want
        assert direct_read(m / "vm.raw") == want
        s = image_stats(m, "vm.raw")
        assert s["fast_backing_reads"] > first["fast_backing_reads"], (first, s)
    finally:
        m.umount()
    check_clean(d / "vm.qcow2")
    check_clean(d / "base.qcow2")
