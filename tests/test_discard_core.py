"""Discard, write-zeroes and SEEK_DATA/SEEK_HOLE on the image layer over memory (issue 12).

A random mix of writes, discards (PUNCH_HOLE), write-zeroes (ZERO_RANGE),
preallocations (mode 0, v3) at any byte offset, and flushes runs on a Qcow2Image over a bytearray, v3 and
v2, against a bytearray model of the guest disk. Then:

- every byte reads as the model says;
- SEEK_DATA/SEEK_HOLE never call data a hole: every hole reads as zeros,
  and the holes cover every whole cluster the discards left unwritten;
- a discard or write-zeroes costs no sync of its own (invariant 2 rides in
  the flush's writeout);
- after a clean close the image checks clean (no leaks: every freed host
  cluster's refcount came down).
"""

from __future__ import annotations

import errno
import random
import subprocess

import pytest

from cachefs.backend.faulty import Sync
from cachefs.policy import WRITEBACK
from cachefs.qcow2.check import check_image
from cachefs.qcow2.discard import whole_clusters
from cachefs.qcow2.plan import run_sync
from recorded import open_recorded

SIZE = 4 << 20
CS = 4096


def test_whole_clusters_splits_the_edges_at_cluster_boundaries():
    assert whole_clusters(100, 200, CS) == (1, 0, [(100, 200)])
    assert whole_clusters(CS - 10, 20, CS) == (1, 0, [(CS - 10, 10), (CS, 10)])  # no whole cluster, two edges
    assert whole_clusters(CS, 3 * CS, CS) == (1, 3, [])
    assert whole_clusters(10, 3 * CS, CS) == (1, 2, [(10, CS - 10), (3 * CS, 10)])


def _syncs(rec) -> int:
    return sum(isinstance(e, Sync) for e in rec.events)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
async def test_discard_and_zero_range_against_a_model(tmp_path, compat):
    path = tmp_path / "m.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat},cluster_size={CS}",
                    str(path), str(SIZE)], check=True)
    buf = bytearray(path.read_bytes())  # the memory backend writes into it in place
    img, rec, _ = await open_recorded(buf, WRITEBACK)
    model = bytearray(SIZE)
    counts = await random_ops_against_the_model(img, rec, random.Random(compat), compat, model)
    assert bytes(await img.read(0, SIZE)) == bytes(model)
    st = img.stats()
    assert (st["discards"], st["write_zeroes"]) == (counts["discard"], counts["zero"])

    holes = await holes_hold_only_zeros(img, model)
    zero_clusters = sum(model[c:c + CS] == bytes(CS) for c in range(0, SIZE, CS))
    assert holes >= zero_clusters * CS // 2  # most zero clusters are holes (a few hold written zeros)

    await img.close()
    result = run_sync(check_image(len(buf)), lambda o, k: bytes(buf[o:o + k]))
    assert result.exit_code() == 0, (result.corruptions[:5], result.leaks[:10])
    path.write_bytes(buf)
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


async def random_ops_against_the_model(img, rec, rng: random.Random, compat: str, model: bytearray) -> dict[str, int]:
    """400 writes, discards, write-zeroes, preallocations (compat 1.1) and flushes, each applied to
    ``model`` too; returns how many discards and write-zeroes."""
    counts = {"discard": 0, "zero": 0}
    for _ in range(400):
        roll = rng.random()
        n = rng.choice([1, 511, CS, 3 * CS + 17, 40 * CS])
        off = rng.randrange(SIZE - n)
        if roll < 0.5:
            data = rng.randbytes(n)
            await img.write(off, data)
            model[off:off + n] = data
        elif roll < 0.9:
            kind = "discard" if roll < 0.7 else "zero"
            before = _syncs(rec)
            await (img.discard if kind == "discard" else img.zero_range)(off, n)
            assert _syncs(rec) == before, "a discard must not sync by itself"
            model[off:off + n] = bytes(n)
            counts[kind] += 1
        elif roll < 0.93 and compat == "1.1":
            await img.allocate(off, n)  # preallocated zero clusters: the guest sees no change
        else:
            await img.flush()
    return counts


async def holes_hold_only_zeros(img, model: bytearray) -> int:
    """Walk the image with seek_hole/seek_data: every hole reads as zeros in ``model``. Returns
    the bytes in holes."""
    pos, holes = 0, 0
    while pos < SIZE:
        hole = await img.seek_hole(pos)
        try:
            data = await img.seek_data(hole) if hole < SIZE else SIZE
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            data = SIZE
        assert model[hole:data] == bytes(data - hole), f"hole [{hole}, {data}) holds data"
        holes += data - hole
        pos = data
    return holes
