"""`cachefs check`: check (and repair) an image file, report as qemu-img check does.

The checker (cachefs/qcow2/check.py) and the repair (cachefs/qcow2/repair.py)
are sans-I/O; this module feeds the checker from a file and shows progress on
a terminal; image/repair_file.py carries out the repair.

The report is qemu-img check's, in its words (human) or its keys
(``--output=json``), with one difference: with ``-U`` on an image a cachefs
mount is serving, the clusters that mount holds in reserve are not leaks
(cli/served.py): they are reported apart, and the exit code leaves them out.
"""

from __future__ import annotations

import json
import os
import sys

import attrs

from cachefs.cli import served
from cachefs.qcow2 import check as qcheck
from cachefs.qcow2.plan import run_sync
from cachefs.image.repair_file import reader as _reader
from cachefs.image.repair_file import repair_fd


@attrs.frozen
class Report:
    """A check's result as the command reports it."""

    path: str
    result: qcheck.CheckResult
    before: qcheck.CheckResult  # before a repair (the same without one)
    repaired: int               # repair writes
    live: served.Live | None = None
    reserved: int = 0           # leaked clusters the serving mount holds in reserve

    @property
    def leaks(self) -> int:
        return self.result.leaked_clusters - self.reserved

    def exit_code(self) -> int:
        code = self.result.exit_code()
        return qcheck.EXIT_CLEAN if code == qcheck.EXIT_LEAKS and not self.leaks else code


def check_fd(fd: int, *, repair: str | None = None, show_progress: bool = False):
    """Check (and repair) the image open at ``fd``: (result, repair writes, result before the repair)."""
    size = os.fstat(fd).st_size
    if show_progress:
        from rich.progress import Progress
        with Progress(transient=True) as bar:
            task = bar.add_task("checking", total=size)
            result = run_sync(qcheck.check_image(size), _reader(fd, lambda n: bar.advance(task, n)))
    else:
        result = run_sync(qcheck.check_image(size), _reader(fd))
    before, repaired = result, 0
    if repair and not result.clean:
        repaired = repair_fd(fd, result, repair)
        result = run_sync(qcheck.check_image(size), _reader(fd))
    return result, repaired, before


def run_check(path: str, *, repair: str | None, as_json: bool, given: str | None = None,
              force_share: bool = False) -> int:
    """Check (and repair) ``path``; returns qemu-img check's exit code.

    ``given``: -f (qcow2, raw or probe), else the name says the format.
    ``force_share``: -U, take no lock (only without ``repair``); a cachefs mount serving the
    image then says which clusters it holds in reserve, before and after the check.
    """
    from cachefs.cli.info import inspected, require_format, resolve_format
    require_format(path, given)
    live = served.serving_mount(path) if force_share else None
    held = live.reserved() if live else set()
    with inspected(path, writable=bool(repair), force_share=force_share) as fd:
        if resolve_format(path, fd, given) != "qcow2":
            print(f"{path}: raw image: nothing to check")
            return 0
        result, repaired, before = check_fd(fd, repair=repair,
                                            show_progress=sys.stderr.isatty() and not as_json)
    if live:
        held |= live.reserved()
    report = Report(path, result, before, repaired, live, sum(1 for c in result.leaks if c in held))
    if as_json:
        print(json.dumps(json_report(report), indent=4))
    else:
        _print_report(report)
    return report.exit_code()


def json_report(report: Report) -> dict:
    """qemu-img check --output=json: its keys, in its order; a count of 0 is left out as qemu-img
    leaves it out (collect_image_check). A live image adds "cachefs": the mount and its reserve."""
    r, before = report.result, report.before
    fields = [("image-end-offset", r.image_end_offset), ("compressed-clusters", r.compressed_clusters),
              ("total-clusters", r.total_clusters), ("corruptions", len(r.corruptions)),
              ("corruptions-fixed", max(0, len(before.corruptions) - len(r.corruptions))),
              ("check-errors", r.errors), ("leaks", report.leaks),
              ("leaks-fixed", max(0, before.leaked_clusters - r.leaked_clusters)),
              ("allocated-clusters", r.allocated_clusters), ("filename", report.path), ("format", "qcow2"),
              ("fragmented-clusters", r.fragmented_clusters)]
    out = {k: v for k, v in fields if v or k in ("check-errors", "filename", "format")}
    if report.live:
        out["cachefs"] = {"mount": report.live.mount, "reserved-clusters": report.reserved}
    return out


def _print_report(report: Report) -> None:
    """qemu-img check's wording (img_check), and a line about a live image's reserve."""
    result = report.result
    for line in result.corruptions[:50]:
        print(line)
    if len(result.corruptions) > 50:
        print(f"... and {len(result.corruptions) - 50} more")
    if report.repaired:
        print(f"Repaired with {report.repaired} write(s).")
    if report.leaks:
        print(f"{report.leaks} leaked clusters were found on the image.\n"
              "This means waste of disk space, but no harm to data.")
    if result.corruptions:
        print(f"\n{len(result.corruptions)} errors were found on the image.\n"
              "Data may be corrupted, or further writes to the image may corrupt it.")
    elif not report.leaks and not result.errors:
        print("No errors were found on the image.")
    if report.live:
        _print_live(report)
    if result.total_clusters and result.allocated_clusters:
        a = result.allocated_clusters
        print(f"{a}/{result.total_clusters} = {100 * a / result.total_clusters:.2f}% allocated, "
              f"{100 * result.fragmented_clusters / a:.2f}% fragmented, "
              f"{100 * result.compressed_clusters / a:.2f}% compressed clusters")
    if result.image_end_offset:
        print(f"Image end offset: {result.image_end_offset}")


def _print_live(report: Report) -> None:
    live = report.live
    parts = []
    if report.reserved:
        parts.append(f"{report.reserved} clusters it holds in reserve (counted ahead of its writes, "
                     f"given back at unmount) are not leaks")
    if report.leaks:
        parts.append(f"the {report.leaks} leaked clusters may be ones it changed since its last flush")
    daemon = f" (daemon {live.pid})" if live.pid else ""
    print(f"The image is in use by the cachefs mount at {live.mount}{daemon}" +
          (": " + "; ".join(parts) if parts else "") + ".")
