"""Cache-mode promises inside the daemon: policy answers, power cuts per mode, sticky sync failure.

The mount-level half (open flags in /proc, fdatasyncs under strace, live
switch, coherence) is tests/test_cache_modes_mount.py. Here an image runs
over an in-memory file whose every write and fdatasync is recorded, so a
power cut can be simulated at any point: the durable prefix plus any subset
of the writes no completed sync covers. Each mode's promise is then checked
sector by sector (docs/cache-modes.md, "The promises"):

- writeback, none: what a completed guest flush covered survives;
- writethrough, directsync: every acknowledged write survives, with no
  flush at all (the backend is O_DSYNC: emulated here as a sync after each
  write, which is what the flag means);
- unsafe: flushes promise nothing, and cost no fdatasync; a clean close
  still leaves everything on disk.

In every cut state the image must be qcow2-consistent: leaks allowed,
corruption never (our checker for all states, qemu-img for a sample).
"""

from __future__ import annotations

import errno
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from cachefs.backend import MemoryBackend, RecordingBackend, replay
from cachefs.backend.faulty import Sync
from cachefs.image.backends import BackendSet
from cachefs.image.qcow2image import Qcow2Image
from cachefs.policy import AUTO, DIRECTSYNC, MODES, NONE, UNSAFE, WRITEBACK, WRITETHROUGH, CacheMode, mode_named
from cachefs.qcow2.check import check_image
from cachefs.qcow2.engine import open_engine
from cachefs.qcow2.plan import run_async, run_sync
from memimage import read_all
from powercut import SECTOR, allowed_by_sector
from recorded import ModeView, Op, cut_state, fresh_qcow2, guaranteed, open_recorded

CONCRETE = [WRITEBACK, WRITETHROUGH, NONE, DIRECTSYNC, UNSAFE]


# ---------------------------------------------------------------- the policy table

def test_each_mode_answers_the_three_questions_as_qemu_does():
    table = {m.name: (m.direct, m.write_through, m.honour_flush, m.queue_metadata) for m in CONCRETE}
    assert table == {
        "writeback": (False, False, True, True),
        "writethrough": (False, True, True, False),
        "none": (True, False, True, True),
        "directsync": (True, True, True, False),
        "unsafe": (False, False, False, True),
    }


@pytest.mark.parametrize("flags,expect", [
    (os.O_RDWR, WRITEBACK),
    (os.O_RDONLY, WRITEBACK),
    (os.O_RDWR | os.O_DIRECT, NONE),
    (os.O_RDWR | os.O_DSYNC, WRITETHROUGH),
    (os.O_RDWR | os.O_SYNC, WRITETHROUGH),
    (os.O_RDWR | os.O_DIRECT | os.O_DSYNC, DIRECTSYNC),
    (os.O_WRONLY | os.O_DIRECT | os.O_SYNC, DIRECTSYNC),
])
def test_auto_follows_the_openers_flags(flags, expect):
    assert AUTO.for_open(flags) is expect
    assert AUTO.default is WRITEBACK


def test_concrete_modes_ignore_open_flags():
    for m in CONCRETE:
        assert m.for_open(os.O_RDWR | os.O_DIRECT | os.O_SYNC) is m


def test_mode_names_round_trip_and_bad_names_are_one_line():
    for name, m in MODES.items():
        assert mode_named(name.upper()) is m
    with pytest.raises(ValueError, match=r"^unknown cache mode 'fast'; choose one of writeback, "):
        mode_named("fast")


def test_no_code_branches_on_a_modes_name():
    """A mode is asked, never compared by name, outside policy.py (docs/cache-modes.md)."""
    src = Path(__file__).resolve().parent.parent / "cachefs"
    pattern = re.compile(r"""(\.name\s*[!=]=|[!=]=\s*["'](?:%s)["']|["'](?:%s)["']\s*[!=]=)""" % (
        "|".join(MODES), "|".join(MODES)))
    offenders = [f"{p.name}:{i}" for p in src.rglob("*.py") if p.name != "policy.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


# ---------------------------------------------------------------- a workload over recorded memory

async def run_workload(img, rec, rng: random.Random, n_ops: int, size: int) -> list[Op]:
    """Allocating, partial, overwriting and all-zero writes with a guest flush now and then."""
    ops = []
    cs = 65536
    for i in range(n_ops):
        started = len(rec.events)
        roll = rng.random()
        if roll < 0.15:
            await img.flush()
            ops.append(Op("flush", started=started, done=len(rec.events)))
            continue
        if roll < 0.22:  # a whole cluster of zeros: becomes a zero cluster (a free)
            off = rng.randrange(size // cs) * cs
            data = bytes(cs)
        else:
            sectors = rng.choice([1, 1, 8, 8, 16, 130])
            off = rng.randrange(size // SECTOR - sectors) * SECTOR
            data = rng.randbytes(sectors * SECTOR)
        await img.write(off, data)
        ops.append(Op("write", off, data, started, len(rec.events)))
    return ops


async def read_guest(buf: bytearray, sectors: int) -> bytes:
    reader = lambda off, n: bytes(buf[off:off + n])  # noqa: E731
    result = run_sync(check_image(len(buf)), reader)
    assert not result.corruptions, result.corruptions
    return await read_all(buf, sectors * SECTOR)


@pytest.mark.parametrize("mode", CONCRETE, ids=lambda m: m.name)
async def test_power_cut_keeps_each_modes_promise(mode, tmp_path):
    size = 8 << 20
    sectors = size // SECTOR
    base = bytes(fresh_qcow2(size))
    img, rec, _ = await open_recorded(bytearray(base), mode)
    rng = random.Random(f"cut-{mode.name}")
    ops = await run_workload(img, rec, rng, 160, size)
    events = list(rec.events)
    syncs_cost_what_the_mode_says(img, mode, ops, events)

    cuts = sorted(set(rng.sample(range(len(events) + 1), min(120, len(events) + 1))) | {len(events)})
    checked_promises = 0
    for n, cut in enumerate(cuts):
        state = cut_state(base, events, cut, rng)
        data = await read_guest(state, sectors)
        checked_promises += keeps_the_promise(mode, ops, cut, len(events), data, sectors)
        if n % 30 == 0:  # qemu-img is the judge: leaks at most
            path = tmp_path / f"cut{cut}.qcow2"
            path.write_bytes(state)
            rc = subprocess.run(["qemu-img", "check", str(path)], capture_output=True).returncode
            assert rc in (0, 3), f"{mode.name}: qemu-img check exit {rc} at cut {cut}"
    if mode.honour_flush:
        assert checked_promises > 0

    # A clean close writes everything, whatever the mode (unsafe too).
    await img.close()
    final = replay(base, rec.events)
    data = await read_guest(final, sectors)
    every = {i for i, op in enumerate(ops) if op.kind == "write"}
    for s, allowed in allowed_by_sector(ops, every, sectors).items():
        assert data[s * SECTOR:(s + 1) * SECTOR] in allowed
    assert isinstance(rec.events[-1], Sync)
    assert run_sync(check_image(len(final)), lambda o, n: bytes(final[o:o + n])).exit_code() == 0


def syncs_cost_what_the_mode_says(img, mode: CacheMode, ops: list[Op], events: list) -> None:
    """What each mode costs in explicit fdatasyncs (O_DSYNC writes are not calls)."""
    syncs = sum(isinstance(e, Sync) for e in events)
    flushes = sum(op.kind == "flush" for op in ops)
    assert flushes >= 10
    explicit = sum(c.fdatasyncs for c in img.backends.counters.values())
    if not mode.honour_flush:
        assert explicit == 0 and syncs == 0, "unsafe must not sync before close"
    elif mode.write_through:
        # One device sync per guest write at most, metadata included: an overwrite in place is
        # one O_DSYNC write (a Sync event here), an allocating write one shared fdatasync
        # (docs/cache-modes.md, "One sync per write"). The first allocation, before any
        # reservation, and a new L2 table cost a round more: counted over the run.
        per_write = [sum(isinstance(e, Sync) for e in events[op.started:op.done]) for op in ops if op.kind == "write"]
        print(f"{mode.name}: {sum(per_write)} device syncs ({explicit} fdatasyncs in all) for "
              f"{len(per_write)} guest writes, at most {max(per_write)} per write")
        assert sum(per_write) <= len(per_write), per_write
    else:
        # A flush right after a write must sync; one right after another flush may find nothing to do.
        after_write = sum(op.kind == "flush" and i > 0 and ops[i - 1].kind == "write" for i, op in enumerate(ops))
        assert after_write <= explicit <= 3 * flushes, (after_write, explicit, flushes)


def keeps_the_promise(mode: CacheMode, ops: list[Op], cut: int, n_events: int, data: bytes, sectors: int) -> int:
    """Every sector of the guest view ``data`` of a state cut after ``cut`` events holds what the
    mode promised; returns how many promised writes were checked."""
    safe = guaranteed(ops, cut, mode)
    for s, allowed in allowed_by_sector(ops, safe, sectors).items():
        got = data[s * SECTOR:(s + 1) * SECTOR]
        assert got in allowed, f"{mode.name}: cut {cut}/{n_events}: sector {s} lost an acknowledged write"
    return len(safe)


@pytest.mark.parametrize("mode", [WRITEBACK, NONE], ids=lambda m: m.name)
async def test_a_failed_fdatasync_fails_that_flush_and_every_later_one(mode):
    img, rec, faulty = await open_recorded(fresh_qcow2(4 << 20), mode, faulty=True)
    await img.write(0, b"a" * 4096)
    await img.flush()
    await img.write(65536, b"b" * 4096)
    faulty.inject("fdatasync", errno.EIO, times=1)
    with pytest.raises(OSError) as first:
        await img.flush()
    assert first.value.errno == errno.EIO
    # The fault is gone, but the kernel may have dropped the pages: never report success again.
    for _ in range(3):
        await img.write(131072, b"c" * 4096)
        with pytest.raises(OSError) as later:
            await img.flush()
        assert later.value.errno == errno.EIO
    assert img.guest.flush_failures == 1
    assert img.stats()["flush_failures"] == 1
    # Reads still work; a close reports the failure rather than hiding it.
    assert await img.read(0, 4096) == b"a" * 4096
    with pytest.raises(OSError):
        await img.close()


async def test_unsafe_flush_is_acknowledged_and_counted_as_ignored():
    img, rec, _ = await open_recorded(fresh_qcow2(4 << 20), UNSAFE)
    for i in range(5):
        await img.write(i * 65536, b"x" * 4096)
        await img.flush()
    stats = img.stats()
    assert stats["unsafe.guest_flushes"] == 5 and stats["unsafe.flushes_ignored"] == 5
    assert stats["backend_fdatasyncs"] == 0
    assert not any(isinstance(e, Sync) for e in rec.events)
    await img.close()
    assert isinstance(rec.events[-1], Sync)


async def test_writethrough_write_is_durable_on_return_metadata_included():
    """Cut right after each acknowledged write: the durable prefix alone has the data."""
    base = bytes(fresh_qcow2(4 << 20))
    img, rec, _ = await open_recorded(bytearray(base), WRITETHROUGH)
    rng = random.Random(7)
    for n in range(20):
        off = rng.randrange(4 << 20 >> 9) * SECTOR
        off = min(off, (4 << 20) - 4096)
        data = rng.randbytes(4096)
        await img.write(off, data)
        state = cut_state(base, rec.events, len(rec.events), random.Random(0))
        # No flush ever happened, and the write is there with every later-unsynced write dropped.
        assert isinstance(rec.events[-1], Sync)
        assert (await read_guest(state, (4 << 20) // SECTOR))[off:off + 4096] == data
    assert img.stats()["queue_depth"] == 0, "writethrough never leaves metadata queued"


async def test_mixed_modes_on_one_image_keep_cow_data_before_its_l2_entry():
    """auto: a writeback handle's buffered data must be synced before a writethrough write exposes it."""
    base = bytes(fresh_qcow2(4 << 20))
    img, rec, _ = await open_recorded(bytearray(base), AUTO)
    await img.write(0, b"w" * 4096, WRITEBACK)                # allocates; data buffered, L2 queued
    await img.write(1 << 20, b"t" * 4096, WRITETHROUGH)       # must write out the queue durably
    state = cut_state(base, rec.events, len(rec.events), random.Random(1))
    data = await read_guest(state, (4 << 20) // SECTOR)
    assert data[(1 << 20):(1 << 20) + 4096] == b"t" * 4096
    # The writeback write may or may not be durable, but if its L2 entry is, so is its data.
    assert data[:4096] in (b"w" * 4096, bytes(4096))


async def test_raw_writethrough_needs_no_fdatasync_and_writeback_flush_needs_one():
    buf = bytearray(1 << 20)
    img, rec, _ = await open_recorded(buf, AUTO, raw=True)
    await img.write(0, b"1" * 4096, WRITETHROUGH)
    await img.flush(WRITETHROUGH)
    assert img.stats()["backend_fdatasyncs"] == 0
    await img.write(4096, b"2" * 4096, WRITEBACK)
    await img.flush(WRITEBACK)
    await img.flush(WRITEBACK)  # nothing new: no second fdatasync
    assert img.stats()["writeback.fdatasyncs"] == 1
    await img.close()


async def test_switch_flushes_first_and_reopens_with_the_new_flags():
    opened = []
    store = MemoryBackend(fresh_qcow2(4 << 20))
    rec = RecordingBackend(store)

    def opener(m):
        opened.append(m.name)
        return ModeView(rec, m)
    backends = BackendSet(opener)
    be = backends.get(WRITEBACK)
    engine = await run_async(open_engine(store.size(), writable=True), be.pread)
    img = Qcow2Image("mem", backends, None, True, engine, WRITEBACK)
    await img.write(0, b"s" * 4096)
    await img.switch_mode(NONE)
    assert img.mode is NONE and opened == ["writeback", "none"]
    assert backends.modes_open() == ["none"]
    assert isinstance(rec.events[-1], Sync) and not img.engine.queue.dirty
    assert await img.read(0, 4096) == b"s" * 4096
    await img.close()


async def test_switch_refused_keeps_the_old_mode_and_says_why():
    store = MemoryBackend(fresh_qcow2(4 << 20))
    from cachefs.errors import DirectIOUnsupported

    def opener(m):
        if m.direct:
            raise DirectIOUnsupported("x: the backing filesystem (ramfs) does not support O_DIRECT")
        return ModeView(store, m)
    backends = BackendSet(opener)
    engine = await run_async(open_engine(store.size(), writable=True), backends.get(WRITEBACK).pread)
    img = Qcow2Image("mem", backends, None, True, engine, WRITEBACK)
    with pytest.raises(DirectIOUnsupported):
        await img.switch_mode(DIRECTSYNC)
    assert img.mode is WRITEBACK and "ramfs" in img.switch_error
    await img.write(0, b"k" * 512)
    assert await img.read(0, 512) == b"k" * 512
    await img.close()


async def test_switch_waits_for_running_io():
    """No request may run on a descriptor the switch closes."""
    store = MemoryBackend(fresh_qcow2(4 << 20))
    gate = trio.Event()

    class Slow(ModeView):
        async def pwrite(self, offset, data):
            await gate.wait()
            await super().pwrite(offset, data)
    backends = BackendSet(lambda m: Slow(store, m))
    engine = await run_async(open_engine(store.size(), writable=True), backends.get(WRITEBACK).pread)
    img = Qcow2Image("mem", backends, None, True, engine, WRITEBACK)
    order = []
    async with trio.open_nursery() as nursery:
        async def writer():
            await img.write(0, b"q" * 4096)
            order.append("write")

        async def switcher():
            await img.switch_mode(NONE)
            order.append("switch")
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(switcher)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        gate.set()
    assert order == ["write", "switch"]
    assert await img.read(0, 4096) == b"q" * 4096
