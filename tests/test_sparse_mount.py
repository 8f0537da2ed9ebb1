"""Discard, write-zeroes and SEEK_DATA/SEEK_HOLE through a real mount (issue 12).

pyfuse3 has no fallocate or lseek: the data plane takes FUSE_FALLOCATE and
FUSE_LSEEK before libfuse and Python serves them (cachefs/fuse/direct_requests.py). The
clients here are the real ones: fallocate(1), os.lseek, cp --sparse,
qemu-img convert and map. The expected bytes come from the same fallocate
calls on a plain file of the host filesystem.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time

import pytest

from cachefs.image.sparse import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from conftest import cachefs, qemu_img, qemu_io, run, sha256

MiB = 1 << 20
CS = 64 << 10


def _expected(workdir, size: int, writes: list[tuple[int, int, int]], fallocs: list[list[str]]):
    """A host file with the same writes and the same fallocate calls: what the disk must read as."""
    path = workdir / "expected.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n, byte in writes:
            f.seek(off)
            f.write(bytes([byte]) * n)
    for args in fallocs:
        run("fallocate", *args, path)
    return path


def _blocks(path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_punch_and_zero_range_through_the_mount(workdir, mounted, fmt):
    """fallocate -p and -z: the disk reads the host file's result, du drops, the image checks clean."""
    images = workdir / "images"
    images.mkdir()
    img = images / f"d.{fmt}"
    qemu_img("create", "-q", "-f", fmt, img, "16M")
    writes = [(0, 6 * MiB, 0xAA), (9 * MiB, 512 << 10, 0xBB)]
    qemu_io(img, *(f"write -P {b:#x} {o} {n}" for o, n, b in writes), fmt=fmt)
    # Partial clusters on both edges of each call; -z across data and a never-written range.
    fallocs = [["-p", "-o", "100000", "-l", str(3 * MiB)], ["-z", "-o", str(5 * MiB + 4096), "-l", str(MiB + 8192)],
               ["-p", "-o", str(9 * MiB), "-l", str(256 << 10)]]
    expected = _expected(workdir, 16 * MiB, writes, fallocs)
    m = mounted(images)
    served = m / "d.raw"
    before = _blocks(served)
    for args in fallocs:
        run("fallocate", *args, served)
    fd = os.open(served, os.O_RDWR)
    os.fsync(fd)  # the freed clusters' space goes back when the change is durable (invariant 2)
    os.close(fd)
    after = _blocks(served)
    assert before - after >= 3 * MiB, (before, after)  # du drops by what was discarded whole
    with open(served, "rb") as f:
        f.seek(200000)
        assert f.read(2 * MiB) == bytes(2 * MiB)  # reads give zeros
    assert sha256(served) == sha256(expected)
    st = m.stats()["images"]["d.raw"]
    assert (st["stats.discards"], st["stats.write_zeroes"]) == (2, 1)
    assert st["stats.bytes_discarded"] == 3 * MiB + (256 << 10)
    m.umount()
    qemu_img("compare", "-f", fmt, "-F", "raw", img, expected)
    if fmt == "qcow2":
        qemu_img("check", img)
        assert st["stats.bytes_punched"] >= 3 * MiB
        # -z keeps the whole clusters' space, as on a local filesystem: zero clusters with an offset.
        zeroed = [e for e in json.loads(qemu_img("map", "--output=json", img).stdout)
                  if e["start"] <= 5 * MiB + CS and e["start"] + e["length"] >= 6 * MiB]
        assert zeroed and zeroed[0]["zero"] and "offset" in zeroed[0], zeroed


def _layout_image(images) -> list[tuple[int, int]]:
    """64 MiB qcow2: data at 1 MiB (1 MiB), 5 MiB (one cluster), a zero cluster at 8 MiB, a
    compressed cluster at 10 MiB, data in the last cluster. Returns the data extents."""
    img = images / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    qemu_io(img, f"write -P 1 {MiB} {MiB}", f"write -P 2 {5 * MiB} {CS}", f"write -z {8 * MiB} {CS}",
            f"write -c -P 3 {10 * MiB} {CS}", f"write -P 4 {64 * MiB - CS} {CS}")
    return [(MiB, MiB), (5 * MiB, CS), (10 * MiB, CS), (64 * MiB - CS, CS)]


def _seek_layout(path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        out, pos, size = [], 0, os.fstat(fd).st_size
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data))
            pos = hole
        return out
    finally:
        os.close(fd)


def test_seek_data_and_hole_and_the_sparse_clients(workdir, mounted):
    """SEEK_DATA/SEEK_HOLE follow the mapping; cp --sparse, qemu-img convert and map use them."""
    images = workdir / "images"
    images.mkdir()
    extents = _layout_image(images)
    m = mounted(images)
    served = m / "s.raw"
    assert _seek_layout(served) == extents
    fd = os.open(served, os.O_RDONLY)
    try:
        assert os.lseek(fd, MiB + 4096, os.SEEK_DATA) == MiB + 4096  # inside data: where it is
        assert os.lseek(fd, 8 * MiB, os.SEEK_DATA) == 10 * MiB       # the zero cluster is a hole
        with pytest.raises(OSError) as exc:
            os.lseek(fd, 64 * MiB, os.SEEK_DATA)
        assert exc.value.errno == errno.ENXIO  # at the end, as for any file
    finally:
        os.close(fd)

    copy = workdir / "copy.raw"
    run("cp", "--sparse=always", served, copy)
    assert sha256(copy) == sha256(served)
    assert _blocks(copy) <= MiB + 3 * CS + 64 * 1024, _blocks(copy)  # only the data is allocated

    converted = workdir / "conv.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", served, converted)
    conv_map = json.loads(qemu_img("map", "--output=json", converted).stdout)
    assert [(e["start"], e["length"]) for e in conv_map if e["data"]] == extents

    ours = cachefs("map", served, "--output=json").stdout
    theirs = qemu_img("map", "-f", "raw", "--output=json", served).stdout
    assert ours == theirs
    m.umount()
    img_map = cachefs("map", images / "s.qcow2", "--output=json").stdout
    assert img_map == qemu_img("map", "--output=json", images / "s.qcow2").stdout


def test_writethrough_discard_survives_sigkill(workdir, mounted):
    """In writethrough a discard is durable when fallocate returns: after SIGKILL the range reads
    zeros, the data around it is there, and qemu-img check finds leaks at most."""
    images = workdir / "images"
    images.mkdir()
    img = images / "k.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_io(img, f"write -P 0xcc 0 {4 * MiB}")
    m = mounted(images, "--cache", "writethrough")
    run("fallocate", "-p", "-o", str(MiB), "-l", str(2 * MiB), m / "k.raw")
    with open(m / "k.raw", "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"\x5a" * CS)  # acknowledged = durable in writethrough
    os.kill(m.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{m.pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    subprocess.run(["umount", "-l", str(m.path)], capture_output=True)
    r = qemu_img("check", img, check=False)
    assert r.returncode in (0, 3), r.stdout + r.stderr  # leaks at most
    qemu_io(img, f"read -P 0xcc 0 {MiB}", f"read -P 0 {MiB} {2 * MiB}", f"read -P 0x5a {3 * MiB} {CS}",
            f"read -P 0xcc {3 * MiB + CS} {MiB - CS}")


def test_dataplane_off_says_why(workdir, mounted):
    """Without the data plane libfuse answers ENOSYS: fallocate fails with EOPNOTSUPP, the log says
    why in one line, and cachefs map refuses the served file rather than report it all data."""
    images = workdir / "images"
    images.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", images / "o.qcow2", "16M")
    m = mounted(images, "--dataplane", "off")
    fd = os.open(m / "o.raw", os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, MiB)
        assert exc.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert "data plane off: fallocate (discard, write-zeroes) fails with EOPNOTSUPP" in m.log_text()
    r = cachefs("map", m / "o.raw", check=False)
    assert r.returncode == 1 and "--dataplane off" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_more_seeks_at_once_than_the_table_holds(workdir, mounted):
    """200 threads seek at once, more than the data plane's table of Python-served requests holds
    (DP_PYQ, 64): the rest wait in their slots (back-pressure), none is lost, refused or mixed up."""
    from concurrent.futures import ThreadPoolExecutor
    images = workdir / "images"
    images.mkdir()
    extents = _layout_image(images)
    m = mounted(images)
    starts = [0, MiB + 100, 3 * MiB, 5 * MiB + CS, 7 * MiB, 10 * MiB]
    want = {s: next(max(s, o) for o, n in extents if o + n > s) for s in starts}
    fds = [os.open(m / "s.raw", os.O_RDONLY) for _ in range(200)]
    try:
        with ThreadPoolExecutor(200) as pool:
            got = list(pool.map(lambda i: (starts[i % 6], os.lseek(fds[i], starts[i % 6], os.SEEK_DATA)),
                                range(200)))
    finally:
        for fd in fds:
            os.close(fd)
    assert all(pos == want[s] for s, pos in got), got


def test_fallocate_preallocates_qcow2_clusters(workdir, mounted):
    """Mode 0 (qemu-img's preallocation=falloc): v3 clusters become zero clusters with their own
    host space, du grows, reads stay zeros, a write lands in place; v2 has no zero flag: EOPNOTSUPP."""
    images = workdir / "images"
    images.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", images / "p.qcow2", "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", images / "v2.qcow2", "16M")
    qemu_io(images / "p.qcow2", f"write -P 0x11 {MiB} {CS}")
    m = mounted(images)
    before = _blocks(m / "p.raw")
    run("fallocate", "-o", "0", "-l", str(8 * MiB), m / "p.raw")
    assert _blocks(m / "p.raw") - before >= 8 * MiB - CS
    with open(m / "p.raw", "r+b") as f:
        assert f.read(MiB) == bytes(MiB) and f.read(CS) == b"\x11" * CS
        f.seek(2 * MiB + 100)
        f.write(b"\x22" * 300)
    fd = os.open(m / "v2.raw", os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            fallocate(fd, 0, 0, MiB)
        assert exc.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    m.umount()
    qemu_img("check", images / "p.qcow2")
    entries = json.loads(qemu_img("map", "--output=json", images / "p.qcow2").stdout)
    assert all(e["present"] and "offset" in e for e in entries if e["start"] < 8 * MiB), entries
    qemu_io(images / "p.qcow2", f"read -P 0 0 {MiB}", f"read -P 0x11 {MiB} {CS}",
            f"read -P 0x22 {2 * MiB + 100} 300", f"read -P 0 {2 * MiB + 400} {CS}")
