"""`cachefs info` and `cachefs check` are qemu-img's (issue 20, defect 10).

What the admin found: `info` left out the snapshot table and the bitmaps, said
only "raw" of a served file, `check` had no `--output=json`, and `check -U`
on a live image counted the mount's reservation as leaks (exit 3). Each is
compared here with qemu-img on the same file.
"""

from __future__ import annotations

import json
import os
import struct

import pytest

from conftest import cachefs, qemu_img, qemu_io

KiB, MiB = 1 << 10, 1 << 20


def json_of(r) -> dict:
    return json.loads(r.stdout)


def set_snapshot_clock(path, vm_clock_nsec: int, icount: int) -> None:
    """Give the first snapshot a VM clock and an icount (qemu-img snapshot -c records none)."""
    with open(path, "r+b") as f:
        head = f.read(72)
        table = struct.unpack_from(">Q", head, 64)[0]  # spec "Header": snapshots_offset
        f.seek(table + 24)
        f.write(struct.pack(">Q", vm_clock_nsec))  # spec "Snapshot table entry", bytes 24-31
        f.seek(table + 36)
        extra = struct.unpack(">I", f.read(4))[0]
        if extra >= 24:
            f.seek(table + 40 + 16)  # extra data bytes 16-23: icount
            f.write(struct.pack(">q", icount))


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_info_shows_snapshots_and_bitmaps(workdir, compat):
    img = workdir / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", img, "64M")
    qemu_io(img, "write -P 0x11 0 1M")
    qemu_img("snapshot", "-c", "before-upgrade", img)
    qemu_io(img, "write -P 0x22 512k 1M")
    qemu_img("snapshot", "-c", "s2", img)
    set_snapshot_clock(img, 3723_456_000_000, -1)  # 1:02:03.456, icount not recorded
    if compat == "1.1":
        qemu_img("bitmap", "--add", img, "b0")
        qemu_img("bitmap", "--add", "-g", "128k", "--disable", img, "b1")
    theirs = json_of(qemu_img("info", "--output=json", img))
    assert len(theirs["snapshots"]) == 2
    assert compat == "0.10" or len(theirs["format-specific"]["data"]["bitmaps"]) == 2
    assert json_of(cachefs("info", "--output=json", img)) == theirs
    assert cachefs("info", img).stdout == qemu_img("info", img).stdout


def test_info_on_a_served_file_names_the_image(workdir, mounted):
    d = workdir / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "vm.qcow2", "16M")
    m = mounted(d, "--cache", "none")
    served = json_of(cachefs("info", "--output=json", m / "vm.raw"))
    assert served["format"] == "raw" and served["virtual-size"] == 16 * MiB
    assert served["cachefs"] == {"image": str(d / "vm.qcow2"), "format": "qcow2", "cache": "none",
                                 "writable": True}
    human = cachefs("info", m / "vm.raw").stdout
    assert f"Served by cachefs:\n    image: {d / 'vm.qcow2'}\n    format: qcow2\n    cache: none\n" in human


def _leaky(path):
    """A bitmap whose autoclear bit a writer lacking bitmap support cleared: its clusters leak."""
    qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    qemu_img("bitmap", "--add", path, "b0")
    with open(path, "r+b") as f:
        f.seek(88)  # spec "Header": autoclear_features
        f.write(bytes(8))


def _corrupt(path):
    """A data cluster whose refcount is 0: corruption."""
    qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    qemu_io(path, "write 0 64k", "write 1M 64k", "write 128k 64k")
    with open(path, "r+b") as f:
        table = struct.unpack(">Q", f.read(56)[48:56])[0]
        f.seek(table)
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block + 2 * 5)  # refcount_bits 16: cluster 5, a data cluster
        f.write(bytes(2))


def _compressed(path):
    src = path.with_suffix(".src")
    src.write_bytes(b"\x5a" * (256 * KiB))
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", src, path)


@pytest.mark.parametrize("make", [_leaky, _corrupt, _compressed], ids=["leaks", "corrupt", "compressed"])
def test_check_output_json_is_qemu_img_check(workdir, make):
    img = workdir / "vm.qcow2"
    make(img)
    theirs = qemu_img("check", "--output=json", img, check=False)
    ours = cachefs("check", "--output=json", img, check=False)
    assert ours.returncode == theirs.returncode == {_leaky: 3, _corrupt: 2}.get(make, 0)
    assert json_of(ours) == json_of(theirs)
    assert list(json_of(ours)) == list(json_of(theirs)), "qemu-img's key order"
    human = cachefs("check", img, check=False).stdout.splitlines()
    assert human[-2:] == qemu_img("check", img, check=False).stdout.splitlines()[-2:]


def test_check_force_share_on_a_live_image(workdir, mounted):
    """The mount's reservation is on disk as raised refcounts nothing points at yet: qemu-img
    check -U calls them leaks (exit 3); cachefs check -U says whose they are, and exits 0."""
    d = workdir / "images"
    d.mkdir()
    img = d / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    m = mounted(d)
    fd = os.open(m / "vm.raw", os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(MiB), 0)
        os.fsync(fd)  # the flush reserves ahead for the next interval
    finally:
        os.close(fd)
    reserved = os.getxattr(m / "vm.raw", "user.cachefs.reserved").decode()
    assert reserved, "a flush after allocating writes reserves ahead"
    assert qemu_img("check", "-U", img, check=False).returncode == 3
    r = cachefs("check", "-U", img)
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout
    assert f"in use by the cachefs mount at {m.path}" in r.stdout and "in reserve" in r.stdout, r.stdout
    out = json_of(cachefs("check", "-U", "--output=json", img))
    assert "leaks" not in out and out["cachefs"]["mount"] == str(m.path)
    assert out["cachefs"]["reserved-clusters"] > 0
    m.umount()
    assert cachefs("check", "--output=json", img).returncode == 0
