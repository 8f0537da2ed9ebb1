"""`cachefs map`: which parts of a disk hold data, in `qemu-img map`'s shape.

Two kinds of argument:

- an **image file**: read-only, under QEMU's lock unless ``-U`` (as `cachefs
  info`). A qcow2 is mapped from its L1/L2 tables (qcow2/discard.plan_map):
  unallocated, zero and data clusters, with host offsets, as `qemu-img map`
  reports them. A raw image is mapped with SEEK_DATA/SEEK_HOLE on the file.
  An overlay's chain is opened by the rule a mount follows backing names
  (cli/chain.py: the top's directory and each ``--backing-dir``), and each
  extent carries its ``depth``, as qemu-img's: the ranges a layer leaves to
  its backing file (``MappingKind.BACKING``) are answered by the next layer
  down; a range past a shorter base's end reads as zeros and is reported at
  the depth of the layer whose base is short (present: false), and a range
  no layer allocated at the depth of the last one, as qemu-img reports both.
- a **served file** (``MNT/NAME.raw``): mapped with SEEK_DATA/SEEK_HOLE
  through the mount, which the data plane answers from the image's mapping
  (fuse/direct_requests.py). That is what every other client sees (`qemu-img map -f raw`,
  `cp --sparse`, backup tools), so `cachefs map` shows exactly that and
  needs no interface of its own; host offsets are the image file's
  business (map the image file for those). A mount with ``--dataplane off``
  cannot answer SEEK_DATA (pyfuse3 has no lseek): refused in one line.

The JSON is `qemu-img map --output=json`'s, byte for byte (one entry per
line); the human form is its table of data extents.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Sequence

import attrs

from cachefs.errors import CachefsError


@attrs.frozen
class MapEntry:
    """One run, with qemu-img's MapEntry fields."""

    start: int
    length: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    #: 0: the top image; N: its Nth backing file.
    depth: int = 0
    #: The layer's file as QEMU names it (the human table's File column).
    filename: str = ""

    def json(self) -> str:
        """qemu-img's dump_map_entry() for OFORMAT_JSON."""
        b = lambda v: "true" if v else "false"  # noqa: E731
        out = (f'{{ "start": {self.start}, "length": {self.length}, "depth": {self.depth}, '
               f'"present": {b(self.present)}, '
               f'"zero": {b(self.zero)}, "data": {b(self.data)}')
        return out + (f', "offset": {self.offset}}}' if self.offset is not None else "}")


def seek_entries(fd: int, size: int) -> list[MapEntry]:
    """A file's data and holes by SEEK_DATA/SEEK_HOLE, as qemu's raw driver reports them."""
    out, pos = [], 0
    while pos < size:
        try:
            data = min(os.lseek(fd, pos, os.SEEK_DATA), size)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = size
        if data > pos:
            out.append(MapEntry(pos, data - pos, True, True, False, pos))
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        out.append(MapEntry(data, hole - data, True, False, True, data))
        pos = hole
    return out


#: A layer's run: (start, length, its entry), the entry None where the layer's backing file answers.
Run = tuple[int, int, "MapEntry | None"]


def layer_runs(layer, depth: int) -> list[Run]:
    """One layer's own map: its runs, BACKING ones left for the layer below."""
    if layer.engine is None:
        return [(e.start, e.length, attrs.evolve(e, depth=depth, filename=layer.filename))
                for e in seek_entries(layer.fd, layer.size)]
    from cachefs.qcow2.cluster import MappingKind
    from cachefs.qcow2.discard import plan_map
    from cachefs.qcow2.plan import run_sync
    out: list[Run] = []
    for start, length, kind, host in run_sync(plan_map(layer.engine), lambda o, n: os.pread(layer.fd, n, o)):
        if kind is MappingKind.BACKING:
            out.append((start, length, None))
            continue
        data = kind in (MappingKind.DATA, MappingKind.COMPRESSED)
        out.append((start, length, MapEntry(start, length, kind is not MappingKind.UNALLOCATED, not data, data,
                                            host, depth, layer.filename)))
    return out


def _clipped(runs: list[Run], starts: list[int], lo: int, hi: int):
    """The runs' pieces inside [lo, hi), each entry cut to its piece (host offsets move along)."""
    i = max(bisect.bisect_right(starts, lo) - 1, 0)
    while i < len(runs) and runs[i][0] < hi:
        start, length, e = runs[i]
        a, b = max(start, lo), min(start + length, hi)
        if a < b:
            if e is not None:
                off = None if e.offset is None else e.offset + (a - start)
                e = attrs.evolve(e, start=a, length=b - a, offset=off)
            yield a, b - a, e
        i += 1


def chain_entries(layers) -> list[MapEntry]:
    """The chain's map, top first: each layer's BACKING ranges answered by the layer below."""
    runs = [layer_runs(layer, d) for d, layer in enumerate(layers)]
    starts = [[r[0] for r in rs] for rs in runs]
    out: list[MapEntry] = []

    def fill(depth: int, lo: int, hi: int) -> None:
        for start, length, e in _clipped(runs[depth], starts[depth], lo, hi):
            if e is not None:
                out.append(e)
                continue
            end = start + length
            below = layers[depth + 1].size if depth + 1 < len(layers) else 0
            if start < below:
                fill(depth + 1, start, min(end, below))
            if end > below:  # past a shorter base's end: zeros, reported at this layer (as qemu-img)
                cut = max(start, below)
                out.append(MapEntry(cut, end - cut, False, True, False, None, depth, layers[depth].filename))

    fill(0, 0, layers[0].size)
    return merged(out)


def _mergeable(a: MapEntry, b: MapEntry) -> bool:
    """qemu-img's entry_mergeable(): the same flags and depth, and host offsets that continue."""
    if (a.zero, a.data, a.depth, a.present) != (b.zero, b.data, b.depth, b.present):
        return False
    if (a.offset is None) != (b.offset is None):
        return False
    return a.offset is None or a.offset + a.length == b.offset


def merged(entries: list[MapEntry]) -> list[MapEntry]:
    """Adjacent mergeable entries joined, as qemu-img map prints them."""
    out: list[MapEntry] = []
    for e in entries:
        if out and _mergeable(out[-1], e):
            out[-1] = attrs.evolve(out[-1], length=out[-1].length + e.length)
        else:
            out.append(e)
    return out


def served_entries(path: str) -> list[MapEntry]:
    """A file of a cachefs mount, through the mount."""
    root = os.path.dirname(os.path.abspath(path))
    try:
        plane = os.getxattr(root, "user.cachefs.dataplane").decode()
    except OSError:
        plane = "on"
    if plane == "off":
        raise CachefsError(f"{path}: its mount runs --dataplane off, which cannot answer SEEK_DATA/SEEK_HOLE "
                           f"(pyfuse3 has no lseek); map the image file instead")
    fd = os.open(path, os.O_RDONLY)
    try:
        return seek_entries(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def is_served(path: str) -> bool:
    try:
        os.getxattr(path, "user.cachefs.format")
    except OSError:
        return False
    return True


def map_entries(path: str, given: str | None, force_share: bool,
                backing_dirs: Sequence[str] = ()) -> list[MapEntry]:
    from cachefs.cli.chain import open_chain
    from cachefs.cli.info import require_format
    if given is None and is_served(path):
        return served_entries(path)
    require_format(path, given)
    with open_chain(path, given, backing_dirs=backing_dirs, force_share=force_share) as layers:
        return chain_entries(layers)


def json_text(entries: list[MapEntry]) -> str:
    """qemu-img map --output=json: '[' entries joined by ',\\n' ']'."""
    return "[" + ",\n".join(e.json() for e in entries) + "]"


def human_lines(entries: list[MapEntry], filename: str) -> list[str]:
    """qemu-img map's table: data extents with their offsets (compressed data has none: refused, as qemu-img does)."""
    if any(e.data and e.offset is None for e in entries):
        raise CachefsError("File contains external, encrypted or compressed clusters; use --output=json")
    h = lambda v: f"{v:#x}" if v else "0"  # noqa: E731  (C's %#x prints 0 as "0")
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    lines += [f"{h(e.start):<16}{h(e.length):<16}{h(e.offset):<16}{e.filename or filename}"
              for e in entries if e.data]
    return lines
