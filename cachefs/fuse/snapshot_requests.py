"""Internal snapshots through xattrs, for scripts that only have a path (issue 23).

``setfattr -n user.cachefs.snapshot.create -v NAME MNT/vm1.raw`` takes a snapshot while the guest
writes; ``.delete`` and ``.apply`` take a name or an id; ``getfattr -n user.cachefs.snapshot.list``
is the snapshot table as JSON (qemu-img info's "snapshots" keys). ``cachefs snapshot`` uses these.
A refusal is the errno of its CachefsError (EEXIST, ENOENT, EBUSY, EROFS, EOPNOTSUPP); its one-line
reason is the image's ``user.cachefs.snapshot_error`` until the next operation succeeds.
"""

from __future__ import annotations

import errno
import json
import logging

import pyfuse3
import trio

from cachefs.errors import CachefsError, ImageLocked
from cachefs.image import internal_snapshots
from cachefs.image.snapshot_view import SnapshotView

log = logging.getLogger("cachefs.fuse.operations")

OPERATIONS = ("create", "delete", "apply")
DONE = {"create": "created", "delete": "deleted", "apply": "applied"}


def snapshot_info(s) -> dict:
    """One snapshot as qemu-img info --output=json shows it (icount only when recorded)."""
    out = {"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size, "date-sec": s.date_sec,
           "date-nsec": s.date_nsec, "vm-clock-sec": s.vm_clock_nsec // 10**9,
           "vm-clock-nsec": s.vm_clock_nsec % 10**9}
    if s.icount is not None:
        out["icount"] = s.icount
    return out


class SnapshotRequests:
    """The snapshot xattrs of one mount's files (ops: fuse/operations.Operations)."""

    def __init__(self, ops) -> None:
        self.ops = ops
        self.errors: dict[int, str] = {}  # inode -> the last refusal, one line

    async def listing(self, entry) -> bytes:
        snaps = await internal_snapshots.entries(entry.image)
        return json.dumps([snapshot_info(s) for s in snaps]).encode()

    async def change(self, entry, operation: str, value: bytes) -> None:
        """setxattr user.cachefs.snapshot.OPERATION = NAME on a live image's file."""
        name = value.decode(errors="replace").strip()
        try:
            await self._change(entry, operation, name)
        except (CachefsError, OSError) as exc:
            self.errors[entry.inode] = str(exc)
            log.error("snapshot %s %r of %s: %s", operation, name, entry.visible, exc)
            raise
        self.errors.pop(entry.inode, None)

    async def _change(self, entry, operation: str, name: str) -> None:
        if isinstance(entry.image, SnapshotView):
            raise OSError(errno.EROFS, f"{entry.visible} is a snapshot's file: take snapshots of the live image")
        if not name:
            raise OSError(errno.EINVAL, "no snapshot name given")
        files = self.ops.catalog.snapshots
        if operation == "apply" and (busy := files.busy(entry)):
            raise ImageLocked(f"{entry.visible}: cannot revert to snapshot {name!r} while open "
                              f"({', '.join(busy)}): close them first")
        if operation == "delete" and (view := files.view(entry, name)) is not None and view.handles:
            raise ImageLocked(f"{entry.visible}: snapshot {name!r} is open as {view.visible}: "
                              f"close it first")
        async with self.ops.fast.paused(entry.inode):  # C writes in place: out while the mapping changes
            snap = await getattr(internal_snapshots, operation)(entry.image, name)
        log.info("%s: snapshot %s %s (id %s)", entry.visible, snap.name, DONE[operation], snap.id)
        await files.sync(entry)  # a new snapshot's file appears at once, a deleted one's vanishes
        if operation == "apply":  # the bytes (and maybe the size) changed: nothing cached stays
            await trio.to_thread.run_sync(self.ops.fast.invalidate or _invalidate, entry.inode)


def _invalidate(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode, attr_only=False)
    except OSError:
        pass
