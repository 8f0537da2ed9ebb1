"""The mount's life as an admin lives it (issue 9 items 2, 5 and 6), on real mounts.

- one mount per mountpoint: a second one is refused in one line;
- ``cachefs umount`` of a busy mount refuses as umount(8) does, names the
  holder and leaves the mount working; ``--lazy`` is the explicit opt-in;
- SIGTERM unmounts as umount does, refused while a file is open (the mount
  keeps serving); SIGINT flushes, logs the handles that were open, and detaches;
- ``--pid-file`` and systemd's readiness protocol (READY=1 on $NOTIFY_SOCKET);
- every mistake is one line on stderr, never a traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import _env, cachefs, is_mounted, one_line_error, qemu_img, qemu_io


@pytest.fixture
def images(workdir):
    d = workdir / "images"
    d.mkdir()
    qemu_img("create", "-f", "qcow2", d / "vm.qcow2", "64M")
    return d


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                return
        time.sleep(0.02)


def test_second_mount_on_a_live_mountpoint_is_refused(images, mounted):
    m = mounted(images)
    r = cachefs("mount", images, m.path, check=False)
    line = one_line_error(r)
    assert "already a mount point" in line and "fuse.cachefs" in line
    with open("/proc/self/mountinfo") as f:
        assert sum(line.split()[4] == str(m.path) for line in f) == 1
    assert os.listdir(m.path) == ["vm.raw"]


def test_umount_of_a_busy_mount_refuses_and_leaves_it_working(images, mounted):
    m = mounted(images)
    holder = subprocess.Popen(["sleep", "60"], stdin=open(m / "vm.raw", "rb"))
    try:
        r = cachefs("umount", m.path, check=False)
        assert r.returncode == 32
        line = one_line_error(r)
        assert "target is busy" in line and f"sleep [{holder.pid}]" in line
        assert is_mounted(m.path)
        with open(m / "vm.raw", "r+b") as f:  # still served, reads and writes
            f.write(b"still here")
            f.flush()
            os.fsync(f.fileno())
    finally:
        holder.kill()
        holder.wait()
    m.umount()  # fails the test unless it unmounts now
    assert not is_mounted(m.path)
    assert qemu_io(images / "vm.qcow2", "read -P 0x73 0 1").returncode == 0  # 's'


def test_lazy_umount_serves_open_files_until_their_last_close(images, mounted):
    m = mounted(images)
    f = open(m / "vm.raw", "r+b", buffering=0)
    try:
        r = cachefs("umount", "--lazy", m.path, check=False)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(m.path)
        os.pwrite(f.fileno(), b"\x42" * 4096, 1 << 20)  # the detached mount still serves its open file
        os.fsync(f.fileno())
        assert os.path.exists(f"/proc/{m.pid}")
    finally:
        f.close()
    wait_gone(m.pid)
    assert qemu_img("check", images / "vm.qcow2", check=False).returncode == 0
    qemu_io(images / "vm.qcow2", "read -P 0x42 1M 4k")
    m.check_log()


def test_sigterm_refuses_a_busy_mount_and_sigint_detaches_it(images, mounted):
    """SIGTERM (systemd's stop, kill's default) unmounts as umount(8) does: refused while a file is open,
    and serving goes on (issue 20 defect 3). SIGINT (Ctrl-C) is "stop now": flush, log, detach."""
    m = mounted(images)
    f = open(m / "vm.raw", "r+b", buffering=0)
    try:
        os.kill(m.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "SIGTERM: not unmounting" not in m.log_text():
            assert time.monotonic() < deadline, m.log_text()
            time.sleep(0.05)
        assert "target is busy (in use by " in m.log_text() and "open: vm.raw opened by pid" in m.log_text()
        assert is_mounted(m.path) and os.path.exists(f"/proc/{m.pid}")
        os.pwrite(f.fileno(), b"\x17" * 65536, 2 << 20)  # still served; no fsync: SIGINT must flush it
        os.kill(m.pid, signal.SIGINT)
        wait_gone(m.pid)
    finally:
        try:
            f.close()
        except OSError:
            pass  # the connection is gone
    assert not is_mounted(m.path)
    log = m.log_text()
    assert "open at stop: vm.raw opened by pid" in log and "read-write" in log
    assert qemu_img("check", images / "vm.qcow2", check=False).returncode == 0
    qemu_io(images / "vm.qcow2", "read -P 0x17 2M 64k")


def test_pid_file_and_systemd_readiness(images, workdir):
    """Type=notify: READY=1 once the mount is live, STOPPING=1 at SIGTERM; the pid file lives meanwhile."""
    mnt, pid_file, sock_path = workdir / "mnt", workdir / "cachefs.pid", str(workdir / "notify")
    mnt.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(60)
    env = dict(_env(), NOTIFY_SOCKET=sock_path)
    proc = subprocess.Popen([sys.executable, "-m", "cachefs.cli", "mount", "--foreground", "--log",
                             str(workdir / "log"), "--pid-file", str(pid_file), str(images), str(mnt)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert sock.recv(256) == b"READY=1"
        assert is_mounted(mnt) and os.listdir(mnt) == ["vm.raw"]
        assert int(pid_file.read_text()) == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
        assert proc.wait(60) == 0
        assert not pid_file.exists() and not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        sock.close()
    assert "Traceback" not in (workdir / "log").read_text() + proc.stderr.read()


def test_mount_prints_its_log_and_each_skipped_image(images, workdir, mounted):
    (images / "broken.qcow2").write_bytes(b"not a qcow2 image at all")
    mnt = workdir / "mnt"
    mnt.mkdir()
    r = cachefs("mount", images, mnt, "--log", workdir / "log")
    try:
        assert f"log: {workdir / 'log'}" in r.stderr
        assert f"not serving {images / 'broken.qcow2'}: " in r.stderr and "magic" in r.stderr
        assert os.listdir(mnt) == ["vm.raw"]
    finally:
        cachefs("umount", mnt)


@pytest.mark.parametrize("mistake", ["umount-not-mounted", "umount-not-cachefs", "umount-missing", "log-dir",
                                     "mount-missing-dir", "mount-file-as-dir", "bad-option", "bad-cache"])
def test_mistakes_are_one_line_never_a_traceback(images, workdir, mistake):
    mnt = workdir / "mnt"
    mnt.mkdir()
    args = {
        "umount-not-mounted": ["umount", mnt],
        "umount-not-cachefs": ["umount", "/"],
        "umount-missing": ["umount", workdir / "nope"],
        "log-dir": ["mount", images, mnt, "--log", "/nonexistent/dir/x.log"],
        "mount-missing-dir": ["mount", workdir / "nope", mnt],
        "mount-file-as-dir": ["mount", images / "vm.qcow2", mnt],
        "bad-option": ["mount", images, mnt, "-o", "allow_others"],
        "bad-cache": ["mount", images, mnt, "-o", "cache=fast"],
    }[mistake]
    r = cachefs(*args, check=False)
    line = one_line_error(r)
    assert not is_mounted(mnt)
    if mistake == "log-dir":
        assert "/nonexistent/dir/x.log" in line and "No such file or directory" in line
    if mistake == "umount-not-cachefs":
        assert "not a cachefs mount" in line
    if mistake == "bad-option":
        assert "allow_others" in line
