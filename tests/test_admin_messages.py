"""Issue 20, defects 9 and 11: what an admin is told, done with the real tools.

Each message names the image and says why, in one line: a request the daemon
fails (a damaged range, a shrink, a name the mount cannot hold) in the log
and in `cachefs stats`; who holds an image's lock; an image that was not
closed cleanly; a name clash that appears while mounted; `cachefs create`
of a name no mount would serve; the CLI's help.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess

import pytest

from conftest import cachefs, is_mounted, qemu_img, qemu_io, run

OFFSET_MASK = 0x00FFFFFFFFFFFE00


@pytest.fixture
def images(workdir):
    d = workdir / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "vm.qcow2", "16M")
    return d


def log_lines(m, *words) -> list[str]:
    return [line for line in m.log_text().splitlines() if all(w in line for w in words)]


def stats_text(m) -> str:
    return cachefs("stats", m.path).stdout


def refused(*cmd) -> str:
    r = run(*cmd, check=False)
    assert r.returncode != 0, f"{cmd} succeeded"
    return r.stderr


# ---------------------------------------------------------------- defect 9: messages

def damage_first_l2_entry(img) -> None:
    """Set a reserved bit in the L2 entry of guest offset 0 (an allocated cluster)."""
    with open(img, "r+b") as f:
        hdr = f.read(48)
        l1_off = struct.unpack_from(">Q", hdr, 40)[0]
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & OFFSET_MASK
        f.seek(l2_off)
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry & OFFSET_MASK, "guest offset 0 must be allocated"
        f.seek(l2_off)
        f.write(struct.pack(">Q", entry | 1 << 56))


def test_failed_requests_name_the_image_and_range_in_the_log_and_stats(images, mounted):
    """A damaged range's EIO, a shrink and the names a mount cannot hold: one line each that names the
    image (and the guest range), never a Python object; `cachefs stats` shows the last one."""
    qemu_io(images / "vm.qcow2", "write -P 0x11 0 64k")
    qemu_img("create", "-q", "-f", "qcow2", images / "bad.qcow2", "16M")
    qemu_io(images / "bad.qcow2", "write -P 0x22 0 64k")
    damage_first_l2_entry(images / "bad.qcow2")
    m = mounted(images)

    assert "Input/output error" in refused("dd", f"if={m / 'bad.raw'}", "of=/dev/null", "bs=4k", "count=1",
                                           "iflag=direct", "status=none")
    lines = log_lines(m, "read of bad.raw", str(images / "bad.qcow2"))
    assert lines and "guest offset 0, 4096 bytes" in lines[0] and "damaged" in lines[0], m.log_text()

    refused("truncate", "-s", "1M", m / "vm.raw")
    lines = log_lines(m, "truncate of vm.raw", str(images / "vm.qcow2"))
    assert lines and "shrink" in lines[0] and "16777216" in lines[0] and "1048576" in lines[0], m.log_text()
    assert "object at 0x" not in m.log_text()
    assert "shrink" in stats_text(m)

    assert "not permitted" in refused("touch", m / "x.qcow2")
    assert log_lines(m, "create of x.qcow2", "EPERM", "NAME.raw")
    text = stats_text(m)
    assert "create of x.qcow2" in text and "NAME.raw" in text, text
    assert "not permitted" in refused("mv", m / "vm.raw", m / "vm.img")
    last = m.stats()["last_failure"]
    assert "rename of vm.raw to vm.img" in last and "qcow2" in last, last
    assert m.stats()["failed_requests"] == 4


def test_a_lock_held_by_another_cachefs_names_it(images, mounted):
    first = mounted(images)
    second = mounted(images)
    why = second.stats()["skipped"]["vm.raw"]
    assert f"cachefs (pid {first.pid}" in why and "QEMU" not in why, why


def test_an_image_not_closed_cleanly_is_not_called_lazy_refcounts(images, mounted):
    """A killed cachefs leaves the dirty bit of its reservation on an image without lazy refcounts."""
    m = mounted(images)
    run("dd", "if=/dev/urandom", f"of={m / 'vm.raw'}", "bs=64k", "count=4", "conv=notrunc,fsync", "status=none")
    os.kill(m.pid, signal.SIGKILL)
    m._wait_daemon_gone()
    subprocess.run(["fusermount3", "-uz", str(m.path)], capture_output=True)
    assert not is_mounted(m.path)
    with open(images / "vm.qcow2", "rb") as f:
        hdr = f.read(88)
    assert struct.unpack_from(">Q", hdr, 72)[0] & 1 and not struct.unpack_from(">Q", hdr, 80)[0] & 1
    again = mounted(images)
    lines = log_lines(again, str(images / "vm.qcow2"), "rebuilding")
    assert lines and "not closed cleanly" in lines[0] and "without lazy refcounts" in lines[0], again.log_text()
    assert "lazy-refcounts image" not in again.log_text()
    again.umount()
    qemu_img("check", images / "vm.qcow2")


# ---------------------------------------------------------------- defect 11: smaller

def test_a_name_clash_that_appears_live_is_said_once(images, mounted):
    m = mounted(images)
    with open(m / "vm.raw", "r+b") as f:  # vm.raw is open, and stays served as it was
        qemu_img("create", "-q", "-f", "raw", images / "vm.raw", "1M")
        assert os.listdir(m.path) == ["vm.raw"]
        assert os.listdir(m.path) == ["vm.raw"]  # a second scan says nothing new
        f.write(b"still served")
    assert os.getxattr(m / "vm.raw", "user.cachefs.format") == b"qcow2"
    lines = log_lines(m, "vm.qcow2", "vm.raw", "would both appear")
    assert len(lines) == 1, m.log_text()
    why = m.stats()["skipped"]["vm.raw"]
    assert str(images / "vm.raw") in why and "vm.qcow2" in why, why
    assert "not served" in stats_text(m)
    os.unlink(images / "vm.raw")
    os.listdir(m.path)
    assert m.stats()["skipped"] == {}


@pytest.mark.parametrize("args", [[], ["-f", "raw"]])
def test_create_refuses_a_name_no_mount_serves(workdir, args):
    r = cachefs("create", *args, workdir / "d", "1M", check=False)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert ".qcow2" in r.stderr and "Traceback" not in r.stderr
    assert not (workdir / "d").exists()


def test_mount_help_says_what_dataplane_and_debug_do():
    out = " ".join(cachefs("mount", "--help").stdout.split())
    dataplane = out.split("--dataplane [on|off]")[1].split("--l2-cache-size")[0]
    assert "qcow2" in dataplane and "raw images in the C data plane" not in dataplane, dataplane
    debug = out.split("--debug")[1].split("-h, --help")[0].strip()
    assert "log" in debug.lower(), debug


def test_make_venv_leaves_the_machine_wide_helpers_alone():
    """`make venv` links nothing into /sbin; `make install-helper` links both names; `make test` does too."""
    from conftest import REPO
    venv = run("make", "-n", "-C", REPO, "venv").stdout
    assert "/sbin/" not in venv, venv
    helper = run("make", "-n", "-C", REPO, "install-helper").stdout
    assert "/sbin/mount.fuse.cachefs" in helper and "/sbin/umount.fuse.cachefs" in helper, helper
    assert "/sbin/mount.fuse.cachefs" in run("make", "-n", "-C", REPO, "test").stdout
