"""writethrough and directsync cost at most one device sync per guest write, counted from outside.

docs/cache-modes.md, "One sync per write": an overwrite in place is one write
through the O_DSYNC descriptor (the kernel syncs it: one device sync); an
allocating write puts its data and the metadata that maps it on the mode's
batch descriptor (no O_DSYNC) and one fdatasync, shared by concurrent writers,
makes them durable before the acknowledgement.

Counted with ``strace -f -p`` on a thread-engine mount with the data plane off,
so every pwrite and fdatasync of the daemon is a syscall strace sees: device
syncs are the fdatasyncs plus the writes on the O_DSYNC descriptor (fdinfo
tells which one that is). The image's own counters are cross-checked.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from conftest import cachefs, qemu_img
from guestio import BLOCK, O_DIRECT, pwrite_block
from mounting import stat_of
from stracing import SYNC_CALLS, WRITE_CALLS, Strace, io_fds, kind

N = 48          # allocating writes, then as many overwrites in place
CLUSTER = 65536


def device_syncs(st: Strace, fds: dict[int, int]) -> tuple[int, int]:
    """(fdatasyncs on the image's descriptors, writes on its O_DSYNC descriptor)."""
    dsync = [fd for fd, fl in fds.items() if kind(fl)[1]]
    return st.count(SYNC_CALLS, list(fds)), st.count(WRITE_CALLS, dsync)


@pytest.mark.parametrize("mode", ["writethrough", "directsync"])
def test_at_most_one_device_sync_per_guest_write(mode, mounted, workdir):
    images = workdir / "images"
    images.mkdir()
    cachefs("create", images / "vm.qcow2", "256M")
    m = mounted(images, "--cache", mode, "--dataplane", "off", "--aio", "threads")
    f, backing = m / "vm.raw", images / "vm.qcow2"
    direct = mode == "directsync"
    rng = random.Random(mode)
    fd = os.open(f, os.O_RDWR | (O_DIRECT if direct else 0))
    try:
        # Warm-up: the first allocation makes the L2 table and the first reservation (their extra
        # rounds are the deliberate ones of DESIGN.md section 3, once per 512 MiB of guest space).
        pwrite_block(fd, b"w" * BLOCK, 0)
        offsets = [(i + 1) * CLUSTER + rng.randrange(CLUSTER // BLOCK) * BLOCK for i in range(N)]
        w0, s0 = stat_of(f, "guest_writes"), stat_of(f, "backend_fdatasyncs")
        with Strace(m.pid, workdir / f"strace-alloc-{mode}.txt") as alloc:
            for off in offsets:
                pwrite_block(fd, rng.randbytes(BLOCK), off)
        fds = io_fds(m.pid, backing)
        with Strace(m.pid, workdir / f"strace-inplace-{mode}.txt") as inplace:
            for off in offsets:
                pwrite_block(fd, rng.randbytes(BLOCK), off)
        w1, s1 = stat_of(f, "guest_writes"), stat_of(f, "backend_fdatasyncs")
    finally:
        os.close(fd)

    # The descriptors: the mode's O_DSYNC one, and its batch twin (same O_DIRECT, no O_DSYNC).
    assert sorted(kind(fl) for fl in fds.values()) == [(direct, False), (direct, True)], fds
    a_sync, a_dsync = device_syncs(alloc, fds)
    i_sync, i_dsync = device_syncs(inplace, fds)
    print(f"\n{mode}: {N} allocating writes: {a_sync} fdatasyncs + {a_dsync} O_DSYNC writes; "
          f"{N} overwrites in place: {i_sync} fdatasyncs + {i_dsync} O_DSYNC writes")
    assert a_sync + a_dsync <= N, "allocating writes: more than one device sync each"
    assert a_sync >= N, "allocating writes acknowledged with no fdatasync: not durable"
    assert i_sync + i_dsync <= N, "overwrites in place: more than one device sync each"
    assert i_dsync == N, "overwrites in place went around the O_DSYNC descriptor"
    assert alloc.total(SYNC_CALLS) == a_sync and inplace.total(SYNC_CALLS) == i_sync, "syncs on other files"
    # The daemon's counters agree with strace.
    assert w1 - w0 == 2 * N
    assert s1 - s0 == a_sync + i_sync

    # What a crash right now leaves: a byte copy holds every acknowledged write (no flush was sent).
    snap = workdir / "snap.qcow2"
    subprocess.run(["cp", "--sparse=always", backing, snap], check=True)
    assert qemu_img("check", "-U", snap, check=False).returncode in (0, 3)  # leaks at most
    m.umount()
    qemu_img("check", backing)


def test_sync_count_holds_with_concurrent_writers(mounted, workdir):
    """Sixteen concurrent writers in writethrough: writers finishing together share an fdatasync."""
    images = workdir / "images"
    images.mkdir()
    cachefs("create", images / "vm.qcow2", "256M")
    m = mounted(images, "--cache", "writethrough", "--dataplane", "off", "--aio", "threads")
    f = m / "vm.raw"
    fd = os.open(f, os.O_RDWR)
    try:
        pwrite_block(fd, b"w" * BLOCK, 0)
    finally:
        os.close(fd)
    w0, s0 = stat_of(f, "guest_writes"), stat_of(f, "backend_fdatasyncs")
    # Sixteen writers, each over its own 4 MiB (fio verifies each job's own blocks), so the
    # daemon sees up to sixteen writes at once.
    r = subprocess.run(["fio", "--name=wt", f"--filename={f}", "--rw=randwrite", "--bs=4k", "--size=4M",
                        "--offset=1M", "--offset_increment=4M", "--numjobs=16", "--thread", "--ioengine=psync",
                        "--number_ios=32", "--randrepeat=0", "--verify=crc32c", "--do_verify=1",
                        "--verify_state_save=0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    writes, syncs = stat_of(f, "guest_writes") - w0, stat_of(f, "backend_fdatasyncs") - s0
    print(f"\nwritethrough, 16 writers: {syncs} fdatasyncs for {writes} guest writes")
    assert writes >= 512 and syncs <= writes
    m.umount()
    qemu_img("check", images / "vm.qcow2")
