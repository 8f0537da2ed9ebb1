"""Seeded task interleavings: one seed fixes a simulation's workload *and* its scheduling (issue 19).

trio picks the order in which the tasks of one scheduling batch run from a
module-level ``random.Random`` (``trio._core._run._r``). With hypothesis
imported, trio's hypothesis plugin turns on its deterministic mode: each batch
is sorted by task creation order, then shuffled with that Random. Seeding it
before ``trio.run`` makes the interleaving a function of the seed, so a power
cut that loses a write on one seed loses it on every re-run of that seed
(seed 119 of the data-plane simulation found a flush that did not sync,
tests/test_flush_fast_writes.py; without the seed it showed up once in 36 runs).

A simulation is run as ``run(simulation, *args, seed=S)``. Its own workload
Random is seeded from the same S by the simulation. A failure carries a note
naming the seed and the command that replays it.

Which seeds run: ``seeds()``, a fixed set in CI (``CI_SEEDS``), or the ones
``POWERCUT_SEEDS`` names ("7", "0-199", "3,5,9"). ``make soak`` runs thousands
(tests/soak.py).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import hypothesis  # noqa: F401  (trio's hypothesis plugin: deterministic scheduling)
import trio
import trio._core._run as trio_run
import trio.testing

#: The seeds every CI run checks, for each power-cut simulation.
CI_SEEDS = (1, 2)


def seeds(default=CI_SEEDS) -> list[int]:
    """The seeds to run: ``POWERCUT_SEEDS`` ("0-199", "3,5,9", "7") or ``default``."""
    spec = os.environ.get("POWERCUT_SEEDS", "").strip()
    if not spec:
        return list(default)
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi) + 1) if hi else [int(lo)]
    return out


def run(fn: Callable[..., Awaitable], *args, seed: int, replay: str = "", virtual_time: bool = False):
    """``trio.run(fn, *args)`` with trio's scheduling seeded by ``seed``; the Random's state is
    restored afterwards, so other tests are not affected. ``replay``: how to run this case alone,
    for the failure note. ``virtual_time``: sleeps end in the order of their deadlines, never
    by the wall clock (trio.testing.MockClock jumping whenever every task waits), for workloads
    that sleep."""
    assert trio_run._ALLOW_DETERMINISTIC_SCHEDULING, "trio's hypothesis plugin did not load"
    saved = trio_run._r.getstate()
    trio_run._r.seed(seed)
    try:
        clock = trio.testing.MockClock(autojump_threshold=0) if virtual_time else None
        return trio.run(fn, *args, clock=clock)
    except BaseException as exc:
        how = replay or "POWERCUT_SEEDS=<seed> pytest <this test>"
        exc.add_note(f"interleaving seed {seed}: replay with {how.replace('<seed>', str(seed))}")
        raise
    finally:
        trio_run._r.setstate(saved)
