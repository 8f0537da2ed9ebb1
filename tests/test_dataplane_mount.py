"""The data plane behind real mounts (issue 11, stage 1: raw images served in C).

fio with crc32c verification at QD32 O_DIRECT (4k random, 1M sequential) with
the data plane on and off; unaligned O_DIRECT requests forwarded and still
right; a flush after fast writes does its fdatasync; a cached reader sees a
direct writer's bytes; a live mode switch under fio; lazy umount and SIGINT
with writers running lose nothing acknowledged; the INIT and OPEN patches
seen from outside; and the one-line refusals (io_uring denied, no module).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from cachefs.fuse import queue_limit as fuseconn
from ackedwrites import acked_blocks_are_there, start_writer, wait_acked
from conftest import REPO, _env, cachefs, is_mounted, run
from fiojobs import FIO_DIRECT, fio, switch_modes_under_fio
from mounting import C_SERVES, image_stats, needs_dataplane

#: Tests marked so run over the ring (FUSE over io_uring, the session's default) and over /dev/fuse
#: (issue 24); the rest over the ring only (the suite's 15 minutes).
over_both_transports = pytest.mark.both_transports

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
BLOCK = 4096


def connection(m) -> dict:
    return json.loads(os.getxattr(m.path, "user.cachefs.dataplane_counters"))


def aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


def pattern(i: int, tag: bytes = b"cachefs!") -> bytes:
    return (i.to_bytes(8, "little") + tag) * (BLOCK // 16)


@over_both_transports
@needs_dataplane
@pytest.mark.parametrize("mode", ["none", "writeback"])
def test_fio_verify_served_in_c(mounted, raw, mode):
    m = mounted(raw, "--cache", mode, *C_SERVES)  # served in C, counted there: not passed through
    assert os.getxattr(m.path, "user.cachefs.dataplane") == b"on"
    f = m / "disk.raw"
    fio(f, *FIO_DIRECT, "--rw=randwrite", "--bs=4k", "--size=64M", "--number_ios=8000", "--do_verify=1")
    fio(f, *FIO_DIRECT, "--rw=write", "--bs=1M", "--size=64M", "--offset=128M", "--do_verify=1")
    s = image_stats(m)
    assert s["fast_writes"] >= 8000 + 64 and s["fast_reads"] >= 8000 + 64, s
    assert s["fast_bytes_written"] >= 8000 * BLOCK + 64 * MiB, s
    assert s["guest_writes"] >= s["fast_writes"] and s["fast_errors"] == 0, s
    assert s["forwarded"] < 200, s  # opens, getattrs, flushes: not the I/O
    m.umount()
    # The other plane reads back what this one wrote (fio's randrepeat: the same offsets).
    m = mounted(raw, "--cache", mode, "--dataplane", "off")
    fio(m / "disk.raw", *FIO_DIRECT, "--rw=randwrite", "--bs=4k", "--size=64M", "--number_ios=8000",
        "--verify_only")
    fio(m / "disk.raw", *FIO_DIRECT, "--rw=write", "--bs=1M", "--size=64M", "--offset=128M", "--verify_only")


@pytest.mark.parametrize("mode", ["none", "writeback"])
def test_fio_verify_with_the_data_plane_off(mounted, raw, mode):
    m = mounted(raw, "--cache", mode, "-o", "dataplane=off")  # as fstab would say it
    assert os.getxattr(m.path, "user.cachefs.dataplane") == b"off"
    f = m / "disk.raw"
    fio(f, *FIO_DIRECT, "--rw=randwrite", "--bs=4k", "--size=64M", "--number_ios=4000", "--do_verify=1")
    fio(f, *FIO_DIRECT, "--rw=write", "--bs=1M", "--size=32M", "--offset=128M", "--do_verify=1")
    s = image_stats(m)
    assert "fast_writes" not in s and s["guest_writes"] >= 4000 + 32, s
    assert fuseconn.queue_limit(str(m.path)) == 64  # through fusectl, as before the data plane
    m.umount()
    m = mounted(raw, "--cache", mode)  # and the data plane reads back what pyfuse3 wrote
    fio(m / "disk.raw", *FIO_DIRECT, "--rw=randwrite", "--bs=4k", "--size=64M", "--number_ios=4000",
        "--verify_only")


@needs_dataplane
def test_unaligned_direct_requests_are_forwarded_and_right(mounted, raw):
    m = mounted(raw, "--cache", "none", *C_SERVES)  # C's counters are the point
    f = m / "disk.raw"
    fd = os.open(f, os.O_RDWR | os.O_DIRECT)
    try:
        before = image_stats(m)
        os.pwrite(fd, aligned(pattern(1)), 20 * BLOCK)  # aligned: C
        mid = image_stats(m)
        assert mid["fast_writes"] == before["fast_writes"] + 1, (before, mid)
        # direct_io handles take any offset and length; O_DIRECT on the backend does not: Python's
        # bounce buffers serve these.
        odd = b"odd bytes " * 51
        os.pwrite(fd, odd, 10 * BLOCK + 512)
        os.pwrite(fd, b"tiny", 30 * BLOCK + 7)
        assert os.pread(fd, len(odd), 10 * BLOCK + 512) == odd
        assert os.pread(fd, 4, 30 * BLOCK + 7) == b"tiny"
        assert os.pread(fd, BLOCK, 20 * BLOCK) == pattern(1)
        after = image_stats(m)
        assert after["fast_writes"] == mid["fast_writes"], (mid, after)
        assert after["forwarded"] >= mid["forwarded"] + 4, (mid, after)
    finally:
        os.close(fd)
    m.umount()
    with open(raw / "disk.raw", "rb") as img:
        assert os.pread(img.fileno(), len(odd), 10 * BLOCK + 512) == odd
        assert os.pread(img.fileno(), 4, 30 * BLOCK + 7) == b"tiny"
        assert os.pread(img.fileno(), BLOCK, 20 * BLOCK) == pattern(1)
        assert os.pread(img.fileno(), 512, 10 * BLOCK) == bytes(512)  # the bounce kept its neighbours


@needs_dataplane
def test_reads_at_the_end_and_growth(mounted, workdir):
    """A READ past the guest's end is short (C), a write past it grows the disk (Python), and C
    serves the grown part at once (the size is published again)."""
    d = workdir / "images"
    d.mkdir()
    tail = os.urandom(MiB + 512)
    (d / "odd.raw").write_bytes(tail)  # not a multiple of 4096
    m = mounted(d, "--cache", "none", "--create-format", "raw", *C_SERVES)  # C's reads and counters
    fd = os.open(m / "odd.raw", os.O_RDONLY | os.O_DIRECT)
    try:
        before = image_stats(m, "odd.raw")["fast_reads"]
        assert os.pread(fd, 8192, MiB) == tail[MiB:]  # 512 bytes: the file's end is the guest's
        assert os.pread(fd, 4096, 2 * MiB) == b""
        assert image_stats(m, "odd.raw")["fast_reads"] == before + 2
    finally:
        os.close(fd)
    data = os.urandom(8 * MiB)
    with open(m / "new.raw", "wb") as f:  # created through the mount: empty, grows with each write
        for off in range(0, len(data), 256 * 1024):
            f.write(data[off:off + 256 * 1024])
    assert (m / "new.raw").stat().st_size == len(data)
    fd = os.open(m / "new.raw", os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, MiB)  # page aligned: the kernel cuts a direct request at its page boundaries
    try:
        got = b"".join(buf[:os.preadv(fd, [buf], off)] for off in range(0, len(data), MiB))
    finally:
        os.close(fd)
    assert got == data
    s = image_stats(m, "new.raw")
    assert s["fast_reads"] >= 8 and s["fast_errors"] == 0, s


@over_both_transports
@needs_dataplane
@pytest.mark.parametrize("how", ["fsync", "close"])
def test_a_flush_after_fast_writes_syncs(mounted, raw, how):
    """The fast writes never pass ModeBackend.pwrite; the flush must still fdatasync for them."""
    m = mounted(raw, "--cache", "writeback", *C_SERVES)  # C's writes (test_passthrough_mount.py: the kernel's)
    f = m / "disk.raw"
    syncs = lambda: image_stats(m)["backend_fdatasyncs"]  # noqa: E731
    for round_ in range(3):
        fd = os.open(f, os.O_RDWR)
        before, fast = syncs(), image_stats(m)["fast_writes"]
        os.pwrite(fd, pattern(round_), round_ * BLOCK)
        assert image_stats(m)["fast_writes"] == fast + 1
        if how == "fsync":
            os.fsync(fd)
            assert syncs() == before + 1
            os.fsync(fd)  # nothing written since: nothing to sync
            assert syncs() == before + 1
        os.close(fd)  # flush-on-close: once after a fast write, never twice
        assert syncs() == before + 1


@needs_dataplane
@pytest.mark.parametrize("mode", ["none", "writeback"])
def test_backend_errno_reaches_the_client(mounted, workdir, mode):
    """ENOSPC from the backing file (a sparse image on a full filesystem), hit by a write served in
    C: the client gets ENOSPC, the daemon counts it, and the image keeps serving."""
    fs = workdir / "small"
    fs.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", fs)
    try:
        (fs / "images").mkdir()
        with open(fs / "images" / "sparse.raw", "wb") as f:
            f.truncate(64 * MiB)
        m = mounted(fs / "images", "--cache", mode, *C_SERVES)  # C's error path and counters
        fd = os.open(m / "sparse.raw", os.O_RDWR | os.O_DIRECT)
        try:
            buf = aligned(pattern(7) * 16)  # 64 KiB
            with pytest.raises(OSError) as exc:
                for off in range(0, 64 * MiB, len(buf)):
                    os.pwrite(fd, buf, off)
            assert exc.value.errno == errno.ENOSPC, exc.value
            assert os.preadv(fd, [buf], 0) == len(buf) and buf[:BLOCK] == pattern(7)  # still serving
        finally:
            os.close(fd)
        s = image_stats(m, "sparse.raw")
        assert s["fast_errors"] >= 1 and s["fast_writes"] >= 1, s
        m.umount()
    finally:
        run("umount", "-l", fs, check=False)


@needs_dataplane
def test_a_cached_reader_sees_a_direct_writers_bytes(mounted, raw):
    """auto: plain opens are cached (writeback), O_DIRECT ones direct_io (none). While both are open
    the direct writes are forwarded, so Python drops the reader's cached pages after each."""
    m = mounted(raw, "--cache", "auto", *C_SERVES)  # C's forwarding of the direct writes
    f = m / "disk.raw"
    direct = os.open(f, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(direct, aligned(pattern(0, b"beforeXX")), 0)
        assert image_stats(m)["fast_writes"] >= 1  # alone, the direct handle writes in C
        with open(f, "rb", buffering=0) as cached:
            before = image_stats(m)
            for i in range(1, 40):
                off = (i % 8) * BLOCK
                cached.seek(off)
                cached.read(BLOCK)  # now in the reader's page cache
                os.pwrite(direct, aligned(pattern(i)), off)
                cached.seek(off)
                assert cached.read(BLOCK) == pattern(i), i
            during = image_stats(m)
            assert during["fast_writes"] == before["fast_writes"], (before, during)
            assert int(os.getxattr(m.path, "user.cachefs.invalidations")) >= 39
        # The kernel sends RELEASE after close(2) returns, in the background: wait for it.
        deadline = time.monotonic() + 10
        while os.getxattr(m.path, "user.cachefs.open_handles") != b"1" and time.monotonic() < deadline:
            time.sleep(0.01)
        os.pwrite(direct, aligned(pattern(99)), 0)
        assert image_stats(m)["fast_writes"] == during["fast_writes"] + 1  # the reader left: C again
    finally:
        os.close(direct)


@needs_dataplane
def test_live_mode_switch_under_fio(mounted, raw):
    # C's descriptors reopened under load (test_passthrough_mount.py: switches with passthrough handles).
    m = mounted(raw, "--cache", "writeback", *C_SERVES)
    f = m / "disk.raw"
    switch_modes_under_fio(m, f, number_ios=60000)
    s = image_stats(m)
    assert s["fast_writes"] > 1000 and s["fast_errors"] == 0, s
    # After the last switch the descriptor is writeback's again, and C serves it.
    fio(f, *FIO_DIRECT, "--rw=randwrite", "--bs=4k", "--size=64M", "--number_ios=60000", "--verify_only")


@over_both_transports
@needs_dataplane
@pytest.mark.parametrize("mode", ["none", "writeback"])
def test_sigint_with_writers_loses_nothing_acknowledged(mounted, raw, mode):
    # The stop must land mid-run of writes the daemon serves: passthrough writes go on without it
    # (test_passthrough_mount.py checks those survive a stop).
    m = mounted(raw, "--cache", mode, *C_SERVES)
    proc, acked, reader = start_writer(m / "disk.raw", 60000)
    wait_acked(acked)
    os.kill(m.pid, signal.SIGINT)  # "stop now" (SIGTERM would wait for the writer: issue 20)
    m._wait_daemon_gone()
    proc.wait(timeout=60)
    reader.join(timeout=60)
    assert not is_mounted(m.path)
    m.check_log()
    assert "unmounted" in m.log_text() and "cleanly" in m.log_text()
    assert 0 < len(acked) < 60000, len(acked)
    acked_blocks_are_there(raw / "disk.raw", acked)


@needs_dataplane
def test_lazy_umount_with_writers_loses_nothing(mounted, raw):
    m = mounted(raw, "--cache", "none")
    proc, acked, reader = start_writer(m / "disk.raw", 20000)
    time.sleep(0.5)
    cachefs("umount", "--lazy", m.path)  # detached: the writer keeps its file until it is done
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    reader.join(timeout=60)
    m._wait_daemon_gone()
    m.check_log()
    assert sorted(acked) == list(range(20000))
    acked_blocks_are_there(raw / "disk.raw", acked)


@needs_dataplane
def test_init_and_open_replies_are_patched(mounted, raw):
    """max_background comes from the INIT reply (no fusectl write), and direct writes to one inode run
    in parallel (FOPEN_PARALLEL_DIRECT_WRITES): without it the kernel holds the inode lock through
    each synchronous direct write, and C would never see two at once."""
    m = mounted(raw, "--cache", "none", *C_SERVES)  # C must see the writes to count them in flight
    assert fuseconn.queue_limit(str(m.path)) == 64
    assert "FUSE connection" not in m.log_text()  # the fusectl write's log line
    run("fio", "--name=par", f"--filename={m / 'disk.raw'}", "--ioengine=psync", "--direct=1", "--numjobs=8",
        "--rw=randwrite", "--bs=4k", "--size=64M", "--number_ios=1000", "--group_reporting", timeout=120)
    assert connection(m)["peak_active"] >= 2, connection(m)


def refusal(args, env=None, *, filtered=True, cwd=None):
    cmd = [sys.executable, HERE / "no_io_uring.py"] if filtered else []
    return run(*cmd, sys.executable, "-m", "cachefs.cli", "mount", *args, check=False, env=env or _env(), cwd=cwd)


@needs_dataplane
def test_refused_in_one_line_when_io_uring_is_denied(raw, workdir):
    mnt = workdir / "mnt"
    mnt.mkdir()
    log = workdir / "refused.log"
    for extra in ([], ["--dataplane", "on"]):  # the default is on: no silent fallback either way
        r = refusal([raw, mnt, "--log", log, *extra])
        assert r.returncode == 1, r.stdout + r.stderr
        assert r.stderr.strip().splitlines() == [
            "cachefs: --dataplane on is not available: io_uring_setup failed (Operation not permitted): io_uring "
            "is disabled here (sysctl kernel.io_uring_disabled, or a seccomp filter); use --dataplane off"]
        assert not is_mounted(mnt)
    assert "Traceback" not in log.read_text()
    r = refusal([raw, mnt, "--log", log, "--dataplane", "off"])  # off: pyfuse3 alone, no ring needed
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "disk.raw").stat().st_size == 256 * MiB
        assert os.getxattr(mnt, "user.cachefs.dataplane") == b"off"
    finally:
        cachefs("umount", mnt)


def test_without_the_native_module(raw, workdir):
    """A tree whose module was never built: off works, on is refused, the default says it is off."""
    src = workdir / "src"
    shutil.copytree(REPO / "cachefs", src / "cachefs", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # Found before the editable install's finder could find the real tree's module (and the CLI
    # runs from the work directory: `python -m` puts its directory first on sys.path).
    (src / "cachefs" / "native" / "_cachefs_native.py").write_text('raise ImportError("never built")\n')
    env = dict(os.environ, PYTHONPATH=str(src))
    mnt = workdir / "mnt"
    mnt.mkdir()
    log = workdir / "nomodule.log"
    r = refusal([raw, mnt, "--log", log, "--dataplane", "on"], env, filtered=False, cwd=workdir)
    if is_mounted(mnt):
        run(sys.executable, "-m", "cachefs.cli", "umount", mnt, env=env, cwd=workdir)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("cachefs: --dataplane on is not available: the native module is not built ("), r.stderr
    assert r.stderr.rstrip().endswith("; use --dataplane off"), r.stderr
    assert not is_mounted(mnt)
    for extra, warned in (([], True), (["--dataplane", "off"], False)):
        r = refusal([raw, mnt, "--log", log, *extra], env, filtered=False, cwd=workdir)
        assert r.returncode == 0, r.stderr
        try:
            lines = r.stderr.strip().splitlines()
            assert any(line.startswith("cachefs: warning: data plane off: the native module is not built")
                       for line in lines) == warned, lines
            with open(mnt / "disk.raw", "rb") as f:
                assert f.read(4096) == bytes(4096)
        finally:
            run(sys.executable, "-m", "cachefs.cli", "umount", mnt, env=env, cwd=workdir)
