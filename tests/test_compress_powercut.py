"""Power cuts during a compress-on-write workload (issue 13; the simulation of test_powercut.py).

The production core and image layer write a compress-on-write image over a
backend that records every completed write and fdatasync: whole-cluster
writes (stored compressed, packed into shared host clusters, some spanning
two), overwrites of compressed clusters, partial writes (copy-on-write out of
a compressed cluster, possibly one whose host cluster is still in the fill
cache), zero clusters and discards (fallocate: each frees a share of a host cluster), and
guest flushes (each seals the partial host cluster). Every cut state, with a
random subset of the unsynced writes, must be consistent (leaks allowed),
show every flushed write, and decompress: a compressed L2 entry durable
before its data would read as damaged, failing the test.
"""

from __future__ import annotations

import random
import subprocess

import pytest

import interleaving

from cachefs.backend.faulty import replay
from cachefs.policy import DIRECTSYNC, NONE, WRITEBACK
from cachefs.qcow2.check import check_image
from cachefs.qcow2.plan import run_sync
from memimage import new_buffer
from powercut import SECTOR, allowed_by_sector, guest_after_cut
from recorded import Op, cut_state, guaranteed, open_recorded


def compressible(rng: random.Random, n: int) -> bytes:
    """Never all zeros; chunks of 1/8 to 1/3 of a cluster, so host clusters are shared and spanned."""
    word, noise = rng.randbytes(rng.randrange(1, 40)), rng.randbytes(n // rng.choice([3, 5, 8]))
    return noise + (word * (n // len(word) + 1))[:n - len(noise)]


async def workload(img, rec, rng: random.Random, n_ops: int, size: int, cs: int) -> list[Op]:
    ops: list[Op] = []
    whole: list[int] = []
    for _ in range(n_ops):
        started, roll = len(rec.events), rng.random()
        if roll < 0.1:
            await img.flush()
            ops.append(Op("flush", started=started, done=len(rec.events)))
            continue
        if roll < 0.17 and whole:
            off, data = rng.choice(whole), bytes(cs)                        # discard a compressed cluster
            if roll < 0.135:  # fallocate PUNCH_HOLE (issue 12); to the guest, zeros like the zero write
                await img.discard(off, cs)
                ops.append(Op("write", off, data, started, len(rec.events)))
                continue
        elif roll < 0.35 and whole:
            off, data = rng.choice(whole), compressible(rng, cs)            # overwrite a compressed one
        elif roll < 0.5:
            n = rng.choice([1, 8, 130]) * SECTOR                            # partial: COW, a normal cluster
            off = rng.randrange((size - n) // SECTOR) * SECTOR
            data = compressible(rng, n) if rng.random() < 0.5 else rng.randbytes(n)
        else:
            k = rng.choice([1, 1, 2, 4])                                     # whole clusters, compressed
            off = rng.randrange(size // cs - k) * cs
            data = b"".join(compressible(rng, cs) if rng.random() < 0.9 else rng.randbytes(cs)
                            for _ in range(k))
            whole.extend(off + i * cs for i in range(k))
        await img.write(off, data)
        ops.append(Op("write", off, data, started, len(rec.events)))
    return ops


# Every write is durable when acknowledged in directsync: the open host cluster is rewritten
# whole, not sealed. Each case: mode, cluster bits, its CI seed, algorithm.
CASES = {"writeback-16-zlib": (WRITEBACK, 16, 11, "zlib"), "none-16-zstd": (NONE, 16, 13, "zstd"),
         "none-12-zstd": (NONE, 12, 12, "zstd"), "writeback-12-zlib": (WRITEBACK, 12, 14, "zlib"),
         "directsync-16-zlib": (DIRECTSYNC, 16, 15, "zlib")}


@pytest.mark.parametrize("case", CASES)
def test_power_cut_states_of_a_compress_on_write_image(case, tmp_path):
    seed = CASES[case][2]
    states = interleaving.run(simulate, case, seed, tmp_path, seed=seed,
                              replay=f"make soak SOAK_ONLY=compress-{case} SOAK_SEEDS=<seed>")
    assert states >= 40


async def simulate(case: str, seed: int, tmp_path) -> int:
    """One seeded run of a case; the cut states checked."""
    mode, cluster_bits, _, algorithm = CASES[case]
    cs = 1 << cluster_bits
    size = 4 << 20
    base = bytes(new_buffer(size, cluster_bits=cluster_bits, compress=algorithm))
    img, rec, _ = await open_recorded(bytearray(base), mode)
    rng = random.Random(seed)
    ops = await workload(img, rec, rng, 120, size, cs)
    stats = img.stats()
    assert stats["compressed_clusters"] > 50 and stats["compress_spanning"] > 0, stats
    assert stats["compress_full_writes"] > 0 and stats["compress_flush_writes"] > 0, stats
    assert stats["compress_host_clusters"] * 2 < stats["compressed_clusters"], stats  # packed, in every mode
    events = list(rec.events)
    initial = bytes(size)
    cuts = sorted(set(rng.sample(range(len(events) + 1), min(40, len(events) + 1))) | {len(events)})
    states = 0
    for n, cut in enumerate(cuts):
        for _ in range(2):
            state = cut_state(base, events, cut, rng)
            states += 1
            data, _ = await guest_after_cut(state)
            safe = guaranteed(ops, cut, mode)
            for s, allowed in allowed_by_sector(ops, safe, size // SECTOR, initial).items():
                assert data[s * SECTOR:(s + 1) * SECTOR] in allowed, f"cut {cut}/{len(events)}: sector {s}"
        if n % 20 == 0:  # qemu-img is the judge: leaks at most
            path = tmp_path / f"cut{cut}.qcow2"
            path.write_bytes(state)
            r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
            assert r.returncode in (0, 3), f"qemu-img check exit {r.returncode} at cut {cut}:\n{r.stdout}"
    await img.close()
    final = replay(base, rec.events)
    result = run_sync(check_image(len(final)), lambda o, n: bytes(final[o:o + n]))
    assert result.exit_code() == 0, (result.corruptions[:5], result.leaks[:10])  # exact refcounts: no leaks
    return states


SOAK = {f"compress-{case}": (simulate, case) for case in CASES}
