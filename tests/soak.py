"""``make soak``: every power-cut simulation over thousands of seeds (issue 19).

The real daemon's power cuts run too (``daemon-MODE``: tests/test_powercut_daemon.py
with ``POWERCUT_SEED``, 300 crash states a run). Each simulation module names
its cases in a ``SOAK`` dict: case name ->
(async simulate function, its first argument). ``simulate(arg, seed,
tmp_path)`` runs one seeded workload (the seed fixes the workload's Random
and, through tests/interleaving.py, trio's task interleaving), checks every
cut state it samples and returns how many it checked.

Seeds go round the cases in turn until the time is up (``SOAK_SECONDS``,
default 600), so every case gets about the same share. It prints each
failure with its seed as it happens, then one line per case: seeds run,
states checked, failures. Exit status 1 if anything failed. Replay one:
``make soak SOAK_ONLY=fastalloc-c-heavy SOAK_SEEDS=119``.

Environment: SOAK_SECONDS, SOAK_ONLY (comma-separated case names or
prefixes), SOAK_SEEDS (as POWERCUT_SEEDS: "119", "0-999"; then each listed
seed runs once per case, without the time bound), SOAK_FIRST (the first
seed of an open-ended run; by default a random one from 1000 up, printed,
so each soak covers new seeds: CI's fixed seeds are below 1000). A case
whose last run would end past the time bound is skipped, so the soak ends
on time.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import interleaving  # noqa: E402

MODULES = ("test_powercut", "test_powercut_concurrent", "test_compress_powercut", "test_powercut_fastalloc",
           "test_dataplane_differential")


@attrs.define
class Tally:
    seeds: int = 0
    states: int = 0
    failures: list[str] = attrs.Factory(list)


#: Cache modes of the real daemon's power cuts (tests/test_powercut_daemon.py); "switching"
#: changes the mode live under load.
DAEMON_MODES = ("writeback", "none", "writethrough", "directsync", "switching")
DAEMON_STATES = 300  # crash states per run
DAEMON_SECONDS = 60  # what one run takes at most, before the first has been timed


async def daemon_power_cuts(mode: str, seed: int, tmp_path) -> int:
    """The real daemon over the recording layer, in one cache mode, seeded (the seed fixes the
    guest's choices and the crash states, not the daemon's interleaving): its crash states."""
    env = dict(os.environ, POWERCUT_SEED=str(seed), POWERCUT_DAEMON_MODES=mode,
               POWERCUT_DAEMON_STATES=str(DAEMON_STATES))
    tests = Path(__file__).resolve().parent
    r = await trio.run_process([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                f"--basetemp={tmp_path}", str(tests / "test_powercut_daemon.py")],
                               env=env, capture_stdout=True, capture_stderr=True, check=False)
    out = r.stdout.decode(errors="replace")
    if r.returncode != 0:
        failed = [line for line in out.splitlines() if line.startswith(("E ", "FAILED"))]
        raise AssertionError((failed or out.splitlines()[-1:] or ["pytest failed"])[0])
    return DAEMON_STATES


def cases() -> dict:
    found = {f"daemon-{mode}": (daemon_power_cuts, mode) for mode in DAEMON_MODES}
    for name in MODULES:
        found.update(getattr(importlib.import_module(name), "SOAK", {}))
    only = [p for p in os.environ.get("SOAK_ONLY", "").split(",") if p]
    return {k: v for k, v in found.items() if not only or any(k.startswith(p) for p in only)}


def run_one(name: str, case, seed: int, tally: Tally) -> None:
    fn, arg = case
    tally.seeds += 1
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        try:
            tally.states += interleaving.run(fn, arg, seed, Path(tmp), seed=seed)
        except BaseException as exc:  # an ExceptionGroup from a nursery, or the assertion itself
            if isinstance(exc, KeyboardInterrupt):
                raise
            inner = exc
            while getattr(inner, "exceptions", None):
                inner = inner.exceptions[0]
            line = (str(inner).splitlines() or [""])[0][:200]
            tally.failures.append(f"seed {seed}: {type(inner).__name__} {line}")
            print(f"FAIL {name} seed {seed}: {type(inner).__name__} {line}", file=sys.stderr, flush=True)


def seed_stream():
    listed = os.environ.get("SOAK_SEEDS", "").strip()
    if listed:
        os.environ["POWERCUT_SEEDS"] = listed
        yield from interleaving.seeds()
        return
    # Each soak covers seeds no earlier one did (a failure names its seed, so nothing is lost):
    # CI's fixed seeds are below 1000.
    seed = int(os.environ.get("SOAK_FIRST") or random.randrange(1000, 1 << 30))
    print(f"soak: seeds from {seed}", flush=True)
    while True:
        yield seed
        seed += 1


def soak_round(todo: dict, seed: int, tallies: dict, deadline: float | None, took: dict) -> bool:
    """Every case once on ``seed``, starting at a case the seed picks (a short soak still reaches
    each case), skipping those whose last run (15 s if none yet, 60 s for the daemon) would not
    end before ``deadline``. False if none ran."""
    names = list(todo)
    start = seed % len(names)
    ran = False
    for name in names[start:] + names[:start]:
        if deadline is not None and time.monotonic() + took.get(name, DAEMON_SECONDS if name.startswith("daemon-") else 15.0) > deadline:
            continue
        began = time.monotonic()
        run_one(name, todo[name], seed, tallies[name])
        took[name] = time.monotonic() - began
        ran = True
    return ran


def main() -> int:
    todo = cases()
    if not todo:
        print("soak: no case matches SOAK_ONLY", file=sys.stderr)
        return 2
    bounded = not os.environ.get("SOAK_SEEDS", "").strip()
    deadline = time.monotonic() + float(os.environ.get("SOAK_SECONDS", "600")) if bounded else None
    tallies, took = {name: Tally() for name in todo}, {}
    for seed in seed_stream():
        if not soak_round(todo, seed, tallies, deadline, took):
            break
    failed = 0
    for name, t in tallies.items():
        failed += len(t.failures)
        print(f"{name}: {t.seeds} seeds, {t.states} states checked, {len(t.failures)} failed")
        for f in t.failures[:5]:
            print(f"    {f}")
    total = sum(t.seeds for t in tallies.values()), sum(t.states for t in tallies.values())
    first = next((f"; first: {name} {t.failures[0]}" for name, t in tallies.items() if t.failures), "")
    print(f"soak: {total[0]} seeds, {total[1]} states, {failed} failures{first}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
