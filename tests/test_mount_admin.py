"""What an admin tried and what went wrong (issue 20, defects 1, 4 and 5), on real mounts.

- ``cachefs mount DIR DIR``, or an image directory inside the mountpoint, is
  refused in one line (it used to hang the machine's lookups until an abort
  through fusectl); a mountpoint inside the image directory works;
- everything that can fail is checked before mounting (``--pid-file`` in a
  missing directory used to mount, then fail and leave a dead mountpoint),
  and a dead mountpoint is named as such, with how to clear it;
- an image directory on a read-only filesystem is served read-only, with one
  warning that says so, on stderr, in the log and in ``stats``.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from cachefs.cli import preflight

from conftest import cachefs, is_mounted, one_line_error, qemu_img, run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="read-only bind mounts and fusectl need root")


@pytest.fixture
def images(workdir) -> Path:
    d = workdir / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "vm.qcow2", "16M")
    return d


def in_mountinfo(path: Path) -> bool:
    """Whether something is mounted at ``path``, without a stat (a hung self-mount would not answer)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def abort_fuse(path: Path) -> None:
    """The only way out of a self-mount: abort its connection (fusectl), then detach it."""
    with open("/proc/self/mountinfo") as f:
        devs = [line.split()[2] for line in f if line.split()[4] == str(path) and " fuse" in line]
    for dev in devs:
        abort = Path(f"/sys/fs/fuse/connections/{dev.split(':')[1]}/abort")
        if abort.exists():
            abort.write_text("1")
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def cleanup():
    """Paths to abort and detach after the test, whatever it did (a refused mount leaves none)."""
    paths: list[Path] = []
    yield paths.append
    left = [p for p in paths if in_mountinfo(p)]
    for p in left:
        abort_fuse(p)
    assert not left, f"left mounted: {left}"


# ---------------------------------------------------------------- defect 1: the mount inside itself

@pytest.mark.parametrize("where", ["same", "same-via-symlink", "images-inside-mountpoint"])
def test_image_directory_in_the_mountpoint_is_refused(workdir, images, cleanup, where):
    if where == "same":
        image_dir, mnt = images, images
    elif where == "same-via-symlink":
        (workdir / "link").symlink_to(images)
        image_dir, mnt = workdir / "link", images
    else:
        image_dir, mnt = images, workdir
    cleanup(mnt)
    r = cachefs("mount", image_dir, mnt, "--log", workdir.parent / f"{workdir.name}.log", check=False, timeout=30)
    line = one_line_error(r)
    assert not in_mountinfo(mnt)
    assert str(images) in line and "inside" in line and str(mnt) in line, line


def test_mountpoint_inside_the_image_directory_works(workdir, images, mounted):
    (images / "mnt").mkdir()
    r = cachefs("mount", images, images / "mnt", "--log", workdir / "log")
    try:
        assert "Traceback" not in r.stderr
        assert sorted(os.listdir(images / "mnt")) == ["vm.raw"]
        with open(images / "mnt" / "vm.raw", "r+b") as f:
            f.write(b"inside" * 100)
    finally:
        cachefs("umount", images / "mnt")
    qemu_img("check", images / "vm.qcow2")


# ---------------------------------------------------------------- defect 4: checks before mounting

@pytest.mark.parametrize("mistake", ["pid-file-missing-dir", "pid-file-read-only-dir"])
def test_what_can_fail_is_checked_before_mounting(workdir, images, cleanup, mistake):
    mnt = workdir / "mnt"
    mnt.mkdir()
    cleanup(mnt)
    pid_dir = workdir / "nodir" if mistake == "pid-file-missing-dir" else Path("/proc/sys")
    r = cachefs("mount", images, mnt, "--log", workdir / "log", "--pid-file", pid_dir / "cachefs.pid", check=False)
    line = one_line_error(r)
    assert str(pid_dir / "cachefs.pid") in line and "pid file" in line, line
    assert not is_mounted(mnt)
    assert "Traceback" not in ((workdir / "log").read_text() if (workdir / "log").exists() else "")


def test_remounting_over_a_dead_mount_names_it_and_how_to_clear_it(workdir, images, mounted):
    m = mounted(images)
    os.kill(m.pid, 9)  # the daemon is gone; the kernel's mount stays, dead
    m._wait_daemon_gone()
    with pytest.raises(OSError) as info:
        os.statvfs(m.path)  # what ls and df get (a stat may still answer from the kernel's cached attributes)
    assert info.value.errno in preflight.DEAD  # ECANCELED: over the ring, before the kernel's teardown
    for cmd in (["cachefs", "mount", images, m.path],
                ["mount", "-t", "fuse.cachefs", images, m.path]):
        r = cachefs(*cmd[1:], check=False) if cmd[0] == "cachefs" else run(*cmd, check=False)
        line = one_line_error(r)
        assert f"{m.path}: a dead cachefs mount" in line, line
        assert f"cachefs umount {m.path}" in line and f"fusermount3 -u {m.path}" in line, line
    cachefs("umount", m.path)  # what the message says clears it
    assert not is_mounted(m.path)


# ---------------------------------------------------------------- defect 5: a read-only image directory

@pytest.fixture
def read_only_images(workdir, images):
    """``images`` again, through a read-only bind mount."""
    ro = workdir / "ro-images"
    ro.mkdir()
    run("mount", "--bind", images, ro)
    try:
        run("mount", "-o", "remount,bind,ro", ro)
        yield ro
    finally:
        run("umount", ro)


def test_read_only_image_directory_is_served_read_only(workdir, read_only_images, mounted):
    mnt = workdir / "mnt"
    mnt.mkdir()
    r = cachefs("mount", read_only_images, mnt, "--log", workdir / "log")
    try:
        warnings = [line for line in r.stderr.splitlines() if "warning" in line]
        assert len(warnings) == 1 and str(read_only_images) in warnings[0], r.stderr
        assert "read-only" in warnings[0] and "-o ro" in warnings[0], warnings
        assert os.listdir(mnt) == ["vm.raw"]
        assert open(mnt / "vm.raw", "rb").read(512) == bytes(512)
        for attempt in (lambda: open(mnt / "vm.raw", "r+b"), lambda: open(mnt / "new.raw", "wb")):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS
        assert os.getxattr(mnt / "vm.raw", "user.cachefs.writable") == b"false"
        assert b"read-only filesystem" in os.getxattr(mnt / "vm.raw", "user.cachefs.read_only_reason")
        stats = json.loads(cachefs("stats", mnt, "--json").stdout)
        assert "read-only" in stats["read_only"] and str(read_only_images) in stats["read_only"], stats
        assert "read-only" in (workdir / "log").read_text()
    finally:
        cachefs("umount", mnt)
