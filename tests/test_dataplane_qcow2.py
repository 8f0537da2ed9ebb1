"""The data plane serving qcow2 images (issue 11, stage 2), behind real mounts.

- fio crc32c at QD32 on a prefilled qcow2: reads and in-place writes served in
  C, allocating writes forwarded, and the mapping C holds bounded by the L2
  cache (``--l2-cache-size``);
- **the race**: fio writes at QD32 over a region while another process keeps
  turning clusters of that region into zero clusters (a full cluster of
  zeros: our discard) and COWing them back with partial writes, on a cache
  so small that tables are published and taken back all the time. Freed host
  clusters are recycled into a witness region that nobody else writes: a fast
  write that landed in a cluster after it was freed would show there. At the
  end ``qemu-img check`` is clean and ``qemu-img compare`` matches the
  expected image;
- SIGINT ("stop now") with writers in flight, and a live mode switch under fio, on qcow2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ackedwrites import acked_blocks_are_there, start_writer, wait_acked
from conftest import run
from fiojobs import FIO_DIRECT, fio, switch_modes_under_fio
from mounting import image_stats, needs_dataplane

MiB = 1 << 20
CLUSTER = 8192  # small clusters: an L2 table maps 8 MiB, so a 64 MiB disk has 8 of them

#: Regions of the race test's disk: fio's verified region, the churned one, the witnesses.
VERIFIED = (0, 16 * MiB)
CHURNED = (16 * MiB, 48 * MiB)
WITNESS = (48 * MiB, 64 * MiB)


def qcow2(d: Path, name: str, size: int, *, cluster: int = 65536, fill: tuple[int, int] | None = None) -> Path:
    img = d / name
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", img, str(size))
    if fill:
        run("qemu-io", "-c", f"write -P 0x11 {fill[0]} {fill[1]}", img)
    return img


@pytest.fixture
def images(workdir):
    d = workdir / "images"
    d.mkdir()
    return d


@needs_dataplane
def test_fio_verify_on_qcow2_served_in_c(mounted, images):
    """Prefilled clusters are read and overwritten in C; a fresh region's first writes allocate in
    Python, and once the L2 entry is published the next ones are fast too."""
    img = qcow2(images, "vm.qcow2", 256 * MiB, fill=(0, 128 * MiB))
    m = mounted(images, "--cache", "none", "--l2-cache-size", "256K")
    f = m / "vm.raw"
    fio(f, *FIO_DIRECT, "--rw=randwrite", "--bs=4k", "--size=128M", "--number_ios=8000", "--do_verify=1")
    s = image_stats(m, "vm.raw")
    # The table is published once Python first loads it: only the first requests are forwarded.
    assert s["fast_writes"] >= 7900 and s["fast_reads"] >= 7900 and s["fast_errors"] == 0, s
    assert s["forwarded"] < 300, s
    # Fresh clusters: allocation is Python's; rewriting them afterwards is C's.
    fio(f, *FIO_DIRECT, "--rw=write", "--bs=64k", "--size=16M", "--offset=128M", "--do_verify=1")
    before = image_stats(m, "vm.raw")
    fio(f, *FIO_DIRECT, "--rw=write", "--bs=64k", "--size=16M", "--offset=128M", "--do_verify=1")
    after = image_stats(m, "vm.raw")
    assert after["fast_writes"] - before["fast_writes"] == 256, (before, after)
    assert after["allocations"] == before["allocations"], (before, after)
    # C holds what the cached tables map: a 64 KiB cluster's L2 table maps 512 MiB (two 32 KiB chunks).
    assert after["fast_tables"] == 1 and after["fast_map_bytes"] <= 64 * 1024, after
    m.umount()
    run("qemu-img", "check", img)


CHURNER = r"""
import mmap, os, sys
path, cluster, lo, hi, wlo, whi, stop = sys.argv[1], *map(int, sys.argv[2:7]), sys.argv[7]
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
zeros, part = mmap.mmap(-1, cluster), mmap.mmap(-1, 4096)
part[:] = b"COWpart!" * 512
wit = mmap.mmap(-1, cluster)
n, w = 0, wlo
while not os.path.exists(stop):
    c = lo + (n * 7 % ((hi - lo) // cluster)) * cluster
    os.pwrite(fd, zeros, c)            # a zero cluster: the host cluster is freed
    os.pwrite(fd, part, c + cluster // 2)  # COW: a new host cluster, maybe a recycled one
    if n % 4 == 3 and w < whi:         # a witness lands in whatever cluster is free now
        wit[:] = (w.to_bytes(8, "little") + b"witness!") * (cluster // 16)
        os.pwrite(fd, wit, w)
        w += cluster
    if n % 64 == 63:
        os.fsync(fd)                   # frees are applied at writeouts
    n += 1
print(n, (w - wlo) // cluster, flush=True)
"""


def witness(w: int) -> bytes:
    return (w.to_bytes(8, "little") + b"witness!") * (CLUSTER // 16)


def known(c: int) -> bytes:
    return (c.to_bytes(8, "little") + b"final!!!") * (CLUSTER // 16)


@needs_dataplane
def test_race_fast_writes_against_zeroing_and_cow(mounted, images, workdir):
    img = qcow2(images, "race.qcow2", 64 * MiB, cluster=CLUSTER, fill=(0, CHURNED[1]))
    # 32 KiB: four 8 KiB tables in all (L2 and refcount blocks) for eight L2 tables' worth of disk.
    m = mounted(images, "--cache", "none", "--l2-cache-size", "32K")
    f = m / "race.raw"
    rounds, witnesses = churn_under_verified_fio(f, workdir / "stop")
    during = image_stats(m, "race.raw")
    # Final, known contents of the churned region, and the witnesses still intact through the mount.
    fd = os.open(f, os.O_RDWR)
    try:
        for c in range(*CHURNED, CLUSTER):
            os.pwrite(fd, known(c), c)
        os.fsync(fd)
        for i in range(witnesses):
            w = WITNESS[0] + i * CLUSTER
            assert os.pread(fd, CLUSTER, w) == witness(w), f"witness at {w:#x} was overwritten"
    finally:
        os.close(fd)
    fio(f, *FIO_DIRECT, "--rw=randwrite", "--bs=4k", f"--size={VERIFIED[1]}", "--number_ios=20000",
        "--verify_only")
    m.umount()
    # What the test made sure of: C was writing there, mappings changed under it, the cache churned,
    # and freed clusters were recycled (allocations beyond what the reservations gave).
    assert during["fast_writes"] > 1000 and during["fast_fences"] > 0 and during["forwarded"] > 1000, during
    assert during["fast_tables"] <= 4, during  # the cache holds four tables, refcount blocks included
    assert during["allocations"] > during["from_reservation"], during
    assert rounds > 20 and witnesses > 5, (rounds, witnesses)
    run("qemu-img", "check", img)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, expected_image(img, workdir, witnesses))


def churn_under_verified_fio(f: Path, stop: Path) -> tuple[int, int]:
    """The churner (zeroing and copy-on-write) and fio noise in the churned region while a verified
    fio job writes the verified one; returns the churner's rounds and witnesses."""
    churner = subprocess.Popen([sys.executable, "-c", CHURNER, str(f), str(CLUSTER), str(CHURNED[0]),
                                str(CHURNED[1]), str(WITNESS[0]), str(WITNESS[1]), str(stop)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    noise = subprocess.Popen(["fio", "--name=noise", f"--filename={f}", *FIO_DIRECT, "--rw=randwrite", "--bs=4k",
                              f"--offset={CHURNED[0]}", f"--size={CHURNED[1] - CHURNED[0]}", "--time_based",
                              "--runtime=6"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        fio(f, *FIO_DIRECT, "--rw=randwrite", "--bs=4k", f"--size={VERIFIED[1]}", "--number_ios=20000",
            "--do_verify=1")
        assert noise.wait(timeout=120) == 0, noise.stdout.read()
    finally:
        stop.touch()
        out, err = churner.communicate(timeout=120)
    assert churner.returncode == 0, err
    rounds, witnesses = map(int, out.split())
    return rounds, witnesses


def expected_image(img: Path, workdir: Path, witnesses: int) -> Path:
    """The guest view the image must have: the verified region as it is (fio checked it), the
    churned region's known contents, the witnesses."""
    expected = workdir / "expected.raw"
    run("qemu-img", "convert", "-O", "raw", img, expected)  # the verified region, checked by fio above
    with open(expected, "r+b") as e:
        for c in range(*CHURNED, CLUSTER):
            e.seek(c)
            e.write(known(c))
        e.truncate(WITNESS[0])
        for i in range(witnesses):
            e.write(witness(WITNESS[0] + i * CLUSTER))
        e.truncate(WITNESS[1])
    return expected


@needs_dataplane
@pytest.mark.parametrize("mode", ["none", "writeback"])
def test_sigint_with_qcow2_writers_loses_nothing_acknowledged(mounted, images, mode):
    img = qcow2(images, "vm.qcow2", 256 * MiB, fill=(0, 128 * MiB))  # half in place (C), half allocating
    m = mounted(images, "--cache", mode)
    proc, acked, reader = start_writer(m / "vm.raw", 60000)
    wait_acked(acked)
    assert image_stats(m, "vm.raw")["fast_writes"] > 0
    os.kill(m.pid, signal.SIGINT)  # "stop now" (SIGTERM would wait for the writer)
    m._wait_daemon_gone()
    proc.wait(timeout=60)
    reader.join(timeout=60)
    m.check_log()
    assert 0 < len(acked) < 60000, len(acked)
    run("qemu-img", "check", img)
    raw = img.with_suffix(".img")
    run("qemu-img", "convert", "-O", "raw", img, raw)
    acked_blocks_are_there(raw, acked)


@needs_dataplane
def test_live_mode_switch_under_fio_on_qcow2(mounted, images):
    img = qcow2(images, "vm.qcow2", 128 * MiB, fill=(0, 64 * MiB))
    m = mounted(images, "--cache", "writeback")
    switch_modes_under_fio(m, m / "vm.raw", number_ios=40000)
    s = image_stats(m, "vm.raw")
    assert s["fast_writes"] > 1000 and s["fast_errors"] == 0, s
    m.umount()
    run("qemu-img", "check", img)
