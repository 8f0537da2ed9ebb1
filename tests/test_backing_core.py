"""Backing files in the sans-I/O core (issue 22), in memory: no mount, no image layer.

The production engine runs under plan.run_sync over a bytearray (the overlay
file), with a ``backing`` reader over a second bytearray (the base's guest
bytes, possibly shorter than the overlay: zeros past its end, spec "Cluster
mapping"). :class:`Overlay` does only what a driver must: the data writes of
a plan, then its commit; a flush is the metadata queue's own rounds. Reads
resolve BACKING extents through the base. A model (the chain's guest bytes)
says what every read must return.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess

import attrs
import pytest
import trio

from cachefs.backend.faulty import Sync, Truncate, Write
from cachefs.errors import CorruptImage, UnsupportedOperation
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.check import check_image
from cachefs.qcow2.cluster import MappingKind
from cachefs.qcow2.create import new_image
from cachefs.qcow2.discard import SeekBacking, plan_allocate, plan_clear, plan_map, plan_seek
from cachefs.qcow2.engine import open_engine
from cachefs.qcow2.plan import ExtentKind, run_async, run_sync
from recorded import cut_state


def image_bytes(pieces) -> bytearray:
    buf = bytearray()
    for off, data in pieces:
        buf.extend(bytes(max(0, off + len(data) - len(buf))))
        buf[off:off + len(data)] = data
    return buf


def qemu_overlay(tmp_path, size: int, cs: int, compat: str) -> bytearray:
    """An overlay as qemu-img makes it (-u: the base is not opened), v2 or v3."""
    path = tmp_path / f"ov-{compat}-{cs}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw",
                    "-o", f"compat={compat},cluster_size={cs}", str(path), str(size)], check=True)
    return bytearray(path.read_bytes())


class Overlay:
    """The engine over an overlay's bytes ``buf`` and its base's guest bytes ``base``.

    It is also the ``io`` of plan.run_sync (pwrite, sync, truncate). ``events``: every completed
    write, truncate and sync is recorded there, as RecordingBackend records them (power cuts).
    """

    def __init__(self, buf: bytearray, base: bytes | bytearray, *, writable: bool = True, events=None):
        self.buf, self.base, self.events = buf, base, events
        self.eng = run_sync(open_engine(len(buf), writable=writable), self.pread)

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset:offset + length])

    def backing(self, guest_offset: int, length: int) -> bytes:
        return bytes(self.base[guest_offset:guest_offset + length]).ljust(length, b"\0")

    def pwrite(self, offset: int, data) -> None:
        data = bytes(data)
        self.buf.extend(bytes(max(0, offset + len(data) - len(self.buf))))
        self.buf[offset:offset + len(data)] = data
        self._record(Write(offset, data))

    def sync(self) -> None:
        self._record(Sync(len(self.events) if self.events is not None else 0))

    def truncate(self, size: int, grow: bool) -> None:
        if (len(self.buf) < size) if grow else (len(self.buf) > size):
            del self.buf[size:]
            self.buf.extend(bytes(size - len(self.buf)))
            self._record(Truncate(size))

    def _record(self, event) -> None:
        if self.events is not None:
            self.events.append(event)

    def run(self, gen):
        return run_sync(gen, self.pread, self, backing=self.backing)

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        for e in self.run(self.eng.plan_read(offset, length)):
            if e.kind is ExtentKind.ZERO:
                parts.append(bytes(e.length))
            elif e.kind is ExtentKind.BACKING:
                parts.append(self.backing(e.guest_offset, e.length))
            elif e.kind is ExtentKind.DATA:
                parts.append(self.pread(e.host_offset, e.length).ljust(e.length, b"\0"))
            else:
                raise AssertionError(f"unexpected extent {e}")
        return b"".join(parts)

    def write(self, offset: int, data) -> None:
        plan = self.run(self.eng.plan_write(offset, data))
        for w in plan.data_writes:
            self.pwrite(w.host_offset, w.data)
        if plan.data_writes:
            self.eng.queue.data_written()
        self.run(self.eng.commit(plan))

    def clear(self, first: int, count: int, *, zero: bool) -> None:
        """Discard (or write-zeroes) whole guest clusters, one L2 table at a time."""
        per, end = self.eng.map.l2_entries, first + count
        while first < end:
            n = min(end, (first // per + 1) * per) - first
            self.run(self.eng.commit(self.run(plan_clear(self.eng, first, n, zero=zero))))
            first += n

    def flush(self) -> None:
        self.run(self.eng.queue.flush(reserve=True))

    def close(self) -> None:
        self.run(self.eng.queue.close())


def checked_clean(buf: bytearray) -> None:
    result = run_sync(check_image(len(buf)), lambda o, n: bytes(buf[o:o + n]))
    assert result.exit_code() == 0, (result.corruptions[:5], result.leaks[:5])


# ---------------------------------------------------------------- the model

CASES = [("1.1", 512, 256 << 10), ("1.1", 65536, 4 << 20), ("0.10", 512, 256 << 10), ("0.10", 65536, 4 << 20)]


@pytest.mark.parametrize("compat,cs,size", CASES, ids=[f"{c}-{cs}" for c, cs, _ in CASES])
def test_random_operations_on_an_overlay_match_the_chain(tmp_path, compat, cs, size):
    rng = random.Random(f"{compat}-{cs}")
    base = bytearray(rng.randbytes(size * 3 // 4))  # shorter than the overlay: zeros past its end
    base_before = bytes(base)
    ov = Overlay(qemu_overlay(tmp_path, size, cs, compat), base)
    assert ov.eng.backing == fmt.BackingName("base.raw", "raw")
    model = bytearray(bytes(base).ljust(size, b"\0"))
    assert ov.read(0, size) == model, "a fresh overlay reads its base"
    refused = 0
    for step in range(300):
        refused += random_step(ov, model, rng, cs, size)
        if step % 25 == 0:
            ov.flush()
        assert ov.read(0, size) == model, f"step {step}"
    assert (refused > 0) == (compat == "0.10"), "v2 refuses discard and write-zeroes, v3 never"
    assert ov.eng.counters.backing_cow_reads > 0
    ov.close()
    assert base == base_before, "the base never changes"
    checked_clean(ov.buf)
    assert Overlay(ov.buf, base, writable=False).read(0, size) == model, "what is on disk reads the same"


def random_step(ov: Overlay, model: bytearray, rng: random.Random, cs: int, size: int) -> int:
    """One random operation on the overlay and the model; 1 if the overlay refused it."""
    roll = rng.random()
    if roll < 0.6:
        n = rng.choice([1, 100, cs - 1, cs, 2 * cs, 3 * cs + 7])
        off = rng.randrange(0, size - n) if rng.random() < 0.5 else rng.randrange(0, size // cs - 3) * cs
        data = bytes(n) if rng.random() < 0.2 else rng.randbytes(n)  # zeros: detected as such
        ov.write(off, data)
        model[off:off + n] = data
        return 0
    count = rng.choice([1, 2, 5, min(70, size // cs // 2)])
    first = rng.randrange(0, size // cs - count)
    try:
        ov.clear(first, count, zero=roll < 0.8)
    except UnsupportedOperation:
        return 1
    model[first * cs:(first + count) * cs] = bytes(count * cs)
    return 0


# ---------------------------------------------------------------- reads, writes, map and seek

def fresh_overlay(cs: int = 512, size: int = 64 << 10, base: bytes | None = None, **kw) -> Overlay:
    buf = image_bytes(new_image(size, cluster_bits=cs.bit_length() - 1, backing_name="base", **kw))
    return Overlay(buf, base if base is not None else bytes(range(256)) * (size // 256))


def test_unallocated_clusters_read_the_backing_file_and_zero_clusters_read_zeros():
    ov = fresh_overlay()
    assert [e.kind for e in ov.run(ov.eng.plan_read(0, 4096))] == [ExtentKind.BACKING]  # no L2 table
    ov.write(512, bytes(512))  # a whole cluster of zeros: a zero cluster (v3), not "already zeros"
    ov.write(1024 + 10, b"x")  # a partial write: COW from the backing file
    kinds = [(e.guest_offset, e.length, e.kind) for e in ov.run(ov.eng.plan_read(0, 4096))]
    assert kinds == [(0, 512, ExtentKind.BACKING), (512, 512, ExtentKind.ZERO), (1024, 512, ExtentKind.DATA),
                     (1536, 4096 - 1536, ExtentKind.BACKING)]
    assert ov.read(1024, 512) == ov.base[1024:1034] + b"x" + ov.base[1035:1536]
    assert ov.eng.counters.backing_cow_reads == 1
    ov.write(2048, b"y" * 512)  # a whole cluster copies nothing
    assert ov.eng.counters.backing_cow_reads == 1


def test_an_image_without_backing_file_reads_zeros_where_unallocated():
    buf = image_bytes(new_image(64 << 10, cluster_bits=9))
    ov = Overlay(buf, b"")
    assert ov.eng.backing is None
    assert [e.kind for e in ov.run(ov.eng.plan_read(0, 4096))] == [ExtentKind.ZERO]
    ov.write(100, b"z")
    assert ov.eng.counters.backing_cow_reads == 0
    assert run_sync(plan_map(ov.eng), ov.pread)[0][2] is MappingKind.DATA
    assert run_sync(plan_map(ov.eng), ov.pread)[1][2] is MappingKind.UNALLOCATED


def test_map_and_seek_report_backing_runs():
    ov = fresh_overlay()
    ov.write(512, b"d" * 512)     # cluster 1: data
    ov.clear(3, 2, zero=False)    # clusters 3, 4: discarded over a backing file: zero clusters
    runs = [(s, n, k) for s, n, k, _ in run_sync(plan_map(ov.eng), ov.pread)]
    assert runs == [(0, 512, MappingKind.BACKING), (512, 512, MappingKind.DATA), (1024, 512, MappingKind.BACKING),
                    (1536, 1024, MappingKind.ZERO), (2560, (64 << 10) - 2560, MappingKind.BACKING)]
    seek = lambda off, data: run_sync(plan_seek(ov.eng, off, data=data), ov.pread)  # noqa: E731
    assert seek(0, True) == SeekBacking(0, 512)
    assert seek(100, False) == SeekBacking(100, 512)
    assert seek(512, True) == 512
    assert seek(600, False) == SeekBacking(1024, 1536)
    assert seek(1024, True) == SeekBacking(1024, 1536)
    assert seek(1536, False) == 1536
    assert seek(1536, True) == SeekBacking(2560, 64 << 10)
    ov.write(60 << 10, b"e" * 512)  # in a later L2 table: the backing run before it ends there
    assert seek(1536, True) == SeekBacking(2560, 60 << 10)
    assert seek(60 << 10, False) == SeekBacking((60 << 10) + 512, 64 << 10)


def test_discard_and_zero_range_over_a_backing_file_make_zero_clusters():
    ov = fresh_overlay()
    ov.write(0, b"a" * 2048)               # clusters 0-3: data, owned
    ov.clear(0, 2, zero=False)             # discard: no host cluster, the zero flag
    ov.clear(2, 1, zero=True)              # write-zeroes keeps its host cluster (preallocated)
    ov.clear(8, 3, zero=False)             # unallocated: zero clusters too
    table = ov.eng.map.load_l2(ov.eng.map.l2_offset(0), 0)
    entries = run_sync(table, ov.pread).entries
    assert entries[0] == entries[1] == fmt.L2_ZERO
    assert entries[2] & fmt.L2_ZERO and entries[2] & fmt.OFFSET_MASK
    assert entries[8:11] == [fmt.L2_ZERO] * 3
    assert ov.read(0, 1536) == bytes(1536) and ov.read(8 * 512, 1536) == bytes(1536)
    ov.clear(100, 4, zero=False)          # a range with no L2 table gets one
    assert ov.read(100 * 512, 2048) == bytes(2048)
    ov.close()
    checked_clean(ov.buf)


def test_v2_refuses_discard_zero_range_and_both_refuse_preallocation(tmp_path):
    ov = Overlay(qemu_overlay(tmp_path, 1 << 20, 512, "0.10"), bytes(range(256)) * 4096)
    for zero in (False, True):
        with pytest.raises(UnsupportedOperation, match="v2 has no zero flag"):
            ov.clear(0, 1, zero=zero)
    ov.write(0, bytes(512))  # v2 writes a cluster of zeros: no zero flag to say it
    assert ov.read(0, 1024) == bytes(512) + bytes(range(256)) * 2
    with pytest.raises(UnsupportedOperation, match="backing file"):
        ov.run(plan_allocate(ov.eng, 0, 1))
    with pytest.raises(UnsupportedOperation, match="backing file"):
        fresh_overlay().run(plan_allocate(fresh_overlay().eng, 0, 1))
    with pytest.raises(UnsupportedOperation, match="backing file"):
        ov.run(ov.eng.resize(2 << 20))


def test_the_drivers_refuse_a_backing_read_they_cannot_serve():
    ov = fresh_overlay()
    with pytest.raises(RuntimeError, match="no backing reader"):
        run_sync(ov.eng.plan_write(10, b"x"), ov.pread, ov)

    async def pread(o, n):
        return ov.pread(o, n)

    async def backing(o, n):
        return ov.backing(o, n)

    plan = trio.run(lambda: run_async(ov.eng.plan_write(10, b"x"), pread, ov, backing))
    assert len(plan.data_writes[0].data) == 512 and plan.data_writes[0].data[10:11] == b"x"
    ov.run(ov.eng.abort(plan))
    asked = []
    run_sync(ov.eng.plan_write(1024 + 1, b"x"), ov.pread, ov, lambda o, n: asked.append((o, n)) or bytes(n))
    assert asked == [(1024, 512)], "the whole cluster, at its guest offset"


# ---------------------------------------------------------------- the header: name and format

def header_with(name: str = "base.qcow2", fmt_name: str | None = "qcow2", **kw) -> bytearray:
    return image_bytes(new_image(1 << 20, cluster_bits=9, backing_name=name, backing_format=fmt_name, **kw))


def name_at(buf: bytearray) -> tuple[int, int]:
    return struct.unpack_from(">QI", buf, 8)


def test_the_backing_name_and_format_are_parsed_from_the_header():
    buf = header_with()
    assert fmt.parse_header_untrusted(bytes(buf), len(buf)).backing == fmt.BackingName("base.qcow2", "qcow2")
    buf = header_with("dir/é.raw", None)  # UTF-8, and no format extension
    assert fmt.parse_header_untrusted(bytes(buf), len(buf)).backing == fmt.BackingName("dir/é.raw", None)
    assert fmt.parse_header_untrusted(bytes(buf := image_bytes(new_image(1 << 20))), len(buf)).backing is None


@pytest.mark.parametrize("damage,message", [
    (lambda b, o, n: b.__setitem__(slice(o, o + 2), b"\xff\xfe"), "backing file name is not valid UTF-8"),
    (lambda b, o, n: b.__setitem__(o + 1, 0), "backing file name contains a NUL byte"),
    (lambda b, o, n: struct.pack_into(">I", b, 16, 0), "backing file name is empty"),
    (lambda b, o, n: b.__delitem__(slice(o + 2, None)), "backing file name lies past the end of the file"),
])
def test_a_bad_backing_name_is_a_corrupt_image_in_one_line(damage, message):
    buf = header_with()
    damage(buf, *name_at(buf))
    with pytest.raises(CorruptImage, match=message) as exc:
        fmt.parse_header_untrusted(bytes(buf), 1 << 30)
    assert "\n" not in str(exc.value)


def test_a_bad_backing_format_is_a_corrupt_image():
    buf = header_with(fmt_name="qc")
    at = bytes(buf).index(b"qc\0")
    buf[at] = 0xff
    with pytest.raises(CorruptImage, match="backing file format name is not valid UTF-8"):
        fmt.parse_header_untrusted(bytes(buf), len(buf))


def test_new_image_refuses_what_a_header_cannot_hold():
    for name, fmt_name in (("", None), ("a\0b", None), ("x" * 1024, None), (None, "raw"), ("a", "")):
        with pytest.raises(ValueError):
            new_image(1 << 20, backing_name=name, backing_format=fmt_name)
    with pytest.raises(ValueError, match="more than the first cluster"):
        new_image(1 << 20, cluster_bits=9, backing_name="x" * 500)


def test_the_engine_writes_the_header_back_with_the_backing_name():
    """A header write (here a dirty header after an explicit touch) lays the name out again."""
    ov = Overlay(header_with("base.raw", "raw", compress="zlib"), bytes(1 << 20))
    ov.eng.header.touch()
    ov.write(0, b"x")
    ov.close()
    hdr = fmt.parse_header_untrusted(bytes(ov.buf), len(ov.buf))
    assert hdr.backing == fmt.BackingName("base.raw", "raw") and hdr.extension(fmt.EXT_CACHEFS_COMPRESS) == b"zlib"
    checked_clean(ov.buf)


def test_with_backing_changes_only_the_backing_name_and_format():
    buf = header_with("old.qcow2", "qcow2", compress="zlib")
    first = bytes(buf[:512])
    hdr = fmt.parse_header_untrusted(first, len(buf))
    for name, fmt_name in (("new/base.raw", "raw"), ("n2", None), ("n3", "qcow2"), (None, None)):
        out = fmt.with_backing(first, name, fmt_name)
        assert len(out) == 512 and out[:8] == first[:8] and out[20:112] == first[20:112]
        again = fmt.parse_header_untrusted(out, len(buf))
        assert again.backing == (None if name is None else fmt.BackingName(name, fmt_name))
        others = [e for e in again.extensions if e[0] != fmt.EXT_BACKING_FORMAT]
        assert others == [e for e in hdr.extensions if e[0] != fmt.EXT_BACKING_FORMAT]
        buf[:512] = out
        assert Overlay(buf, b"", writable=False).eng.backing == again.backing
        first = out
    with pytest.raises(ValueError, match="more than the first cluster"):
        fmt.with_backing(first, "y" * 400, "qcow2")
    with pytest.raises(ValueError):
        fmt.with_backing(first, None, "raw")
    with pytest.raises(CorruptImage):
        fmt.with_backing(b"\0" * 512, "x", None)


# ---------------------------------------------------------------- qemu-img reads what we write

def qemu_info(path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)


def qemu_check(path) -> None:
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("cluster_bits", [9, 16])
def test_qemu_img_reads_the_backing_name_new_image_writes(tmp_path, cluster_bits):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M"], check=True)
    ov = tmp_path / "ov.qcow2"
    ov.write_bytes(image_bytes(new_image(1 << 20, cluster_bits=cluster_bits, backing_name="base.qcow2",
                                         backing_format="qcow2")))
    info = qemu_info(ov)
    assert (info["backing-filename"], info["backing-filename-format"]) == ("base.qcow2", "qcow2")
    qemu_check(ov)


def test_a_qemu_img_overlay_parses_and_with_backing_renames_its_base(tmp_path):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "other base.raw"), "1M"], check=True)
    ov = tmp_path / "ov.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(ov)],
                   check=True)
    buf = bytearray(ov.read_bytes())
    assert Overlay(buf, b"", writable=False).eng.backing == fmt.BackingName("base.qcow2", "qcow2")
    features = fmt.parse_header_untrusted(bytes(buf), len(buf)).extension(0x6803F857)
    buf[:65536] = fmt.with_backing(bytes(buf[:65536]), "other base.raw", "raw")
    ov.write_bytes(buf)
    info = qemu_info(ov)
    assert (info["backing-filename"], info["backing-filename-format"]) == ("other base.raw", "raw")
    assert fmt.parse_header_untrusted(bytes(buf), len(buf)).extension(0x6803F857) == features
    qemu_check(ov)
