"""`cachefs snapshot list|create|delete|apply` on image files (issue 23), judged by qemu-img.

Output as qemu-img snapshot's (-l's table, nothing for a change), exit 1 with one line on
stderr for every refusal: a name taken or missing, a v2 image, a dirty or corrupt image, an
image some other process holds (here a running qemu-io).
"""

from __future__ import annotations

import subprocess

from conftest import cachefs, one_line_error, qemu_img, qemu_io
from interop import check_clean
from snapshotting import active_raw, snapshot_names, snapshot_raw

DIRTY_BYTE = 79  # spec "Header": incompatible_features is bytes 72-79; bit 0 (the dirty bit) is in the last


def image(workdir, name="vm.qcow2", opts="compat=1.1"):
    path = workdir / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, "16M")
    qemu_io(path, "write -P 0x11 0 256k", "write -P 0x22 8M 64k")
    return path


def test_list_create_delete_apply(workdir):
    img = image(workdir)
    assert cachefs("snapshot", "list", img).stdout == ""
    before = active_raw(img, workdir / "before.raw")
    r = cachefs("snapshot", "create", img, "first")
    assert r.stdout == r.stderr == ""
    qemu_io(img, "write -P 0x33 0 64k")
    cachefs("snapshot", "create", img, "second")
    check_clean(img)
    ours = cachefs("snapshot", "list", img).stdout.splitlines()
    theirs = qemu_img("snapshot", "-l", img).stdout.splitlines()
    assert ours == theirs and len(ours) == 4 and ours[2].split()[:2] == ["1", "first"]
    assert snapshot_raw(img, "first", workdir / "f.raw") == before
    cachefs("snapshot", "apply", img, "first")
    assert active_raw(img, workdir / "a.raw") == before
    cachefs("snapshot", "delete", img, "2")  # by ID, as qemu-img finds it
    check_clean(img)
    assert snapshot_names(img) == ["first"]
    qemu_img("snapshot", "-c", "theirs", img)  # and qemu-img goes on from ours
    cachefs("snapshot", "delete", img, "first")
    check_clean(img)
    assert snapshot_names(img) == ["theirs"]


def test_help_names_the_subcommands():
    out = cachefs("snapshot", "--help").stdout
    for sub in ("list", "create", "delete", "apply"):
        assert sub in out
    assert "snapshot" in cachefs("--help").stdout
    assert "NAME" in cachefs("snapshot", "create", "-h").stdout


def test_refusals_are_one_line(workdir):
    img = image(workdir)
    cachefs("snapshot", "create", img, "taken")
    cases = {
        ("create", "taken"): "exists already",
        ("delete", "missing"): "no snapshot with ID or name 'missing'",
        ("apply", "7"): "no snapshot with ID or name '7'",
    }
    for (op, name), says in cases.items():
        line = one_line_error(cachefs("snapshot", op, img, name, check=False))
        assert str(img) in line and says in line, line
    v2 = image(workdir, "old.qcow2", "compat=0.10")
    line = one_line_error(cachefs("snapshot", "create", v2, "x", check=False))
    assert "v3" in line, line
    dirty = image(workdir, "dirty.qcow2")
    with open(dirty, "r+b") as f:
        f.seek(DIRTY_BYTE)
        f.write(b"\x01")
    line = one_line_error(cachefs("snapshot", "create", dirty, "x", check=False))
    assert "cachefs check --repair all" in line and str(dirty) in line, line
    raw = workdir / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    assert "qcow2" in one_line_error(cachefs("snapshot", "list", raw, check=False))
    assert snapshot_names(img) == ["taken"]
    check_clean(img)


def test_an_image_in_use_is_refused(workdir):
    img = image(workdir)
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        holder.stdin.write("read 0 512\n")
        holder.stdin.flush()
        holder.stdout.readline()  # qemu-io has the image open (and locked) once it answers
        line = one_line_error(cachefs("snapshot", "create", img, "x", check=False))
        assert "in use" in line and str(img) in line, line
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert snapshot_names(img) == []
    cachefs("snapshot", "create", img, "x")
    check_clean(img)
