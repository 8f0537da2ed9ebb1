"""``make soak``: every power-cut simulation over thousands of seeds (issue 19).

Each simulation module names its cases in a ``SOAK`` dict: case name ->
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
seed of an open-ended run, default 1000: CI's fixed seeds are below it).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent))
import interleaving  # noqa: E402

MODULES = ("test_powercut", "test_powercut_concurrent", "test_compress_powercut", "test_powercut_fastalloc")


@attrs.define
class Tally:
    seeds: int = 0
    states: int = 0
    failures: list[str] = attrs.Factory(list)


def cases() -> dict:
    found = {}
    for name in MODULES:
        found.update(getattr(importlib.import_module(name), "SOAK", {}))
    only = [p for p in os.environ.get("SOAK_ONLY", "").split(",") if p]
    return {k: v for k, v in found.items() if not only or any(k.startswith(p) for p in only)}


def run_one(name: str, case, seed: int, tally: Tally) -> None:
    fn, arg = case
    tally.seeds += 1
    with tempfile.TemporaryDirectory() as tmp:
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
            print(f"FAIL {name} seed {seed}: {type(inner).__name__} {line}", flush=True)


def seed_stream():
    listed = os.environ.get("SOAK_SEEDS", "").strip()
    if listed:
        os.environ["POWERCUT_SEEDS"] = listed
        yield from interleaving.seeds()
        return
    seed = int(os.environ.get("SOAK_FIRST", "1000"))
    while True:
        yield seed
        seed += 1


def main() -> int:
    todo = cases()
    if not todo:
        print("soak: no case matches SOAK_ONLY", file=sys.stderr)
        return 2
    bounded = not os.environ.get("SOAK_SEEDS", "").strip()
    deadline = time.monotonic() + float(os.environ.get("SOAK_SECONDS", "600"))
    tallies = {name: Tally() for name in todo}
    for seed in seed_stream():
        for name, case in todo.items():
            if bounded and time.monotonic() >= deadline:
                break
            run_one(name, case, seed, tallies[name])
        else:
            continue
        break
    failed = 0
    for name, t in tallies.items():
        failed += len(t.failures)
        print(f"{name}: {t.seeds} seeds, {t.states} cut states checked, {len(t.failures)} failed")
        for f in t.failures[:5]:
            print(f"    {f}")
    total = sum(t.seeds for t in tallies.values()), sum(t.states for t in tallies.values())
    print(f"soak: {total[0]} seeds, {total[1]} states, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
