"""The mapping-change hook: every change of a guest cluster's mapping is reported, first.

The data plane (docs/design.md, "Two planes") serves published mappings
from C, so it must hear of every change before it takes effect:
allocation, copy-on-write, a zero-write (our discard, which frees the old
host cluster), and growth of the disk. ``Engine.on_mapping_change`` is that
subscription; cluster.ClusterMap.remap and .grow are the only places that
report. Here each kind of change is made through the production image layer
and the reports are checked, including that each came while a lookup still
saw the old mapping.
"""

from __future__ import annotations

import errno
import random
import subprocess

import pytest

from cachefs.policy import WRITEBACK
from cachefs.qcow2.cluster import Mapping, MappingChange, MappingKind
from cachefs.qcow2.plan import run_sync
from memimage import open_memory
from recorded import fresh_qcow2, open_recorded

CS = 1 << 16
SIZE = 4 << 20


def no_reads(offset, length):
    raise AssertionError("a mapping lookup in the callback needed a read")


def subscribe(img) -> list[tuple[MappingChange, list[Mapping]]]:
    """Record each report with what a lookup saw for its clusters at that moment."""
    engine, seen = img.engine, []

    def callback(change: MappingChange) -> None:
        now = []
        for vcl in range(change.first, change.first + change.count):
            if vcl * engine.cs >= engine.size:
                now.append(Mapping(MappingKind.OUTSIDE))
            else:
                now.append(Mapping.of(run_sync(engine.map.entry(vcl), no_reads), engine.cb))
        seen.append((change, now))
    engine.on_mapping_change(callback)
    return seen


def host_of(img, vcl: int) -> int:
    return run_sync(img.engine.map.entry(vcl), no_reads) & 0x00FF_FFFF_FFFF_FE00


async def test_allocate_zero_write_and_resize_are_reported_before_they_happen():
    img = await open_memory(fresh_qcow2(SIZE))
    seen = subscribe(img)

    await img.write(0, b"a" * 4096)                       # allocate guest cluster 0
    h0 = host_of(img, 0)
    await img.write(8192, b"b" * 4096)                    # in place: no mapping change
    await img.write(0, bytes(CS))                         # zero-write: cluster 0 becomes a zero cluster
    await img.write(3 * CS + 100, b"c" * 1000)            # allocate, partial (reads as zeros around it)
    h3 = host_of(img, 3)
    await img.truncate(SIZE + 2 * CS + 512)               # 3 new guest clusters

    unallocated, zero = Mapping(MappingKind.UNALLOCATED), Mapping(MappingKind.ZERO)
    assert [c for c, _ in seen] == [
        MappingChange(0, 1, unallocated, Mapping(MappingKind.DATA, h0, owned=True)),
        MappingChange(0, 1, Mapping(MappingKind.DATA, h0, owned=True), zero),
        MappingChange(3, 1, unallocated, Mapping(MappingKind.DATA, h3, owned=True)),
        MappingChange(SIZE // CS, 3, Mapping(MappingKind.OUTSIDE), unallocated),
    ]
    # Each report came while lookups still saw the old mapping.
    assert all(now == [change.old] * change.count for change, now in seen)
    # The freed host cluster stays allocated until a flush makes the zero-write durable.
    assert h3 != h0
    await img.flush()
    assert len(seen) == 4, "a flush changes no mapping"
    await img.close()


async def test_cow_out_of_a_compressed_cluster_is_reported(tmp_path):
    raw, path = tmp_path / "src.raw", tmp_path / "c.qcow2"
    rng = random.Random(5)
    raw.write_bytes(b"".join(bytes([i + 1]) * 4096 + rng.randbytes(2048) + bytes(CS - 6144) for i in range(8)))
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    buf = bytearray(path.read_bytes())
    img = await open_memory(buf)
    old = Mapping.of(run_sync(img.engine.map.entry(2), lambda off, n: bytes(buf[off:off + n])), img.engine.cb)
    assert old.kind is MappingKind.COMPRESSED
    seen = subscribe(img)

    await img.write(2 * CS + 10, b"new")                  # copy-on-write: old bytes around the new ones
    new = Mapping(MappingKind.DATA, host_of(img, 2), owned=True)
    assert [c for c, _ in seen] == [MappingChange(2, 1, old, new)]
    assert seen[0][1] == [old]
    assert (await img.read(2 * CS, 16)) == bytes([3]) * 10 + b"new" + bytes([3]) * 3
    await img.close()


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
async def test_a_failed_allocating_write_reports_nothing(err):
    """Abort gives the cluster back; the mapping never changed, so nothing is reported."""
    img, _, faulty = await open_recorded(fresh_qcow2(SIZE), WRITEBACK, faulty=True)
    seen = subscribe(img)
    faulty.inject("pwrite", err, times=1)
    with pytest.raises(OSError):
        await img.write(5 * CS, b"x" * 4096)
    assert seen == []
    await img.write(5 * CS, b"x" * 4096)
    assert [c.first for c, _ in seen] == [5]
    await img.close()
