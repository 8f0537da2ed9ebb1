"""Internal snapshots of a live image: create, delete, apply, list (issue 23).

Each operation is one new metadata generation (qcow2/generation.py) switched to at a snapshot
point that no guest write straddles (Qcow2Image.new_generation). What the core refuses (a v2
image, a name in use, an unknown name, a damaged snapshot table) is raised as its one-line
CachefsError.
"""

from __future__ import annotations

import errno
import time

from cachefs.errors import UnsupportedOperation
from cachefs.image.base import Image
from cachefs.image.qcow2image import Qcow2Image
from cachefs.qcow2 import generation
from cachefs.qcow2.snapshots import SnapshotEntry, read_entries


def _live(img: Image) -> Qcow2Image:
    if not isinstance(img, Qcow2Image):
        raise UnsupportedOperation(f"{img.path}: internal snapshots need a qcow2 image (this one is {img.format})")
    if not img.writable:
        why = img.read_only_reason or "it is served read-only"
        raise OSError(errno.EROFS, f"{img.path}: no snapshot can be taken or changed: {why}")
    return img


async def _run(img: Qcow2Image, planner) -> SnapshotEntry | None:
    gen = await img.new_generation(planner)
    return gen.snapshot if gen is not None else None


async def create(img: Image, name: str) -> SnapshotEntry:
    """Take snapshot ``name`` of the image as it is now (every write acknowledged before is in it)."""
    live, now = _live(img), time.time_ns()
    return await _run(live, lambda hdr, size, at: generation.create_snapshot(hdr, size, at, name, now))


async def delete(img: Image, name_or_id: str) -> SnapshotEntry:
    """Delete a snapshot; what only it held is freed (refcounts exact)."""
    live = _live(img)
    return await _run(live, lambda hdr, size, at: generation.delete_snapshot(hdr, size, at, name_or_id))


async def apply(img: Image, name_or_id: str) -> SnapshotEntry:
    """Revert the image to a snapshot (``qemu-img snapshot -a``). The caller makes sure nobody
    has the image open: its contents, and maybe its size, change under any reader."""
    live = _live(img)
    return await _run(live, lambda hdr, size, at: generation.apply_snapshot(hdr, size, at, name_or_id))


async def unshare(img: Qcow2Image) -> None:
    """Private copies of the L2 tables a qemu-img snapshot shares with the active image: the
    engine writes only private tables (qcow2/generation.py)."""
    await _run(img, generation.unshare)


async def entries(img: Image) -> list[SnapshotEntry]:
    """The image's snapshots, in table order ([] for a raw image)."""
    if not isinstance(img, Qcow2Image):
        return []
    hdr = img.engine.current_header()
    if not hdr.nb_snapshots:
        return []
    be = img.backend
    return await img.query(read_entries(hdr, be.size()), be)
