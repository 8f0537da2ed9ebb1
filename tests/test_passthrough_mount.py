"""Kernel passthrough of raw images behind real mounts (issue 24; dataplane/passthrough.py).

With FUSE passthrough the kernel reads and writes the image file itself: the proof that it did is
from outside, C's and Python's per-image read/write counters staying at zero while fio's data
verifies, through the mount and again in the image file. What still reaches the daemon still
counts and still works: flushes and fsyncs (each one an fdatasync of the file), a live mode switch
(refused with EBUSY when an open passthrough handle's flags cannot keep the new mode's promise),
a SIGKILL of the daemon (fsync-acknowledged writes are in the file), a read-only mount.

Every test skips, saying why, where the kernel does not offer passthrough (Linux before 6.9, or
without CONFIG_FUSE_PASSTHROUGH); it does on the CI kernel.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import stat
import subprocess
import sys
import time

import pytest

from conftest import qemu_img, sha256
from crashwrites import WRITER, acked_blocks
from fiojobs import fio, switch_modes_under_fio
from mounting import image_stats, kill_daemon, needs_dataplane, xattr

pytestmark = needs_dataplane

MiB = 1 << 20
BLOCK = 4096
#: Per-image counters of reads and writes the daemon served (Python's and C's): passthrough's zero.
SERVED = ("guest_reads", "guest_writes", "fast_reads", "fast_writes", "guest_bytes_read", "guest_bytes_written")

#: fio flags per cache mode that keep its promise, so every open passes through: O_DIRECT where the
#: mode promises no host page cache, O_SYNC where it promises durable writes (policy.py).
FLAGS = {
    "writeback": ("--direct=1",),
    "unsafe": ("--direct=1",),
    "none": ("--direct=1",),
    "writethrough": ("--direct=0", "--sync=1"),
    "directsync": ("--direct=1", "--sync=1"),
    "auto": ("--direct=1",),
}


def mount_passthrough(mounted, images, *extra):
    """A mount whose INIT took passthrough; skipped, with the kernel's reason, where it could not."""
    m = mounted(images, "--passthrough", "on", *extra)
    state = xattr(m.path, "passthrough")
    if state != "on":
        m.umount()
        pytest.skip(f"kernel passthrough unavailable here: {state}")
    return m


def served(m, name="disk.raw") -> dict:
    s = image_stats(m, name)
    return {k: int(s[k]) for k in SERVED}


def aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


@pytest.mark.parametrize("mode", list(FLAGS))
def test_fio_verify_passes_through_in_every_mode(mounted, raw, mode):
    """QD32 4k random writes then 1M sequential ones, verified; the daemon serves none of them."""
    m = mount_passthrough(mounted, raw, "--cache", mode)
    f = m / "disk.raw"
    before = served(m)
    job = ("--ioengine=libaio", "--iodepth=32", *FLAGS[mode])
    fio(f, *job, "--rw=randwrite", "--bs=4k", "--size=64M", "--number_ios=4000", "--do_verify=1")
    fio(f, *job, "--rw=write", "--bs=1M", "--size=32M", "--offset=128M", "--do_verify=1")
    s = image_stats(m)
    assert served(m) == before, s  # not one read or write reached Python or C
    assert int(s["passthrough_opens"]) >= 2 and int(s["passthrough_handles"]) == 0, s
    assert xattr(f, "passthrough").startswith("on"), xattr(f, "passthrough")
    m.umount()
    # The bytes are in the image file itself: fio verifies them there, with no mount.
    img = raw / "disk.raw"
    fio(img, "--rw=randwrite", "--bs=4k", "--size=64M", "--number_ios=4000", "--verify_only")
    fio(img, "--rw=write", "--bs=1M", "--size=32M", "--offset=128M", "--verify_only")


def test_flushes_and_fsyncs_still_count_and_sync(mounted, raw):
    """Writes the daemon never saw still owe an fdatasync: every fsync and close of a passthrough
    writer syncs the file (the daemon cannot tell whether it wrote), a reader's close does not."""
    m = mount_passthrough(mounted, raw, "--cache", "writeback")
    f = m / "disk.raw"
    # Read in this process: `cachefs stats` is a fork, and its exec closes a copy of our descriptor,
    # which the kernel sends as a FLUSH of the handle (one more fdatasync: unseen writes may precede it).
    stat = lambda key: int(xattr(f, "stats." + key))  # noqa: E731
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"passthrough!" * 100, 5 * BLOCK)
        syncs, flushes = stat("backend_fdatasyncs"), stat("guest_flushes")
        os.fsync(fd)
        assert stat("backend_fdatasyncs") == syncs + 1 and stat("guest_flushes") == flushes + 1
        os.fdatasync(fd)
        assert stat("guest_flushes") == flushes + 2
        assert stat("guest_writes") == 0 and stat("fast_writes") == 0
        syncs = stat("backend_fdatasyncs")
        subprocess.run(["true"], check=True)  # its exec closes a copy of fd: a FLUSH, which syncs
        assert stat("backend_fdatasyncs") == syncs + 1
    finally:
        syncs = stat("backend_fdatasyncs")
        os.close(fd)
    assert stat("backend_fdatasyncs") == syncs + 1  # flush-on-close
    with open(f, "rb") as r:
        assert r.read(12) == bytes(12)
        r.seek(5 * BLOCK)
        assert r.read(12) == b"passthrough!"
    assert stat("backend_fdatasyncs") == syncs + 1  # a reader's close owes nothing
    assert stat("guest_reads") == 0


def test_mode_switch_under_load(mounted, raw):
    """O_DIRECT|O_SYNC writers keep every mode's promise, so the image switches through all five
    while fio writes and verifies in passthrough at QD32; nothing reaches the daemon."""
    m = mount_passthrough(mounted, raw, "--cache", "writeback")
    f = m / "disk.raw"
    switch_modes_under_fio(m, f, number_ios=20000, extra=("--sync=1",))
    assert served(m) == dict.fromkeys(SERVED, 0), image_stats(m)
    assert int(image_stats(m)["passthrough_opens"]) >= 1


def test_a_switch_a_passthrough_handle_cannot_keep_is_refused(mounted, raw):
    """writeback -> writethrough with a writer that did not open O_DSYNC: its later writes could not
    be durable before they return (the kernel reopened the file with its flags), so EBUSY and the
    reason; a switch it keeps goes through; after it closes, the switch does too, and then a plain
    writer is the daemon's (writethrough's promise kept there) while an O_DSYNC one passes through."""
    m = mount_passthrough(mounted, raw, "--cache", "writeback")
    f = m / "disk.raw"
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.setxattr(f, "user.cachefs.cache", b"writethrough")
        assert exc.value.errno == errno.EBUSY
        assert "O_DSYNC" in xattr(f, "cache_error") and "passthrough" in xattr(f, "cache_error")
        assert xattr(f, "cache") == "writeback"
        os.setxattr(f, "user.cachefs.cache", b"unsafe")  # a weaker promise: kept
        os.setxattr(f, "user.cachefs.cache", b"writeback")
        os.pwrite(fd, b"x" * BLOCK, 0)
    finally:
        os.close(fd)
    os.setxattr(f, "user.cachefs.cache", b"writethrough")
    with pytest.raises(OSError):
        xattr(f, "cache_error")
    plain = os.open(f, os.O_RDWR)
    try:
        before = served(m)["guest_writes"]
        os.pwrite(plain, b"y" * BLOCK, BLOCK)
        assert served(m)["guest_writes"] == before + 1  # not passed through: the daemon made it durable
        assert "O_DSYNC" in xattr(f, "passthrough")
    finally:
        os.close(plain)
    dsync = os.open(f, os.O_RDWR | os.O_DSYNC)
    try:
        before = served(m)["guest_writes"]
        os.pwrite(dsync, b"z" * BLOCK, 2 * BLOCK)
        assert served(m)["guest_writes"] == before
        assert xattr(f, "passthrough").startswith("on (1 ")
    finally:
        os.close(dsync)


def test_an_open_that_must_not_pass_through_beside_one_that_does(mounted, raw):
    """cache=none: an O_DIRECT writer passes through; a buffered reader of the same image must not
    (no host page cache), yet the kernel fails any open without FOPEN_PASSTHROUGH while another
    passes through: it gets FOPEN_PASSTHROUGH with FOPEN_DIRECT_IO, and the daemon serves its reads."""
    m = mount_passthrough(mounted, raw, "--cache", "none")
    f = m / "disk.raw"
    fd = os.open(f, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, aligned(b"direct!!" * 512), 7 * BLOCK)
        with open(f, "rb", buffering=0) as r:
            r.seek(7 * BLOCK)
            assert r.read(BLOCK) == b"direct!!" * 512
            assert int(image_stats(m)["passthrough_served_handles"]) == 1
            assert served(m)["guest_reads"] + served(m)["fast_reads"] >= 1  # the daemon's
        assert served(m)["guest_writes"] + served(m)["fast_writes"] == 0  # the writer's: the kernel's
    finally:
        os.close(fd)


def test_sigkill_mid_write_keeps_what_fsync_acknowledged(mounted, raw, workdir):
    """The crash writer (4k writes, an fdatasync every 16) in passthrough; SIGKILL the daemon. Writes
    after the kill still reach the file (the kernel needs no daemon for them), but their fdatasync
    fails: every block acknowledged before it holds its data."""
    nblocks = 256 * MiB // BLOCK
    script = workdir / "writer.py"
    script.write_text(WRITER % {"blocks": nblocks})
    m = mount_passthrough(mounted, raw, "--cache", "writeback")
    log = workdir / "writer.log"
    writer = subprocess.Popen([sys.executable, script, m / "disk.raw", "7", "1", log])
    try:
        deadline = time.monotonic() + 30
        while not log.exists() or log.read_text().count("acked") < 50:
            assert writer.poll() is None and time.monotonic() < deadline, "writer did not get going"
            time.sleep(0.02)
        assert served(m) == dict.fromkeys(SERVED, 0)
        kill_daemon(m)
    finally:
        writer.kill()
        writer.wait()
    expect, maybe = acked_blocks(log.read_text(), 7, nblocks)
    expect = {b: d for b, d in expect.items() if b not in maybe}  # rewritten since, unacknowledged
    assert len(expect) > 100
    with open(raw / "disk.raw", "rb") as img:
        lost = [b for b, d in expect.items() if os.pread(img.fileno(), BLOCK, b * BLOCK) != d]
    assert lost == [], f"{len(lost)} fsync-acknowledged blocks lost"


def test_a_read_only_mount_stays_read_only(mounted, raw):
    """-o ro: reads pass through (the kernel reopens the file read-only, as the opener asked),
    writable opens are refused, and the image file is unchanged."""
    with open(raw / "disk.raw", "r+b") as img:
        img.write(b"original" * 512)
    digest = sha256(raw / "disk.raw")
    m = mount_passthrough(mounted, raw, "-o", "ro")
    f = m / "disk.raw"
    with open(f, "rb") as r:
        assert r.read(BLOCK) == b"original" * 512
        with pytest.raises(OSError) as exc:
            os.pwrite(r.fileno(), b"nope", 0)
        assert exc.value.errno == errno.EBADF
        with pytest.raises(OSError):  # a shared writable map of a read-only passthrough file
            mmap.mmap(r.fileno(), BLOCK, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    for flags in (os.O_RDWR, os.O_WRONLY, os.O_RDWR | os.O_DIRECT):
        with pytest.raises(OSError) as exc:
            os.open(f, flags)
        assert exc.value.errno == errno.EROFS
    assert int(image_stats(m)["passthrough_opens"]) >= 1 and served(m)["guest_reads"] == 0
    m.umount()
    assert sha256(raw / "disk.raw") == digest


def test_qcow2_and_passthrough_off_are_served_by_the_daemon(mounted, workdir):
    """A qcow2 image's clusters are mapped by the daemon: never passed through. --passthrough off: no
    raw image is either, and the root says so."""
    d = workdir / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "vm.qcow2", "64M")
    with open(d / "disk.raw", "wb") as f:
        f.truncate(64 * MiB)
    m = mount_passthrough(mounted, d)
    fio(m / "vm.raw", "--ioengine=libaio", "--iodepth=8", "--direct=1", "--rw=randwrite", "--bs=4k", "--size=16M",
        "--number_ios=200", "--do_verify=1")
    s = image_stats(m, "vm.raw")
    assert int(s["guest_writes"]) >= 200 and int(s["passthrough_opens"]) == 0, s
    assert "qcow2" in xattr(m / "vm.raw", "passthrough")
    m.umount()
    m = mounted(d, "-o", "passthrough=off")
    assert xattr(m.path, "passthrough") == "off: --passthrough off"
    fio(m / "disk.raw", "--ioengine=libaio", "--iodepth=8", "--direct=1", "--rw=randwrite", "--bs=4k",
        "--size=16M", "--number_ios=200", "--do_verify=1")
    s = image_stats(m)
    assert int(s["fast_writes"]) >= 200 and int(s["passthrough_opens"]) == 0, s


def past_the_end(m, name: str, size: int) -> tuple[int, OSError | None]:
    """An O_DIRECT writer 8 KiB across the end of a ``size``-byte disk, then fsync: what pwrite
    returned, and the fsync's error."""
    fd = os.open(m / name, os.O_WRONLY | os.O_DIRECT)
    try:
        n = os.pwritev(fd, [aligned(b"E" * 8192)], size - 4096)
        try:
            os.fsync(fd)
        except OSError as exc:
            return n, exc
        return n, None
    finally:
        os.close(fd)


def test_passthrough_is_the_default_and_a_disk_keeps_its_size(mounted, workdir):
    """With no option a raw image passes through where the kernel offers it. The kernel grows the
    file for a write past the disk's end without asking us; the writer's next fsync cuts the file
    back to the disk's size and fails with ENOSPC (a block device refuses the write: only a resize
    changes a disk's size, tests/test_disk_size.py), keeping what lay inside the disk. On a
    ``-o growable`` mount the disk takes the new size instead."""
    d = workdir / "images"
    d.mkdir()
    size = 64 * 1024
    (d / "disk.raw").write_bytes(bytes(size))
    m = mounted(d)
    if xattr(m.path, "passthrough") != "on":
        pytest.skip(f"kernel passthrough unavailable here: {xattr(m.path, 'passthrough')}")
    n, err = past_the_end(m, "disk.raw", size)
    assert n == 8192 and err is not None and err.errno == errno.ENOSPC, (n, err)
    assert int(image_stats(m)["passthrough_opens"]) >= 1 and served(m)["guest_writes"] == 0
    assert os.stat(m / "disk.raw").st_size == size == os.stat(d / "disk.raw").st_size
    with open(m / "disk.raw", "rb") as r:
        assert r.read() == bytes(size - 4096) + b"E" * 4096
    m.umount()
    assert (d / "disk.raw").read_bytes()[-4096:] == b"E" * 4096
    m = mounted(d, "-o", "growable")
    n, err = past_the_end(m, "disk.raw", size)
    assert n == 8192 and err is None, (n, err)
    assert os.stat(m / "disk.raw").st_size == size + 4096
    m.umount()
    assert (d / "disk.raw").stat().st_size == size + 4096


def test_passthrough_writes_cost_the_daemon_no_request(mounted, raw):
    """Before each write the kernel's file_remove_privs asks for security.capability unless the inode
    is S_NOSEC, which FUSE only latches when the server takes FUSE_HANDLE_KILLPRIV_V2 (dp_passthrough.c):
    without it every passthrough write was a GETXATTR round trip. 4000 writes now cost a handful of
    requests (open, the first write's probe, fsync, flush, release). And a setuid bit, which that
    promise would have to clear, cannot be set on an image through the mount."""
    m = mount_passthrough(mounted, raw, "--cache", "none")
    before = json.loads(xattr(m.path, "dataplane_counters"))["requests"]
    fio(m / "disk.raw", "--ioengine=libaio", "--iodepth=32", "--direct=1", "--rw=randwrite", "--bs=4k",
        "--size=16M", "--number_ios=4000", "--verify=crc32c", "--do_verify=0")
    asked = json.loads(xattr(m.path, "dataplane_counters"))["requests"] - before
    assert int(image_stats(m)["passthrough_opens"]) >= 1 and served(m)["guest_writes"] == 0
    assert asked < 100, f"{asked} requests reached the daemon for 4000 passthrough writes"
    with pytest.raises(PermissionError):
        os.chmod(m / "disk.raw", 0o4644)
    os.chmod(m / "disk.raw", 0o640)
    assert stat.S_IMODE(os.stat(raw / "disk.raw").st_mode) == 0o640


def test_an_image_turned_off_is_served_and_counted(mounted, raw):
    """``setfattr -n user.cachefs.passthrough -v off``: the image's next opens are served by the daemon,
    so every request counts again (what an admin who wants the counters does); a handle opened before
    keeps passing through until closed; ``on`` gives the next opens back to the kernel."""
    m = mount_passthrough(mounted, raw, "--cache", "none")
    f = m / "disk.raw"
    early = os.open(f, os.O_RDWR | os.O_DIRECT)
    try:
        os.setxattr(f, "user.cachefs.passthrough", b"off")
        assert xattr(f, "passthrough") == "off: turned off for this image (1 handle(s) still in passthrough until closed)"
        os.pwritev(early, [aligned(b"e" * BLOCK)], 0)
        assert served(m)["guest_writes"] == 0  # the early handle still passes through
    finally:
        os.close(early)
    fio(f, "--ioengine=libaio", "--iodepth=8", "--direct=1", "--rw=randwrite", "--bs=4k", "--size=16M",
        "--number_ios=300", "--verify=crc32c", "--do_verify=1")
    s = served(m)
    assert s["guest_writes"] >= 300 and s["guest_reads"] >= 300, s
    assert int(image_stats(m)["passthrough_handles"]) == 0
    with pytest.raises(OSError) as exc:
        os.setxattr(f, "user.cachefs.passthrough", b"sometimes")
    assert exc.value.errno == errno.EINVAL
    os.setxattr(f, "user.cachefs.passthrough", b"on")
    before = served(m)
    fio(f, "--ioengine=libaio", "--iodepth=8", "--direct=1", "--rw=randwrite", "--bs=4k", "--size=16M",
        "--number_ios=300", "--verify=crc32c", "--do_verify=1")
    assert served(m) == before and xattr(f, "passthrough").startswith("on")
