"""Power-cut simulation of the metadata queue (the dm-log-writes / CrashMonkey idea).

A workload of allocating writes, overwrites, partial writes, all-zero
clusters (frees), discards, write-zeroes and preallocation (fallocate, issue 12), a resize
and guest flushes runs over a backend that
records every completed write and fdatasync. For hundreds of cut points,
the file a power cut would leave is materialized: everything a completed
sync covered, plus a random subset of the writes no sync covered (the
kernel may have written any of them, in any order). That subset model is
stronger than shuffling the queue's write-out order within its barriers:
every order of the uncovered writes, and every prefix of it, is one of the
subsets.

In every state:

- the image is consistent: our checker finds no corruption (leaks are
  allowed: clusters reserved ahead, frees not yet applied), and a sample is
  judged by ``qemu-img check`` (exit 0 or 3);
- every write covered by a completed guest flush reads back (invariant 4),
  sector by sector; a sector may show a later write that was in flight;
- a completed resize covered by a flush is there.

Steady-state cost is asserted too: about one fdatasync per guest flush, and in
writethrough and directsync, where every acknowledged write is promised, about
one device sync per guest write (docs/cache-modes.md, "One sync per write").
"""

from __future__ import annotations

import random
import subprocess

import attrs
import pytest

import interleaving

from cachefs.backend.faulty import Sync, replay
from cachefs.policy import NONE, WRITEBACK, WRITETHROUGH
from cachefs.qcow2.check import check_image
from cachefs.qcow2.plan import run_sync
from powercut import SECTOR, allowed_by_sector, compressed_qcow2, guest_after_cut
from recorded import Op, cut_state, fresh_qcow2, guaranteed, open_recorded


async def workload(img, rec, rng: random.Random, n_ops: int, size: int, cs: int) -> tuple[list[Op], int]:
    """Ops as in test_cache_modes plus overwrites of written ranges, discards, write-zeroes and one resize half way."""
    ops: list[Op] = []
    written: list[tuple[int, int]] = []
    grown = size
    for i in range(n_ops):
        started = len(rec.events)
        roll = rng.random()
        if i == n_ops // 2:
            grown = size + 4 * cs + 3 * SECTOR
            await img.truncate(grown)
            ops.append(Op("resize", grown, started=started, done=len(rec.events)))
            continue
        if roll < 0.12:
            await img.flush()
            ops.append(Op("flush", started=started, done=len(rec.events)))
            continue
        limit = grown if i > n_ops // 2 else size
        if roll < 0.28:
            # A discard (fallocate PUNCH_HOLE, issue 12): whole clusters unallocated, partial
            # edges zeroed. To the guest it reads as zeros, so it is modelled as a write of zeros.
            n = rng.choice([cs, 3 * cs, 2 * cs + 5 * SECTOR, 7 * SECTOR])
            off = rng.randrange((limit - n) // SECTOR + 1) * SECTOR
            if 0.24 <= roll < 0.26:  # preallocation (mode 0): zero clusters with space; nothing to see
                await img.allocate(off, n)
                continue
            await (img.discard if roll < 0.24 else img.zero_range)(off, n)
            ops.append(Op("write", off, bytes(n), started, len(rec.events)))
            continue
        if roll < 0.32:
            off, data = rng.randrange(limit // cs) * cs, bytes(cs)       # a zero cluster: a free
        elif roll < 0.45 and written:
            off, n = rng.choice(written)                                 # overwrite in place
            data = rng.randbytes(n)
        else:
            n = rng.choice([1, 1, 8, 8, 16, 130]) * SECTOR
            n = min(n, limit)
            off = rng.randrange((limit - n) // SECTOR + 1) * SECTOR
            data = rng.randbytes(n)
            written.append((off, n))
        await img.write(off, data)
        ops.append(Op("write", off, data, started, len(rec.events)))
    return ops, grown


def resize_guaranteed(ops: list[Op], cut: int) -> int | None:
    """The new size if a resize and a later completed flush both happened before the cut."""
    for i, op in enumerate(ops):
        if op.kind == "resize":
            if any(o.kind == "flush" and o.done <= cut for o in ops[i + 1:]):
                return op.offset
    return None


WORKLOADS = {"16-fresh": (16, 1, "fresh"), "16-compressed": (16, 2, "compressed"), "12-fresh": (12, 3, "fresh"),
             "9-fresh": (9, 4, "fresh"), "12-tiny-cache": (12, 5, "tiny-cache")}  # cluster bits, CI seed, source
MODES = {m.name: m for m in (WRITEBACK, NONE, WRITETHROUGH)}
# Every workload in writeback; none on two, writethrough on three of them, 512-byte clusters
# included (that workload found the moved-L1 ordering bug in writethrough): the suite's time budget.
# Over this memory file none differs from writeback only in the descriptors' O_DIRECT, and
# directsync from writethrough likewise, which memory does not model: test_cache_modes.py and
# test_powercut_concurrent.py cut directsync and none too.
CASES = ([f"writeback-{w}" for w in WORKLOADS] + [f"none-{w}" for w in ("16-fresh", "12-tiny-cache")]
         + [f"writethrough-{w}" for w in ("16-fresh", "9-fresh", "12-tiny-cache")])


@pytest.mark.parametrize("case", CASES)
def test_power_cut_states_are_consistent_and_keep_flushed_writes(case, tmp_path):
    """Each case's own CI seed (WORKLOADS); make soak runs the others."""
    seed = WORKLOADS[case.split("-", 1)[1]][1]
    states = interleaving.run(simulate, case, seed, tmp_path, seed=seed,
                              replay=f"make soak SOAK_ONLY=powercut-{case} SOAK_SEEDS=<seed>")
    assert states >= 200


@attrs.frozen
class Recorded:
    """One seeded workload as recorded: the image it started from, its ops and the events they made."""

    base: bytes
    initial: bytes       # the guest's view of ``base``, its grown tail as zeros
    size: int
    grown: int           # the size after the resize
    ops: list[Op]
    events: list


async def simulate(case: str, seed: int, tmp_path) -> int:
    """One seeded run of a case ("MODE-WORKLOAD"); the cut states checked. tiny-cache: 4 tables,
    so the queue writes out early (no sync) and evicts written tables."""
    mode_name, shape = case.split("-", 1)
    mode, (cluster_bits, _, source) = MODES[mode_name], WORKLOADS[shape]
    cs = 1 << cluster_bits
    size = 8 << 20 if cluster_bits > 9 else 2 << 20
    base = base_image(tmp_path, source, size, cluster_bits)
    initial, _ = await guest_after_cut(bytearray(base))
    initial = initial.ljust(size + (8 << 20), b"\0")  # the grown tail reads as zeros
    cache = 4 * cs if source == "tiny-cache" else None
    img, rec, _ = await open_recorded(bytearray(base), mode, cache_bytes=cache)
    rng = random.Random(seed)
    first = await one_write_per_l2_table(img, rec, rng, size, cs) if source == "tiny-cache" else []
    ops, grown = await workload(img, rec, rng, 220, size, cs)
    run = Recorded(base, initial, size, grown, first + ops, list(rec.events))
    syncs_cost_what_the_mode_promises(run, mode, source, cluster_bits)
    states = await check_cut_states(run, mode, rng, tmp_path)
    if source == "tiny-cache" and not mode.write_through:  # write-through writes everything out at each write
        assert img.early_writeouts > 0

    await img.close()
    final = replay(base, rec.events)
    result = run_sync(check_image(len(final)), lambda o, n: bytes(final[o:o + n]))
    assert result.exit_code() == 0, (result.corruptions, result.leaks[:10])  # a clean close: no leaks
    return states


def base_image(tmp_path, source: str, size: int, cluster_bits: int) -> bytes:
    if source == "compressed":
        # Partial writes copy-on-write out of compressed clusters: the copied
        # old data must be durable before the L2 entry switches (invariant 3).
        return compressed_qcow2(tmp_path, size, cluster_bits)
    return bytes(fresh_qcow2(size, cluster_bits))


async def one_write_per_l2_table(img, rec, rng: random.Random, size: int, cs: int) -> list[Op]:
    """One write in the range of every L2 table before any flush: more dirty tables than the
    cache holds, so an early writeout happens on every seed (the random workload alone
    left it out on seed 55370313)."""
    first: list[Op] = []
    for off in range(0, size, (cs // 8) * cs):
        started, data = len(rec.events), rng.randbytes(SECTOR)
        await img.write(off, data)
        first.append(Op("write", off, data, started, len(rec.events)))
    return first


def syncs_cost_what_the_mode_promises(run: Recorded, mode, source: str, cluster_bits: int) -> None:
    ops, events = run.ops, run.events
    flushes = sum(op.kind == "flush" for op in ops)
    syncs = sum(isinstance(e, Sync) for e in events)
    # One fdatasync per flush in steady state; new tables and the first flushes cost extra.
    # (512-byte clusters need a new L2 table every 32 KiB of guest space: more extra syncs.)
    # Copy-on-write out of a compressed cluster is the deliberate extra sync (data first).
    per_flush = 2.0 if source == "compressed" else 1.5 if cluster_bits >= 12 else 2.5
    if mode.write_through:
        # Every acknowledged write is durable (guaranteed() counts them all), at one device
        # sync per write: an O_DSYNC write in place, or one fdatasync for an allocating write
        # and its metadata. New tables, data-first COW and the first allocation cost more.
        writes = [op for op in ops if op.kind == "write"]
        per_write = [sum(isinstance(e, Sync) for e in events[op.started:op.done]) for op in writes]
        extra = 1.0 if source == "compressed" else 0.1 if cluster_bits >= 12 else 0.5
        assert sum(per_write) <= (1 + extra) * len(writes) + 4, (sum(per_write), len(writes))
    else:
        assert syncs <= per_flush * flushes + 4, (syncs, flushes)


async def check_cut_states(run: Recorded, mode, rng: random.Random, tmp_path) -> int:
    """Two cut states at each of about 100 cuts, each judged sector by sector; qemu-img check on
    every 25th cut's. Returns how many states were checked."""
    events = run.events
    cuts = sorted(set(rng.sample(range(len(events) + 1), min(100, len(events) + 1))) | {len(events)})
    states = 0
    for n, cut in enumerate(cuts):
        for _ in range(2):  # two random subsets of the uncovered writes per cut
            state = cut_state(run.base, events, cut, rng)
            data, result = await guest_after_cut(state)
            states += 1
            flushed_writes_survive(run, mode, cut, data)
        if n % 25 == 0:  # qemu-img is the judge: leaks at most
            path = tmp_path / f"cut{cut}.qcow2"
            path.write_bytes(state)
            r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
            assert r.returncode in (0, 3), f"qemu-img check exit {r.returncode} at cut {cut}:\n{r.stdout}"
            path.unlink()
    assert states >= 2 * min(100, len(events) + 1)
    print(f"power-cut states checked: {states} ({len(cuts)} cuts of {len(events)} events)")
    return states


def flushed_writes_survive(run: Recorded, mode, cut: int, data: bytes) -> None:
    """The guest view ``data`` of a state cut after ``cut`` events keeps what the mode promised."""
    ops, size = run.ops, run.size
    safe = guaranteed(ops, cut, mode)
    must_size = resize_guaranteed(ops, cut)
    if must_size is not None:
        assert len(data) >= must_size, f"cut {cut}: a flushed resize was lost"
    for s, allowed in allowed_by_sector(ops, safe, run.grown // SECTOR, run.initial).items():
        got = data[s * SECTOR:(s + 1) * SECTOR] or None
        if got is None:
            # Past the size this state has: only allowed if no guaranteed write is there.
            assert not any(s * SECTOR >= size and i in safe for i, op in enumerate(ops)
                           if op.kind == "write" and op.offset <= s * SECTOR < op.offset + len(op.data))
            continue
        assert got in allowed, f"cut {cut}/{len(run.events)}: sector {s} lost a flushed write"


SOAK = {f"powercut-{case}": (simulate, case) for case in CASES}
