"""`cachefs check` and the repair of dirty lazy-refcount images at open.

The checker itself (cachefs/qcow2/check.py) is sans-I/O; this module feeds
it from a file, shows progress on a terminal, and carries out the repair's
write and sync requests (check.write_repair) with plan.run_sync.
"""

from __future__ import annotations

import json
import os
import sys

from cachefs.qcow2 import check as qcheck
from cachefs.qcow2.plan import run_sync


def _reader(fd: int, progress=None):
    def pread(off: int, n: int) -> bytes:
        if progress is not None:
            progress(n)
        return os.pread(fd, n, off)
    return pread


class _FileIO:
    """plan.py's write requests on a file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def pwrite(self, offset: int, data) -> None:
        os.pwrite(self.fd, data, offset)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def truncate(self, size: int, grow: bool) -> None:
        now = os.fstat(self.fd).st_size
        if (now < size) if grow else (now > size):
            os.ftruncate(self.fd, size)


def _apply(fd: int, writes) -> int:
    """Apply repair writes in check.repair's order, then make them durable."""
    return run_sync(qcheck.write_repair(writes), _reader(fd), _FileIO(fd))


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
        writes = run_sync(qcheck.repair(result, repair), _reader(fd))
        repaired = _apply(fd, writes)
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


def repair_dirty_sync(fd: int) -> None:
    """A lazy-refcounts image that was not closed cleanly: rebuild refcounts, clear the dirty bit.

    QEMU does the same on read-write open (qcow2_check_refcounts with
    BDRV_FIX_ERRORS | BDRV_FIX_LEAKS). Raises CorruptImage if it cannot.
    """
    size = os.fstat(fd).st_size
    writes = run_sync(qcheck.rebuild_refcounts(size), _reader(fd))
    _apply(fd, writes)
