"""Allocating writes served by the data plane (issue 14), behind real mounts with ``--dataplane on``.

- fio verify at QD32 on a fresh qcow2 image, cache none and writeback: random 4 KiB writes (16
  requests land in each new 64 KiB cluster, up to 32 at once), then 1 KiB ones (64 per cluster).
  C must have served the allocations (``fast_allocations``), Python adopted every one of them by
  the next flush, the image is clean after unmount and holds what the mount served.
- SIGKILL rounds during allocating QD32 writes with fsyncs, in writeback and none: 32 threads
  write 4 KiB blocks at distinct random offsets of never-written space (O_DIRECT) and fdatasync
  every 8 writes; the daemon is killed mid-flight. After each round ``qemu-img check`` finds
  leaks at most, and after a remount every write that completed before a completed fdatasync
  started reads back.

The data plane is required here (CI runs as root on a kernel with FUSE and io_uring): a mount
without it fails these tests instead of skipping them.
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import qemu_img, sha256
from fiojobs import switch_modes_under_fio
from mounting import image_stats, kill_daemon

KiB, MiB = 1 << 10, 1 << 20
CS = 64 * KiB
BLOCK = 4 * KiB


def fio_allocating(f, *args) -> str:
    r = subprocess.run(["fio", "--name=alloc", f"--filename={f}", "--rw=randwrite", "--iodepth=32",
                        "--ioengine=libaio", "--direct=1", "--verify=crc32c", "--do_verify=1",
                        "--verify_fatal=1", "--randrepeat=0", "--verify_state_save=0", *args],
                       capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(f)))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "verify" not in r.stderr.lower() and "err= 0" in r.stdout, out
    return out


def stat(f, key: str) -> int:
    return int(os.getxattr(f, f"user.cachefs.stats.{key}"))


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_fio_verify_qd32_on_a_fresh_image_allocates_in_c(cache, mounted, workdir):
    images = workdir / "images"
    images.mkdir()
    image = images / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    m = mounted(images, "--cache", cache, "--dataplane", "on")
    assert os.getxattr(m.path, "user.cachefs.dataplane") == b"on"
    f = m / "vm.raw"
    fio_allocating(f, "--bs=4k", "--offset=0", "--size=16M")
    fio_allocating(f, "--bs=1k", "--offset=16M", "--size=4M")  # partial writes: 64 per new cluster
    s = image_stats(m, "vm.raw")
    clusters = 20 * MiB // CS
    # The first writes reach Python (the L2 table, the first lent clusters); C serves the rest. With
    # cache none the backend is O_DIRECT, and C forwards requests that are not 4 KiB aligned.
    in_c = clusters if cache == "writeback" else 16 * MiB // CS
    assert s["fast_allocations"] >= 0.75 * in_c, s
    assert s["fast_errors"] == 0 and s["fast_writes"] > 0.75 * 4096, s
    # No cluster allocated twice: C's and Python's allocations together are one per cluster (the
    # L2 table aside), so no write landed in a cluster someone else had allocated meanwhile.
    assert s["allocations"] <= clusters + 1, s
    fd = os.open(f, os.O_RDWR)
    try:
        os.fsync(fd)  # a flush adopts everything C allocated before it
    finally:
        os.close(fd)
    assert stat(f, "fast_allocations_adopted") == stat(f, "fast_allocations")
    served = sha256(f)
    m.umount()
    r = qemu_img("check", image, check=False)
    assert r.returncode == 0, r.stdout + r.stderr  # a clean unmount: no leaks, lent clusters given back
    view = workdir / "view.raw"
    qemu_img("convert", "-O", "raw", image, view)
    assert sha256(view) == served, "the image does not hold what the mount served"


# 32 threads write the blocks of [first, first+count) once each, in a random order, O_DIRECT; each
# fdatasyncs after every 8 of its writes. Logged, in completion order: "w BLOCK" for a completed
# write, "f N" for a completed fdatasync that started when N writes had completed.
WRITER = r"""
import mmap, os, random, sys, threading
path, seed, first, count, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
THREADS, EVERY = 32, 8
blocks = list(range(first, first + count))
random.Random(seed).shuffle(blocks)
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
lock = threading.Lock()
done = 0
out = open(log, "w", buffering=1)

def worker(k):
    global done
    buf = mmap.mmap(-1, 4096)
    try:
        for i, b in enumerate(blocks[k::THREADS]):
            buf[:] = random.Random(seed * 1000003 + b).randbytes(4096)
            os.pwrite(fd, buf, b * 4096)
            with lock:
                done += 1
                out.write(f"w {b}\n")
            if i % EVERY == EVERY - 1:
                with lock:
                    start = done
                os.fdatasync(fd)
                with lock:
                    out.write(f"f {start}\n")
    except OSError:
        pass  # the daemon is gone

threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def promised_blocks(log_text: str) -> list[int]:
    """The blocks whose write completed before a completed fdatasync started."""
    written, covered = [], 0
    for line in log_text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue  # the last line may be cut short by the kill
        if parts[0] == "w":
            written.append(int(parts[1]))
        elif parts[0] == "f":
            covered = max(covered, int(parts[1]))
    return written[:covered]


def block_data(seed: int, block: int) -> bytes:
    return random.Random(seed * 1000003 + block).randbytes(BLOCK)


def check_promised(f, promised: dict[int, int]) -> None:
    """Every promised block reads back through the mount (block -> the seed that wrote it)."""
    fd = os.open(f, os.O_RDONLY)
    try:
        lost = [b for b, seed in promised.items() if os.pread(fd, BLOCK, b * BLOCK) != block_data(seed, b)]
    finally:
        os.close(fd)
    assert lost == [], f"{len(lost)} of {len(promised)} fsync-acknowledged blocks lost, first at {lost[0] * BLOCK:#x}"


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_sigkill_rounds_during_allocating_qd32_writes(cache, mounted, workdir):
    rounds, region = 3, 32 * MiB // BLOCK  # each round writes its own never-written region
    images = workdir / "images"
    images.mkdir()
    image = images / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, str(rounds * region * BLOCK))
    script = workdir / "writer.py"
    script.write_text(WRITER)
    promised: dict[int, int] = {}
    verdicts = []
    rng = random.Random(cache)
    for rnd in range(rounds):
        m = mounted(images, "--cache", cache, "--dataplane", "on")
        f = m / "vm.raw"
        check_promised(f, promised)  # the remount (which repairs the dirty image) kept them
        seed = 1000 * rnd + len(cache)
        log = workdir / f"writer{rnd}.log"
        writer = subprocess.Popen([sys.executable, script, f, str(seed), str(rnd * region), str(region), log])
        try:
            # Kill somewhere in the first half of the round's writes, once some fdatasyncs returned
            # and C has allocated.
            fast = wait_for_c_allocations_then_writes(writer, f, log, rng.randrange(region // 8, region // 2))
            kill_daemon(m)
        finally:
            writer.kill()
            writer.wait()
        got = promised_blocks(log.read_text())
        assert len(got) >= 32, f"round {rnd}: only {len(got)} writes were acknowledged by an fdatasync"
        print(f"round {rnd}: C allocated {fast} clusters by the first fdatasyncs; {len(got)} writes acknowledged")
        promised.update((b, seed) for b in got)
        r = qemu_img("check", image, check=False)
        assert r.returncode in (0, 3), f"round {rnd}: qemu-img check after the kill: exit {r.returncode}\n{r.stdout}"
        verdicts.append(r.returncode)
    m = mounted(images, "--cache", cache, "--dataplane", "on")
    check_promised(m / "vm.raw", promised)
    m.umount()
    r = qemu_img("check", image, check=False)
    assert r.returncode == 0, r.stdout + r.stderr  # the repair and a clean unmount: no leaks left
    print(f"{cache}: {len(promised)} acknowledged blocks kept over {rounds} kills; qemu-img check {verdicts}")


def wait_for_c_allocations_then_writes(writer, f: Path, log: Path, kill_at: int) -> int:
    """Until 4 fdatasyncs returned (C has allocated by then: asserted) and ``kill_at`` writes were
    logged; returns C's fast_allocations at the first check."""
    deadline = time.monotonic() + 60
    fast = 0
    while True:
        assert writer.poll() is None, "the writer finished before the kill"
        assert time.monotonic() < deadline, "the writer did not get going"
        text = log.read_text() if log.exists() else ""
        if not fast and text.count("f ") >= 4:
            fast = stat(f, "fast_allocations")
            assert fast > 0, "C allocated nothing: the writes were not served by the data plane"
        if fast and text.count("w ") >= kill_at:
            return fast
        time.sleep(0.005)


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_one_fdatasync_per_flush_while_c_allocates(cache, mounted, workdir):
    """A guest that allocates a new cluster with every 4 KiB write and flushes every 16 writes: C
    serves the allocations, and each guest flush still costs one fdatasync of the image file."""
    images = workdir / "images"
    images.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", images / "vm.qcow2", "1G")
    m = mounted(images, "--cache", cache, "--dataplane", "on")
    f = m / "vm.raw"
    fd = os.open(f, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    try:
        def interval(first: int) -> None:
            for k in range(16):
                buf[:] = random.Random(first + k).randbytes(BLOCK)
                os.pwrite(fd, buf, (first + k) * CS)  # a fresh cluster each
            os.fdatasync(fd)

        for i in range(8):  # warming up: the L2 table, the first reservations
            interval(16 * i)
        before = {k: stat(f, k) for k in ("backend_fdatasyncs", "guest_flushes", "fast_allocations")}
        flushes = 150
        for i in range(8, 8 + flushes):
            interval(16 * i)
        after = {k: stat(f, k) for k in before}
    finally:
        os.close(fd)
    syncs = after["backend_fdatasyncs"] - before["backend_fdatasyncs"]
    assert after["guest_flushes"] - before["guest_flushes"] >= flushes, (before, after)
    assert after["fast_allocations"] - before["fast_allocations"] >= 0.95 * 16 * flushes, (before, after)
    assert syncs <= 1.05 * flushes, f"{syncs} fdatasyncs for {flushes} guest flushes"
    m.umount()
    qemu_img("check", images / "vm.qcow2")


def test_live_mode_switches_while_c_allocates(mounted, workdir):
    """fio allocates at QD32 on a fresh image while the cache mode switches every 50 ms: C stops
    allocating for the write-through modes (what it allocated and Python has not adopted turns
    read-only) and starts again after; fio's verify, qemu-img check and compare judge the result."""
    images = workdir / "images"
    images.mkdir()
    image = images / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "128M")
    m = mounted(images, "--cache", "writeback", "--dataplane", "on")
    f = m / "vm.raw"
    switch_modes_under_fio(m, f, number_ios=6000)
    s = image_stats(m, "vm.raw")
    assert s["fast_allocations"] > 0 and s["fast_errors"] == 0, s
    served = sha256(f)
    m.umount()
    qemu_img("check", image)
    view = workdir / "view.raw"
    qemu_img("convert", "-O", "raw", image, view)
    assert sha256(view) == served, "the image does not hold what the mount served"


def test_fio_verify_while_c_allocates_in_more_tables_than_the_cache_holds(mounted, workdir):
    """Eight fio jobs allocate in eight L2 tables (one 512 MiB table each) at once, with an L2 cache
    of four entries: Python evicts and reloads tables all the time, some of them holding clusters C
    allocated and Python has not adopted yet. C must keep serving what it allocated (no second
    allocation of one guest cluster: the image would turn read-only), fio's verify must pass and
    the image be clean. Four rounds, each on fresh space (the race is a matter of timing)."""
    images = workdir / "images"
    images.mkdir()
    image = images / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "4G")
    m = mounted(images, "--cache", "none", "--dataplane", "on", "--l2-cache-size", "256K")
    f = m / "vm.raw"
    for rnd in range(4):
        r = subprocess.run(["fio", "--name=tables", f"--filename={f}", "--rw=randwrite", "--bs=4k", "--size=2M",
                            f"--offset={rnd * 2}M", "--offset_increment=512M", "--numjobs=8", "--ioengine=libaio",
                            "--iodepth=8", "--direct=1", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                            "--randrepeat=0", "--verify_state_save=0", "--group_reporting"],
                           capture_output=True, text=True, timeout=120, cwd=workdir)
        corrupt = [line for line in m.log_text().splitlines() if "corruption detected" in line][:1]
        assert r.returncode == 0 and not corrupt, f"round {rnd}: {corrupt}\n{(r.stdout + r.stderr)[-1500:]}"
    s = image_stats(m, "vm.raw")
    assert s["fast_allocations"] > 0, s
    m.umount()
    qemu_img("check", image)
