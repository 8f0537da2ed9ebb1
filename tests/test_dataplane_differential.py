"""C checked against its model (issue 19): the data plane's table, allocation and write planner
(cachefs/native/dp_table.c, dp_alloc.c, dp_loop.c) and their Python models in tests/simplane.py
(PublishedPlane, on SimulatedPlane), which tests/test_powercut_fastalloc.py runs the production
image layer against, get the same random sequences of steps and must agree after every one
(the machinery: tests/difftest.py).

Steps: publish entries (dp_map_clusters, with dp_alloc_restore), take them back
(dp_unmap_clusters), allow or stop allocation (dp_alloc_set), lend clusters (dp_alloc_give),
take them back (dp_alloc_take_spares), adopt the log (dp_alloc_peek_log, dp_alloc_drop_log),
claim and unclaim ranges, and WRITEs in one cluster or across many, through a plain handle or a
write-through one with or without its twin descriptor, planned and dispatched by the loop's own
code (dp_testhooks.c's dp_test_plan: dp_take_fast, that is dp_plan, dp_alloc_may and
dp_alloc_commit, without the I/O).

Compared after every step: every published entry (state bits and host), the lent clusters in
the order C takes them, the log in order, the claims, the status, allocation on or off and its
low-water mark, whether C woke Python, and for a write: forwarded, served in place or
allocated, at which hosts, which clusters it allocated, through which descriptor, and whether
its answer waits for a sync.

One level up (tests/difftest_l2.py), SimulatedPlane, which plans from Python's L2 entries and
which the power-cut workloads use, runs against C fed by the production MappingPublisher.

A failure names the seed and the sequence, and prints the shortest sequence of steps found
that still disagrees. More: ``DIFF_SEQUENCES=100000 DIFF_SEED=7 pytest tests/test_dataplane_differential.py``;
one sequence: ``DIFF_ONLY=<number>``. ``SOAK`` is this module's case for tests/soak.py.
"""

from __future__ import annotations

import collections
import os
import random

import pytest

import simplane
from cachefs import native
from cachefs.dataplane import plane as dataplane
from difftest import Layout, Op, Runner, random_sequence, run, shrink
from difftest_l2 import l2_sequence, run_l2

needs_dataplane = pytest.mark.skipif(
    dataplane.why_unavailable() is not None or not hasattr(native.lib, "dp_test_plan"),
    reason=str(dataplane.why_unavailable() or "built without the data plane's test hooks"))

SEQUENCES = int(os.environ.get("DIFF_SEQUENCES", "1000"))
SEED = os.environ.get("DIFF_SEED", "19")
ONLY = os.environ.get("DIFF_ONLY")


@pytest.fixture(scope="module")
def plane():
    p = dataplane.DataPlane()  # never started: no /dev/fuse, no thread, just C's tables
    yield p
    p.close()


def check(plane, seed: str, numbers, seen=None, profile=None, shrinking=True) -> str | None:
    """Run the sequences ``numbers`` of ``seed``; the first disagreement, shrunk, as a report.
    ``plane``: a DataPlane, or None for fresh ones (each sequence leaves C a dead image struct,
    freed only with its DataPlane: a long run must not keep one)."""
    own, fresh = plane is None, None
    try:
        for n, i in enumerate(numbers):
            if own and n % 2000 == 0:
                if fresh is not None:
                    fresh.close()
                plane = fresh = dataplane.DataPlane()
            profile_i, layout, ops = random_sequence(random.Random(f"{seed}:{i}"), profile)
            got = run(plane, layout, ops, seen)
            if got is not None:
                at, what = got
                small = shrink(plane, layout, ops[:at + 1], what.what) if shrinking else ops[:at + 1]
                return report(seed, i, profile_i, layout, small, run(plane, layout, small)[1])
        return None
    finally:
        if fresh is not None:
            fresh.close()


def report(seed, i, profile, layout: Layout, ops, what) -> str:
    steps = "\n".join(f"  {n}. {op}" for n, op in enumerate(ops, 1))
    return (f"C and tests/simplane.py disagree after step {len(ops)}: {what}\n"
            f"DIFF_SEED={seed} DIFF_ONLY={i} ({profile}; {layout}); shortest sequence found:\n{steps}")


@needs_dataplane
def test_c_and_its_model_agree():
    seen = collections.Counter()
    failure = check(None, SEED, [int(ONLY)] if ONLY else range(SEQUENCES), seen)
    assert failure is None, failure
    print(f"{SEQUENCES} sequences, {seen['steps']} steps: {dict(seen)}")
    if ONLY or SEED != "19" or SEQUENCES < 1000:
        return
    # Not vacuous: every kind of decision came up, many times (CI's seed; others vary).
    for what, least in (("allocated", 1000), ("in place", 1000), ("forwarded", 1000), ("deferred", 200),
                        ("through the twin", 200), ("allocating several clusters", 20), ("wakes", 200),
                        ("overflowed claims", 100), ("stops with clusters logged", 20),
                        ("publications over logged clusters", 200), ("write-through allocated", 100),
                        ("in DP_MAXPIECE pieces", 3), ("bulk forwarded", 20)):
        assert seen[what] >= least, (what, seen[what])


# ------------------------------------------------------------------ the model's old mistakes

W, R, U = simplane.W, simplane.R, simplane.U


def _restore_plain_writable(self, first, count):
    for g, h in self.log:
        if first <= g < first + count:
            self._set_c_entry(g, h | W)


def _set_keeps_writable(self, ino, on, low_water):
    self.on, self.low_water = bool(on), low_water


def _wake_every_time(self):
    if len(self.spares) <= self.low_water or len(self.log) >= native.lib.DP_ALOG // 2:
        self.wake.set()


def _claim_without_limit(self, ino, first, count):
    cid = next(i for i in range(len(self.claims) + 1) if i not in self.claims)
    self.claims[cid] = (first, first + (count or 1))
    return cid


def _may_allocate_past_full_log(self, vcl, nth, sync, twin):
    return (self.on and not (sync and not twin) and nth < native.lib.DP_MAXALLOC and not self._claimed(vcl)
            and nth < len(self.spares))


def _dispatch_durable(orig):
    def dispatch(self, hosts, allocs, defer, twin):
        served = orig(self, hosts, allocs, defer, twin)
        for vcl in allocs:
            self.entries[vcl] &= ~U
        return served
    return dispatch


#: What tests/simplane.py got wrong before this test (each found by it), put back one at a time:
#: the test must see each. name: (class, attribute, replacement, profile of the sequences tried).
MISTAKES = {
    "republished C clusters lose DP_MAP_UNSYNCED, stay writable when C may not allocate":
        (simplane.SimulatedPlane, "_restore", _restore_plain_writable, None),
    "stopping allocation leaves C's unadopted clusters writable":
        (simplane.SimulatedPlane, "alloc_set", _set_keeps_writable, None),
    "C wakes Python at every allocation below the low-water mark, not once until it lends or adopts":
        (simplane.SimulatedPlane, "_woken", _wake_every_time, None),
    "more than DP_NCLAIM claims are claims like the others (C then allocates nowhere)":
        (simplane.SimulatedPlane, "alloc_claim", _claim_without_limit, "claims"),
    "C allocates with its log full (DP_ALOG)":
        (simplane.PublishedPlane, "_may_allocate", _may_allocate_past_full_log, "log"),
    "a cluster C allocates is mapped durable (no DP_MAP_UNSYNCED)":
        (simplane.PublishedPlane, "_dispatch", _dispatch_durable(simplane.PublishedPlane._dispatch), None),
}


@needs_dataplane
@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_model_that_is_wrong_is_caught(plane, mistake, monkeypatch):
    cls, name, wrong, profile = MISTAKES[mistake]
    monkeypatch.setattr(cls, name, wrong)
    assert check(plane, SEED, range(10 if profile == "log" else 200), profile=profile, shrinking=False), \
        f"the differential test missed a model where {mistake}"


@needs_dataplane
def test_the_low_water_mark_starts_at_zero(plane):
    """C's image starts with allocation off and a low-water mark of 0 (calloc), until Python's
    first dp_alloc_set; the model started at FastAllocations' 4."""
    assert run(plane, Layout(12, 8, ((0, 8),)), [Op("adopt", (0,))]) is None


@needs_dataplane
def test_a_publication_past_the_guest_end_changes_nothing(plane):
    """dp_map_clusters used to publish the entries before the first one past the guest's last
    cluster, fail, and skip dp_alloc_restore: a cluster C had allocated and Python had not
    adopted became allocatable again, and C allocated it a second time (two log records, two
    host clusters for one guest cluster). Found by this test once the model knew the guest's size."""
    za = native.lib.DP_MAP_ZERO | native.lib.DP_MAP_ALLOC
    cs = 4096
    r = Runner(plane, Layout(12, 8, ((0, 8),)))
    for op in (Op("set", (True, 0)), Op("give", ((256 * cs, 257 * cs),)), Op("map", (0, (za,) * 8)),
               Op("write", (1, 5 * cs, 512)), Op("map", (4, (za,) * 8)), Op("write", (1, 5 * cs + 512, 512))):
        r.step(op)
    assert r.c.state().log == ((5, 256 * cs),)



# ------------------------------------------------------------------ SimulatedPlane, from Python's L2 tables

L2_SEQUENCES = max(1, SEQUENCES // 2)


@needs_dataplane
def test_c_behind_the_mapping_publisher_and_the_simulated_plane_agree(plane):
    """tests/difftest_l2.py: SimulatedPlane plans from Python's L2 entries, C from what the
    production MappingPublisher published of them; tables load and leave the cache, entries
    change, the log is adopted. Their decisions and allocation state must agree."""
    seen = collections.Counter()
    for i in [int(ONLY)] if ONLY else range(L2_SEQUENCES):
        layout, initial, ops = l2_sequence(random.Random(f"{SEED}:l2:{i}"))
        got = run_l2(plane, layout, initial, ops, seen)
        if got is not None:
            at, what = got
            steps = "\n".join(f"  {n}. {op}" for n, op in enumerate(ops[:at + 1], 1))
            pytest.fail(f"{what}\nDIFF_SEED={SEED} DIFF_ONLY={i} ({layout}; L2 entries "
                        f"{[hex(e) for e in initial]}):\n{steps}")
    if not ONLY and SEED == "19" and L2_SEQUENCES >= 500:
        for what, least in (("L2 allocated", 1000), ("L2 in place", 1000), ("L2 forwarded", 1000),
                            ("evictions with clusters logged", 200)):
            assert seen[what] >= least, (what, seen[what])


@needs_dataplane
def test_a_cluster_c_allocated_is_forwarded_once_its_table_left_the_cache(plane):
    """SimulatedPlane kept serving C's allocation in place after the L2 table was evicted, where
    C, whose entries of that table are gone, forwards the write (Python adopts first)."""
    layout = Layout(12, 16, ((0, 16),))
    ops = [Op("set", (True, 0)), Op("give", ((1 << 32,),)), Op("load", (0,)),
           Op("write", (3 * 4096, 512, ((0, 511),))), Op("evict", (0,)), Op("write", (3 * 4096 + 512, 512, ()))]
    assert run_l2(plane, layout, [0] * 16, ops) is None


async def soak(sequences: int, seed: int, tmp_path) -> int:
    """A ``SOAK`` case (tests/soak.py): ``sequences`` sequences of seed ``seed``; the steps checked."""
    seen = collections.Counter()
    failure = check(None, str(seed), range(sequences), seen)
    assert failure is None, failure
    plane = dataplane.DataPlane()
    try:
        for i in range(sequences // 2):
            layout, initial, ops = l2_sequence(random.Random(f"{seed}:l2:{i}"))
            got = run_l2(plane, layout, initial, ops, seen)
            assert got is None, f"{got[1]}; DIFF_SEED={seed} DIFF_ONLY={i} (the L2 test)"
    finally:
        plane.close()
    return seen["steps"]


SOAK = {"dataplane-differential": (soak, 300)}
