"""`cachefs check`: check (and repair) an image file, report as qemu-img check does.

The checker (cachefs/qcow2/check.py) and the repair (cachefs/qcow2/repair.py)
are sans-I/O; this module feeds the checker from a file and shows progress on
a terminal; repairio.py carries out the repair.
"""

from __future__ import annotations

import json
import os
import sys

from cachefs.qcow2 import check as qcheck
from cachefs.qcow2.plan import run_sync
from cachefs.repairio import reader as _reader
from cachefs.repairio import repair_fd


def check_fd(fd: int, *, repair: str | None = None, show_progress: bool = False):
    size = os.fstat(fd).st_size
    if show_progress:
        from rich.progress import Progress
        with Progress(transient=True) as bar:
            task = bar.add_task("checking", total=size)
            result = run_sync(qcheck.check_image(size), _reader(fd, lambda n: bar.advance(task, n)))
    else:
        result = run_sync(qcheck.check_image(size), _reader(fd))
    repaired = 0
    if repair and not result.clean:
        repaired = repair_fd(fd, result, repair)
        result = run_sync(qcheck.check_image(size), _reader(fd))
    return result, repaired


def run_check(path: str, *, repair: str | None, as_json: bool, given: str | None = None,
              force_share: bool = False) -> int:
    """Check (and repair) ``path``; returns qemu-img check's exit code.

    ``given``: -f (qcow2, raw or probe), else the name says the format.
    ``force_share``: -U, take no lock (only without ``repair``).
    """
    from cachefs.infocmd import inspected, require_format, resolve_format
    require_format(path, given)
    with inspected(path, writable=bool(repair), force_share=force_share) as fd:
        if resolve_format(path, fd, given) != "qcow2":
            print(f"{path}: raw image: nothing to check")
            return 0
        result, repaired = check_fd(fd, repair=repair, show_progress=sys.stderr.isatty() and not as_json)
    if as_json:
        print(json.dumps({"filename": path, "corruptions": len(result.corruptions),
                          "leaks": result.leaked_clusters, "check_errors": result.errors,
                          "allocated_clusters": result.allocated_clusters,
                          "total_clusters": result.total_clusters,
                          "compressed_clusters": result.compressed_clusters,
                          "image_end_offset": result.image_end_offset,
                          "repair_writes": repaired, "messages": list(result.corruptions)}, indent=2))
    else:
        _print_report(result, repaired)
    return result.exit_code()


def _print_report(result, repaired: int) -> None:
    """qemu-img check's wording."""
    for line in result.corruptions[:50]:
        print(line)
    if len(result.corruptions) > 50:
        print(f"... and {len(result.corruptions) - 50} more")
    if repaired:
        print(f"Repaired with {repaired} write(s).")
    if result.leaks:
        print(f"{result.leaked_clusters} leaked clusters were found on the image.\n"
              "This means waste of disk space, but no harm to data.")
    if result.corruptions:
        print(f"\n{len(result.corruptions)} errors were found on the image.\n"
              "Data may be corrupted, or further writes to the image may corrupt it.")
    elif not result.leaks and not result.errors:
        print("No errors were found on the image.")
    total = max(1, result.total_clusters)
    print(f"{result.allocated_clusters}/{result.total_clusters} = "
          f"{100 * result.allocated_clusters / total:.2f}% allocated, "
          f"{100 * result.compressed_clusters / total:.2f}% compressed clusters")
    print(f"Image end offset: {result.image_end_offset}")
