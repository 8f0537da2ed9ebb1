"""`cachefs map`: which parts of a disk hold data, in `qemu-img map`'s shape.

Two kinds of argument:

- an **image file**: read-only, under QEMU's lock unless ``-U`` (as `cachefs
  info`). A qcow2 is mapped from its L1/L2 tables (qcow2/discard.plan_map):
  unallocated, zero and data clusters, with host offsets, as `qemu-img map`
  reports them. A raw image is mapped with SEEK_DATA/SEEK_HOLE on the file.
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

import errno
import os

import attrs

from cachefs.errors import CachefsError


@attrs.frozen
class MapEntry:
    """One run, with qemu-img's MapEntry fields (depth is always 0: no backing files)."""

    start: int
    length: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None

    def json(self) -> str:
        """qemu-img's dump_map_entry() for OFORMAT_JSON."""
        b = lambda v: "true" if v else "false"  # noqa: E731
        out = (f'{{ "start": {self.start}, "length": {self.length}, "depth": 0, "present": {b(self.present)}, '
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


def qcow2_entries(fd: int) -> list[MapEntry]:
    from cachefs.qcow2.cluster import MappingKind
    from cachefs.qcow2.discard import plan_map
    from cachefs.qcow2.engine import open_engine
    from cachefs.qcow2.plan import run_sync
    pread = lambda o, n: os.pread(fd, n, o)  # noqa: E731
    engine = run_sync(open_engine(os.fstat(fd).st_size, writable=False), pread)
    out = []
    for start, length, kind, host in run_sync(plan_map(engine), pread):
        data = kind in (MappingKind.DATA, MappingKind.COMPRESSED)
        out.append(MapEntry(start, length, kind is not MappingKind.UNALLOCATED, not data, data, host))
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


def map_entries(path: str, given: str | None, force_share: bool) -> list[MapEntry]:
    from cachefs.cli.info import inspected, require_format, resolve_format
    if given is None and is_served(path):
        return served_entries(path)
    require_format(path, given)
    with inspected(path, writable=False, force_share=force_share) as fd:
        if resolve_format(path, fd, given) == "raw":
            return seek_entries(fd, os.fstat(fd).st_size)
        return qcow2_entries(fd)


def json_text(entries: list[MapEntry]) -> str:
    """qemu-img map --output=json: '[' entries joined by ',\\n' ']'."""
    return "[" + ",\n".join(e.json() for e in entries) + "]"


def human_lines(entries: list[MapEntry], filename: str) -> list[str]:
    """qemu-img map's table: data extents with their offsets (compressed data has none: refused, as qemu-img does)."""
    if any(e.data and e.offset is None for e in entries):
        raise CachefsError("File contains external, encrypted or compressed clusters; use --output=json")
    h = lambda v: f"{v:#x}" if v else "0"  # noqa: E731  (C's %#x prints 0 as "0")
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    lines += [f"{h(e.start):<16}{h(e.length):<16}{h(e.offset):<16}{filename}" for e in entries if e.data]
    return lines
