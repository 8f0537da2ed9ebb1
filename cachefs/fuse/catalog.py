"""The image directory is the truth (docs/design.md, "The image directory and the mount's life").

The mount shows what the image directory holds *now*, not what it held when
it was mounted: an image copied in appears at the next lookup or readdir,
one removed there vanishes, one renamed moves. What an image is comes from
its name, never from its bytes (QEMU's format-probing hazard): ``NAME.qcow2``
shows as ``NAME.raw``; ``*.raw`` and ``*.img`` are raw and keep their names.

An image's identity is its file (``st_dev``, ``st_ino``), not its name, so a
rename keeps the inode number, the open handles and QEMU's OFD locks, which
belong to the open file description and so follow the file. A removed image
that is still open keeps working until its last close, as an unlinked file
does on any filesystem; only then is it flushed and closed.

The directory is rescanned when its mtime changed. ext4 keeps mtimes at
timer-tick resolution, so a scan is trusted only once the mtime it saw was a
second old (git's "racy clean" rule): a change in the same tick as the scan
is never missed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

from cachefs.errors import CachefsError
from cachefs.image.base import Image
from cachefs.image.opening import create_image_file
from cachefs.fuse.snapshot_files import SnapshotFiles

log = logging.getLogger("cachefs.fuse.catalog")

IMAGE_SUFFIXES = (".qcow2", ".raw", ".img")
ROOT_INODE = 1  # pyfuse3.ROOT_INODE; not imported so that this module stays free of the FUSE layer
#: How old a directory mtime must be before a scan that saw it is trusted.
RACY_NS = 1_000_000_000


def visible_name(filename: str) -> str | None:
    """The name an image file shows under in the mount; None for what is no image."""
    if filename.startswith(".") or not filename.endswith(IMAGE_SUFFIXES):
        return None
    return filename[:-len(".qcow2")] + ".raw" if filename.endswith(".qcow2") else filename


def backing_name(visible: str, qcow2: bool) -> str:
    """The file name behind ``visible``: NAME.raw is NAME.qcow2 when it is (to be) a qcow2 image."""
    return visible[:-len(".raw")] + ".qcow2" if qcow2 and visible.endswith(".raw") else visible


@attrs.frozen
class Found:
    """One image file seen by a directory scan."""
    visible: str
    path: str
    ident: tuple[int, int]  # (st_dev, st_ino)


def scan(image_dir: str) -> tuple[dict[str, list[Found]], float]:
    """Visible name -> every image file that would show under it (more than one is a clash)."""
    out: dict[str, list[Found]] = {}
    for entry in sorted(os.scandir(image_dir), key=lambda e: e.name):
        name = visible_name(entry.name)
        if name is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=True):
                continue
            st = entry.stat(follow_symlinks=True)
        except OSError:  # removed while we looked, or a dangling symlink
            continue
        out.setdefault(name, []).append(Found(name, entry.path, (st.st_dev, st.st_ino)))
    return out, time.time_ns()


def clash_message(found: list[Found]) -> str:
    a, b = (os.path.basename(f.path) for f in found[:2])
    return f"{a} and {b} would both appear as {found[0].visible}; rename one of them"


def unservable(name: str, qcow2: bool | None = None) -> str:
    """Why ``name`` cannot be a file of the mount, in one line (create(2) and rename(2) through it).

    ``qcow2``: what creating NAME.raw makes on this mount (None: not a create).
    """
    if name.startswith("."):
        return "names starting with '.' are never served (the image directory keeps them to itself)"
    if name.endswith(".qcow2") and qcow2 is not None:
        stem = name[:-len(".qcow2")]
        made = f"it is made as {stem}.qcow2" if qcow2 else "this mount makes it raw (--create-format raw)"
        return f"a qcow2 image NAME.qcow2 shows as NAME.raw in the mount: create {stem}.raw instead ({made})"
    return ("a mount holds only disk images, named NAME.raw or NAME.img "
            "(NAME.qcow2 in the image directory shows as NAME.raw)")


@attrs.define(eq=False)
class Entry:
    """A served image. Invariant: ``visible`` is None only while ``handles`` > 0 (removed, still open)."""
    inode: int
    image: Image
    ident: tuple[int, int]
    visible: str | None
    handles: int = 0


Opener = Callable[[str], Awaitable[Image]]


class Catalog:
    """Visible names, inode numbers and open images of one image directory."""

    def __init__(self, image_dir: str, opener: Opener):
        self.image_dir = image_dir
        self._open = opener
        self.by_name: dict[str, Entry] = {}
        self.by_inode: dict[int, Entry] = {}
        self.skipped: dict[str, str] = {}  # visible name -> "PATH: why it is not served"
        self._next_inode = ROOT_INODE + 1
        self._lock = trio.Lock()
        self._seen_mtime: int | None = None  # of the directory, at a trusted scan
        self._found: dict[tuple[int, int], Found] = {}  # the files of the scan in progress, by ident
        self.bases = None  # image/backing.Bases: which overlays read which image (the daemon sets it)
        self.snapshots = SnapshotFiles(self)  # vm1@NAME.raw: each internal snapshot as a file

    # -------------------------------------------------------------- lookups

    def entry(self, inode: int) -> Entry | None:
        return self.by_inode.get(inode)

    def names(self) -> list[str]:
        return sorted([*self.by_name, *self.snapshots.by_name])

    def named(self, name: str) -> Entry | None:
        """The entry shown as ``name``: an image, or a snapshot's file."""
        return self.by_name.get(name) or self.snapshots.by_name.get(name)

    def images(self) -> list[Image]:
        return [e.image for e in self.by_inode.values()]

    # -------------------------------------------------------------- scanning

    def _unchanged(self) -> bool:
        return self._seen_mtime is not None and os.stat(self.image_dir).st_mtime_ns == self._seen_mtime

    async def refresh(self, *, force: bool = False, fatal: tuple[type[BaseException], ...] = ()) -> list[str]:
        """Bring the served set in line with the directory; returns the names that went away.

        ``force`` rescans even an unchanged directory, which retries the
        images that could not be opened before (QEMU may have let go of one).
        ``fatal``: open errors that refuse the whole mount instead of one image.
        """
        async with self._lock:
            if not force and self._unchanged():
                return []
            mtime = os.stat(self.image_dir).st_mtime_ns
            found, scanned_at = scan(self.image_dir)
            self._found = {f.ident: f for group in found.values() for f in group if len(group) == 1}
            gone, moved = await self._drop_missing(found)
            await self._adopt(found, fatal)
            for e in moved:
                if e.visible is None:  # moved onto a name another served image keeps
                    await self._detach(e)
            await self.snapshots.sync_all()
            self._seen_mtime = mtime if scanned_at - mtime > RACY_NS else None
            return gone

    async def _drop_missing(self, found: dict[str, list[Found]]) -> tuple[list[str], list[Entry]]:
        """Unname the entries whose file left its name: removed ones go, moved ones wait for _adopt."""
        idents = {f.ident: f for group in found.values() for f in group}
        gone, moved = [], []
        for name, e in list(self.by_name.items()):
            now = idents.get(e.ident)
            if now is not None and now.visible == name:
                continue
            del self.by_name[name]
            gone.append(name)
            if now is None:
                log.info("%s: removed from %s", name, self.image_dir)
                await self._detach(e)
            else:
                e.visible = None  # renamed: _adopt gives it its new name
                moved.append(e)
        return gone, moved

    async def _adopt(self, found: dict[str, list[Found]], fatal) -> None:
        served = {e.ident: e for e in self.by_inode.values()}
        for name, group in found.items():
            mine = [f for f in group if f.ident in served]
            if len(group) > 1 and not mine:
                self._skip(name, f"{group[0].path}: {clash_message(group)}")
                continue
            f = mine[0] if mine else group[0]
            if f.ident in served:
                self._rename(served[f.ident], f, clashing=[g for g in group if g is not f])
            elif name not in self.by_name:
                await self._open_new(f, fatal)
        for name in list(self.skipped):
            if name not in found:
                del self.skipped[name]

    def _rename(self, e: Entry, f: Found, clashing: list[Found] = ()) -> None:
        """Keep serving ``e`` as ``f``; files that would show under the same name (an image copied in
        while it is served) are left out, with one line (the same clash refuses a mount at its start)."""
        if e.visible != f.visible:
            log.info("%s: now %s (%s)", e.visible or os.path.basename(e.image.path), f.visible, f.path)
        e.visible = f.visible
        e.image.path = f.path
        self.by_name[f.visible] = e
        if clashing:
            paths = ", ".join(g.path for g in clashing)
            self._skip(f.visible, f"{paths}: {clash_message([f, *clashing])}; "
                                  f"{os.path.basename(f.path)} stays served")
        else:
            self.skipped.pop(f.visible, None)

    async def _open_new(self, f: Found, fatal) -> None:
        try:
            img = await self._open(f.path)
        except fatal:
            raise
        except (CachefsError, OSError) as exc:
            why, own = str(exc), os.path.basename(f.path) + ": "
            why = why[len(own):] if why.startswith(own) else why  # named by its whole path below
            self._skip(f.visible, why if why.startswith(f.path) else f"{f.path}: {why}")
            return
        self.add(img, f)

    async def served_for_backing(self, path: str, ident: tuple[int, int]) -> Image | None:
        """The mount's own open image of a base an overlay names, opening it now if the scan in
        progress found it (one open per file: image/backing.py); None if the mount does not serve it."""
        e = next((e for e in self.by_inode.values() if e.ident == ident), None)
        if e is None and ident in self._found and self._found[ident].visible not in self.by_name:
            await self._open_new(self._found[ident], ())
            e = next((e for e in self.by_inode.values() if e.ident == ident), None)
        return e.image if e is not None else None

    def inode_of(self, img: Image) -> int | None:
        """The inode the mount serves ``img`` as, or None (a base it does not serve)."""
        return next((e.inode for e in self.by_inode.values() if e.image is img), None)

    def holders(self, img: Image) -> list[str]:
        """The overlays (paths) reading ``img`` as their backing file."""
        return self.bases.holders(img) if self.bases is not None else []

    def open_conflict(self, e: Entry, writable: bool, written: Callable[[Entry], bool]) -> str | None:
        """Why ``e`` must not be opened now, in one line, or None. A backing file allows no
        writer while an overlay above it is open (QEMU's lock for a backing file), so a base is
        not opened for writing then, nor an overlay while its base is open for writing."""
        by_path = {x.image.path: x for x in self.by_inode.values()}
        if writable:
            above, todo = [], list(self.holders(e.image))
            while todo:
                x = by_path.get(todo.pop())
                if x is not None and x not in above:
                    above.append(x)
                    todo += self.holders(x.image)
            users = [x.visible or os.path.basename(x.image.path) for x in above if x.handles]
            if users:
                return f"it is the backing file of {', '.join(sorted(users))}, open now: no writer while they are"
        base = e.image.backing
        while base is not None:
            x = by_path.get(base.image.path)
            if x is not None and written(x):
                return f"its backing file {x.visible} is open for writing"
            base = base.image.backing
        return None

    def add(self, img: Image, f: Found) -> Entry:
        """Serve an image just opened (by a scan, or by create(2) through the mount)."""
        e = Entry(self._next_inode, img, f.ident, f.visible)
        self._next_inode += 1
        self.by_inode[e.inode] = self.by_name[f.visible] = e
        self.skipped.pop(f.visible, None)
        log.info("serving %s as %s (%s)", f.path, f.visible, img.format)
        if img.read_only_reason:
            log.warning("serving %s read-only: %s", f.path, img.read_only_reason)
        return e

    def add_virtual(self, img: Image, name: str) -> Entry:
        """Serve a file that is no file of the directory (a snapshot's: fuse/snapshot_files.py)."""
        e = Entry(self._next_inode, img, (-1, self._next_inode), name)
        self._next_inode += 1
        self.by_inode[e.inode] = e
        return e

    async def forget_unnamed(self, e: Entry) -> None:
        """``e`` lost its name (a deleted snapshot): closed now, or at its last close."""
        await self._detach(e)

    def _skip(self, name: str, why: str) -> None:
        if self.skipped.get(name) != why:
            log.warning("not serving %s: %s", name, why)
        self.skipped[name] = why

    # -------------------------------------------------------------- changes through the mount

    async def create(self, name: str, *, qcow2: bool, owner: tuple[int, int] | None, perm: int) -> Entry:
        """create(2)/mknod(2) of NAME.raw or NAME.img: a new, empty image file, served at once.

        Its size comes from the ftruncate that follows, as with ``qemu-img
        create -f raw`` or ``truncate -s``. ``qcow2`` makes NAME.raw a qcow2
        image (NAME.qcow2) of virtual size 0; NAME.img is always raw.
        """
        if visible_name(name) != name:
            raise OSError(errno.EPERM, unservable(name, qcow2))
        async with self._lock:
            path = os.path.join(self.image_dir, backing_name(name, qcow2 and name.endswith(".raw")))
            if name in self.by_name or os.path.lexists(path):
                raise OSError(errno.EEXIST, f"{name} exists")
            await trio.to_thread.run_sync(create_image_file, path, path.endswith(".qcow2"), owner, perm)
            try:
                img = await self._open(path)
            except BaseException:
                os.unlink(path)
                raise
            st = os.stat(path)
            return self.add(img, Found(name, path, (st.st_dev, st.st_ino)))

    async def unlink(self, name: str) -> None:
        """unlink(2) through the mount: the image file goes; an open image lives to its last close."""
        async with self._lock:
            e = self._named(name)
            os.unlink(e.image.path)
            del self.by_name[name]
            log.info("%s: %s removed through the mount", name, e.image.path)
            await self._detach(e)

    async def rename(self, old: str, new: str, *, replace: bool) -> None:
        """rename(2) within the mount: the image file is renamed; its handles and locks follow it.

        A qcow2 image stays qcow2 (a.raw -> b.raw renames a.qcow2 to b.qcow2),
        so the new name must show a qcow2 image as NAME.raw.
        """
        async with self._lock:
            e = self._named(old)
            qcow2 = e.image.path.endswith(".qcow2")
            if visible_name(new) != new:
                raise OSError(errno.EPERM, unservable(new))
            if qcow2 and not new.endswith(".raw"):
                raise OSError(errno.EPERM, f"{old} is a qcow2 image ({os.path.basename(e.image.path)}), which the "
                                           f"mount shows as NAME.raw: rename it to another NAME.raw")
            target = os.path.join(self.image_dir, backing_name(new, qcow2))
            victim = self.by_name.get(new)
            if victim is e:
                return
            if victim is not None or os.path.lexists(target) or new in self.skipped:
                if not replace:
                    raise OSError(errno.EEXIST, f"{new} exists")
                await self._remove_target(new, victim)
            os.rename(e.image.path, target)
            del self.by_name[old]
            st = os.stat(target)
            self._rename(e, Found(new, target, (st.st_dev, st.st_ino)))

    async def _remove_target(self, name: str, victim: Entry | None) -> None:
        """What rename(2) replaces: every file that shows as ``name`` (NAME.raw may also be NAME.qcow2)."""
        if victim is not None:
            del self.by_name[name]
            os.unlink(victim.image.path)
            await self._detach(victim)
        for candidate in {name, backing_name(name, True)}:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.image_dir, candidate))
        self.skipped.pop(name, None)

    def _named(self, name: str) -> Entry:
        e = self.by_name.get(name)
        if e is None and name in self.snapshots.by_name:
            raise OSError(errno.EPERM, f"{name} is an internal snapshot's file: 'cachefs snapshot delete' "
                                       f"deletes the snapshot")
        if e is None:
            raise OSError(errno.ENOENT, f"{name}: no such image")
        return e

    # -------------------------------------------------------------- life of an entry

    def opened(self, e: Entry) -> None:
        e.handles += 1

    async def released(self, e: Entry) -> None:
        e.handles -= 1
        if e.handles == 0 and e.visible is None:
            await self._detach(e)

    async def _detach(self, e: Entry) -> None:
        """The entry has no name: close it now, or at its last close."""
        e.visible = None
        if e.handles:
            log.info("%s stays open until its last close", e.image.path)
            return
        self.by_inode.pop(e.inode, None)
        await self.snapshots.drop_views_of(e.inode)
        if self.holders(e.image):  # still a base of served overlays: closed with the last of them
            self.bases.take_over(e.image)
            return
        await close_quietly(e.image)

    async def close_all(self) -> list[str]:
        """Flush and close every image; returns the problems (one line each)."""
        problems = []
        for e in list(self.by_inode.values()):
            why = await close_quietly(e.image)
            if why:
                problems.append(f"{e.visible or e.image.path}: {why}")
        self.by_inode.clear()
        self.by_name.clear()
        return problems


async def close_quietly(img: Image) -> str | None:
    """Close an image, shielded from cancellation; the error, if any, as one logged line."""
    try:
        with trio.CancelScope(shield=True):
            await img.close()
    except (OSError, CachefsError) as exc:
        log.error("closing %s failed: %s", img.path, exc)
        return str(exc)
    return None
