"""ImageLock against the real QEMU tools (qemu-img, qemu-io, qemu-storage-daemon)."""

import os
import subprocess
import time

import pytest

from cachefs.errors import ImageLocked
from cachefs.image.locking import ImageLock

TIMEOUT = 10


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)


def assert_refused(*args):
    r = run(*args)
    assert r.returncode != 0, f"{args} succeeded while the image was locked"
    assert "lock" in r.stderr, r.stderr


def assert_ok(*args):
    r = run(*args)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "vm1.qcow2"
    assert_ok("qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M")
    return str(path)


@pytest.fixture
def raw_image(tmp_path):
    path = tmp_path / "vm1.raw"
    assert_ok("qemu-img", "create", "-q", "-f", "raw", str(path), "16M")
    return str(path)


@pytest.fixture
def fds():
    opened = []

    def open_(path, flags=os.O_RDWR):
        fd = os.open(path, flags)
        opened.append(fd)
        return fd

    yield open_
    for fd in opened:
        os.close(fd)


@pytest.fixture
def spawn():
    """Start long-running QEMU processes; kill whatever is left at the end."""
    procs = []

    def spawn_(*args):
        p = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(p)
        return p

    yield spawn_
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=TIMEOUT)
        for f in (p.stdin, p.stderr):
            if f and not f.closed:
                f.close()


def wait_until_locked(proc, fd, path, writable=True):
    """Poll until acquiring fails because *proc* holds the image; return the error."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            ImageLock.acquire(fd, path, writable).release()
        except ImageLocked as e:
            return e
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "QEMU never took its locks"
        time.sleep(0.02)


def stop_qemu_io(proc):
    proc.stdin.write(b"quit\n")
    proc.stdin.close()
    assert proc.wait(timeout=TIMEOUT) == 0


# --- cachefs holds the image; QEMU must be refused --------------------------


def test_writable_lock_refuses_qemu(image, fds):
    fd = fds(image)
    lock = ImageLock.acquire(fd, image, writable=True)
    assert lock.held

    r = run("qemu-img", "info", image)
    assert r.returncode != 0
    assert 'Failed to get shared "write" lock' in r.stderr
    assert_refused("qemu-io", "-c", "read 0 512", image)
    assert_refused("qemu-io", "-r", "-c", "read 0 512", image)
    assert_refused("qemu-io", "-c", "write 0 512", image)
    assert_refused("qemu-img", "check", image)
    # -U (force-share) is QEMU's documented way around the lock.
    assert_ok("qemu-img", "info", "-U", image)

    lock.release()
    assert not lock.held
    assert_ok("qemu-img", "info", image)
    assert_ok("qemu-io", "-c", "write 0 512", image)


def test_release_is_idempotent_and_context_manager(image, fds):
    fd = fds(image)
    with ImageLock.acquire(fd, image, writable=True) as lock:
        assert_refused("qemu-img", "info", image)
    lock.release()
    assert_ok("qemu-img", "info", image)


def test_closing_fd_drops_lock(image):
    fd = os.open(image, os.O_RDWR)
    lock = ImageLock.acquire(fd, image, writable=True)
    os.close(fd)
    lock.release()  # fd is gone: must not raise
    assert_ok("qemu-img", "info", image)


def test_readonly_lock_allows_readers_refuses_writers(image, fds):
    fd = fds(image, os.O_RDONLY)
    with ImageLock.acquire(fd, image, writable=False):
        assert_ok("qemu-img", "info", image)
        assert_ok("qemu-io", "-r", "-c", "read 0 512", image)
        r = run("qemu-io", "-c", "write 0 512", image)
        assert r.returncode != 0
        assert 'Failed to get "write" lock' in r.stderr
    assert_ok("qemu-io", "-c", "write 0 512", image)


def test_raw_image_writable_lock(raw_image, fds):
    # For raw images QEMU's raw format node shares everything, so (exactly as
    # with a running VM) qemu-img info still works but writers are refused.
    fd = fds(raw_image)
    with ImageLock.acquire(fd, raw_image, writable=True):
        assert_ok("qemu-img", "info", raw_image)
        assert_refused("qemu-io", "-f", "raw", "-c", "write 0 512", raw_image)
    assert_ok("qemu-io", "-f", "raw", "-c", "write 0 512", raw_image)


# --- two cachefs opens of the same image (same process, two fds) ------------


def test_second_open_file_description_conflicts(image, fds):
    fd1, fd2 = fds(image), fds(image)
    with ImageLock.acquire(fd1, image, writable=True):
        for writable in (True, False):
            with pytest.raises(ImageLocked, match=rf"this cachefs \(pid {os.getpid()}\), through another open file"):
                ImageLock.acquire(fd2, image, writable=writable)
    ImageLock.acquire(fd2, image, writable=True).release()


def test_readers_share_but_exclude_writer(image, fds):
    fd1, fd2, fd3 = fds(image, os.O_RDONLY), fds(image, os.O_RDONLY), fds(image)
    with ImageLock.acquire(fd1, image, writable=False):
        ImageLock.acquire(fd2, image, writable=False).release()
        with pytest.raises(ImageLocked, match="does not allow writers"):
            ImageLock.acquire(fd3, image, writable=True)


def test_failed_acquire_leaves_no_bytes(image, fds):
    fd1, fd2 = fds(image), fds(image)
    with ImageLock.acquire(fd1, image, writable=True):
        with pytest.raises(ImageLocked):
            ImageLock.acquire(fd2, image, writable=True)
    # fd2 must not have kept any of the bytes it locked before the check.
    assert_ok("qemu-img", "info", image)


# --- QEMU holds the image; cachefs must refuse ------------------------------


def test_refuses_image_open_in_qemu_io(image, fds, spawn):
    fd = fds(image)
    proc = spawn("qemu-io", image)  # read-write, interactive; stdin kept open
    err = wait_until_locked(proc, fd, image)
    msg = str(err)
    # Issue 20 defect 9: the holder is named (its OFD locks are in /proc/PID/fdinfo, not /proc/locks).
    assert msg == f"{image}: in use: qemu-io (pid {proc.pid}) holds a write lock"
    assert "\n" not in msg
    with pytest.raises(ImageLocked, match=rf"qemu-io \(pid {proc.pid}\) holds a write lock"):
        ImageLock.acquire(fd, image, writable=False)

    stop_qemu_io(proc)
    ImageLock.acquire(fd, image, writable=True).release()


def test_readonly_qemu_io_blocks_writer_only(image, fds, spawn):
    fd = fds(image)
    proc = spawn("qemu-io", "-r", image)
    err = wait_until_locked(proc, fd, image, writable=True)
    assert f"qemu-io (pid {proc.pid}) has it open and does not allow writers" in str(err)
    ImageLock.acquire(fd, image, writable=False).release()
    stop_qemu_io(proc)
    ImageLock.acquire(fd, image, writable=True).release()


def test_refuses_image_served_by_storage_daemon(image, fds, spawn):
    fd = fds(image)
    proc = spawn(
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,filename={image},node-name=f",
        "--blockdev", "driver=qcow2,file=f,node-name=q",
    )
    err = wait_until_locked(proc, fd, image)
    assert f"qemu-storage-daemon (pid {proc.pid}) holds a write lock" in str(err)
    proc.terminate()
    proc.wait(timeout=TIMEOUT)
    ImageLock.acquire(fd, image, writable=True).release()
