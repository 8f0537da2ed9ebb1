"""Ten overlays on one base through a real mount (issue 22): the base is opened once for all of
them, refuses a writer while they are open, and never changes. With the data plane on (the
default): its reads of the base are C's, its copy-on-write Python's."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess

import pytest

from conftest import make_random_raw, qemu_img, sha256
from interop import check_clean

MiB = 1 << 20


def _fds_on(pid: int, path) -> int:
    """How many of the daemon's descriptors are open on ``path``."""
    real, n = os.path.realpath(path), 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == real
    return n


def test_ten_overlays_share_one_open_base(workdir, mounted):
    """Ten overlays on one base, written at once by fio with verify: the base is opened once (its
    descriptors do not grow with its overlays), refuses a writer meanwhile, and never changes."""
    d = workdir / "images"
    d.mkdir()
    make_random_raw(d / "base.raw", 32 * MiB, 11)
    for i in range(10):
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", d / f"vm{i}.qcow2", str(32 * MiB))
    before = sha256(d / "base.raw")
    m = mounted(d, "--cache", "none")
    alone = _fds_on(m.pid, d / "base.raw")
    # Every overlay held open by the test too, so all ten are open at once however fast a fio ends.
    held = [os.open(m / f"vm{i}.raw", os.O_RDONLY) for i in range(10)]
    jobs = [subprocess.Popen(["fio", "--name=j", f"--filename={m / f'vm{i}.raw'}", "--rw=randwrite", "--bs=4k",
                              "--size=8M", "--direct=1", "--ioengine=libaio", "--iodepth=8", "--verify=crc32c",
                              "--verify_state_save=0", f"--randseed={i + 1}"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir)
            for i in range(10)]
    try:
        assert int(os.getxattr(m.path, "user.cachefs.open_handles")) >= 10
        with pytest.raises(OSError) as info:
            os.close(os.open(m / "base.raw", os.O_RDWR))
        assert info.value.errno == errno.EBUSY
        users = json.loads(os.getxattr(m / "base.raw", "user.cachefs.backing_users"))
        assert sorted(users) == [f"vm{i}.qcow2" for i in range(10)]
        assert _fds_on(m.pid, d / "base.raw") == alone, "the base was opened again for its overlays"
    finally:
        outs = [j.communicate(timeout=180)[0] for j in jobs]
        for fd in held:
            os.close(fd)
    for i, (j, out) in enumerate(zip(jobs, outs)):
        assert j.returncode == 0 and "err= 0" in out and "verify" not in out.lower().replace("verify_", ""), \
            f"fio on vm{i}.raw:\n{out}"
    m.umount()
    for i in range(10):
        check_clean(d / f"vm{i}.qcow2")
    assert sha256(d / "base.raw") == before
