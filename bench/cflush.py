#!/usr/bin/env python3
"""Guest flushes served in C (issue 24): before and after in one interleaved run.

The side-by-side bench (bench/sidebyside.py) runs one cachefs build per invocation, and on this
machine the device's flush latency wanders by 3x between minutes, so two invocations compare
noise. This runs, round after round, each job on qsd, cachefs with flushes in C (the default)
and cachefs with ``CACHEFS_CFLUSH=off`` (every flush Python's, as before), the targets' order
rotating per round, and prints per job the median IOPS, the ratios to qsd per round's median and
cachefs's fdatasyncs per guest flush (its counters: C's fdatasync is an io_uring op).

    .venv/bin/python bench/cflush.py        # ROUNDS=5 RUNTIME=5 REGION=256M JOBS=alloc-flush16,...
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("ROUNDS", "5")
os.environ.setdefault("RUNTIME", "5")
os.environ.setdefault("REGION", "256M")
os.environ.setdefault("COUNT", "0")
os.environ.setdefault("JOBS", "alloc-flush16,alloc-flush1,wt-randwrite4k-qd1,ds-randwrite4k-qd1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import Plan, cachefs_cli, select_jobs  # noqa: E402
from sidebyside_jobs import ROUNDS, run_one  # noqa: E402
from sidebyside_targets import CachefsTarget, QsdTarget  # noqa: E402


def main() -> None:
    cli = cachefs_cli()
    targets = [QsdTarget(), CachefsTarget("cachefs-cflush", "io_uring", "on", "qcow2", cli),
               CachefsTarget("cachefs-python-flush", "io_uring", "on", "qcow2", ["env", "CACHEFS_CFLUSH=off", *cli])]
    jobs = select_jobs()
    plan = Plan(jobs, targets)
    runs = []
    try:
        for r in range(1, ROUNDS + 1):
            for job in jobs:
                for t in plan.order(r):
                    run = run_one(job, t, str(r))
                    runs.append(run)
                    print(f"r{r} {job.name:20} {t.name:22} {run.iops or 0:9.0f} IOPS  "
                          f"syncs {run.backend_fdatasyncs}/{run.guest_flushes} {run.status} {run.note}", flush=True)
    finally:
        for t in targets:
            t.teardown()
    print(f"\nmedians over {ROUNDS} rounds (ratio: the median of each round's ratio to qsd)")
    for job in jobs:
        qsd = {x.round: x.iops for x in runs if x.job == job.name and x.target == "qsd" and x.iops}
        line = [f"{job.name:20}", f"qsd {statistics.median(qsd.values()):7.0f}"]
        for t in targets[1:]:
            mine = [x for x in runs if x.job == job.name and x.target == t.name and x.iops]
            ratio = statistics.median(x.iops / qsd[x.round] for x in mine if x.round in qsd)
            syncs = sum(x.backend_fdatasyncs or 0 for x in mine)
            flushes = sum(x.guest_flushes or 0 for x in mine)
            per = f" {syncs / flushes:.2f} fdatasync/flush" if flushes else ""
            line.append(f"{t.name} {statistics.median(x.iops for x in mine):7.0f} ({ratio:.2f}x qsd){per}")
        print("  ".join(line))


if __name__ == "__main__":
    main()
