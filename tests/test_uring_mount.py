"""`cachefs mount --aio io_uring`: the io_uring submitter behind a real mount.

fio with crc32c verification through a buffered mode (writeback: io_uring
serves buffered descriptors too, unlike Linux AIO) and a direct one (none,
fio itself on libaio at queue depth 32); the submitter visible in the stats;
`qemu-img check` clean and `qemu-img compare` agreeing with what the mount
served. And the refusal when the kernel will not give a ring.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cachefs import native
from conftest import _env, cachefs, is_mounted, qemu_img, run
from fiojobs import check_clean, fio

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(native.uring_available() is not None, reason=str(native.uring_available()))


@pytest.mark.parametrize("mode", ["writeback", "none"])
def test_io_uring_submitter_serves_the_mount(mounted, image, workdir, mode):
    m = mounted(image, "--cache", mode, "--aio", "io_uring")
    f = m / "vm.raw"
    direct = ["--ioengine=libaio", "--direct=1", "--iodepth=32"] if mode == "none" else ["--fsync=64"]
    fio(f, *direct, "--rw=randwrite", "--bs=4k", "--size=32M", "--number_ios=3000", "--do_verify=1")
    fio(f, *direct, "--rw=write", "--bs=1M", "--size=32M", "--offset=64M", "--do_verify=1")
    assert os.getxattr(f, "user.cachefs.stats.aio").decode() == f"{mode}:io_uring"
    # What the mount serves, for qemu-img compare once it is unmounted.
    ref = workdir / "served.raw"
    run("dd", f"if={f}", f"of={ref}", "bs=4M", "status=none")
    m.umount()
    check_clean(image / "vm.qcow2")
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", image / "vm.qcow2", ref, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_refused_in_one_line_when_the_kernel_denies_io_uring(image, workdir):
    """io_uring_setup denied by a seccomp filter (as in a Docker container):
    the mount is refused with the reason, no traceback, nothing mounted."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    log = workdir / "refused.log"
    r = run(sys.executable, HERE / "no_io_uring.py", sys.executable, "-m", "cachefs.cli", "mount", image, mnt,
            "--aio", "io_uring", "--log", log, check=False, env=_env())
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0] == (
        f"cachefs: {image / 'vm.qcow2'}: --aio io_uring is not available: io_uring_setup failed "
        "(Operation not permitted): io_uring is disabled here (sysctl kernel.io_uring_disabled, "
        "or a seccomp filter); use --aio threads"
    )
    assert not is_mounted(mnt)
    assert "Traceback" not in (log.read_text() if log.exists() else "")
    # Without the filter the same command mounts (the image itself was fine).
    cachefs("mount", image, mnt, "--aio", "io_uring", "--log", log)
    try:
        assert os.getxattr(mnt / "vm.raw", "user.cachefs.stats.aio").decode() == "writeback:io_uring"
    finally:
        cachefs("umount", mnt)
    check_clean(image / "vm.qcow2")
