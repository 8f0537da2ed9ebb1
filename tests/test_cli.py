"""The command line against real qemu-img: create, info, errors in one line, SIGTERM lifecycle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def cachefs(*args, check=True):
    return subprocess.run([sys.executable, "-m", "cachefs.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, check=check, timeout=120)


@pytest.fixture
def work():
    import tempfile
    d = tempfile.mkdtemp(dir="/var/tmp", prefix="cachefs-cli-")
    yield d
    subprocess.run(["fusermount3", "-uz", os.path.join(d, "mnt")], capture_output=True)
    subprocess.run(["rm", "-rf", d])


@pytest.mark.parametrize("cluster,bits", [("512", 1), ("64K", 16), ("2M", 64)])
def test_create_is_qemu_clean_and_info_agrees(work, cluster, bits):
    img = os.path.join(work, "a.qcow2")
    cachefs("create", img, "3G", "--cluster-size", cluster, "--refcount-bits", bits)
    assert subprocess.run(["qemu-img", "check", img], capture_output=True).returncode == 0
    q = json.loads(subprocess.run(["qemu-img", "info", "--output=json", img],
                                  capture_output=True, text=True, check=True).stdout)
    ours = json.loads(cachefs("info", img, "--json").stdout)  # --json: the old spelling of --output=json
    assert q["virtual-size"] == ours["virtual-size"] == 3 << 30
    assert q["cluster-size"] == ours["cluster-size"]
    assert q["format-specific"]["data"]["refcount-bits"] == ours["format-specific"]["data"]["refcount-bits"] == bits


def test_create_refuses_existing_file_in_one_line(work):
    img = os.path.join(work, "a.qcow2")
    cachefs("create", img, "1G")
    before = open(img, "rb").read()
    r = cachefs("create", img, "1G", check=False)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "exists" in r.stderr
    assert open(img, "rb").read() == before


def test_info_on_garbage_is_one_line(work):
    img = os.path.join(work, "bad.qcow2")
    with open(img, "wb") as f:
        f.write(b"QFI\xfb" + b"\xff" * 200)
    r = cachefs("info", img, check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_sigterm_flushes_and_unmounts(work):
    imgs, mnt = os.path.join(work, "imgs"), os.path.join(work, "mnt")
    os.mkdir(imgs), os.mkdir(mnt)
    cachefs("create", os.path.join(imgs, "vm.qcow2"), "256M")
    cachefs("mount", imgs, mnt, "--log", os.path.join(work, "log"))
    pid = int(os.getxattr(mnt, "user.cachefs.pid"))
    payload = os.urandom(3 << 20)
    fd = os.open(os.path.join(mnt, "vm.raw"), os.O_WRONLY)
    os.pwrite(fd, payload, 5 << 20)  # no fsync: SIGTERM must flush it
    os.close(fd)
    os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.05)
    assert not os.path.ismount(mnt)
    img = os.path.join(imgs, "vm.qcow2")
    assert subprocess.run(["qemu-img", "check", img], capture_output=True).returncode == 0
    raw = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -v {5 << 20} 16", img],
                         capture_output=True, text=True, check=True).stdout
    assert payload[:16].hex()[:8] in raw.replace(" ", "")
    assert "Traceback" not in open(os.path.join(work, "log")).read()


def test_name_clash_refused(work):
    imgs, mnt = os.path.join(work, "imgs"), os.path.join(work, "mnt")
    os.mkdir(imgs), os.mkdir(mnt)
    cachefs("create", os.path.join(imgs, "a.qcow2"), "16M")
    cachefs("create", os.path.join(imgs, "a.raw"), "16M", "--format", "raw")
    r = cachefs("mount", imgs, mnt, check=False)
    assert r.returncode != 0 and "a.qcow2" in r.stderr and "a.raw" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(mnt)


def test_core_imports_no_io():
    """STYLE.md habit 1: the qcow2 core never imports I/O, trio, cffi or pyfuse3."""
    code = ("import sys; import cachefs.qcow2.engine, cachefs.qcow2.create, cachefs.qcow2.format;"
            "bad = [m for m in ('trio', 'pyfuse3', 'cffi', 'cachefs.backend', 'cachefs.image.base', 'socket')"
            " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
