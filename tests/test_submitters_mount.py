"""`cachefs mount --aio native` and `--aio io_uring`: the native submitters behind a real mount.

fio with crc32c verification through each mode a submitter serves (Linux AIO:
the direct ones, none, directsync and auto's O_DIRECT opens, fio on libaio at
queue depth 32; io_uring: a buffered mode, writeback, too); the submitter
visible in the stats; `qemu-img check` clean and `qemu-img compare` agreeing
with what the mount served. And the refusals a user can hit: native AIO for
a buffered mode, io_uring where the kernel will not give a ring. Where the
native module has no liburing the io_uring cases are skipped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cachefs import native
from conftest import _env, cachefs, is_mounted, qemu_img, run
from fiojobs import fio
from interop import check_clean

HERE = Path(__file__).resolve().parent

needs_uring = pytest.mark.skipif(native.uring_available() is not None, reason=str(native.uring_available()))


def fio_options(mode: str) -> tuple[list[str], list[str]]:
    """The random and the sequential job's options: O_DIRECT on libaio for a direct mode (auto opens
    O_DIRECT), fsyncs every 64 writes for a buffered one."""
    if mode == "writeback":
        return ["--fsync=64"], ["--fsync=64"]
    return (["--ioengine=libaio", "--direct=1", "--iodepth=32"],
            ["--ioengine=libaio", "--direct=1", "--iodepth=8"])


@pytest.mark.parametrize("aio,mode", [
    ("native", "none"), ("native", "directsync"), ("native", "auto"),
    pytest.param("io_uring", "writeback", marks=needs_uring), pytest.param("io_uring", "none", marks=needs_uring),
])
def test_native_submitter_serves_the_mount(mounted, image, workdir, aio, mode):
    m = mounted(image, "--cache", mode, "--aio", aio)
    f = m / "vm.raw"
    random_job, sequential_job = fio_options(mode)
    fio(f, *random_job, "--rw=randwrite", "--bs=4k", "--size=32M", "--number_ios=3000", "--do_verify=1")
    fio(f, *sequential_job, "--rw=write", "--bs=1M", "--size=32M", "--offset=64M", "--do_verify=1")
    submitters = os.getxattr(f, "user.cachefs.stats.aio").decode()
    served = "none" if mode == "auto" else mode
    assert f"{served}:{aio}" in submitters.split(","), submitters
    # Every direct descriptor uses the submitter (native AIO serves only those).
    assert all(s.endswith(f":{aio}") or not s.startswith(("none", "directsync")) for s in submitters.split(","))
    if mode != "auto":
        assert submitters == f"{mode}:{aio}"
    # What the mount serves, for qemu-img compare once it is unmounted.
    ref = workdir / "served.raw"
    run("dd", f"if={f}", f"of={ref}", "bs=4M", "status=none")
    m.umount()
    check_clean(image / "vm.qcow2")
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", image / "vm.qcow2", ref, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_native_submitter_needs_a_direct_mode(image, workdir):
    mnt = workdir / "mnt"
    mnt.mkdir()
    r = cachefs("mount", image, mnt, "--cache", "writeback", "--aio", "native", check=False)
    assert r.returncode == 2 and "--aio native needs O_DIRECT" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    with open("/proc/mounts") as f:
        assert str(mnt) not in f.read()


def test_threads_stay_the_default(mounted, image):
    m = mounted(image, "--cache", "none")
    f = m / "vm.raw"
    with open(f, "r+b", buffering=0) as g:
        g.write(b"t" * 4096)
    assert os.getxattr(f, "user.cachefs.stats.aio").decode() == "none:threads"
    m.umount()
    assert qemu_img("check", image / "vm.qcow2", check=False).returncode == 0


@needs_uring
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
