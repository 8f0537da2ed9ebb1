"""A guest disk's size changes only by an explicit resize (issue 20, defect 7).

An admin ran one `dd` past the end of a 10 KiB raw disk and found it grown to
96 MiB. A disk is a block device to its guest: a write past its end gets
ENOSPC, a write across it is cut at the end (what `dd` to a block device does),
and only `truncate` on the served file resizes it, unless the mount says
`-o growable`. Raw and qcow2, the data plane on and off, buffered and O_DIRECT.
"""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from conftest import qemu_img, run
from mounting import C_SERVES

pytestmark = pytest.mark.both_planes

KiB, MiB = 1 << 10, 1 << 20


def dd(target, *args) -> "subprocess.CompletedProcess":  # noqa: F821
    return run("dd", "if=/dev/urandom", f"of={target}", "conv=notrunc", "status=none", *args, check=False)


def sizes(m) -> dict[str, int]:
    return {name: os.stat(m / name).st_size for name in ("small.raw", "vm.raw")}


@pytest.fixture
def images(workdir):
    d = workdir / "images"
    d.mkdir()
    (d / "small.raw").write_bytes(bytes(10 * KiB))  # the admin's 10 KiB raw disk
    qemu_img("create", "-q", "-f", "qcow2", d / "vm.qcow2", "1M")
    return d


def test_a_write_past_the_end_is_enospc(images, mounted, plane):
    m = mounted(images)
    before = sizes(m)
    for name, size in before.items():
        for direct in ([], ["oflag=direct"]):
            r = dd(m / name, "bs=64k", "count=1", f"seek={size // (64 * KiB) + 1}", *direct)
            assert r.returncode != 0 and "No space left on device" in r.stderr, (name, direct, r.stderr)
            # Across the end: written up to it, then ENOSPC, as to a block device.
            r = dd(m / name, "bs=4k", "count=4", f"seek={size // (4 * KiB) - 2}", *direct)
            assert r.returncode != 0 and "No space left on device" in r.stderr, (name, direct, r.stderr)
        # fallocate(1) past the end (the data plane serves fallocate; without it: EOPNOTSUPP).
        r = run("fallocate", "-o", size, "-l", "64k", m / name, check=False)
        assert r.returncode != 0 and (plane == "off" or "No space left on device" in r.stderr), r.stderr
    assert sizes(m) == before
    # An explicit resize still resizes, and a write inside the new size lands.
    os.truncate(m / "small.raw", 64 * KiB)
    os.truncate(m / "vm.raw", 2 * MiB)
    assert dd(m / "small.raw", "bs=4k", "count=1", "seek=15").returncode == 0
    assert dd(m / "vm.raw", "bs=64k", "count=1", "seek=31", "oflag=direct").returncode == 0
    assert sizes(m) == {"small.raw": 64 * KiB, "vm.raw": 2 * MiB}
    m.umount()
    assert (images / "small.raw").stat().st_size == 64 * KiB
    qemu_img("check", images / "vm.qcow2")
    assert '"virtual-size": 2097152' in qemu_img("info", "--output=json", images / "vm.qcow2").stdout


def test_growable_mount_grows_with_writes(images, mounted, plane):
    if plane == "off":
        pytest.skip("one plane is enough: the option is Python's")
    m = mounted(images, "-o", "growable")
    assert dd(m / "small.raw", "bs=64k", "count=1", "seek=1").returncode == 0
    assert dd(m / "vm.raw", "bs=64k", "count=1", "seek=16").returncode == 0
    assert sizes(m) == {"small.raw": 128 * KiB, "vm.raw": MiB + 64 * KiB}
    m.umount()
    qemu_img("check", images / "vm.qcow2")


def test_cache_none_writes_up_to_the_end(images, mounted, plane):
    """--cache none: every handle is direct_io, so a write across the end is cut short there, and
    what lies before the end is written (dd to a block device)."""
    if plane == "off":
        pytest.skip("the data plane forwards these writes to Python: one plane is enough")
    m = mounted(images, "--cache", "none", *C_SERVES)  # passthrough: test_passthrough_mount.py
    data = os.urandom(8 * KiB)
    fd = os.open(m / "small.raw", os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        assert os.pwritev(fd, [buf], 8 * KiB) == 2 * KiB  # 10 KiB disk: 2 KiB fit
        with pytest.raises(OSError) as ei:
            os.pwritev(fd, [buf], 16 * KiB)
        assert ei.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.stat(m / "small.raw").st_size == 10 * KiB
    m.umount()
    assert (images / "small.raw").read_bytes()[8 * KiB:] == data[:2 * KiB]
