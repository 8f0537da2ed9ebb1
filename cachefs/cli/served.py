"""Which cachefs mount serves an image file, and which of the image's clusters it holds in reserve.

`cachefs check -U` reads an image that a mount may be writing. Such a mount
raises the refcounts of clusters ahead of their use and makes that durable
(docs/design.md, "One fdatasync per guest flush"): until a write takes one,
nothing on disk points at it, so a check counts it as leaked, and `qemu-img
check -U` exits 3 on a healthy live image. The mount knows which clusters
those are and says so in the served file's ``user.cachefs.reserved``
(host cluster numbers, "first-last" runs): `check` reports them apart.

Found through /proc/self/mountinfo (cachefs mounts) and the xattrs of each
mount's root (``image_dir``) and served files (``path``); no lock is taken
and nothing is written.
"""

from __future__ import annotations

import os

import attrs

from cachefs.mountinfo import MOUNTINFO, parse_mountinfo
from cachefs.image.cluster_runs import parse_runs

PREFIX = "user.cachefs."


@attrs.frozen
class Live:
    """A cachefs mount serving an image: where, as which file, by which daemon."""

    mount: str
    served: str
    pid: str | None

    def reserved(self) -> set[int]:
        """The host clusters the mount holds in reserve now (empty if it says nothing)."""
        return parse_runs(_xattr(self.served, "reserved") or "")


def serving_mount(image: str) -> Live | None:
    """The cachefs mount serving the image file ``image``, or None."""
    real = os.path.realpath(image)
    try:
        with open(MOUNTINFO) as f:
            mounts = [m for m in parse_mountinfo(f.read()) if m.fstype == "fuse.cachefs"]
    except OSError:
        return None
    for m in mounts:
        image_dir = _xattr(m.path, "image_dir")
        if image_dir is None or not _same(image_dir, os.path.dirname(real)):
            continue
        for name in _listdir(m.path):
            served = os.path.join(m.path, name)
            path = _xattr(served, "path")
            if path is not None and _same(path, real):
                return Live(m.path, served, _xattr(m.path, "pid"))
    return None


def _xattr(path: str, name: str) -> str | None:
    try:
        return os.getxattr(path, PREFIX + name).decode()
    except OSError:
        return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
