"""Issue 5, "concurrency through the stack": a QD32 client keeps 32 requests
in flight on the backend, whichever submitter serves the mount.

Three limits stand between fio's 32 and the backing file: the FUSE kernel
module's background-request limit (12 by default; the daemon raises it
through fusectl, cachefs/fuse/queue_limit.py), pyfuse3's max_tasks, and the submitter's
depth (threads, or AIO/io_uring slots). The submitters count what they have
handed to the kernel and not yet reaped; the peak is in the stats.
"""

from __future__ import annotations

import os

import pytest

from conftest import qemu_img, qemu_io, run
from cachefs.fuse import queue_limit as fuseconn


@pytest.fixture
def filled(workdir):
    d = workdir / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "vm.qcow2", "64M")
    qemu_io(d / "vm.qcow2", "write -P 0x3c 0 32M")  # overwrites: no allocation, no write lock
    return d


@pytest.mark.parametrize("submitter", ["threads", "native", "io_uring"])
def test_qd32_reaches_the_backend(mounted, filled, submitter):
    # directsync overwrites: every backend write waits for the device (O_DSYNC),
    # so requests pile up in the daemon as far as the stack lets them. (With
    # fast reads they are answered before the next ones arrive: the peak then
    # shows that the daemon, not the device, is the bottleneck.)
    # The Python path's stack (pyfuse3 and the submitters): with the data plane on, these
    # overwrites would be served in C (its own concurrency: test_dataplane_mount.py).
    m = mounted(filled, "--aio", submitter, "--cache", "directsync", "--dataplane", "off")
    assert fuseconn.queue_limit(str(m.path)) == 64
    r = run("fio", "--name=qd32", f"--filename={m / 'vm.raw'}", "--rw=randwrite", "--bs=4k", "--size=32M",
            "--ioengine=libaio", "--iodepth=32", "--direct=1", "--number_ios=1500", "--output-format=terse",
            timeout=120)
    assert r.returncode == 0, r.stderr
    stats = m.stats()["images"]["vm.raw"]
    assert stats["stats.aio"] == f"directsync:{submitter}"
    peak = int(os.getxattr(m.path, "user.cachefs.peak_requests"))
    in_flight = int(stats["stats.directsync.peak_in_flight"])
    assert peak <= 64 and in_flight <= peak
    if submitter == "threads":
        # Every O_DSYNC write blocks its worker thread, so nothing completes
        # early: the stack's limit shows. The kernel's default of 12
        # background requests would cap both at 12; measured: 32 and 32 on an
        # idle machine, 23 with another test run beside it.
        assert peak > 12 and in_flight > 12, (peak, in_flight)
    else:
        # Linux AIO and io_uring may complete an O_DSYNC write inside the
        # submission on ext4 (measured peaks 11-32), so only the overlap is
        # asserted: more than one request on the backend at once.
        assert in_flight > 1, in_flight


def test_connection_id_from_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        "61 22 0:39 / /var/tmp/a\\040b rw,nosuid - fuse.cachefs cachefs rw,user_id=0\n"
        "62 22 0:45 / /mnt/other rw - fuse.qemu qsd rw\n"
        "63 61 8:2 / /var/tmp/a\\040b rw - fuse.cachefs cachefs rw\n"  # mounted on top: wins
    )
    assert fuseconn.connection_id("/var/tmp/a b", str(info)) == (8 << 20) | 2
    assert fuseconn.connection_id("/mnt/other", str(info)) == 45
    assert fuseconn.connection_id("/", str(info)) is None  # not FUSE
