"""The image directory is the truth (issue 9 items 1 and 3), driven through real mounts.

- a raw file that holds a qcow2 header is served raw, byte for byte: the
  format comes from the name, never from the content;
- images added to the directory appear, removed ones vanish (an open one
  keeps working until its last close), renames follow, with QEMU's lock;
- through the mount, ``qemu-img create -f raw``, ``truncate``, ``cp``,
  ``rm`` and ``mv`` make, remove and rename image files, and the images they
  leave behind pass ``qemu-img check``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import make_random_raw, qemu_img, run, sha256


def xattr(path, name: str) -> str:
    return os.getxattr(path, f"user.cachefs.{name}").decode()


def daemon_files(m) -> list[str]:
    out = []
    for n in os.listdir(f"/proc/{m.pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{m.pid}/fd/{n}"))
        except FileNotFoundError:
            pass
    return out


@pytest.fixture
def images(workdir):
    d = workdir / "images"
    d.mkdir()
    return d


def test_raw_file_with_a_qcow2_header_is_served_raw_byte_for_byte(workdir, images, mounted):
    """QEMU's format-probing hazard: a guest that writes a qcow2 header into its raw disk
    must not change what it is served (nor make us read a backing file it names)."""
    qcow2 = workdir / "a.qcow2"
    qemu_img("create", "-f", "qcow2", qcow2, "64M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", qcow2)
    shutil.copy(qcow2, images / "disguised.raw")
    shutil.copy(qcow2, images / "disguised.img")
    m = mounted(images)
    for name in ("disguised.raw", "disguised.img"):
        assert xattr(m / name, "format") == "raw"
        assert os.path.getsize(m / name) == os.path.getsize(images / name)
        assert sha256(m / name) == sha256(images / name)
    # The guest-visible bytes are the file's: the qcow2 magic, not the payload at 1M.
    with open(m / "disguised.raw", "rb") as f:
        assert f.read(4) == b"QFI\xfb"


def test_qcow2_name_with_bad_magic_is_left_out_with_a_reason(workdir, images, mounted):
    make_random_raw(images / "fake.qcow2", 1 << 20, seed=1)
    qemu_img("create", "-f", "qcow2", images / "good.qcow2", "16M")
    m = mounted(images)
    assert os.listdir(m.path) == ["good.raw"]
    skipped = json.loads(os.getxattr(m.path, "user.cachefs.skipped"))
    assert "magic" in skipped["fake.raw"]


def test_images_added_and_removed_in_the_directory_appear_and_vanish(images, mounted):
    qemu_img("create", "-f", "qcow2", images / "a.qcow2", "16M")
    m = mounted(images)
    assert os.listdir(m.path) == ["a.raw"]
    qemu_img("create", "-f", "qcow2", images / "b.qcow2", "32M")
    make_random_raw(images / "r.raw", 1 << 20, seed=2)
    assert sorted(os.listdir(m.path)) == ["a.raw", "b.raw", "r.raw"]
    assert os.path.getsize(m / "b.raw") == 32 << 20
    assert sha256(m / "r.raw") == sha256(images / "r.raw")
    os.unlink(images / "b.qcow2")
    assert sorted(os.listdir(m.path)) == ["a.raw", "r.raw"]
    with pytest.raises(FileNotFoundError):
        os.stat(m / "b.raw")  # not even from the kernel's dentry cache


def test_image_removed_while_open_keeps_working_until_last_close(images, mounted):
    make_random_raw(images / "r.raw", 1 << 20, seed=3)
    m = mounted(images)
    fd = os.open(m / "r.raw", os.O_RDWR)
    try:
        os.unlink(images / "r.raw")
        assert os.listdir(m.path) == []
        payload = os.urandom(8192)
        os.pwrite(fd, payload, 4096)
        os.fsync(fd)
        assert os.pread(fd, 8192, 4096) == payload
        assert any(t.endswith("r.raw (deleted)") for t in daemon_files(m))
    finally:
        os.close(fd)
    # At the last close the daemon flushes and closes it: no descriptor of it is left.
    # (FUSE sends RELEASE after close(2) has returned, so give it a moment.)
    deadline = time.monotonic() + 10
    while any("r.raw" in t for t in daemon_files(m)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any("r.raw" in t for t in daemon_files(m))


def test_rename_in_the_directory_keeps_inode_handle_and_path(images, mounted):
    qemu_img("create", "-f", "qcow2", images / "a.qcow2", "16M")
    m = mounted(images)
    ino = os.stat(m / "a.raw").st_ino
    fd = os.open(m / "a.raw", os.O_RDWR)
    try:
        os.rename(images / "a.qcow2", images / "b.qcow2")
        assert os.listdir(m.path) == ["b.raw"]
        assert os.stat(m / "b.raw").st_ino == ino
        assert xattr(m / "b.raw", "path") == str(images / "b.qcow2")
        os.pwrite(fd, b"x" * 4096, 0)  # the handle opened under the old name still works
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(m / "b.raw", "rb") as f:
        assert f.read(4096) == b"x" * 4096


def test_create_truncate_and_qemu_img_create_through_the_mount(images, mounted, workdir):
    m = mounted(images)
    qemu_img("create", "-f", "raw", m / "vm2.raw", "256M")
    run("truncate", "-s", "64M", m / "t.raw")
    assert sorted(os.listdir(images)) == ["t.qcow2", "vm2.qcow2"]  # qcow2 behind NAME.raw by default
    assert os.path.getsize(m / "vm2.raw") == 256 << 20
    assert os.path.getsize(m / "t.raw") == 64 << 20
    data = make_random_raw(workdir / "data", 4 << 20, seed=4)
    run("dd", f"if={data}", f"of={m / 'vm2.raw'}", "bs=1M", "seek=3", "conv=notrunc,fsync", "status=none")
    subprocess.run(["cp", data, m / "copy.raw"], check=True)  # cp = create + write
    m.umount()
    for name in ("t", "vm2", "copy"):
        assert qemu_img("check", images / f"{name}.qcow2", check=False).returncode == 0, name
    expect = workdir / "expect.raw"
    run("truncate", "-s", "256M", expect)
    run("dd", f"if={data}", f"of={expect}", "bs=1M", "seek=3", "conv=notrunc", "status=none")
    qemu_img("compare", "-f", "raw", "-F", "qcow2", expect, images / "vm2.qcow2")
    qemu_img("compare", "-f", "raw", "-F", "qcow2", data, images / "copy.qcow2")


def test_create_format_raw_makes_raw_files(images, mounted):
    m = mounted(images, "--create-format", "raw")
    run("truncate", "-s", "8M", m / "r.raw")
    run("truncate", "-s", "4M", m / "i.img")
    assert sorted(os.listdir(images)) == ["i.img", "r.raw"]
    assert os.path.getsize(images / "r.raw") == 8 << 20
    assert xattr(m / "r.raw", "format") == "raw"


def test_rm_and_mv_through_the_mount_move_the_image_and_its_lock(images, mounted, workdir):
    qemu_img("create", "-f", "qcow2", images / "a.qcow2", "16M")
    qemu_img("create", "-f", "qcow2", images / "gone.qcow2", "16M")
    m = mounted(images)
    os.unlink(m / "gone.raw")
    assert not (images / "gone.qcow2").exists()
    os.rename(m / "a.raw", m / "b.raw")
    assert sorted(os.listdir(images)) == ["b.qcow2"]
    assert os.listdir(m.path) == ["b.raw"]
    # The OFD lock moved with the file: QEMU still cannot open it under its new name.
    r = qemu_img("info", images / "b.qcow2", check=False)
    assert r.returncode != 0 and "lock" in r.stderr
    with pytest.raises(OSError) as exc:
        os.rename(m / "b.raw", m / "b.img")  # a qcow2 image shows only as NAME.raw
    assert exc.value.errno == errno.EPERM
    m.umount()
    qemu_img("check", images / "b.qcow2")


@pytest.mark.parametrize("op", ["mkdir", "link", "symlink"])
def test_what_a_directory_of_images_cannot_hold_is_eperm_not_enosys(images, mounted, op):
    qemu_img("create", "-f", "qcow2", images / "a.qcow2", "16M")
    m = mounted(images)
    calls = {"mkdir": lambda: os.mkdir(m / "d"), "link": lambda: os.link(m / "a.raw", m / "b.raw"),
             "symlink": lambda: os.symlink("a.raw", m / "s.raw")}
    with pytest.raises(OSError) as exc:
        calls[op]()
    assert exc.value.errno in (errno.EPERM, errno.ENOTSUP)
