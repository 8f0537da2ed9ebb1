"""Power cuts under concurrent writers (issue 14): the data I/O of allocating writes runs unlocked.

tests/test_powercut.py drives one request at a time. Here eight writers run
at once over a recording backend whose every write and fdatasync yields to
the others, so a flush (or a writethrough write's shared fdatasync) can run
between one writer's data write and its commit, allocations are in flight
while other writers plan, and several land in the same new cluster. Each
writer owns its own 4 KiB blocks (so each sector's history is one writer's
order), and the blocks of eight writers share every 64 KiB cluster.

In every cut state: no corruption (leaks allowed), and every write the mode
promises reads back. writeback: the writes completed before a flush started
that completed before the cut. writethrough, directsync: every write
completed before the cut.
"""

from __future__ import annotations

import random

import pytest
import trio

import interleaving

from cachefs.backend import MemoryBackend, RecordingBackend
from cachefs.image.backends import BackendSet
from cachefs.policy import DIRECTSYNC, WRITEBACK, WRITETHROUGH
from cachefs.qcow2.engine import open_engine
from cachefs.qcow2.plan import run_async
from cachefs.image.qcow2image import Qcow2Image
from powercut import SECTOR, allowed_by_sector, guest_after_cut
from recorded import Op, YieldingView, durable_state, fresh_qcow2, promised

WRITERS, BLOCK, CS = 8, 4096, 65536


async def run_writers(img, rec, mode, rng: random.Random, size: int) -> list[Op]:
    ops: list[Op] = []
    blocks = size // BLOCK

    async def writer(k: int) -> None:
        mine = list(range(k, blocks, WRITERS))
        for _ in range(40):
            started = len(rec.events)
            if rng.random() < 0.1:
                await img.flush(mode)
                ops.append(Op("flush", started=started, done=len(rec.events)))
                continue
            b = rng.choice(mine)
            n = rng.choice([1, 2, 8]) * SECTOR
            off = b * BLOCK + rng.randrange((BLOCK - n) // SECTOR + 1) * SECTOR
            data = rng.randbytes(n)
            await img.write(off, data, mode)
            ops.append(Op("write", off, data, started, len(rec.events)))  # appended in completion order

    async with trio.open_nursery() as nursery:
        for k in range(WRITERS):
            nursery.start_soon(writer, k)
    return ops


MODES = {m.name: m for m in (WRITEBACK, WRITETHROUGH, DIRECTSYNC)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", interleaving.seeds())
def test_concurrent_writers_survive_power_cuts(mode, seed):
    states = interleaving.run(simulate, mode, seed, seed=seed, replay=f"make soak SOAK_ONLY=concurrent-{mode} "
                              "SOAK_SEEDS=<seed>")
    assert states > 0


async def simulate(mode_name: str, seed: int, tmp_path=None) -> int:
    """One seeded run: eight writers, then every sampled cut state checked. Returns the states."""
    mode = MODES[mode_name]
    size = 1 << 20  # 16 clusters: eight writers in each
    base = bytes(fresh_qcow2(size))
    rec = RecordingBackend(MemoryBackend(bytearray(base)))
    backends = BackendSet(lambda m: YieldingView(rec, m))
    engine = await run_async(open_engine(len(base), writable=True), backends.get(mode).pread)
    img = Qcow2Image("mem.qcow2", backends, None, True, engine, mode)
    rng = random.Random(f"{mode.name}-{seed}")
    ops = await run_writers(img, rec, mode, rng, size)
    events = list(rec.events)
    assert len(img.allocating) == 0
    cuts = sorted(set(rng.sample(range(len(events) + 1), min(150, len(events) + 1))) | {len(events)})
    checked = 0
    for cut in cuts:
        state = durable_state(base, events, cut, rng)
        data, _ = await guest_after_cut(state)
        safe = promised(ops, cut, mode.write_through)
        checked += len(safe)
        for s, allowed in allowed_by_sector(ops, safe, size // SECTOR).items():
            assert data[s * SECTOR:(s + 1) * SECTOR] in allowed, f"{mode.name}: cut {cut}/{len(events)}: sector {s}"
    assert checked > 0
    await img.close()
    return len(cuts)


SOAK = {f"concurrent-{name}": (simulate, name) for name in MODES}
