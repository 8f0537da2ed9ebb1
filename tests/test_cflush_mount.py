"""Guest flushes served in C (issue 24; docs/design.md "Guest flushes served in C"), behind real mounts.

- Counted from outside: the image directory is tests/recordfs.py, which logs every fsync that
  reaches the image file, whichever descriptor and whichever plane sent it (C's fdatasync is an
  io_uring op, which strace cannot see). Random 4 KiB writes into fresh space, an fdatasync every
  16, in writeback and none: one fsync reaches the image per guest flush, and C served nearly all
  of them (``fast_flushes``). After unmount, ``qemu-img check`` is clean and every write reads back.
- SIGKILL rounds with flushes in C: every fsync-acknowledged block survives a crash of the daemon
  (tests/crashwrites.py), C having served flushes before the kill.
- The sticky error: an fdatasync of C's that fails fails that flush and every later one, whoever
  would serve it (faultyfs fails the image's FSYNCs, then stops failing them).
- The off switch (``CACHEFS_CFLUSH=off``): every flush is Python's again.

The power-cut simulation over the real daemon (tests/test_powercut_daemon.py) judges crash states
of C's flushes, and checks that a flush in C without its fdatasync is caught.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import subprocess
import time

import pytest

from conftest import qemu_img
from crashwrites import WRITER, acked_blocks, leaks_at_most_and_nothing_acknowledged_lost
from lowerfs import LowerMount, faulty  # noqa: F401 (a fixture)
from mounting import kill_daemon
from recordfs import STATE

#: Tests marked so run over the ring (FUSE over io_uring, the session's default) and over /dev/fuse
#: (issue 24); the rest over the ring only (the suite's 15 minutes).
over_both_transports = pytest.mark.both_transports

BLOCK = 4096
FLUSHES, PER_FLUSH = 200, 16
SIZE = 1 << 30
SEED = int(os.environ.get("CFLUSH_SEED", "24"))


def stat(f, key: str) -> int:
    return int(os.getxattr(f, f"user.cachefs.stats.{key}"))


@pytest.fixture
def recorder(workdir):
    """workdir/src served at workdir/lower by tests/recordfs.py (before ``mounted``: torn down after it)."""
    started: list[LowerMount] = []

    def start() -> LowerMount:
        lower = workdir / "lower"
        lower.mkdir()
        log = workdir / "record.log"
        started.append(LowerMount("recordfs.py", workdir / "src", lower, log.with_suffix(".stderr"), log))
        return started[-1]

    (workdir / "src").mkdir()
    yield start
    errors = [err for r in started if "Traceback" in (err := r.stop())]
    assert not errors, f"recordfs logged a traceback:\n{errors[0]}"


def recorded_syncs(lower) -> int:
    return json.loads(os.getxattr(lower, STATE))["syncs"]


def allocating_flushes(path, direct: bool, seed: int, flushes: int) -> dict[int, bytes]:
    """Random 4 KiB writes to never-written blocks, an fdatasync after every PER_FLUSH."""
    rng = random.Random(seed)
    blocks = rng.sample(range(SIZE // BLOCK), flushes * PER_FLUSH)
    written = {}
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, BLOCK)
    try:
        for i, block in enumerate(blocks):
            data = rng.randbytes(BLOCK)
            buf[:] = data
            os.pwrite(fd, buf, block * BLOCK)
            written[block] = data
            if i % PER_FLUSH == PER_FLUSH - 1:
                os.fdatasync(fd)
    finally:
        os.close(fd)
    return written


@over_both_transports
@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_one_fsync_reaches_the_image_per_guest_flush_and_c_serves_them(cache, recorder, mounted, workdir):
    qemu_img("create", "-q", "-f", "qcow2", workdir / "src" / "vm.qcow2", str(SIZE))
    rec = recorder()
    m = mounted(rec.path, "--cache", cache, "--dataplane", "on")
    f = m / "vm.raw"
    allocating_flushes(f, cache == "none", SEED, 8)  # the first tables and reservation: Python's
    syncs0, flushes0, in_c0 = recorded_syncs(rec.path), stat(f, "guest_flushes"), stat(f, "fast_flushes")
    written = allocating_flushes(f, cache == "none", SEED + 1, FLUSHES)
    syncs = recorded_syncs(rec.path) - syncs0
    flushes, in_c = stat(f, "guest_flushes") - flushes0, stat(f, "fast_flushes") - in_c0
    where = f"CFLUSH_SEED={SEED} cache={cache}"
    print(f"{where}: {flushes} guest flushes, {in_c} served in C, {syncs} fsyncs reached the image")
    assert flushes >= FLUSHES, where  # and the close of the first workload's descriptor
    assert in_c >= 0.8 * FLUSHES, f"{where}: C served {in_c} of {FLUSHES} flushes"
    assert FLUSHES <= syncs <= flushes + 2, f"{where}: {syncs} fsyncs for {flushes} guest flushes"
    assert float(os.getxattr(f, "user.cachefs.stats.fdatasyncs_per_flush")) <= 1.05
    m.umount()
    image = rec.source / "vm.qcow2"
    r = qemu_img("check", image, check=False)
    assert r.returncode == 0, f"{where}: {r.stdout}"
    view = workdir / "view.raw"
    qemu_img("convert", "-O", "raw", image, view)
    with open(view, "rb") as v:
        lost = [b for b, d in written.items() if os.pread(v.fileno(), BLOCK, b * BLOCK) != d]
    assert not lost, f"{where}: {len(lost)} blocks differ after unmount"


@pytest.mark.parametrize("cache", ["writeback", "none", "directsync"])
def test_sigkill_rounds_with_flushes_in_c_keep_acknowledged_writes(cache, mounted, workdir):
    """The daemon SIGKILLed mid-workload, round after round: leaks at most, every block acknowledged
    by a completed fdatasync reads back (in directsync: every completed write, no fdatasync asked);
    C served flushes (its write-through writes' syncs) in every round before the kill."""
    images = workdir / "images"
    images.mkdir()
    image = images / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "256M")
    blocks = (256 << 20) // BLOCK
    script = workdir / "writer.py"
    # Writes only: a discard changes the mapping in Python, and the flush after it is Python's.
    # The writer's first discard is refused instead (crashwrites replays it as refused).
    refused = "libc.fallocate64(fd, 3, block * 4096, count * 4096) == 0"
    assert refused in WRITER
    text = (WRITER % {"blocks": blocks}).replace(refused, "False")
    if cache == "directsync":  # each write is acknowledged when it returns: logged as such
        assert "if i % 16 == 15:" in text and "os.fdatasync(fd)" in text
        text = text.replace("if i % 16 == 15:", "if True:").replace("os.fdatasync(fd)", "pass")
    script.write_text(text)
    served_in_c = "fast_flush_writes" if cache == "directsync" else "fast_flushes"
    expect: dict[int, bytes] = {}
    for rnd in range(4):
        m = mounted(images, "--cache", cache, "--dataplane", "on")
        log = workdir / f"writer{rnd}.log"
        seed = SEED * 100 + rnd
        writer = subprocess.Popen([os.sys.executable, script, m / "vm.raw", str(seed), "1" if cache == "none" else "0", log])
        try:
            deadline = time.monotonic() + 30
            while not log.exists() or log.read_text().count("acked") < (20 + 8 * rnd) * (16 if cache == "directsync" else 1):
                assert writer.poll() is None and time.monotonic() < deadline, f"seed {seed}: writer did not get going"
                time.sleep(0.02)
            in_c = stat(m / "vm.raw", served_in_c)
            kill_daemon(m)
        finally:
            writer.kill()
            writer.wait()
        assert in_c > 0, f"CFLUSH_SEED={SEED} round {rnd}: no flush served in C before the kill"
        acked, maybe = acked_blocks(log.read_text(), seed, blocks)
        for block in maybe:
            expect.pop(block, None)
        expect.update({b: d for b, d in acked.items() if b not in maybe})
        leaks_at_most_and_nothing_acknowledged_lost(image, workdir, expect, rnd)
    m = mounted(images, "--cache", cache, "--dataplane", "on")
    m.umount()
    assert qemu_img("check", image, check=False).returncode == 0


@over_both_transports
@pytest.mark.parametrize("cache", ["writethrough", "directsync"])
def test_write_through_allocating_writes_are_made_durable_in_c_without_a_park(cache, recorder, mounted, workdir):
    """An allocating write-through write: data, then C's entry write and fdatasync, then its reply,
    without waiting for Python (dp_park.c). One fsync reaches the image per write at most."""
    qemu_img("create", "-q", "-f", "qcow2", workdir / "src" / "vm.qcow2", str(SIZE))
    rec = recorder()
    m = mounted(rec.path, "--cache", cache, "--dataplane", "on")
    f = m / "vm.raw"
    rng = random.Random(SEED)
    blocks = rng.sample(range(SIZE // BLOCK), 400)
    fd = os.open(f, os.O_RDWR | (os.O_DIRECT if cache == "directsync" else 0))
    buf = mmap.mmap(-1, BLOCK)
    written = {}
    try:
        for i, block in enumerate(blocks):
            if i == 50:
                syncs0, in_c0, parked0 = (recorded_syncs(rec.path), stat(f, "fast_flush_writes"),
                                          stat(f, "fast_parked_syncs"))
            buf[:] = written[block] = rng.randbytes(BLOCK)
            os.pwrite(fd, buf, block * BLOCK)
    finally:
        os.close(fd)
    n = len(blocks) - 50
    syncs = recorded_syncs(rec.path) - syncs0
    in_c, parked = stat(f, "fast_flush_writes") - in_c0, stat(f, "fast_parked_syncs") - parked0
    where = f"CFLUSH_SEED={SEED} cache={cache}"
    print(f"{where}: {n} allocating writes, {in_c} made durable in C, {parked} parked syncs, {syncs} fsyncs")
    assert in_c >= 0.9 * n, f"{where}: C made {in_c} of {n} writes durable itself"
    assert syncs <= n + 5, f"{where}: {syncs} fsyncs for {n} write-through writes"
    m.umount()
    image = rec.source / "vm.qcow2"
    assert qemu_img("check", image, check=False).returncode == 0
    view = workdir / "view.raw"
    qemu_img("convert", "-O", "raw", image, view)
    with open(view, "rb") as v:
        assert all(os.pread(v.fileno(), BLOCK, b * BLOCK) == d for b, d in written.items()), where


def test_a_failed_fdatasync_in_c_fails_every_later_flush(faulty, mounted, workdir):  # noqa: F811
    qemu_img("create", "-q", "-f", "qcow2", workdir / "src" / "vm.qcow2", "256M")
    lower = faulty()
    m = mounted(lower.path, "--cache", "writeback", "--dataplane", "on")
    f = m / "vm.raw"
    fd = os.open(f, os.O_RDWR)
    try:
        rng = random.Random(SEED)

        def write_and_flush() -> None:
            for _ in range(PER_FLUSH):
                os.pwrite(fd, rng.randbytes(BLOCK), rng.randrange((256 << 20) // BLOCK) * BLOCK)
            os.fdatasync(fd)

        for _ in range(8):
            write_and_flush()
        in_c = stat(f, "fast_flushes")
        assert in_c > 0
        os.setxattr(lower.path, "user.faulty.arm", json.dumps({"fsync": True, "errno": 5}).encode())
        with pytest.raises(OSError):
            write_and_flush()
        assert stat(f, "fast_flushes") > in_c, "the failing flush was not C's: this tests nothing"
        os.setxattr(lower.path, "user.faulty.disarm", b"")
        for _ in range(3):  # sticky until remounted
            with pytest.raises(OSError):
                write_and_flush()
        os.close(fd)  # the failed flushes covered its writes: its close owes none (fs.flush)
        fd = os.open(f, os.O_RDWR)
        os.pwrite(fd, b"x" * BLOCK, 0)
        with pytest.raises(OSError):
            os.close(fd)  # a close that owes a flush: Python's, which fails too
        fd = -1
    finally:
        if fd >= 0:
            os.close(fd)
        kill_daemon(m)  # its unmount would fail on the sticky error, as it must


def test_cflush_off_keeps_every_flush_in_python(mounted, workdir, monkeypatch):
    monkeypatch.setenv("CACHEFS_CFLUSH", "off")
    images = workdir / "images"
    images.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", images / "vm.qcow2", str(SIZE))
    m = mounted(images, "--cache", "writeback", "--dataplane", "on")
    f = m / "vm.raw"
    allocating_flushes(f, False, SEED, 20)
    assert stat(f, "fast_flushes") == 0 and stat(f, "guest_flushes") >= 20
    assert stat(f, "fast_allocations") > 0
