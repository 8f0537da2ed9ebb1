"""Fuzz target "engine": open a hostile image as a mount does, read it, write it, flush and close it.

The input is a whole image file. It is opened read-only, then writable, with
the production open path of cachefs/image/opening.py (a dirty lazy-refcounts
image is rebuilt first, as QEMU does), and a table cache of four tables so
that evictions and early writeouts happen. The guest clusters exercised are
the image's own: the first ones, the last, and those its first L2 tables map
(data, zero, compressed), so the mutations of a valid seed reach the tables.

Each step may be refused (harness.REFUSALS); a CorruptImage marks the image
read-only and the steps go on, as Qcow2Image._core does. A DAMAGED extent is
an EIO confined to its range: allowed.
"""

from __future__ import annotations

import itertools

from cachefs.image.compressor import COMPRESSORS
from cachefs.errors import CorruptImage
from cachefs.cli.info import size_to_str
from cachefs.qcow2 import format as fmt
from cachefs.qcow2 import metaqueue
from cachefs.qcow2.compress import FillCache, compress_of, plan_compressed
from cachefs.qcow2.engine import open_engine
from cachefs.qcow2.plan import ExtentKind
from cachefs.qcow2.repair import rebuild_refcounts, write_repair

from fuzz.harness import REFUSALS, FileTooLarge, MemFile

#: A four-table cache (meta.TableCache's minimum) for any cluster size.
CACHE_BYTES = 4 * 512
MAX_CLUSTERS = 12  # guest clusters exercised per image
# Reserve 8 KiB ahead, not 1 MiB: the same code (reserve, lend, release), but a 512-byte-cluster
# image no longer spends 90% of an execution raising and dropping 2048 refcounts. Set only while
# a target runs: the smoke test replays the corpus in the same process as the other tests.
RESERVE_BYTES = 8 << 10


def open_as_mount(f: MemFile, *, writable: bool):
    """opening.open_image's core: open (writable with -o drop_bitmaps, so that hostile bitmaps
    are read and freed), rebuild the refcounts of an image not closed cleanly first, and make
    the header changed at open durable (opening._header_first)."""
    kw = dict(writable=writable, cache_bytes=CACHE_BYTES, drop_bitmaps=writable)
    eng = f.run(open_engine(len(f), **kw))
    if eng.needs_repair and writable and eng.writable:
        f.run(write_repair(f.run(rebuild_refcounts(len(f)))))
        eng = f.run(open_engine(len(f), **kw))
        if eng.needs_repair:
            raise CorruptImage("dirty lazy-refcounts image could not be repaired")
    f.fill = FillCache(eng)  # every Qcow2Image has one (compressed_writes.CompressedWrites)
    if eng.writable:
        f.run(eng.queue.make_durable())
    return eng


def guest_clusters(eng, f: MemFile) -> list[int]:
    """The first and last guest clusters, and the allocated ones the first L2 tables name."""
    total = -(-eng.size // eng.cs)
    if total == 0:
        return []
    found = [0, 1, total - 1]
    per = eng.cs // 8
    for l1_idx, l1e in itertools.islice(((i, e) for i, e in enumerate(eng.map.l1) if e), 4):
        off = l1e & fmt.OFFSET_MASK
        raw = f.buf[off:off + eng.cs] if off % eng.cs == 0 else b""
        table = fmt.decode_table(bytes(raw)[:len(raw) // 8 * 8])
        found += [l1_idx * per + i for i, e in enumerate(table) if e][:4]
    return sorted({v for v in found if v < total})[:MAX_CLUSTERS]


def read_extents(eng, f: MemFile, offset: int, length: int) -> None:
    """A guest read: plan it, then read every extent as Qcow2Image._read_extent does."""
    for ext in f.run(eng.plan_read(offset, length)):
        if ext.kind is ExtentKind.DATA:
            f.pread(ext.host_offset, ext.length)
        elif ext.kind is ExtentKind.COMPRESSED:
            desc = ext.compressed
            eng.decompress(desc, f.pread(desc.offset, desc.max_length))
        # ZERO: no I/O; DAMAGED: EIO for this range only, which the contract allows.


def write(eng, f: MemFile, offset: int, data: bytes) -> None:
    """A guest write: plan, data writes, commit (Qcow2Image._write_plain without the lock)."""
    length = min(len(data), eng.size - offset)
    if length <= 0:
        return
    plan = f.run(eng.plan_write(offset, data[:length]))
    for w in plan.data_writes:
        f.pwrite(w.host_offset, w.data)
    if plan.data_writes:
        eng.queue.data_written()
    f.run(eng.commit(plan))


def write_compressed(eng, f: MemFile, vcluster: int, data: bytes) -> None:
    """A whole-cluster write to a compress-on-write image (compressed_writes.CompressedWrites._store)."""
    payload = COMPRESSORS[compress_of(eng.hdr)](data)
    f.fill.prune()
    f.run(plan_compressed(eng, f.fill, vcluster, payload))
    for c in f.fill.take_full():
        f.pwrite(c.offset, c.buf)
        eng.queue.written_by_caller(c)
        f.fill.written(c)


def step(eng, fn, *args) -> None:
    """One request through the image's one boundary (Qcow2Image._core): a refusal, or an I/O
    error (EFBIG: the image layer's EIO), fails only it."""
    try:
        fn(*args)
    except CorruptImage as exc:
        eng.overlap.corrupted(str(exc))
    except (FileTooLarge, *REFUSALS):
        pass


def exercise_reads(eng, f: MemFile, clusters: list[int]) -> None:
    hdr = eng.current_header()
    size_to_str(hdr.size), compress_of(hdr)
    for v in clusters:
        # From a third into the cluster to a third into the next: two lookups, merged extents.
        step(eng, read_extents, eng, f, v * eng.cs + eng.cs // 3, eng.cs)


def exercise_writes(eng, f: MemFile, clusters: list[int]) -> None:
    cs = eng.cs
    for i, v in enumerate(clusters):
        kind = i % 3
        if kind == 0:  # partial: COW of the head and tail, or in place
            step(eng, write, eng, f, v * cs + 17, b"\xa5" * (cs // 2))
        elif kind == 1:  # a whole cluster of data: compressed if the image says so
            whole = write_compressed if compress_of(eng.hdr) else write
            step(eng, whole, eng, f, v if whole is write_compressed else v * cs, b"\x5a" * cs)
        else:  # a whole cluster of zeros: our discard
            step(eng, write, eng, f, v * cs, bytes(cs))
    step(eng, f.run, eng.queue.flush(reserve=True))
    old_size = eng.size
    step(eng, f.run, eng.resize(old_size + (cs * cs // 8)))
    if eng.size > old_size:
        step(eng, write, eng, f, old_size, b"\x3c" * cs)
    step(eng, read_extents, eng, f, 0, 2 * cs)
    f.fill.close()
    step(eng, f.run, eng.queue.close())


def exercise_engine(data: bytes) -> None:
    """Open read-only and read; then open writable, write, flush, grow and close."""
    saved, metaqueue.MIN_RESERVE_BYTES = metaqueue.MIN_RESERVE_BYTES, RESERVE_BYTES
    try:
        _exercise(MemFile(data))
    finally:
        metaqueue.MIN_RESERVE_BYTES = saved


def _exercise(f: MemFile) -> None:
    try:
        eng = open_as_mount(f, writable=False)
    except REFUSALS:
        return
    clusters = guest_clusters(eng, f)
    exercise_reads(eng, f, clusters)
    try:
        eng = open_as_mount(f, writable=True)
    except REFUSALS:
        return
    exercise_reads(eng, f, clusters)
    if eng.writable:
        exercise_writes(eng, f, clusters)


test_one_input = exercise_engine
