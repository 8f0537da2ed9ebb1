"""Fuzz target "check": the checker (qcow2/check.py check_image) and the repair it drives.

The input is a whole image file. The checker walks every structure a
hostile image can name (L1/L2 tables, snapshots, bitmaps, the refcount
structure); then, as ``cachefs check --repair`` and the open of a dirty
lazy-refcounts image do (cli/check.py, image/repair_file.py), the repairs of both modes
are planned, "all" is applied, and the result is checked again.
"""

from __future__ import annotations

from cachefs.qcow2.check import check_image
from cachefs.qcow2.repair import repair, write_repair

from fuzz.harness import REFUSALS, MemFile


def exercise_check(data: bytes) -> None:
    f = MemFile(data)
    try:
        result = f.run(check_image(len(f)))
    except REFUSALS:
        return
    result.exit_code(), result.refcount_errors, result.leaked_clusters
    if result.clean:
        return
    try:
        f.run(repair(result, "leaks"))
        writes = f.run(repair(result, "all"))
    except REFUSALS:
        return
    f.run(write_repair(writes))
    try:
        f.run(check_image(len(f)))
    except REFUSALS:
        pass


test_one_input = exercise_check
