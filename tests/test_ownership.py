"""Ownership and permissions (issue 9 item 4), on real mounts with a real unprivileged user.

A VM that runs as an unprivileged user (libvirt's ``qemu``) must be able to
open its disk, and nobody else may. So ``stat`` shows the image file's own
owner, group, modes and times; chmod, chown and utimens through the mount
change the image file; ``-o allow_other`` lets other users in, with
``default_permissions`` so the kernel checks those modes; ``uid=``, ``gid=``
and ``umask=`` override what is shown, as in sshfs.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import cachefs, qemu_img

NOBODY = 65534


def as_nobody(*cmd) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *map(str, cmd)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def open_dir():
    """A directory every user can walk into (pytest's tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="cachefs-own-", dir="/var/tmp"))
    d.chmod(0o755)
    (d / "images").mkdir()
    (d / "mnt").mkdir()
    qemu_img("create", "-f", "qcow2", d / "images" / "vm.qcow2", "16M")
    yield d
    if os.path.ismount(d / "mnt"):
        cachefs("umount", d / "mnt", check=False)
        subprocess.run(["fusermount3", "-uz", str(d / "mnt")], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def mount(d: Path, *args) -> Path:
    cachefs("mount", d / "images", d / "mnt", "--log", d / "log", *args)
    return d / "mnt"


def test_stat_shows_the_image_files_owner_modes_and_times(open_dir):
    img = open_dir / "images" / "vm.qcow2"
    os.chown(img, 1234, 2345)
    os.chmod(img, 0o640)
    os.utime(img, ns=(1_500_000_000_000_000_000, 1_600_000_000_000_000_000))
    st = os.stat(mount(open_dir) / "vm.raw")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o640)
    assert st.st_mtime_ns == 1_600_000_000_000_000_000


def test_chmod_chown_and_touch_through_the_mount_change_the_image_file(open_dir):
    f = mount(open_dir) / "vm.raw"
    subprocess.run(["chmod", "600", f], check=True)
    subprocess.run(["chown", f"{NOBODY}:{NOBODY}", f], check=True)
    subprocess.run(["touch", "-d", "2020-01-02 03:04:05 UTC", f], check=True)
    img = os.stat(open_dir / "images" / "vm.qcow2")
    assert (img.st_uid, img.st_gid, stat.S_IMODE(img.st_mode)) == (NOBODY, NOBODY, 0o600)
    assert img.st_mtime == 1577934245
    shown = os.stat(f)
    assert (shown.st_uid, shown.st_gid, stat.S_IMODE(shown.st_mode), shown.st_mtime) == \
        (NOBODY, NOBODY, 0o600, 1577934245)


def test_other_users_get_in_only_with_allow_other_and_only_as_the_modes_say(open_dir):
    img = open_dir / "images" / "vm.qcow2"
    os.chmod(img, 0o644)
    mnt = mount(open_dir)
    r = as_nobody("head", "-c", "512", mnt / "vm.raw")
    assert r.returncode != 0 and "Permission denied" in r.stderr  # FUSE keeps other users out
    cachefs("umount", mnt)

    mnt = mount(open_dir, "-o", "allow_other")
    r = as_nobody("head", "-c", "512", mnt / "vm.raw")
    assert r.returncode == 0 and len(r.stdout) == 512 and r.stdout == "\0" * 512
    r = as_nobody("dd", "if=/dev/zero", f"of={mnt / 'vm.raw'}", "bs=4k", "count=1", "conv=notrunc")
    assert r.returncode != 0 and "Permission denied" in r.stderr  # 0644 root: read, not write
    os.chown(mnt / "vm.raw", NOBODY, NOBODY)  # the VM's user owns its disk: now it may write
    r = as_nobody("dd", "if=/dev/urandom", f"of={mnt / 'vm.raw'}", "bs=4k", "count=1", "conv=notrunc,fsync")
    assert r.returncode == 0, r.stderr
    os.chmod(mnt / "vm.raw", 0o600)
    os.chown(mnt / "vm.raw", 0, 0)
    r = as_nobody("head", "-c", "1", mnt / "vm.raw")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    cachefs("umount", mnt)
    assert qemu_img("check", img, check=False).returncode == 0


def test_uid_gid_umask_options_override_what_is_shown(open_dir):
    mnt = mount(open_dir, "-o", f"uid={NOBODY},gid={NOBODY},umask=077,allow_other")
    st = os.stat(mnt / "vm.raw")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
    r = as_nobody("head", "-c", "16", mnt / "vm.raw")
    assert r.returncode == 0, r.stderr


def test_only_the_owner_or_root_may_switch_the_cache_mode(open_dir):
    mnt = mount(open_dir, "-o", "allow_other")
    f = mnt / "vm.raw"
    os.chmod(f, 0o666)  # anyone may write the data; the mode is still the owner's promise
    r = as_nobody("setfattr", "-n", "user.cachefs.cache", "-v", "unsafe", f)
    assert r.returncode != 0 and "not permitted" in r.stderr
    assert os.getxattr(f, "user.cachefs.cache") == b"writeback"
    os.chown(f, NOBODY, NOBODY)
    r = as_nobody("setfattr", "-n", "user.cachefs.cache", "-v", "writethrough", f)
    assert r.returncode == 0, r.stderr
    assert os.getxattr(f, "user.cachefs.cache") == b"writethrough"


def test_created_images_belong_to_their_creator(open_dir):
    os.chmod(open_dir / "images", 0o777)
    mnt = mount(open_dir, "-o", "allow_other")
    r = as_nobody("truncate", "-s", "8M", mnt / "mine.raw")
    assert r.returncode == 0, r.stderr
    st = os.stat(open_dir / "images" / "mine.qcow2")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    with pytest.raises(OSError) as exc:
        os.mkdir(mnt / "dir")
    assert exc.value.errno == errno.EPERM
