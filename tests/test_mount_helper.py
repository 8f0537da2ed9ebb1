"""mount(8), fstab and mount.fuse.cachefs: real mounts made by util-linux's mount, not by our CLI.

mount(8) runs /sbin/mount.fuse.cachefs, which `make install-helper` (and so
`make test`) links to the venv of the tree under test. The helper is the
editable install, so it runs this tree's code.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cachefs, is_mounted, run
from lowerfs import faulty  # noqa: F401  (a fixture: the image directory on faultyfs)

HELPER = Path("/sbin/mount.fuse.cachefs")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) of a FUSE type needs root")


@pytest.fixture(scope="module", autouse=True)
def helper_is_this_tree():
    ours = Path(sys.executable).parent / "mount.fuse.cachefs"
    if not ours.exists() or not HELPER.exists() or HELPER.resolve() != ours.resolve():
        pytest.fail(f"{HELPER} does not lead to {ours}; run `make install-helper` in this tree")


@pytest.fixture
def images(workdir) -> Path:
    d = workdir / "imgs"
    d.mkdir()
    cachefs("create", d / "x.qcow2", "16M")
    return d


@pytest.fixture
def mnt(workdir):
    """A mountpoint that is unmounted again whatever the test did."""
    m = workdir / "mnt"
    m.mkdir()
    yield m
    if is_mounted(m):
        cachefs("umount", m, check=False, timeout=60)
    if is_mounted(m):  # the last resort, so that no dead mount outlives the test
        subprocess.run(["fusermount3", "-uz", str(m)], capture_output=True)
        pytest.fail(f"cachefs umount left {m} mounted")


def xattr(path, name: str) -> str:
    return run("getfattr", "--only-values", "-n", name, path).stdout


def no_traceback(log: Path) -> None:
    assert "Traceback" not in (log.read_text() if log.exists() else "")


def test_mount_t_fuse_cachefs(images, mnt, workdir):
    log = workdir / "cachefs.log"
    run("mount", "-t", "fuse.cachefs", images, mnt, "-o", f"cache=none,aio=native,log={log}")
    assert is_mounted(mnt)
    assert run("findmnt", "-n", "-o", "FSTYPE", mnt).stdout.strip() == "fuse.cachefs"
    assert xattr(mnt / "x.raw", "user.cachefs.cache") == "none"
    assert "none:native" in xattr(mnt / "x.raw", "user.cachefs.stats.aio").split(",")
    run("dd", "if=/dev/urandom", f"of={mnt / 'x.raw'}", "bs=64k", "count=4", "oflag=direct", "conv=notrunc")
    cachefs("umount", mnt)
    assert not is_mounted(mnt)
    no_traceback(log)
    run("qemu-img", "check", images / "x.qcow2")


def test_fstab_line(images, mnt, workdir):
    log = workdir / "cachefs.log"
    fstab = workdir / "fstab"
    fstab.write_text(f"# the README's line, plus a log in the test's directory\n"
                     f"{images} {mnt} fuse.cachefs cache=writeback,nofail,log={log} 0 0\n")
    run("mount", "--fstab", fstab, mnt)
    assert xattr(mnt / "x.raw", "user.cachefs.cache") == "writeback"
    with open(mnt / "x.raw", "r+b") as f:
        f.write(b"fstab" * 1000)
    cachefs("umount", mnt)
    assert not is_mounted(mnt)
    no_traceback(log)
    run("qemu-img", "check", images / "x.qcow2")


@pytest.mark.parametrize("who", ["user", "users"])
def test_fstab_line_with_user(images, mnt, workdir, who):
    """Issue 20 defect 9: mount(8) turns fstab's `user` into noexec,nosuid,nodev, which the helper is
    given instead; the mount honours them (it was refused, naming a noexec the admin never typed)."""
    fstab = workdir / "fstab"
    fstab.write_text(f"{images} {mnt} fuse.cachefs {who},noauto,log={workdir / 'log'} 0 0\n")
    r = run("mount", "--fstab", fstab, mnt, check=False)
    assert r.returncode == 0, r.stderr
    assert "noexec" in run("findmnt", "-n", "-o", "OPTIONS", mnt).stdout.split(",")
    assert os.listdir(mnt) == ["x.raw"]
    cachefs("umount", mnt)
    no_traceback(workdir / "log")


def test_cachefs_hash_source_and_ro(images, mnt, workdir):
    """The `cachefs#SRC` spelling mount.fuse3 users know; ro from the fstab line reaches every image."""
    fstab = workdir / "fstab"
    fstab.write_text(f"cachefs#{images} {mnt} fuse.cachefs ro,log={workdir / 'log'} 0 0\n")
    run("mount", "--fstab", fstab, mnt)
    with pytest.raises(OSError) as info:
        open(mnt / "x.raw", "r+b")
    assert info.value.errno == errno.EROFS
    assert open(mnt / "x.raw", "rb").read(512) == bytes(512)


@pytest.mark.parametrize("opt,words", [
    ("bogus", "unknown mount option"),
    ("noatime", "not supported"),
    ("cache=fast", "choose one of"),
    ("uid=nosuchuser-cachefs", "no such user"),
])
def test_refused_option_leaves_no_mount(images, mnt, opt, words):
    r = run("mount", "-t", "fuse.cachefs", images, mnt, "-o", f"cache=none,{opt}", check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"-o {opt}: {words}" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not is_mounted(mnt)


def test_fake_and_verbose_and_sloppy(images, mnt):
    """mount -f checks everything and mounts nothing; -v says why an option has no effect; -s drops unknowns."""
    r = run("mount", "-fsv", "-t", "fuse.cachefs", images, mnt, "-o", "cache=none,nofail,frobnicate")
    assert "nofail: no effect here" in r.stderr and "frobnicate" in r.stderr
    assert not is_mounted(mnt)


def test_cli_flag_and_option_must_agree(images, mnt):
    r = cachefs("mount", images, mnt, "--cache", "none", "-o", "cache=writeback", check=False)
    assert r.returncode == 2 and r.stderr.strip() == "cachefs: --cache none and -o cache=writeback disagree; give one of them"
    assert not is_mounted(mnt)


UMOUNT_HELPER = Path("/sbin/umount.fuse.cachefs")


def test_umount_waits_until_the_images_are_closed(faulty, mnt, workdir):
    """Issue 20 defect 8: plain umount (fstab's, systemd .mount units') returns once the daemon has
    flushed, closed every image and let go of QEMU's locks, so qemu-img on the next line works.

    umount(8) runs /sbin/umount.fuse.cachefs (`make install-helper` links it, as mount.fuse.cachefs); the
    kernel's unmount alone returns before the daemon has even seen it. The image directory is a
    faultyfs passthrough whose fsyncs take a second, so the final flush is slow every time.
    """
    ours = Path(sys.executable).parent / "mount.fuse.cachefs"
    if not UMOUNT_HELPER.exists() or UMOUNT_HELPER.resolve() != ours.resolve():
        pytest.fail(f"{UMOUNT_HELPER} does not lead to {ours}; run `make install-helper` in this tree")
    log = workdir / "cachefs.log"
    run("qemu-img", "create", "-q", "-f", "qcow2", workdir / "src" / "vm.qcow2", "64M")
    lower = faulty()
    img = lower.path / "vm.qcow2"
    run("mount", "-t", "fuse.cachefs", lower.path, mnt, "-o", f"cache=writeback,log={log}")
    pid = int(os.getxattr(mnt, "user.cachefs.pid"))
    with open(mnt / "vm.raw", "rb") as held:  # busy: refused as umount(8) refuses, and still served
        r = run("umount", mnt, check=False)
        assert r.returncode == 32 and "target is busy" in r.stderr and "umount -l" in r.stderr, r.stderr
        assert is_mounted(mnt) and held.read(4) == bytes(4)
    run("dd", "if=/dev/urandom", f"of={mnt / 'vm.raw'}", "bs=1M", "count=4", "conv=notrunc", "status=none")
    lower.arm(slow_fsync=[1.0, 10])
    run("umount", mnt)  # absolute, as fstab and systemd give it
    daemon_left = running(pid)
    for args in (["check", img], ["info", img]):
        r = run("qemu-img", *args, check=False)
        assert r.returncode == 0 and "lock" not in r.stderr, f"qemu-img {args[0]} right after umount: {r.stderr}"
    assert not daemon_left, "umount returned while the daemon was still flushing and holding the images' locks"
    assert lower.state()["slow_fsyncs"] > 0
    no_traceback(log)


def running(pid: int) -> bool:
    """Alive and not a zombie (the daemon's parent, mount.fuse.cachefs, is gone: init reaps it when it will)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_umount_of_another_filesystem_sent_to_the_helper_by_a_stale_entry(workdir):
    """A daemon killed and its mount cleared with fusermount3 leaves its utab entry (cachefs/fuse/utab.py);
    a tmpfs mounted there later must still unmount with plain umount, and the entry go."""
    from cachefs.fuse import utab
    target = workdir / "t"
    target.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", target)
    try:
        utab.register("/nowhere", str(target))  # as the killed daemon left it
        assert str(target) in Path(utab.UTAB).read_text()
        run("umount", target)
        assert not is_mounted(target)
        assert str(target) not in Path(utab.UTAB).read_text()
    finally:
        if is_mounted(target):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
        utab.unregister(str(target))
