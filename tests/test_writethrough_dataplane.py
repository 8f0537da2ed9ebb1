"""writethrough and directsync with the data plane allocating (issue 14): at most one device sync
per guest write, counted from outside, and every acknowledged write survives a crash.

The data plane serves these writes in C (io_uring), so strace sees none of them. The count comes
from the kernel instead: the ``ext4:ext4_sync_file_enter`` tracepoint, filtered on the image
file's inode, fires for every fsync/fdatasync of it and for every O_DSYNC write the kernel syncs
through ext4_sync_file (a direct O_DSYNC write the device can do with FUA skips it, so for
overwrites the count is an upper bound only). An allocating write waits in C for one sync of its
data and its L2 entry: C's own (cachefs/native/dp_cflush.c, counted as ``fast_fdatasyncs``) or,
when C cannot serve it, Python's flush it is parked for (cachefs/native/dp_park.c); an overwrite
in place is one O_DSYNC write.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import cachefs, qemu_img
from guestio import BLOCK, O_DIRECT, pwrite_block
from mounting import kill_daemon, stat_of

N = 48
CLUSTER = 65536
TRACING = Path("/sys/kernel/tracing")


class SyncTrace:
    """ext4_sync_file_enter events on one inode, in a tracefs instance of our own."""

    def __init__(self, ino: int, workdir: Path) -> None:
        self.mounted = None
        root = TRACING
        if not (root / "instances").is_dir():
            root = workdir / "tracefs"
            root.mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(root)], check=True)
            self.mounted = root
        self.inst = root / "instances" / f"cachefs-test-{os.getpid()}"
        self.inst.mkdir()
        self.event = self.inst / "events" / "ext4" / "ext4_sync_file_enter"
        (self.event / "filter").write_text(f"ino == {ino}\n")

    def __enter__(self) -> SyncTrace:
        (self.inst / "trace").write_text("")  # empty the buffer
        (self.event / "enable").write_text("1\n")
        return self

    def __exit__(self, *exc) -> None:
        (self.event / "enable").write_text("0\n")

    def count(self) -> int:
        return sum(1 for line in (self.inst / "trace").read_text().splitlines()
                   if "ext4_sync_file_enter" in line and not line.startswith("#"))

    def close(self) -> None:
        self.inst.rmdir()
        if self.mounted is not None:
            subprocess.run(["umount", str(self.mounted)], check=False)


@pytest.fixture
def trace_inode(workdir):
    traces = []

    def make(path: Path) -> SyncTrace:
        traces.append(SyncTrace(os.stat(path).st_ino, workdir))
        return traces[-1]

    yield make
    for t in traces:
        t.close()


def fresh(workdir: Path, mounted, mode: str):
    images = workdir / "images"
    images.mkdir(exist_ok=True)
    cachefs("create", images / "vm.qcow2", "256M")
    m = mounted(images, "--cache", mode, "--aio", "io_uring")
    assert os.getxattr(m.path, "user.cachefs.dataplane") == b"on"
    return m, images / "vm.qcow2"


@pytest.mark.parametrize("mode", ["writethrough", "directsync"])
def test_one_device_sync_per_write_with_c_allocating(mode, mounted, workdir, trace_inode):
    m, backing = fresh(workdir, mounted, mode)
    f = m / "vm.raw"
    rng = random.Random(mode)
    fd = os.open(f, os.O_RDWR | (O_DIRECT if mode == "directsync" else 0))
    trace = trace_inode(backing)
    written = {}
    try:
        # Warm-up: the first allocation makes the L2 table, in Python, and the refill that lends C
        # clusters follows it (dpalloc.python_allocated).
        pwrite_block(fd, b"w" * BLOCK, 0)
        written[0] = b"w" * BLOCK
        offsets = [(i + 1) * CLUSTER + rng.randrange(CLUSTER // BLOCK) * BLOCK for i in range(N)]
        a0, p0 = stat_of(f, "fast_allocations"), synced_for_writes(f)
        with trace:
            for off in offsets:
                written[off] = rng.randbytes(BLOCK)
                pwrite_block(fd, written[off], off)
        alloc_syncs = trace.count()
        a1, p1 = stat_of(f, "fast_allocations"), synced_for_writes(f)
        w0 = stat_of(f, "fast_writes")
        with trace:
            for off in offsets:
                written[off] = rng.randbytes(BLOCK)
                pwrite_block(fd, written[off], off)
        inplace_syncs = trace.count()
        w1 = stat_of(f, "fast_writes")
    finally:
        os.close(fd)
    print(f"\n{mode}: {N} allocating writes in C: {alloc_syncs} syncs of the image file, "
          f"{p1 - p0} parked syncs; {N} overwrites: {inplace_syncs}")
    assert a1 - a0 == N, "the allocating writes were not C's"
    assert 1 <= p1 - p0 <= N, "no write waited for a sync: acknowledged before its mapping was durable"
    assert alloc_syncs <= N, "allocating writes: more than one device sync each"
    assert alloc_syncs >= p1 - p0, "a parked write was released without an fdatasync"
    assert w1 - w0 == N and inplace_syncs <= N, "overwrites: not C's, or more than one sync each"

    # A crash now (no flush was ever sent): every acknowledged write is in the file.
    kill_daemon(m)
    assert qemu_img("check", backing, check=False).returncode in (0, 3)  # leaks at most
    m2 = mounted(backing.parent, "--cache", mode)
    with open(m2 / "vm.raw", "rb") as g:
        lost = [off for off, data in written.items() if os.pread(g.fileno(), BLOCK, off) != data]
    assert not lost, f"acknowledged writes lost: {lost[:8]}"


def synced_for_writes(f) -> int:
    """The syncs write-through writes waited for: Python's (parked, dp_park.c) and C's own (dp_cflush.c)."""
    return stat_of(f, "fast_parked_syncs") + stat_of(f, "fast_fdatasyncs")


def test_concurrent_directsync_writers_share_syncs(mounted, workdir, trace_inode):
    """Direct writes reach C in parallel (FOPEN_PARALLEL_DIRECT_WRITES): writes parked while a sync
    runs share the next one (group commit), never more than one sync per write."""
    m, backing = fresh(workdir, mounted, "directsync")
    f = m / "vm.raw"
    fd = os.open(f, os.O_RDWR | O_DIRECT)
    pwrite_block(fd, b"w" * BLOCK, 0)  # warm-up, as above
    trace = trace_inode(backing)
    writers, per = 16, 8
    errors = []

    def writer(k: int) -> None:
        try:
            for i in range(per):
                pwrite_block(fd, bytes([k + 1]) * BLOCK, (1 + k * per + i) * CLUSTER)
        except OSError as exc:
            errors.append(exc)

    p0 = synced_for_writes(f)
    with trace:
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    os.close(fd)
    syncs, parked = trace.count(), synced_for_writes(f) - p0
    print(f"\n{writers * per} concurrent directsync allocating writes: {syncs} syncs, {parked} parked syncs")
    assert not errors
    assert 1 <= parked <= writers * per and syncs <= writers * per
    with open(f, "rb") as g:
        for k in range(writers):
            for i in range(per):
                assert os.pread(g.fileno(), BLOCK, (1 + k * per + i) * CLUSTER) == bytes([k + 1]) * BLOCK
    m.umount()
    assert qemu_img("check", backing, check=False).returncode == 0
