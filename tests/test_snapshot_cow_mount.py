"""Copy on write of shared clusters in the data plane (issue 23, cachefs/native/dp_cow.c), through
real mounts with ``--dataplane on``.

- After a snapshot every data cluster is shared. Partial (4 KiB) and whole-cluster (64 KiB, and
  1 MiB runs of them) O_DIRECT writes at QD16, and groups of writes racing into one cluster (the
  first copies in C, the others wait: forwarded while the copy is in flight, in place after): the
  snapshot's file still reads its point, the live file reads every write, C served the copies
  (``fast_cows``, ``fast_cow_reads``), and after unmount ``qemu-img check`` is clean and qemu-img
  reads the same bytes in the live image and the snapshot.
- SIGKILL rounds while a writer (4 KiB writes and discards, an fdatasync every 16) writes into
  shared clusters: ``qemu-img check`` finds leaks at most, nothing fdatasync-acknowledged is lost,
  the snapshot is untouched; C copied on write before each kill.
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import qemu_img, sha256
from crashwrites import WRITER, acked_blocks, leaks_at_most_and_nothing_acknowledged_lost
from mounting import kill_daemon, stat_of

KiB, MiB = 1 << 10, 1 << 20
CS = 64 * KiB
SIZE = 32 * MiB


def _image(workdir, size=SIZE):
    """A qcow2 image whose every cluster holds random data (so each is shared after a snapshot)."""
    images = workdir / "images"
    images.mkdir()
    src = workdir / "src.raw"
    src.write_bytes(random.Random(23).randbytes(size))
    qemu_img("convert", "-q", "-O", "qcow2", "-o", f"cluster_size={CS}", src, images / "vm.qcow2")
    return images, src.read_bytes()


def _pwrite_direct(fd: int, offset: int, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))  # page aligned: O_DIRECT
    buf[:] = data
    assert os.pwrite(fd, buf, offset) == len(data)


def _writes(rng: random.Random):
    """Independent writes (each into its own cluster: partial, whole), racing groups (four 4 KiB
    writes into one cluster, at once), and two 1 MiB writes (16 shared clusters each)."""
    runs = rng.sample(range(SIZE // MiB), 2)  # 1 MiB: 16 whole clusters copied on write in one request
    clusters = [c for c in range(SIZE // CS) if c * CS // MiB not in runs]
    solo = []
    rng.shuffle(clusters)
    for c in clusters[:96]:  # a 4 KiB slot of its own cluster: copy the rest from the old one
        solo.append((c * CS + rng.randrange(CS // 4096) * 4096, rng.randbytes(4096)))
    for c in clusters[96:160]:  # the whole cluster: no read
        solo.append((c * CS, rng.randbytes(CS)))
    for c in clusters[160:200]:  # 16 KiB at an odd slot
        solo.append((c * CS + 8 * KiB, rng.randbytes(16 * KiB)))
    races = []
    for c in clusters[260:300]:
        slots = rng.sample(range(CS // 4096), 4)
        races.append([(c * CS + s * 4096, rng.randbytes(4096)) for s in slots])
    return solo, races, [(r * MiB, rng.randbytes(MiB)) for r in runs]


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_writes_after_a_snapshot_copy_on_write_in_c(cache, mounted, workdir):
    images, original = _image(workdir)
    m = mounted(images, "--cache", cache, "--dataplane", "on")
    live = m / "vm.raw"
    os.setxattr(live, "user.cachefs.snapshot.create", b"s1")
    solo, races, runs = _writes(random.Random(f"cow-{cache}"))
    expect = bytearray(original)
    fd = os.open(live, os.O_RDWR | os.O_DIRECT)
    try:
        with ThreadPoolExecutor(16) as pool:  # QD16
            list(pool.map(lambda w: _pwrite_direct(fd, *w), solo))
            for group in races:  # four writes into one shared cluster, released at once
                gate = threading.Barrier(len(group))

                def racer(w, gate=gate):
                    gate.wait()
                    _pwrite_direct(fd, *w)
                list(pool.map(racer, group))
        os.fsync(fd)  # a flush lends C what the reservation holds: room for 16 copies in one request
        before = stat_of(live, "fast_cows")
        for w in runs:
            _pwrite_direct(fd, *w)
        assert stat_of(live, "fast_cows") - before == 16 * len(runs), "a 1 MiB write was not copied in C"
    finally:
        os.close(fd)
    for off, data in solo + [w for g in races for w in g] + runs:
        expect[off:off + len(data)] = data
    cows, reads = stat_of(live, "fast_cows"), stat_of(live, "fast_cow_reads")
    print(f"{cache}: {cows} copies in C ({reads} read the old cluster), {stat_of(live, 'forwarded')} forwarded, "
          f"{stat_of(live, 'fast_cow_waits')} claims waited for a copy")
    assert cows >= 150 and reads >= 90, (cows, reads)  # C copied most (the rest: before a refill), reading the partial ones
    assert sha256(m / "vm@s1.raw") == sha256(workdir / "src.raw"), "the snapshot changed"
    with open(live, "rb") as f:
        got = f.read()
    assert got == bytes(expect), "the live disk does not read what was written"
    os.setxattr(live, "user.cachefs.snapshot.create", b"s2")  # a snapshot point adopts whatever is left
    assert stat_of(live, "fast_cows_adopted") == cows
    m.umount()
    image = images / "vm.qcow2"
    assert qemu_img("check", image, check=False).returncode == 0, qemu_img("check", image, check=False).stdout
    qemu_img("convert", "-O", "raw", image, workdir / "live.raw")
    assert (workdir / "live.raw").read_bytes() == bytes(expect)
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", image, workdir / "s1.raw")
    assert (workdir / "s1.raw").read_bytes() == original


def test_sigkill_while_c_copies_on_write(mounted, workdir):
    images, original = _image(workdir)
    image = images / "vm.qcow2"
    blocks = SIZE // 4096
    script = workdir / "writer.py"
    script.write_text(WRITER % {"blocks": blocks})
    expect: dict[int, bytes] = {}
    for rnd in range(3):
        cache = ("none", "writeback")[rnd % 2]
        m = mounted(images, "--cache", cache, "--dataplane", "on")
        os.setxattr(m / "vm.raw", "user.cachefs.snapshot.create", f"k{rnd}".encode())  # all shared again
        log = workdir / f"writer{rnd}.log"
        seed = 300 + rnd
        writer = subprocess.Popen([os.sys.executable, script, m / "vm.raw", str(seed), "1" if cache == "none" else "0",
                                   log])
        try:
            deadline = time.monotonic() + 30
            while not log.exists() or log.read_text().count("acked") < 12:
                assert writer.poll() is None and time.monotonic() < deadline, "writer did not get going"
                time.sleep(0.02)
            cows = stat_of(m / "vm.raw", "fast_cows")
            kill_daemon(m)
        finally:
            writer.kill()
            writer.wait()
        assert cows > 0, f"round {rnd}: C copied nothing on write"
        acked, maybe = acked_blocks(log.read_text(), seed, blocks)
        for block in maybe:
            expect.pop(block, None)
        expect.update({b: d for b, d in acked.items() if b not in maybe})
        leaks_at_most_and_nothing_acknowledged_lost(image, workdir, expect, rnd)
        qemu_img("convert", "-O", "raw", "-l", "snapshot.name=k0", image, workdir / "k0.raw")
        assert (workdir / "k0.raw").read_bytes() == original, f"round {rnd}: the first snapshot changed"
    m = mounted(images, "--dataplane", "on")  # the last crash repaired; then a clean unmount
    m.umount()
    assert qemu_img("check", image, check=False).returncode == 0
