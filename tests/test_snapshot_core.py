"""Internal snapshots in the qcow2 core (issue 23): the table codec, and create, delete, apply
and unshare as metadata generations (qcow2/generation.py), judged by qemu-img.

Each operation runs over an image file's bytes (plan.run_sync), or over a live engine
(tests/memimage.py) that goes on writing after the switch; qemu-img check must then find
no error and no leak, and qemu-img must read the snapshots as they were taken.
"""

from __future__ import annotations

import struct

import pytest

from cachefs.errors import CorruptImage, SnapshotExists, SnapshotNotFound, UnsupportedImage, UnsupportedOperation
from cachefs.qcow2 import format as fmt
from cachefs.qcow2 import snapshots
from cachefs.qcow2.plan import run_sync
from conftest import qemu_img, qemu_io
from interop import check_clean
from memimage import MemImage
from snapshotting import active_raw, live_op, plan, reader, run_op, snapshot_names, snapshot_raw

KiB, MiB = 1 << 10, 1 << 20


def qcow2(workdir, name: str, *writes: str, size: str = "32M", opts: str = "compat=1.1"):
    path = workdir / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, size)
    if writes:
        qemu_io(path, *writes)
    return path


def load(path) -> bytearray:
    return bytearray(path.read_bytes())


def save(buf: bytearray, path) -> None:
    path.write_bytes(bytes(buf))


def header(buf: bytearray) -> fmt.Header:
    return run_sync(fmt.read_header(len(buf)), reader(buf))


DATA = ("write -P 0x11 0 1M", "write -P 0x22 4M 70k", "write -c -P 0x33 8M 128k", "write -z 12M 64k",
        "write -P 0x44 31M 4k")


def test_table_round_trip_on_qemu_made_tables(workdir):
    img = qcow2(workdir, "q.qcow2", *DATA)
    qemu_img("snapshot", "-c", "first", img)
    qemu_io(img, "write -P 0x55 0 64k")
    qemu_img("snapshot", "-c", "snapshot with a longer name", img)
    buf = load(img)
    hdr = header(buf)
    entries = run_sync(snapshots.read_entries(hdr, len(buf)), reader(buf))
    assert [e.name for e in entries] == ["first", "snapshot with a longer name"]
    assert [e.id for e in entries] == ["1", "2"] and snapshots.next_id(entries) == "3"
    assert all(e.disk_size == 32 * MiB for e in entries)
    raw = snapshots.encode_table(entries)
    assert bytes(buf[hdr.snapshots_offset:hdr.snapshots_offset + len(raw)]) == raw
    mine = snapshots.new_entry("7", "mine", 0x50000, 1, 5 * MiB, 1_700_000_000_123_456_789)
    back = snapshots.encode_table([mine])
    hdr2 = fmt.Header(version=3, cluster_bits=16, size=0, l1_size=0, l1_table_offset=0,
                      refcount_table_offset=0, refcount_table_clusters=1, nb_snapshots=1, snapshots_offset=0)
    again = run_sync(snapshots.read_entries(hdr2, 1 << 20), lambda o, n: back[o:o + n])
    assert again == [mine] and mine.icount is None and mine.date_nsec == 123_456_789
    assert snapshots.find(entries, "2").name == "snapshot with a longer name"
    assert snapshots.find(entries, "first").id == "1"


def test_create_on_a_file_is_qemu_readable(workdir):
    img = qcow2(workdir, "a.qcow2", *DATA)
    before = active_raw(img, workdir / "before.raw")
    buf = load(img)
    gen = run_op(buf, "create", "s1")
    assert gen.snapshot.name == "s1" and gen.snapshot.id == "1"
    assert min(off for off, _ in gen.writes) >= len(img.read_bytes())
    save(buf, img)
    check_clean(img)
    qemu_io(img, "write -P 0x66 0 4k", "write -P 0x77 4M 64k", "write -P 0x88 8M 64k")
    check_clean(img)
    assert snapshot_names(img) == ["s1"]
    assert snapshot_raw(img, "s1", workdir / "s1.raw") == before
    buf = load(img)
    run_op(buf, "create", "s2")
    save(buf, img)
    check_clean(img)
    assert snapshot_names(img) == ["s1", "s2"]
    assert snapshot_raw(img, "s1", workdir / "s1.raw") == before


def test_live_writes_after_a_snapshot_copy_on_write(workdir):
    mem = MemImage.create(32 * MiB)
    mem.write(0, b"\x11" * MiB)
    mem.write(5 * MiB, b"\x22" * 70000)
    old = mem.read(0, 32 * MiB)
    live_op(mem, "create", "s1")
    assert not mem.engine.needs_unshare
    cow_reads = mem.engine.counters.cow_reads
    mem.write(64 * KiB, b"\x44" * (64 * KiB))  # a whole shared cluster: nothing to read
    assert mem.engine.counters.cow_reads == cow_reads
    mem.write(4 * KiB, b"\x33" * 4096)          # a partial one: the old bytes around it are copied
    assert mem.engine.counters.cow_reads == cow_reads + 1
    mem.write(20 * MiB, b"\x55" * 100)
    new = mem.read(0, 32 * MiB)
    live_op(mem, "create", "s2")
    mem.write(8 * KiB, b"\x66" * 4096)
    mem.close()
    img = workdir / "live.qcow2"
    save(mem.buf, img)
    check_clean(img)
    assert snapshot_raw(img, "s1", workdir / "s1.raw") == old
    assert snapshot_raw(img, "s2", workdir / "s2.raw") == new
    assert active_raw(img, workdir / "a.raw")[8 * KiB:12 * KiB] == b"\x66" * 4096


def test_delete_gives_exact_refcounts(workdir):
    img = qcow2(workdir, "d.qcow2", *DATA)
    buf = load(img)
    run_op(buf, "create", "s1")
    save(buf, img)
    qemu_io(img, "write -P 0x66 0 1M", "write -c -P 0x67 16M 64k")
    buf = load(img)
    run_op(buf, "create", "s2")
    save(buf, img)
    after_s2 = active_raw(img, workdir / "s2-time.raw")
    qemu_io(img, "write -P 0x68 0 64k")
    buf = load(img)
    gen = run_op(buf, "delete", "s1")
    assert gen.snapshot.name == "s1" and gen.freed
    save(buf, img)
    check_clean(img)
    assert snapshot_names(img) == ["s2"]
    assert snapshot_raw(img, "s2", workdir / "s2.raw") == after_s2
    buf = load(img)
    run_op(buf, "delete", "2")  # by ID, as QEMU finds it
    save(buf, img)
    check_clean(img)
    assert snapshot_names(img) == []
    info = qemu_img("check", "--output=json", img).stdout
    assert '"leaks"' not in info and '"corruptions"' not in info


def test_live_delete_makes_tables_private_again(workdir):
    mem = MemImage.create(16 * MiB)
    mem.write(0, bytes(range(256)) * 4096)
    live_op(mem, "create", "s1")
    live_op(mem, "delete", "s1")
    eng = mem.engine
    assert all(e & fmt.L1_COPIED for e in eng.map.l1 if e & fmt.OFFSET_MASK)
    cow_reads = eng.counters.cow_reads
    mem.write(4 * KiB, b"\x99" * 512)  # refcount 1 again: in place, no copy
    assert eng.counters.cow_reads == cow_reads
    mem.close()
    img = workdir / "ld.qcow2"
    save(mem.buf, img)
    check_clean(img)


def test_apply_equals_qemu_img_snapshot_a(workdir):
    img = qcow2(workdir, "p.qcow2", *DATA)
    qemu_img("snapshot", "-c", "q1", img)
    qemu_io(img, "write -P 0x70 0 2M", "write -z 4M 64k", "write -c -P 0x71 24M 64k")
    buf = load(img)
    run_op(buf, "create", "mine")
    save(buf, img)
    qemu_io(img, "write -P 0x72 1M 64k")
    qemu_img("resize", img, "48M")
    for name in ("q1", "mine"):
        theirs = workdir / f"theirs-{name}.qcow2"
        theirs.write_bytes(img.read_bytes())
        qemu_img("snapshot", "-a", name, theirs)
        buf = load(img)
        gen = run_op(buf, "apply", name)
        assert gen.header.size == 32 * MiB
        ours = workdir / f"ours-{name}.qcow2"
        save(buf, ours)
        check_clean(ours)
        assert active_raw(ours, workdir / "o.raw") == active_raw(theirs, workdir / "t.raw")
        assert snapshot_names(ours) == ["q1", "mine"]


def test_qemu_made_snapshots_unshare_then_write(workdir):
    img = qcow2(workdir, "u.qcow2", *DATA)
    qemu_img("snapshot", "-c", "q1", img)
    kept = snapshot_raw(img, "q1", workdir / "q1.raw")
    buf = load(img)
    mem = MemImage(buf)
    assert mem.engine.writable and mem.engine.needs_unshare
    gen = live_op(mem, "unshare")
    assert gen is not None and gen.snapshot is None and not mem.engine.needs_unshare
    assert live_op(mem, "unshare") is None
    mem.write(0, b"\xaa" * 4096)
    mem.write(8 * MiB, b"\xbb" * (64 * KiB))
    mem.close()
    save(mem.buf, img)
    check_clean(img)
    assert snapshot_raw(img, "q1", workdir / "q1.raw") == kept
    qemu_io(img, "read -P 0xaa 0 4k", "read -P 0x11 4k 60k", "read -P 0xbb 8M 64k")


def test_refusals_are_one_line(workdir):
    img = qcow2(workdir, "r.qcow2", "write -P 0x11 0 64k")
    qemu_img("snapshot", "-c", "taken", img)
    buf = load(img)
    cases = [(SnapshotExists, ("create", "taken")), (SnapshotNotFound, ("delete", "nothing")),
             (SnapshotNotFound, ("apply", "9"))]
    v2 = load(qcow2(workdir, "v2.qcow2", opts="compat=0.10"))
    one_bit = load(qcow2(workdir, "rb1.qcow2", "write 0 64k", opts="refcount_bits=1"))
    for exc, (op, name) in cases:
        with pytest.raises(exc) as ei:
            plan(buf, op, name)
        assert "\n" not in str(ei.value) and name in str(ei.value)
    with pytest.raises(UnsupportedImage, match="need a qcow2 v3 image") as ei:
        plan(v2, "create", "x")
    with pytest.raises(UnsupportedOperation, match="refcount_bits=1"):
        plan(one_bit, "create", "x")
    with pytest.raises(Exception, match="needs a name"):
        plan(buf, "create", "")


def damaged(buf: bytearray, at: int, value: bytes) -> bytearray:
    out = bytearray(buf)
    out[at:at + len(value)] = value
    return out


def test_damaged_tables_are_corrupt_in_one_line(workdir):
    img = qcow2(workdir, "h.qcow2", "write -P 0x11 0 64k")
    qemu_img("snapshot", "-c", "taken", img)
    buf = load(img)
    at = header(buf).snapshots_offset
    hostile = {
        "L1 outside the file": damaged(buf, at, struct.pack(">Q", 1 << 40)),
        "huge extra data": damaged(buf, at + 36, struct.pack(">I", 1 << 30)),
        "entry outside the file": damaged(buf, 60, struct.pack(">I", 2)),  # nb_snapshots 2: the second runs out
    }
    for what, bad in hostile.items():
        for op in ("create", "delete", "apply"):
            with pytest.raises(CorruptImage) as ei:
                plan(bad, op, "taken" if op != "create" else "new")
            assert "\n" not in str(ei.value), what


def test_generation_writes_only_fresh_clusters_then_the_header(workdir):
    img = qcow2(workdir, "o.qcow2", *DATA)
    buf = load(img)
    gen = plan(buf, "create", "s", alloc_from=100)
    cs = gen.header.cluster_size
    assert all(off >= 100 * cs and off % cs == 0 for off, _ in gen.writes)
    assert gen.end == max(off + len(d) for off, d in gen.writes)
    sector = gen.header_sector
    assert len(sector) == 512 and sector[72:] == bytes(buf[72:512])
    parsed = fmt.parse_header_untrusted(sector + bytes(buf[512:cs]), gen.end)
    assert parsed == gen.header
