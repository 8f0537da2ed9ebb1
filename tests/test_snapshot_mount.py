"""Internal snapshots of a served image (issue 23), through the mount: each snapshot is a file.

Taken with ``setfattr -n user.cachefs.snapshot.create`` while a seeded writer writes, each
snapshot's file ``vm@NAME.raw`` must hold, block by block, a write allowed at its point (a model:
tests/snapwrites.py), while fio verifies its own region of the same disk. After unmount qemu-img
is the judge: check clean, ``snapshot -l`` lists them, ``convert -l`` equals what was served.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from conftest import cachefs as cachefs_cli
from conftest import qemu_img, qemu_io, sha256
from fiojobs import fio
from interop import check_clean, to_raw
from mounting import stat_of
from snapwrites import allowed, check_snapshot, logged_writes, start_writer

pytestmark = pytest.mark.both_planes

MiB = 1 << 20
SNAP = "user.cachefs.snapshot."


def snapshot(path, op: str, name: str) -> None:
    os.setxattr(path, SNAP + op, name.encode())


def listing(path) -> list[dict]:
    return json.loads(os.getxattr(path, SNAP + "list"))


def refused(path, op: str, name: str) -> tuple[int, str]:
    with pytest.raises(OSError) as exc:
        snapshot(path, op, name)
    return exc.value.errno, os.getxattr(path, "user.cachefs.snapshot_error").decode()


def _image_with_data(workdir, size="64M"):
    images = workdir / "images"
    images.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", images / "vm.qcow2", size)
    qemu_io(images / "vm.qcow2", "write -P 0x11 0 8M", "write -P 0x22 20M 1M")
    return images


def test_snapshot_files_appear_hold_their_point_and_vanish(mounted, workdir, plane):
    images = _image_with_data(workdir)
    m = mounted(images)
    live = m / "vm.raw"
    before = sha256(live)
    snapshot(live, "create", "first")
    assert (m / "vm@first.raw").exists() and "vm@first.raw" in os.listdir(m)  # at once
    with open(live, "r+b") as f:  # the guest goes on writing: partial, whole-cluster, and new clusters
        f.seek(4096)
        f.write(b"\x99" * 8192)
        f.seek(2 * MiB)
        f.write(b"\x77" * MiB)
        f.seek(40 * MiB)
        f.write(b"\x55" * 65536)
    assert sha256(m / "vm@first.raw") == before
    if plane == "on":  # the snapshot's own published mapping: its reads are served in C
        assert stat_of(m / "vm@first.raw", "fast_reads") > 0
    assert os.stat(m / "vm@first.raw").st_size == os.stat(live).st_size
    with pytest.raises(OSError) as exc:
        open(m / "vm@first.raw", "r+b")
    assert exc.value.errno == errno.EROFS
    after = sha256(live)
    snapshot(live, "create", "second")
    assert [s["name"] for s in listing(live)] == ["first", "second"]
    with open(m / "vm@first.raw", "rb"):
        err, why = refused(live, "delete", "first")  # open: busy until its last close
        assert err == errno.EBUSY and "first" in why and "\n" not in why
    snapshot(live, "delete", "first")
    assert not (m / "vm@first.raw").exists() and [s["name"] for s in listing(live)] == ["second"]
    assert sha256(m / "vm@second.raw") == after
    m.umount()
    check_clean(images / "vm.qcow2")
    listed = qemu_img("snapshot", "-l", images / "vm.qcow2").stdout
    assert "second" in listed and "first" not in listed
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=second", images / "vm.qcow2", workdir / "s.raw")
    assert sha256(workdir / "s.raw") == after


def test_snapshot_refusals_are_one_line(mounted, workdir):
    images = _image_with_data(workdir)
    qemu_img("create", "-q", "-f", "raw", images / "flat.raw", "1M")
    m = mounted(images)
    live = m / "vm.raw"
    snapshot(live, "create", "a")
    assert refused(live, "create", "a")[0] == errno.EEXIST
    assert refused(live, "delete", "nosuch")[0] == errno.ENOENT
    err, why = refused(m / "flat.raw", "create", "x")
    assert err == errno.EOPNOTSUPP and "qcow2" in why
    with open(live, "rb"):
        err, why = refused(live, "apply", "a")
        assert err == errno.EBUSY and "open" in why
    with pytest.raises(OSError) as exc:
        os.unlink(m / "vm@a.raw")
    assert exc.value.errno == errno.EPERM
    assert "Traceback" not in m.log_text()


def test_snapshots_while_a_writer_and_fio_run(mounted, workdir):
    """Snapshots created and deleted in a loop while a seeded writer writes its 16 MiB and fio
    verifies its own 16 MiB: each snapshot's file holds, block by block, what the model allows."""
    seed = int(os.environ.get("CACHEFS_SNAP_SEED", "23"))  # the interleaving is the machine's: the model allows any
    print(f"seed {seed}")
    images = workdir / "images"
    images.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", images / "vm.qcow2", "64M")
    m = mounted(images)
    live = m / "vm.raw"
    blocks = 16 * MiB // 4096
    proc, log, stop = start_writer(live, workdir, seed, blocks)
    taken = {}
    try:
        for n in range(6):
            before = len(logged_writes(log))
            snapshot(live, "create", f"s{n}")
            after = len(logged_writes(log))
            writes = logged_writes(log)
            taken[f"s{n}"] = allowed(writes, before, after, seed, blocks, lambda b: bytes(4096))
            check_snapshot(m / f"vm@s{n}.raw", taken[f"s{n}"], seed)
            if n % 2:
                snapshot(live, "delete", f"s{n - 1}")
                del taken[f"s{n - 1}"]
            fio(live, "--rw=randwrite", "--bs=4k", "--offset=32M", "--size=16M", "--number_ios=300",
                "--direct=1", "--do_verify=1", f"--randseed={seed + n}")
    finally:
        stop.touch()
        proc.wait(timeout=30)
    served = {name: sha256(m / f"vm@{name}.raw") for name in taken}
    m.umount()
    check_clean(images / "vm.qcow2")
    for name, digest in served.items():
        qemu_img("convert", "-O", "raw", "-l", f"snapshot.name={name}", images / "vm.qcow2", workdir / "s.raw")
        assert sha256(workdir / "s.raw") == digest, f"seed {seed}: {name}"


def test_qemu_img_snapshots_are_served_and_apply_matches_qemu_img(mounted, workdir):
    """Snapshots `qemu-img snapshot -c` made (L2 tables shared with the active image) are files of
    the mount; the live disk stays writable (its tables made private at open); `cachefs snapshot
    apply` through the mount gives the bytes `qemu-img snapshot -a` gives."""
    images = _image_with_data(workdir)
    image = images / "vm.qcow2"
    qemu_img("snapshot", "-c", "old", image)
    qemu_io(image, "write -P 0x33 1M 2M")
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=old", image, workdir / "old.raw")
    m = mounted(images)
    assert sha256(m / "vm@old.raw") == sha256(workdir / "old.raw")
    with open(m / "vm.raw", "r+b") as f:
        f.seek(6 * MiB)
        f.write(b"\x44" * 12288)
    r = cachefs_cli("snapshot", "list", m / "vm.raw")
    assert "old" in r.stdout and r.stdout.startswith("Snapshot list:"), r.stdout
    m.umount()
    check_clean(image)
    m = mounted(images)
    cachefs_cli("snapshot", "apply", m / "vm.raw", "old")
    assert sha256(m / "vm.raw") == sha256(workdir / "old.raw")
    r = cachefs_cli("snapshot", "create", m / "vm.raw", "old", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "exists" in r.stderr, r.stderr
    m.umount()
    check_clean(image)
    copy = workdir / "copy.qcow2"
    copy.write_bytes(image.read_bytes())
    qemu_img("snapshot", "-a", "old", copy)
    assert to_raw(copy, workdir / "a.raw") == to_raw(image, workdir / "b.raw")
