"""Image locking seen from a real mount: QEMU's tools and cachefs keep out of each other's way.

cachefs takes QEMU's file-posix lock bytes (cachefs/image/locking.py), so QEMU's
own tools see a mounted image as "in use" and vice versa.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import qemu_img, qemu_io, run, sha256
from mounting import wait_held_by


@pytest.fixture
def images(workdir):
    d = workdir / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "vm.qcow2", "16M")
    qemu_io(d / "vm.qcow2", "write -P 0x5a 0 64k")
    qemu_img("create", "-q", "-f", "qcow2", d / "other.qcow2", "16M")
    return d


def assert_locked_out(*args):
    r = run(*args, check=False)
    assert r.returncode != 0, f"{args} succeeded while cachefs served the image"
    assert "lock" in r.stderr, r.stderr


def test_mounted_image_is_locked_against_qemu(mounted, images):
    img = images / "vm.qcow2"
    m = mounted(images)
    assert_locked_out("qemu-img", "info", img)
    assert_locked_out("qemu-io", "-c", "read 0 512", img)
    assert_locked_out("qemu-io", "-r", "-c", "read 0 512", img)
    assert_locked_out("qemu-img", "check", img)
    # The mount keeps serving while QEMU is refused.
    with open(m / "vm.raw", "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096
    m.umount()
    assert "virtual size: 16 MiB" in qemu_img("info", img).stdout
    qemu_io(img, "read -P 0x5a 0 64k")


def test_read_only_mount_lets_qemu_readers_in(mounted, images):
    img = images / "vm.qcow2"
    m = mounted(images, "-o", "ro")
    assert "virtual size: 16 MiB" in qemu_img("info", img).stdout
    r = run("qemu-io", "-r", "-c", "read -P 0x5a 0 64k", img, check=False)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
    assert_locked_out("qemu-io", "-c", "write 0 512", img)
    m.umount()


def test_image_held_by_qemu_io_is_skipped(mounted, images):
    img = images / "vm.qcow2"
    before = sha256(img)
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_held_by(proc, img)
        m = mounted(images)
        stats = m.stats()
        assert list(stats["images"]) == ["other.raw"]
        reason = stats["skipped"].get("vm.raw", "")
        assert "in use" in reason, stats["skipped"]
        assert "\n" not in reason
        with open(m / "other.raw", "r+b") as f:  # the rest of the directory is served
            f.write(b"fine")
        m.umount()
    finally:
        if proc.poll() is None:
            proc.stdin.write(b"quit\n")
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stderr.close()
    assert proc.returncode == 0
    assert sha256(img) == before
    qemu_img("check", img)
    qemu_img("check", images / "other.qcow2")
