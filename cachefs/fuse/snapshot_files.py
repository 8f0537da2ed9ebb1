"""Every internal snapshot is a file: ``vm1@NAME.raw``, read-only, beside ``vm1.raw`` (issue 23).

As ZFS shows ``.zfs/snapshot``: a backup tool copies a snapshot's file while the guest writes to
the live one. The files follow the snapshot table: one made (through the mount, or already in the
image when it was opened) appears at once, one deleted vanishes at once. A snapshot whose file is
open is not deleted (EBUSY) until its last close, since its clusters would be freed under the
reader; an image whose file or snapshot files are open is not reverted (apply), since its bytes
would change under them.

Names: the live file's name without ``.raw``/``.img``, ``@``, the snapshot's name, ``.raw``. A
snapshot name that cannot be part of a file name (a ``/``, a NUL, a leading dot, too long) gets
no file; it is still listed by ``cachefs snapshot list``.
"""

from __future__ import annotations

import logging
import os

from cachefs.errors import CachefsError
from cachefs.image import internal_snapshots
from cachefs.image.qcow2image import Qcow2Image
from cachefs.image.snapshot_view import SnapshotView, open_view

log = logging.getLogger("cachefs.fuse.catalog")

NAME_MAX = 255


def view_name(live: str, snapshot: str) -> str | None:
    """The file name of ``live``'s snapshot ``snapshot``, or None if it cannot have one."""
    stem = live[:-4] if live.endswith((".raw", ".img")) else live
    name = f"{stem}@{snapshot}.raw"
    if not snapshot or "/" in snapshot or "\0" in snapshot or len(os.fsencode(name)) > NAME_MAX:
        return None
    return name


class SnapshotFiles:
    """The snapshot files of a catalog's images (fuse/catalog.py keeps their entries by inode)."""

    def __init__(self, catalog) -> None:
        self.catalog = catalog
        self.by_name: dict[str, object] = {}  # visible name -> catalog.Entry of a SnapshotView
        self._of: dict[int, dict[str, object]] = {}  # live inode -> snapshot id -> Entry
        self._seen: dict[int, tuple] = {}  # live inode -> what its files were made from

    def views_of(self, live) -> list:
        return list(self._of.get(live.inode, {}).values())

    def view(self, live, name_or_id: str):
        """The file of ``live``'s snapshot named (or numbered) so, or None."""
        views = self._of.get(live.inode, {})
        return views.get(name_or_id) or next((e for e in views.values() if e.image.snapshot.is_named(name_or_id)), None)

    async def sync_all(self) -> None:
        for e in list(self.catalog.by_name.values()):
            await self.sync(e)
        for inode in [i for i in self._of if self.catalog.entry(i) is None]:
            await self._drop_all(inode)

    async def sync(self, live) -> None:
        """Make ``live``'s snapshot files what its snapshot table says now."""
        img = live.image
        if not isinstance(img, Qcow2Image) or isinstance(img, SnapshotView):
            return
        hdr = img.engine.current_header()
        key = (hdr.snapshots_offset, hdr.nb_snapshots, hdr.l1_table_offset, live.visible)
        if self._seen.get(live.inode) == key:
            return
        try:
            snaps = await internal_snapshots.entries(img)
        except (CachefsError, OSError) as exc:
            log.warning("%s: its snapshots get no files: %s", img.path, exc)
            snaps = []
        self._seen[live.inode] = key
        want = {s.id: s for s in snaps}
        views = self._of.setdefault(live.inode, {})
        for sid in [sid for sid in views if sid not in want]:
            await self._unname(views.pop(sid))
        for sid, snap in want.items():
            name = view_name(live.visible, snap.name) if live.visible else None
            if sid in views:
                self._rename(views[sid], name)
            elif name is not None and name not in self.catalog.by_name:
                views[sid] = await self._open(img, snap, name)

    async def _open(self, img: Qcow2Image, snap, name: str):
        view = await open_view(img, snap)
        e = self.catalog.add_virtual(view, name)
        self.by_name[name] = e
        return e

    def _rename(self, e, name: str | None) -> None:
        if e.visible == name:
            return
        self.by_name.pop(e.visible, None)
        e.visible = name
        if name is not None:
            self.by_name[name] = e

    async def _unname(self, e) -> None:
        """A deleted snapshot's file vanishes now; an open one closes at its last release."""
        self.by_name.pop(e.visible, None)
        await self.catalog.forget_unnamed(e)

    async def drop_views_of(self, inode: int) -> None:
        """The live image closed (removed from the directory): its snapshot files go with it."""
        if inode in self._of:
            await self._drop_all(inode)

    async def _drop_all(self, inode: int) -> None:
        for e in self._of.pop(inode, {}).values():
            await self._unname(e)
        self._seen.pop(inode, None)

    def busy(self, live) -> list[str]:
        """The open files among ``live`` and its snapshot files (apply refuses while there are any)."""
        return [e.visible or "a removed file" for e in [live, *self.views_of(live)] if e.handles]
