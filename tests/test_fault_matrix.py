"""The fault matrix: every named metadata write x {EIO, ENOSPC} x {once, always}.

An image runs over an in-memory file (MemoryBackend) wrapped by a
FaultyBackend and a RecordingBackend. A scenario is a short list of guest
steps (writes, flushes, a resize) chosen so that its flushes write every kind
of metadata: a new L2 table, an updated one, an existing refcount block (for
allocations, and for a new reservation), a new one, the refcount table (an
entry in place, and the whole table moved), the L1 table (an entry, and the
whole table moved by a resize) and the header (the dirty bit of a
reservation, a resize, a moved refcount table). Free space inside the file
starts out as garbage, so a pointer that becomes durable before its target
shows up as corruption, not as a harmless run of zeros.

A learning run of each scenario records which item every flush writes where
(the engine's writeout batches), so each cell of the matrix can aim a fault
at exactly one item's host bytes. Then, per cell, the scenario runs again
from scratch with the fault armed before the flush that writes that item:

- the guest gets the error (OSError with that errno) from that flush;
- the file stays qcow2-consistent, whatever a crash would keep of it: every
  completed write, only what the last completed fdatasync covered, and
  subsets of the writes in between. Leaks are allowed, corruption never, and
  every write acknowledged by an earlier successful flush is there;
- guest writes and reads go on;
- once: a retried flush succeeds, every write reads back, the rest of the
  scenario runs, and after a clean close the image has no leak at all (our
  checker and ``qemu-img check``);
- always: every later flush fails with that errno (the write is retried,
  not given up), reads work, the file stays consistent; once the fault is
  cleared a flush succeeds: a failed pwrite is not sticky;
- finally the whole recorded history is audited: at every completed
  fdatasync, the writes up to the next one all, none, or each metadata write
  alone must leave a corruption-free file.

The ftruncate that extends the file over a new reservation is not sticky
either. A failed fdatasync is sticky (docs/cache-modes.md): that flush and
every later one fail, even after the fault is gone. A failed guest data write
fails that write and aborts its allocation; nothing leaks and later writes
work.

The last test is a bug this matrix found, without any fault: see
test_new_refcount_block_is_reachable_before_an_entry_that_needs_it.
"""

from __future__ import annotations

import errno
import random
import subprocess
from collections.abc import Callable

import attrs
import pytest
import trio

from cachefs.backend.faulty import Sync, Write, replay
from cachefs.policy import WRITEBACK
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.check import CheckResult, check_image
from cachefs.qcow2.engine import open_engine
from cachefs.qcow2.plan import ExtentKind, run_async, run_sync
from cachefs.qcow2.create import new_image
from recorded import open_recorded

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SECTOR = 512
ERRNOS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC}
TIMES = {"once": 1, "always": None}


# ---------------------------------------------------------------- scenarios

@attrs.frozen
class Scenario:
    """A fresh image and guest steps: ("write", offset, length) | ("flush",) | ("grow", size)."""

    name: str
    size: int
    cluster_bits: int
    refcount_order: int
    # Free clusters of stale bytes after the fresh image: the allocator hands
    # them out first, so a table written there reads back as garbage, not
    # zeros, if anything points at it before it is durable.
    garbage: int
    # An unwritten guest offset under an L2 table the first flush links: a
    # write there after a failed flush allocates from what that flush reserved.
    spare: int
    steps: tuple


# 64 KiB clusters: L2 tables (new, then updated), the existing refcount block,
# the L1 entry, the header's dirty bit (first flush after allocations: the
# reservation), an in-place overwrite, then a resize that moves the L1 table
# and rewrites the header, and an L1 entry in the moved table.
BIG = Scenario("big", 8 * MiB, 16, 4, 8, 5 * MiB, (
    ("write", 0, 4 * KiB),          # 0: new L2 table, a data cluster (no reservation yet)
    ("flush",),                     # 1: refblock + dirty bit, L2 (new), L1 entry; reserves 16 clusters
    ("write", 1 * MiB, 1 * MiB),    # 2: 16 clusters: the whole reservation
    ("flush",),                     # 3: refblock (a new reservation), L2 (update)
    ("write", 8 * KiB, 4 * KiB),    # 4: overwrite in place (cluster 0 is allocated)
    ("grow", 1 * GiB),              # 5: L1 grows: moved to the end of the file
    ("flush",),                     # 6: refblock + new L1, then the header
    ("write", 600 * MiB, 4 * KiB),  # 7: new L2 table under the moved L1
    ("flush",),                     # 8
))

# 512 B clusters, 16-bit refcounts: a refcount block covers 128 KiB of host
# space, so 200 KiB of data needs a new one, and a new refcount-table entry.
SMALL = Scenario("small", 1 * MiB, 9, 4, 64, 200 * KiB + 4 * KiB, (
    ("write", 0, 200 * KiB),
    ("flush",),                     # 1: new refblocks, then reftable[0] in place
    ("write", 512 * KiB, 8 * KiB),
    ("flush",),
))

# 512 B clusters, 64-bit refcounts: one refcount-table cluster covers 2 MiB of
# host space, so the second flush's reservation moves (and grows) the table;
# the header switches to it last.
GROW = Scenario("grow", 4 * MiB, 9, 6, 64, 104 * KiB, (
    ("write", 0, 100 * KiB),
    ("flush",),                     # 1: reserves 1 MiB (2048 clusters)
    ("write", 1 * MiB, 900 * KiB),  # 2: inside that reservation (past it: the xfail test at the end)
    ("flush",),                     # 3: new reftable chunks at the end, then the header
    ("write", 3 * MiB, 4 * KiB),
    ("flush",),
))


def fresh_image(sc: Scenario) -> bytes:
    buf = bytearray()
    for off, data in new_image(sc.size, cluster_bits=sc.cluster_bits, refcount_order=sc.refcount_order):
        buf.extend(bytes(max(0, off + len(data) - len(buf))))
        buf[off:off + len(data)] = data
    return bytes(buf)


def base_image(sc: Scenario) -> bytes:
    return fresh_image(sc) + random.Random(sc.name).randbytes(sc.garbage << sc.cluster_bits)


def payload(sc: Scenario, i: int, n: int) -> bytes:
    return random.Random(f"{sc.name}-{i}").randbytes(n)


@attrs.frozen
class Item:
    """One metadata write a flush made: which item, where, and whether that place is new."""

    name: str
    kind: str
    offset: int
    length: int
    new: bool  # not metadata of the fresh image, and not written by an earlier step


@attrs.frozen
class Learned:
    items: dict[int, list[Item]]                  # step -> metadata writes, in order
    data: dict[int, list[tuple[int, int]]]        # write step -> (host offset, length) of its pwrites


_learned: dict[str, Learned] = {}


async def learn(sc: Scenario) -> Learned:
    """Run the scenario once, fault-free, noting what each step writes where."""
    if sc.name in _learned:
        return _learned[sc.name]
    fresh_end = len(fresh_image(sc))
    img, rec, _ = await open_recorded(bytearray(base_image(sc)), WRITEBACK, faulty=True)
    items: dict[int, list[Item]] = {}
    data: dict[int, list[tuple[int, int]]] = {}
    seen: set[int] = set()
    current = [0]
    orig = img.engine.queue.writeout_batch

    def batch():
        out = orig()
        for item, off, p in out:
            if p:
                items.setdefault(current[0], []).append(
                    Item(item.name, item.kind, off, len(p), off >= fresh_end and off not in seen))
        return out
    img.engine.queue.writeout_batch = batch
    for i, step in enumerate(sc.steps):
        current[0] = i
        before = len(rec.events)
        await do_step(img, sc, i)
        if step[0] == "write":
            data[i] = [(e.offset, len(e.data)) for e in rec.events[before:] if isinstance(e, Write)]
        seen |= {it.offset for it in items.get(i, [])}
    await img.close()
    _learned[sc.name] = Learned(items, data)
    return _learned[sc.name]


async def do_step(img, sc: Scenario, i: int) -> None:
    step = sc.steps[i]
    if step[0] == "write":
        await img.write(step[1], payload(sc, i, step[2]))
    elif step[0] == "flush":
        await img.flush()
    else:
        await img.truncate(step[1])


# ---------------------------------------------------------------- a run with a model of the guest

class Run:
    """A scenario over a fresh recorded, fault-injectable image, and what the guest was promised.

    ``writes``: (offset, data, acknowledged by a completed flush). Writes of
    one scenario never overlap, and land on zeros.
    """

    def __init__(self, sc: Scenario, tmp_path):
        self.sc = sc
        self.tmp_path = tmp_path
        self.base = base_image(sc)
        self.writes: list[list] = []
        self.size = sc.size
        self.durable_size = sc.size
        self.done = 0  # steps carried out (successfully or not)

    async def open(self) -> "Run":
        self.img, self.rec, self.faulty = await open_recorded(bytearray(self.base), WRITEBACK, faulty=True)
        self.store = self.faulty.inner
        self.meta: dict[tuple[int, int], str] = {}  # (offset, length) of a metadata write -> its kind
        orig = self.img.engine.queue.writeout_batch

        def batch():
            out = orig()
            self.meta.update({(off, len(p)): item.kind for item, off, p in out if p})
            return out
        self.img.engine.queue.writeout_batch = batch
        return self

    async def step(self, i: int) -> None:
        """Step i; the model follows only if it succeeds."""
        kind = self.sc.steps[i][0]
        self.done = i + 1
        await do_step(self.img, self.sc, i)
        if kind == "write":
            _, off, n = self.sc.steps[i]
            self.writes.append([off, payload(self.sc, i, n), False])
        elif kind == "grow":
            self.size = self.sc.steps[i][1]
        else:
            self.acknowledged()

    async def flush(self) -> None:
        await self.img.flush()
        self.acknowledged()

    async def write(self, off: int, data: bytes) -> None:
        await self.img.write(off, data)
        self.writes.append([off, data, False])

    def acknowledged(self) -> None:
        for w in self.writes:
            w[2] = True
        self.durable_size = self.size

    async def run_until(self, stop: int) -> None:
        for i in range(self.done, stop):
            await self.step(i)

    async def finish(self) -> None:
        """The rest of the scenario, then everything must read back through the image."""
        await self.run_until(len(self.sc.steps))
        await self.assert_reads()

    async def assert_reads(self) -> None:
        for off, data, _ in self.writes:
            assert await self.img.read(off, len(data)) == data, f"write at {off:#x} does not read back"

    # ------------------------------------------------------------ what a crash would leave

    def crash_states(self, rng: random.Random):
        """(label, file) for: every completed write; only what the last sync covered; subsets between."""
        events = self.rec.events
        completed = replay(self.base, events)
        assert completed == self.store.data, "the recording missed a write"
        last = next((e for e in reversed(events) if isinstance(e, Sync)), None)
        covered = last.covers if last is not None else 0
        yield "completed", completed
        yield "synced", replay(self.base, events[:covered])
        window = [(k, e) for k, e in enumerate(events[covered:], covered) if not isinstance(e, Sync)]
        if len(window) < 2:
            return
        for _ in range(4):  # any of these writes may or may not have reached the disk
            kept = sorted(rng.sample(range(len(window)), rng.randrange(1, len(window))))
            yield f"synced+{kept}", replay(self.base, events[:covered] + [window[k][1] for k in kept])

    def assert_crash_safe(self, where: str) -> list:
        """Every crash state: no corruption, acknowledged writes intact. Returns the check results."""
        results = []
        for label, state in self.crash_states(random.Random(where)):
            results.append(self.assert_state(state, f"{where}, {label}"))
        return results

    def assert_state(self, state: bytearray, where: str, *, complete: bool = False):
        result = check(state)
        assert not result.corruptions, f"{where}: {result.corruptions[:5]}"
        assert not result.errors, f"{where}: {result.errors} check errors"
        size, read = guest_view(state)
        assert size in (self.durable_size, self.size), f"{where}: virtual size {size}"
        if complete:
            assert size == self.size, f"{where}: virtual size {size}, the guest made it {self.size}"
        zero = bytes(SECTOR)
        for off, data, acked in self.writes:
            view = read(off, len(data))
            if acked or complete:
                assert view == data, f"{where}: lost the acknowledged write at {off:#x}"
                continue
            for s in range(0, len(data), SECTOR):  # unacknowledged: each sector old (zeros) or new
                got = view[s:s + SECTOR]
                assert got in (zero, data[s:s + SECTOR], b""), f"{where}: sector {off + s:#x} is garbage"
        return result

    async def assert_leaks_known(self, result) -> None:
        """After a successful flush a crash leaks only what the engine knows is spare.

        That is the reservation (refcount raised ahead), and clusters freed in
        memory whose lowered refcount goes out with the next flush.
        """
        eng, pread = self.img.engine, self.img.backend.pread
        for c in result.leaks:
            if c not in eng.refs.reservation:
                assert await run_async(eng.refs.get(c), pread) == 0, f"cluster {c} leaked"

    def qemu_check(self, state: bytes, name: str) -> subprocess.CompletedProcess:
        path = self.tmp_path / f"{name}.qcow2"
        path.write_bytes(state)
        return subprocess.run(["qemu-img", "check", "-f", "qcow2", str(path)], capture_output=True, text=True)

    def audit_history(self) -> int:
        """Every moment of the test a crash could have hit: no corruption (leaks allowed).

        Between two completed fdatasyncs, what the first covered is durable
        and each later write may have reached the disk or not. Checked per
        such window: all of them, none, and each metadata write alone (the
        sharpest test of an ordering edge: a write whose prerequisite went
        out in the same round shows up as corruption when kept alone).
        Returns the number of states checked.
        """
        events, rng = self.rec.events, random.Random(self.sc.name)
        syncs = [k for k, e in enumerate(events) if isinstance(e, Sync)]
        durable, done, checked = bytearray(self.base), 0, 0
        for start, end in zip([None, *syncs], [*syncs, len(events)]):
            covers = max(done, events[start].covers if start is not None else 0)
            durable = replay(durable, events[done:covers])
            done = covers
            window = [e for e in events[covers:end] if not isinstance(e, Sync)]
            meta = [e for e in window if isinstance(e, Write) and (e.offset, len(e.data)) in self.meta]
            pointers = [e for e in meta if self.meta[e.offset, len(e.data)] != "refblock"]
            blocks = [e for e in meta if self.meta[e.offset, len(e.data)] == "refblock"]
            alone = pointers + rng.sample(blocks, min(len(blocks), max(0, 24 - len(pointers))))
            for kept in [window, [], *([e] for e in alone)]:
                result = check(replay(durable, kept))
                what = "all" if kept is window else [f"{self.meta[e.offset, len(e.data)]}@{e.offset:#x}" for e in kept]
                assert not result.corruptions and not result.errors, \
                    f"crash after sync event {start} keeping {what} of {len(window)} writes: {result.corruptions[:3]}"
                checked += 1
        return checked

    async def close_clean(self) -> None:
        """A clean close leaves no leak (our checker and qemu-img) and the guest view is complete.

        Then the whole recorded history is audited for crash consistency.
        """
        await self.img.close()
        assert self.audit_history() > 0
        final = bytes(self.store.data)
        result = self.assert_state(bytearray(final), "after close", complete=True)
        assert result.clean, f"after close: leaks {result.leaks[:10]}"
        assert not result.header.incompatible & fmt.INCOMPAT_DIRTY, "the dirty bit survived a clean close"
        p = self.qemu_check(final, "closed")
        assert p.returncode == 0, p.stdout + p.stderr


def check(state) -> CheckResult:
    return run_sync(check_image(len(state)), lambda o, n: bytes(state[o:o + n]))


def guest_view(state) -> tuple[int, Callable[[int, int], bytes]]:
    """The virtual size a fresh open of ``state`` sees, and a reader of its guest bytes."""
    reader = lambda o, n: bytes(state[o:o + n])  # noqa: E731
    engine = run_sync(open_engine(len(state), writable=False), reader)

    def read(offset: int, length: int) -> bytes:
        out = bytearray()
        for ext in run_sync(engine.plan_read(offset, length), reader):
            if ext.kind is ExtentKind.ZERO:
                out += bytes(ext.length)
            elif ext.kind is ExtentKind.DATA:
                out += reader(ext.host_offset, ext.length).ljust(ext.length, b"\0")
            else:
                raise AssertionError(f"unexpected {ext.kind} extent at {ext.guest_offset:#x} in a state cachefs wrote")
        return bytes(out)
    return engine.size, read


# ---------------------------------------------------------------- the metadata matrix

@attrs.frozen
class Target:
    scenario: Scenario
    step: int                       # the flush step whose writeout hits the item
    pick: Callable[[Item], bool]    # the first such item of that step is the target


TARGETS = {
    "l2-new": Target(BIG, 1, lambda it: it.kind == "l2" and it.new),
    "l2-update": Target(BIG, 3, lambda it: it.kind == "l2" and not it.new),
    "refblock": Target(BIG, 1, lambda it: it.kind == "refblock" and not it.new),
    "refblock-reservation": Target(BIG, 3, lambda it: it.kind == "refblock" and not it.new),
    "l1-entry": Target(BIG, 1, lambda it: it.kind == "l1" and not it.new),
    "header-dirty-bit": Target(BIG, 1, lambda it: it.kind == "header"),
    "l1-moved": Target(BIG, 6, lambda it: it.kind == "l1" and it.new),
    "header-resize": Target(BIG, 6, lambda it: it.kind == "header"),
    "refblock-new": Target(SMALL, 1, lambda it: it.kind == "refblock" and it.new),
    "reftable-entry": Target(SMALL, 1, lambda it: it.kind == "reftable" and not it.new),
    "reftable-moved": Target(GROW, 3, lambda it: it.name == "reftable[0]" and it.new),
    "header-reftable-moved": Target(GROW, 3, lambda it: it.kind == "header"),
}


async def target_item(t: Target) -> Item:
    learned = await learn(t.scenario)
    found = [it for it in learned.items.get(t.step, []) if t.pick(it)]
    assert found, f"step {t.step} of {t.scenario.name} writes no such item: {learned.items.get(t.step)}"
    return found[0]


async def test_each_target_is_a_distinct_named_metadata_write():
    got = {k: await target_item(t) for k, t in TARGETS.items()}
    kinds = {it.kind for it in got.values()}
    assert kinds == {"l1", "l2", "refblock", "reftable", "header"}
    # Distinct items (a scenario's targets never share a host range).
    for sc in (BIG, SMALL, GROW):
        mine = [(k, it) for k, it in got.items() if TARGETS[k].scenario is sc]
        places = {(TARGETS[k].step, it.name, it.offset) for k, it in mine}
        assert len(places) == len(mine), mine
    assert got["l1-moved"].offset != got["l1-entry"].offset
    # The new L2 table reuses stale free space: pointing at it too early would expose garbage.
    assert len(fresh_image(BIG)) <= got["l2-new"].offset < len(base_image(BIG))
    assert got["reftable-moved"].offset > len(base_image(GROW))


@pytest.mark.parametrize("times", TIMES)
@pytest.mark.parametrize("err", ERRNOS)
@pytest.mark.parametrize("kind", TARGETS)
async def test_metadata_write_fault(kind, err, times, tmp_path):
    t, code = TARGETS[kind], ERRNOS[err]
    item = await target_item(t)
    run = await Run(t.scenario, tmp_path).open()
    await run.run_until(t.step)
    fault = run.faulty.inject("pwrite", code, times=TIMES[times], offset_range=(item.offset, item.offset + item.length))
    before = len(run.rec.events)

    with pytest.raises(OSError) as exc:
        await run.step(t.step)
    assert exc.value.errno == code
    assert fault.hits == 1
    assert run.img.sync_error is None, "a failed pwrite must not poison the image"
    assert not any(isinstance(e, Write) and e.offset < item.offset + item.length and item.offset < e.offset + len(e.data)
                   for e in run.rec.events[before:]), f"{item.name} reached the file"
    run.assert_crash_safe(f"{kind}: after the failed flush")
    p = run.qemu_check(bytes(run.store.data), "failed")
    assert p.returncode in (0, 3), f"qemu-img check exit {p.returncode} after the failed flush:\n{p.stdout}{p.stderr}"
    # Guest I/O goes on: a new cluster (from what the failed flush reserved, if
    # anything), and reads of everything written.
    await run.write(t.scenario.spare, random.Random(kind).randbytes(4096))
    await run.assert_reads()

    if times == "always":
        for n in range(2):
            with pytest.raises(OSError) as again:
                await run.flush()
            assert again.value.errno == code
            assert fault.hits == 2 + n, "a later flush must retry the write, not give up or skip it"
        await run.assert_reads()
        run.assert_crash_safe(f"{kind}: while the fault lasts")
        run.faulty.clear()

    await run.flush()  # a failed pwrite is not sticky: this time it succeeds
    assert fault.hits == (1 if times == "once" else 3)
    for r in run.assert_crash_safe(f"{kind}: after the retried flush")[:2]:
        await run.assert_leaks_known(r)
    await run.finish()
    await run.close_clean()


# ---------------------------------------------------------------- truncate (reservation)

@pytest.mark.parametrize("times", TIMES)
@pytest.mark.parametrize("err", ERRNOS)
async def test_reservation_truncate_fault(err, times, tmp_path):
    """The flush that extends the file over a new reservation fails at ftruncate: not sticky either."""
    code = ERRNOS[err]
    run = await Run(BIG, tmp_path).open()
    await run.run_until(1)
    fault = run.faulty.inject("truncate", code, times=TIMES[times])
    with pytest.raises(OSError) as exc:
        await run.step(1)
    assert exc.value.errno == code and fault.hits == 1
    run.assert_crash_safe("after the failed truncate")
    if times == "always":
        with pytest.raises(OSError) as again:
            await run.flush()
        assert again.value.errno == code and fault.hits == 2
        await run.write(2 * MiB, b"t" * 4096)  # into the reserved, not yet extended, space
        with pytest.raises(OSError):
            await run.flush()
        run.assert_crash_safe("while the truncate fault lasts")
        run.faulty.clear()
    await run.flush()
    assert len(run.store.data) >= run.img.engine.queue.min_file_size
    run.assert_crash_safe("after the retried flush")
    await run.finish()
    await run.close_clean()


# ---------------------------------------------------------------- fdatasync: sticky

# The fdatasync of the writeout round that carries this kind of item, in this step of BIG.
SYNC_TARGETS = {
    "refblock-round": (1, "refblock"),
    "l2-round": (1, "l2"),
    "l1-round": (1, "l1"),
    "header-resize-round": (6, "header"),
}


@pytest.mark.parametrize("times", TIMES)
@pytest.mark.parametrize("err", ERRNOS)
@pytest.mark.parametrize("where", SYNC_TARGETS)
async def test_fdatasync_fault_is_sticky(where, err, times, tmp_path):
    step, kind = SYNC_TARGETS[where]
    code = ERRNOS[err]
    run = await Run(BIG, tmp_path).open()
    await run.run_until(step)
    queue, armed = run.img.engine.queue, []
    orig = queue.written

    def written(batch):
        orig(batch)
        if not armed and any(item.kind == kind for item, _, p in batch if p):
            armed.append(run.faulty.inject("fdatasync", code, times=TIMES[times]))
    queue.written = written

    with pytest.raises(OSError) as exc:
        await run.step(step)
    assert armed, f"no writeout round carried a {kind}"
    assert exc.value.errno == code and armed[0].hits == 1
    assert run.img.sync_error == code
    run.assert_crash_safe(f"{where}: after the failed fdatasync")

    # Sticky: no later flush reports success, whether the fault lasts or not.
    for n in range(3):
        if n == 1:
            run.faulty.clear()
        await run.write(7 * MiB + n * 64 * KiB, b"s" * 4096)  # writes are still taken...
        with pytest.raises(OSError) as later:
            await run.img.flush()                                  # ...but never acknowledged
        assert later.value.errno == code
    assert run.faulty.injected == 1, "after a failed fdatasync nothing may try to sync again"
    assert run.img.guest.flush_failures == 1
    await run.assert_reads()
    run.assert_crash_safe(f"{where}: after the later flushes")
    with pytest.raises(OSError) as closing:
        await run.img.close()
    assert closing.value.errno == code, "a close must report the lost fdatasync, not hide it"
    run.assert_crash_safe(f"{where}: after close")
    assert run.audit_history() > 0


# ---------------------------------------------------------------- guest data writes

# The write step whose data pwrite fails, in BIG.
DATA_TARGETS = {
    "data-new-l2": 0,        # first write: a new L2 table, a cluster from the free space
    "data-reserved": 2,      # clusters from the reservation
    "data-overwrite": 4,     # in place, no allocation
}


@pytest.mark.parametrize("times", TIMES)
@pytest.mark.parametrize("err", ERRNOS)
@pytest.mark.parametrize("kind", DATA_TARGETS)
async def test_data_write_fault(kind, err, times, tmp_path):
    step, code = DATA_TARGETS[kind], ERRNOS[err]
    learned = await learn(BIG)
    (host, length), = learned.data[step]
    _, guest, n = BIG.steps[step]
    run = await Run(BIG, tmp_path).open()
    await run.run_until(step)
    eng, pread = run.img.engine, run.img.backend.pread
    cluster = host >> eng.cb
    refcount = await run_async(eng.refs.get(cluster), pread)
    old = await run.img.read(guest, n)
    fault = run.faulty.inject("pwrite", code, times=TIMES[times], offset_range=(host, host + length))

    with pytest.raises(OSError) as exc:
        await run.step(step)
    assert exc.value.errno == code and fault.hits == 1
    assert run.img.sync_error is None
    assert await run.img.read(guest, n) == old, "a failed write must not change what the guest reads"
    after = await run_async(eng.refs.get(cluster), pread)
    allocation_was_aborted(kind, eng, cluster, refcount, after)
    run.assert_crash_safe(f"{kind}: after the failed write")

    # A flush while the fault may last: nothing the flush writes needs that cluster.
    await run.flush()
    for r in run.assert_crash_safe(f"{kind}: flushed after the failed write")[:2]:
        assert cluster not in r.leaks, "the aborted cluster leaked"
        await run.assert_leaks_known(r)
    retried = False
    if times == "always":
        retried = await retry_while_the_fault_lasts(run, kind, step, code, fault, old)
    run.faulty.clear()
    if not retried:
        await run.step(step)  # the retry works
    await run.flush()
    run.assert_crash_safe(f"{kind}: after the retry")
    await run.finish()
    await run.close_clean()


def allocation_was_aborted(kind: str, eng, cluster: int, refcount: int, after: int) -> None:
    """The cluster's refcount before (``refcount``) and after the failed write (``after``)."""
    if kind == "data-overwrite":
        assert refcount == after == 1
    else:
        assert refcount == (1 if kind == "data-reserved" else 0)
        assert after == 0, "the failed write's allocation was not aborted"
        assert cluster not in eng.refs.reservation


async def retry_while_the_fault_lasts(run, kind: str, step: int, code: int, fault, old: bytes) -> bool:
    """The step again while the fault lasts; True if it worked (it went elsewhere)."""
    _, guest, n = BIG.steps[step]
    if kind == "data-overwrite":
        # The same host bytes again: it fails again, and changes nothing.
        with pytest.raises(OSError) as again:
            await run.step(step)
        assert again.value.errno == code and fault.hits == 2
        assert await run.img.read(guest, n) == old
        return False
    # An allocating write may go elsewhere (and work) or back to the bad cluster (and fail again).
    retried = False
    try:
        await run.step(step)
        retried = True
    except OSError as again:
        assert again.errno == code and fault.hits == 2
        assert await run.img.read(guest, n) == old
    run.assert_crash_safe(f"{kind}: retried while the fault lasts")
    return retried


# ---------------------------------------------------------------- found by this matrix: an ordering bug

# No fault needed. A guest write that uses up the reservation takes clusters
# past it, and the refcount blocks counting them are new. The L2 entry for
# such a cluster waits for its refcount block, but not for what makes the
# block reachable: the refcount-table entry (table in place), or the header
# (table moved by the same flush). Both go out in the same round as that L2
# table (or the L1 entry exposing it), so a crash that keeps the L2/L1 write
# and not the table/header leaves referenced clusters with refcount 0
# (qemu-img check: "ERROR OFLAG_COPIED data cluster: ... refcount=0", exit 2).
NEW_BLOCK_IN_PLACE = Scenario("new-block-in-place", 4 * MiB, 9, 4, 0, 0, (
    ("write", 0, 512),
    ("flush",),                       # L2 table T0 is linked; 1 MiB reserved
    ("write", 1 * MiB, 1200 * KiB),   # past the reservation: new refcount blocks
    ("write", 8 * KiB, 4 * KiB),      # under T0: clusters counted by a new block
    ("flush",),                       # round 2: reftable[0] together with T0
))
NEW_BLOCK_MOVED_TABLE = Scenario("new-block-moved-table", 4 * MiB, 9, 6, 0, 0, (
    ("write", 0, 100 * KiB),
    ("flush",),
    ("write", 1 * MiB, 1 * MiB),      # past the reservation: blocks only the moved table will count
    ("flush",),                       # last round: the header together with l1[0]
))


# Regression: an L2/L1 write was not ordered after the refcount-table entry (or the
# header) that makes a new refcount block reachable (engine._counted).
@pytest.mark.parametrize("sc", [NEW_BLOCK_IN_PLACE, NEW_BLOCK_MOVED_TABLE], ids=lambda sc: sc.name)
def test_new_refcount_block_is_reachable_before_an_entry_that_needs_it(sc, tmp_path):
    async def fault_free():
        run = await Run(sc, tmp_path).open()
        await run.run_until(len(sc.steps))
        await run.assert_reads()
        run.audit_history()
    trio.run(fault_free)
