"""Images with persistent bitmaps or internal snapshots (issue 20, defects 2 and 6).

What the admin did: `qemu-img bitmap --add`, mount, umount, and `qemu-img
check` warned that "a program lacking bitmap support modified this file" and
found leaked clusters: a mount with no write had destroyed the bitmaps. And an
image with internal snapshots was served read-only without a word.

Bitmaps are served read-only, said in one line on stderr at mount, in the log
and in `cachefs stats`; `-o drop_bitmaps` serves a bitmap image writable and
deletes its bitmaps, freeing their clusters. An image with internal snapshots
is served writable since issue 23 (qcow2/generation.py: its shared L2 tables
get private copies at open, crash-atomically). An image without either opens
writable as before; unknown autoclear bits are cleared at a writable open
(spec "autoclear_features"), as QEMU clears them.
"""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest

from conftest import Mount, cachefs, qemu_img, qemu_io

KiB, MiB = 1 << 10, 1 << 20
AUTOCLEAR = 88  # spec "Header": autoclear_features, bytes 88-95


def autoclear(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack(">Q", f.read(96)[AUTOCLEAR:])[0]


def bitmap_names(path) -> list[str]:
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]


@pytest.fixture
def images(workdir):
    d = workdir / "images"
    d.mkdir()
    bm = d / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", bm, "16M")
    qemu_img("bitmap", "--add", bm, "b0")
    qemu_img("bitmap", "--add", "-g", "128k", bm, "b1")
    qemu_io(bm, "write -P 0x11 0 1M", "write -P 0x22 8M 64k")  # the enabled bitmaps record these
    snap = d / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", snap, "16M")
    qemu_io(snap, "write -P 0x33 0 64k")
    qemu_img("snapshot", "-c", "s1", snap)
    plain = d / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", plain, "16M")
    with open(plain, "r+b") as f:  # an autoclear bit no one knows: a writer clears it
        f.seek(AUTOCLEAR)
        f.write(struct.pack(">Q", 1 << 5))
    return d


def mount(workdir, image_dir, *args) -> tuple[Mount, str]:
    """`cachefs mount` by hand, for its stderr; the caller unmounts (m.umount) in a finally."""
    mnt = workdir / f"mnt{len(list(workdir.glob('mnt*')))}"
    mnt.mkdir()
    log = workdir / f"{mnt.name}.log"
    r = cachefs("mount", image_dir, mnt, "--log", log, *args)
    return Mount(image_dir, mnt, log), r.stderr


def test_bitmaps_are_served_read_only_and_said_snapshots_are_not(images, workdir):
    bm, snap, plain = images / "bm.qcow2", images / "snap.qcow2", images / "plain.qcow2"
    m, stderr = mount(workdir, images)
    try:
        warnings = [line for line in stderr.splitlines() if "read-only" in line]
        assert len(warnings) == 1, stderr
        assert str(bm) in warnings[0] and "2 persistent dirty bitmaps" in warnings[0], warnings
        assert "-o drop_bitmaps" in warnings[0], warnings
        stats = m.stats()["images"]
        assert stats["bm.raw"]["writable"] is False
        assert "bitmaps" in stats["bm.raw"]["read_only_reason"]
        assert "bitmaps" in os.getxattr(m / "bm.raw", "user.cachefs.read_only_reason").decode()
        with pytest.raises(OSError) as ei:
            os.open(m / "bm.raw", os.O_RDWR)
        assert ei.value.errno == errno.EROFS
        for name in ("snap.raw", "plain.raw"):
            assert stats[name]["writable"] is True and "read_only_reason" not in stats[name], stats[name]
        human = cachefs("stats", m.path).stdout
        assert "bm.raw" in human and "read-only: it has 2 persistent dirty bitmaps" in human, human
        log = m.log_text()
        assert f"serving {bm} read-only: it has 2 persistent dirty bitmaps" in log
        assert f"serving {snap} read-only" not in log
        assert autoclear(plain) == 0, "cleared at the writable open, durably, before any write"
    finally:
        m.umount()
    for img in (bm, snap, plain):
        r = qemu_img("check", img, check=False)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stdout + r.stderr
    assert bitmap_names(bm) == ["b0", "b1"]
    assert autoclear(bm) == 1


def test_drop_bitmaps_writes_and_frees_them(images, workdir):
    bm = images / "bm.qcow2"
    m, stderr = mount(workdir, images, "-o", "drop_bitmaps")
    try:
        assert "bm.qcow2" not in stderr, stderr
        assert m.stats()["images"]["bm.raw"]["writable"] is True
        with open(m / "bm.raw", "r+b") as f:
            f.seek(4 * MiB)
            f.write(b"\x44" * (64 * KiB))
        assert "deleted its persistent bitmaps (b0, b1)" in m.log_text()
    finally:
        m.umount()
    r = qemu_img("check", "--output=json", bm, check=False)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stdout + r.stderr
    assert "leaks" not in json.loads(r.stdout)
    assert bitmap_names(bm) == [] and autoclear(bm) == 0
    qemu_io(bm, "read -P 0x11 0 1M", "read -P 0x44 4M 64k", "read -P 0x22 8M 64k")
