"""`cachefs mount --aio native`: the Linux AIO submitter behind a real mount.

fio with crc32c verification at queue depth 32 (libaio, O_DIRECT) through
each direct mode, the submitter visible in the stats, the image clean after;
and the refusals a user can hit.
"""

from __future__ import annotations

import os

import pytest

from conftest import cachefs, qemu_img
from fiojobs import check_clean, fio


@pytest.mark.parametrize("mode", ["none", "directsync", "auto"])
def test_native_submitter_serves_direct_descriptors(mounted, image, mode):
    m = mounted(image, "--cache", mode, "--aio", "native")
    f = m / "vm.raw"
    fio(f, "--ioengine=libaio", "--direct=1", "--iodepth=32", "--rw=randwrite", "--bs=4k", "--size=32M",
        "--number_ios=3000", "--do_verify=1")
    fio(f, "--ioengine=libaio", "--direct=1", "--iodepth=8", "--rw=write", "--bs=1M", "--size=32M",
        "--offset=64M", "--do_verify=1")
    submitters = os.getxattr(f, "user.cachefs.stats.aio").decode()
    direct = "none" if mode == "auto" else mode
    assert f"{direct}:native" in submitters.split(","), submitters
    assert all(s.endswith(":native") or not s.startswith(("none", "directsync")) for s in submitters.split(","))
    m.umount()
    check_clean(image / "vm.qcow2")


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
