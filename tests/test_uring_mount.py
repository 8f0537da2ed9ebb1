"""FUSE over io_uring behind real mounts (issue 24; cachefs/native/dp_uring.c, dataplane/transport.py).

The proof that requests came over the ring is C's connection counters (the root's
``user.cachefs.dataplane_counters``): ``uring_requests`` (every request taken from a ring entry),
``uring_forwarded`` (those handed to libfuse), ``interrupts`` (INTERRUPTs, which stay on /dev/fuse).
What is checked: fio's crc32c verify through the ring on raw and qcow2; Python-served requests over
it (getattr, xattrs, fallocate, SEEK_DATA); an INTERRUPT of a forwarded request held by a frozen
filesystem; SIGKILL, connection abort and a lazy unmount with fio's QD32 on the ring (no hang, the
data synced before intact); ``--transport dev``; ``auto`` with the kernel's switch off (the log line);
``uring`` turning it on.

Each test sets /sys/module/fuse/parameters/enable_uring as it needs (``switch``) and restores it;
they skip where the kernel has no FUSE over io_uring.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import cachefs, is_mounted, qemu_img
from fiojobs import fio
from mounting import C_SERVES, kill_daemon, needs_dataplane, xattr

pytestmark = needs_dataplane

MiB = 1 << 20
ENABLE = "/sys/module/fuse/parameters/enable_uring"
FIO_QD32 = ("--ioengine=libaio", "--direct=1", "--iodepth=32")


@pytest.fixture
def switch():
    """``switch("Y"|"N")`` sets the kernel's FUSE-over-io_uring switch; the old value is restored after."""
    try:
        with open(ENABLE) as f:
            old = f.read().strip()
    except OSError:
        pytest.skip("this kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)")

    def set_(value: str) -> None:
        try:
            with open(ENABLE, "w") as f:
                f.write(value + "\n")
        except OSError as exc:
            pytest.skip(f"cannot write {ENABLE}: {exc.strerror}")

    yield set_
    with open(ENABLE) as f:
        if f.read().strip() != old:
            set_(old)


@pytest.fixture
def uring(switch):
    switch("Y")


def counters(m) -> dict[str, int]:
    return json.loads(xattr(m.path, "dataplane_counters"))


def delta(after: dict, before: dict) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def make_images(workdir, kind: str):
    """workdir/images-KIND holding a 256 MiB image: disk.raw (sparse) or vm.qcow2 (served as vm.raw)."""
    d = workdir / f"images-{kind}"
    d.mkdir()
    if kind == "raw":
        with open(d / "disk.raw", "wb") as f:
            f.truncate(256 * MiB)
        return d, "disk.raw"
    qemu_img("create", "-q", "-f", "qcow2", d / "vm.qcow2", "256M")
    return d, "vm.raw"


def mount_ring(mounted, images, *extra):
    m = mounted(images, *C_SERVES, *extra)
    state = xattr(m.path, "transport")
    assert state.startswith("uring: "), f"{state}\n{m.log_text()}"
    return m


@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_fio_verifies_over_the_ring(uring, mounted, workdir, kind):
    """QD32 4k random writes and 1M sequential ones, crc32c-verified, every one of them over the ring."""
    images, name = make_images(workdir, kind)
    m = mount_ring(mounted, images)
    f = m / name
    info = json.loads(xattr(m.path, "init"))
    assert info["max_write"] == MiB and info["max_pages"] == 256 and info["async_dio"] == 1, info
    assert info["max_background"] == 64 and info["depth"] == 32 and info["queues"] == os.cpu_count(), info
    st = m.stats()
    assert st["transport"].startswith("uring: ") and st["init"]["max_pages"] == 256, st
    before = counters(m)
    fio(f, *FIO_QD32, "--rw=randwrite", "--bs=4k", "--size=64M", "--number_ios=4000", "--do_verify=1")
    fio(f, *FIO_QD32, "--rw=write", "--bs=1M", "--size=32M", "--offset=128M", "--do_verify=1")
    d = delta(counters(m), before)
    # 4000 writes and their 4000 verify reads, at least: served in C, or forwarded to Python (a fresh
    # qcow2's writes that need a new L2 table, or wait for lent clusters); all of a raw image's in C.
    assert d["fast"] + d["forwarded"] >= 8000 and (kind == "qcow2" or d["fast"] >= 8000), d
    assert d["uring_requests"] >= 0.99 * d["requests"], d  # /dev/fuse carried FORGETs at most
    assert d["reply_errors"] == 0 and d["uring_lost"] == 0, d
    m.umount()
    if kind == "qcow2":
        qemu_img("check", "-q", images / "vm.qcow2")


def test_python_served_requests_over_the_ring(uring, mounted, image):
    """getattr, getxattr, fallocate (Python's, answered from its own thread) and SEEK_DATA: right
    answers, each request over the ring, the forwarded ones counted."""
    m = mount_ring(mounted, image)
    f = m / "vm.raw"
    with open(f, "r+b") as fh:
        fh.write(b"\xab" * (4 * MiB))
        os.fsync(fh.fileno())
    before = counters(m)
    assert os.stat(f).st_size == 256 * MiB
    assert os.getxattr(f, "user.cachefs.format") == b"qcow2"
    subprocess.run(["fallocate", "-p", "-o", str(MiB), "-l", str(MiB), str(f)], check=True)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(fd, MiB, MiB) == bytes(MiB)  # punched
        assert os.pread(fd, 4096, 0) == b"\xab" * 4096
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) <= MiB
    finally:
        os.close(fd)
    d = delta(counters(m), before)
    assert d["uring_forwarded"] >= 2, d  # getxattr, getattr or open at least went to libfuse over the ring
    assert d["uring_requests"] >= d["requests"] - d["interrupts"] - 2, d
    assert d["reply_errors"] == 0, d
    m.umount()
    qemu_img("check", "-q", image / "vm.qcow2")


@contextlib.contextmanager
def freezable_fs(workdir):
    """A small ext4 on a loop device (fsfreeze on it holds every write there); skips where it cannot."""
    img, mnt = workdir / "fs.img", workdir / "fs"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(128 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


CREATE_CLIENT = """
import os, signal, sys
signal.signal(signal.SIGUSR1, lambda *a: print("signal", flush=True))
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
print("created", flush=True)
"""


def wait_blocked_in_fuse(pid: int, timeout: float = 10.0) -> None:
    """Until the client sleeps waiting for the daemon's answer (its wchan, where the kernel shows it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/wchan") as f:
                if "request_wait_answer" in f.read():
                    return
        time.sleep(0.02)
    time.sleep(0.5)  # wchan hidden (kptr_restrict): the create cannot finish while frozen anyway


def test_interrupt_of_a_forwarded_request_over_the_ring(uring, workdir, mounted):
    """A client creating an image sleeps in CREATE (forwarded to libfuse over the ring) while the image
    directory's filesystem is frozen; SIGUSR1 makes the kernel send INTERRUPT (over /dev/fuse); once
    thawed the create completes, its answer committed into the ring entry, and the mount goes on."""
    with freezable_fs(workdir) as fs:
        d = fs / "images"
        d.mkdir()
        with open(d / "disk.raw", "wb") as f:
            f.truncate(16 * MiB)
        m = mount_ring(mounted, d)
        try:
            before = counters(m)
            subprocess.run(["fsfreeze", "-f", str(fs)], check=True)
            try:
                client = subprocess.Popen([sys.executable, "-c", CREATE_CLIENT, str(m / "new.raw")],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                wait_blocked_in_fuse(client.pid)
                assert client.poll() is None, client.communicate()
                os.kill(client.pid, signal.SIGUSR1)
                time.sleep(0.3)
                assert client.poll() is None  # still waiting for the answer: INTERRUPT does not end it
            finally:
                subprocess.run(["fsfreeze", "-u", str(fs)], check=True)
            out, err = client.communicate(timeout=60)
            assert client.returncode == 0 and "created" in out, (out, err)
            d_ = delta(counters(m), before)
            assert d_["interrupts"] >= 1 and d_["uring_forwarded"] >= 1, d_
            assert os.path.exists(m / "new.raw")
            fio(m / "disk.raw", *FIO_QD32, "--rw=randwrite", "--bs=4k", "--size=8M", "--number_ios=500",
                "--do_verify=1")
        finally:
            m.umount()


def connection_dir(path) -> str:
    return f"/sys/fs/fuse/connections/{os.minor(os.stat(path).st_dev)}"


def daemon_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def write_synced(f, size: int) -> str:
    data = hashlib.sha256(b"cachefs").digest() * (size // 32)
    with open(f, "r+b") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(data).hexdigest()


def head_sha(f, size: int) -> str:
    with open(f, "rb") as fh:
        return hashlib.sha256(fh.read(size)).hexdigest()


@pytest.mark.parametrize("how", ["sigkill", "abort", "lazy", "sigkill-qcow2"])
def test_end_with_requests_on_the_ring(uring, mounted, workdir, how):
    """fio at QD32 on the ring, then the daemon SIGKILLed, the connection aborted
    (/sys/fs/fuse/connections/N/abort), or a lazy unmount: nothing hangs, and the data synced before
    reads back intact."""
    images, name = make_images(workdir, "qcow2" if how.endswith("qcow2") else "raw")
    m = mount_ring(mounted, images)
    want = write_synced(m / name, 16 * MiB)
    job = subprocess.Popen(["fio", "--name=busy", f"--filename={m / name}", *FIO_QD32, "--rw=randrw", "--bs=4k",
                            "--size=64M", "--offset=64M", "--time_based", "--runtime=4" if how == "lazy" else "--runtime=30"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        start = counters(m)["uring_requests"]
        deadline = time.monotonic() + 10
        while counters(m)["uring_requests"] < start + 2000 and time.monotonic() < deadline:
            time.sleep(0.05)  # fio's QD32 is running over the ring
        t0 = time.monotonic()
        if how.startswith("sigkill"):
            kill_daemon(m)
        elif how == "abort":
            with open(connection_dir(m.path) + "/abort", "w") as f:
                f.write("1")
            subprocess.run(["fusermount3", "-uz", str(m.path)], capture_output=True, timeout=30)
        else:
            r = cachefs("umount", "--lazy", m.path, check=False, timeout=60)
            assert r.returncode == 0, r.stderr
        assert not is_mounted(m.path)
        job.wait(timeout=60)
        assert time.monotonic() - t0 < 60
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    deadline = time.monotonic() + 30
    while not daemon_gone(m.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon_gone(m.pid), f"the daemon {m.pid} did not exit\n{m.log_text()}"
    m2 = mount_ring(mounted, images)
    assert head_sha(m2 / name, 16 * MiB) == want
    m2.umount()
    if how.endswith("qcow2"):
        qemu_img("check", "-q", images / "vm.qcow2")


def test_refused_registration_falls_back_to_dev(uring, mounted, raw, monkeypatch):
    """A REGISTER the kernel refuses (here a payload buffer below max_write: EINVAL) is said in one line
    of the log and in the transport xattr, and the mount serves over /dev/fuse."""
    monkeypatch.setenv("CACHEFS_TEST_URING_PAYLOAD", str(64 << 10))
    m = mounted(raw, *C_SERVES, "--transport", "uring")
    state = xattr(m.path, "transport")
    assert state == "dev: the kernel refused the ring's registration (Invalid argument)", state
    assert "transport: dev: the kernel refused" in m.log_text()
    fio(m / "disk.raw", *FIO_QD32, "--rw=randwrite", "--bs=4k", "--size=16M", "--number_ios=500", "--do_verify=1")
    d = counters(m)
    assert d["uring_requests"] == 0 and d["fast"] >= 1000, d


def test_transport_dev_still_works(uring, mounted, raw):
    m = mounted(raw, *C_SERVES, "--transport", "dev")
    assert xattr(m.path, "transport") == "dev: --transport dev"
    before = counters(m)
    fio(m / "disk.raw", *FIO_QD32, "--rw=randwrite", "--bs=4k", "--size=32M", "--number_ios=2000", "--do_verify=1")
    d = delta(counters(m), before)
    assert d["fast"] >= 4000 and d["uring_requests"] == 0, d


def test_auto_falls_back_when_the_kernel_switch_is_off(switch, mounted, raw):
    switch("N")
    m = mounted(raw, *C_SERVES)
    state = xattr(m.path, "transport")
    assert state.startswith("dev: io_uring is off in the kernel"), state
    assert f"turn it on with: echo Y > {ENABLE}" in m.log_text()
    with open(ENABLE) as f:
        assert f.read().strip() == "N"  # auto never writes it
    fio(m / "disk.raw", *FIO_QD32, "--rw=randwrite", "--bs=4k", "--size=16M", "--number_ios=500", "--do_verify=1")
    assert counters(m)["uring_requests"] == 0


def test_explicit_uring_turns_the_switch_on(switch, mounted, raw):
    switch("N")
    m = mounted(raw, *C_SERVES, "-o", "transport=uring")
    with open(ENABLE) as f:
        assert f.read().strip() == "Y"
    assert "turned FUSE over io_uring on" in m.log_text()
    assert xattr(m.path, "transport").startswith("uring: ")
    fio(m / "disk.raw", *FIO_QD32, "--rw=randwrite", "--bs=4k", "--size=16M", "--number_ios=500", "--do_verify=1")
    assert counters(m)["uring_requests"] >= 1000


def test_uring_without_the_data_plane_is_refused_in_one_line(workdir, raw):
    mnt = workdir / "mnt"
    mnt.mkdir()
    r = cachefs("mount", raw, mnt, "--dataplane", "off", "--transport", "uring", check=False)
    assert r.returncode != 0 and not is_mounted(mnt)
    assert "--transport uring needs the data plane" in r.stderr and "Traceback" not in r.stderr, r.stderr
