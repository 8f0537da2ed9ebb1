"""The pyfuse3 front end: one flat directory of guest disks.

This is the one place where errors become FUSEError (STYLE.md habit 4):
OSError keeps its errno, damaged metadata and detected corruption become EIO,
a refused operation on a valid image becomes its errno. Everything else about
an image belongs to image/base.py; which images there are, under which names,
belongs to fuse/catalog.py (the image directory is the truth).

Files look like the image files behind them: owner, group, modes and times
are the image file's, and chmod, chown and utimens change it, so a VM that
runs as its own user can own its disk (``-o allow_other`` turns on the
kernel's ``default_permissions`` check). sshfs's ``uid=``, ``gid=`` and
``umask=`` override only what is shown.

Handlers never block the trio thread: all backend I/O goes through the
backend's I/O submitter (a thread pool, Linux AIO or io_uring), and the
kernel's page-cache invalidation runs in a worker thread.

Cache modes reach this layer at two points (policy.py). At open, the
handle's concrete mode comes from the image's mode and the opener's flags,
and a ``direct`` mode opens the handle ``direct_io`` so the kernel keeps no
page cache of guest data. After a write through a direct handle, the
kernel's cached pages of that inode are dropped if a cached handle is open:
otherwise that reader would keep seeing the old bytes (seed 000, coherence).
The mode is looked up again on every request, so a live switch
(``setfattr -n user.cachefs.cache``) applies to handles already open; only
their ``direct_io`` bit, fixed by the kernel at open, stays as it was.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat

import attrs
import pyfuse3
import trio

from cachefs.backend import buffer_pool_stats
from cachefs.errors import CachefsError, ImageLocked, UnsupportedOperation
from cachefs.fuse.catalog import Catalog, Entry, visible_name
from cachefs.dataplane.handles import NoFastPaths
from cachefs.dataplane.passthrough import THROUGH
from cachefs.image.base import Image
from cachefs.mountinfo import command_of
from cachefs.fuse.image_settings import SETTABLE, ImageSettings
from cachefs.fuse.failures import Failures, describe, errno_of, reason
from cachefs.fuse.snapshot_requests import OPERATIONS, SnapshotRequests
from cachefs.policy import CacheMode

log = logging.getLogger("cachefs.fuse.operations")

XATTR_PREFIX = "user.cachefs."
SNAPSHOT_PREFIX = XATTR_PREFIX + "snapshot."


@attrs.define
class Handle:
    entry: Entry
    flags: int       # the opener's open(2) flags, for ``auto``
    direct_io: bool  # fixed by the kernel for the life of the handle
    pid: int         # who opened it, for the log of a forced unmount
    wrote: bool = False
    # Made by create(2) through the mount: its writes fill the new image and grow it (cp, dd).
    created: bool = False
    # Kernel passthrough (dataplane/passthrough.py): "through" (the kernel reads and writes the file),
    # "served" (FOPEN_PASSTHROUGH for the kernel's rule, its I/O still ours), or None.
    passthrough: str | None = None

    @property
    def image(self) -> Image:
        return self.entry.image

    @property
    def inode(self) -> int:
        return self.entry.inode

    @property
    def mode(self) -> CacheMode:
        return self.image.mode.for_open(self.flags)


@attrs.frozen
class Presentation:
    """How files are shown: the image file's owner, group and modes, or sshfs's overrides."""
    uid: int | None = None
    gid: int | None = None
    umask: int | None = None
    read_only: bool = False

    def fill(self, a: pyfuse3.EntryAttributes, st: os.stat_result, kind: int, writable: bool) -> None:
        perm = stat.S_IMODE(st.st_mode) & ~(self.umask or 0)
        if self.read_only or not writable:
            perm &= ~0o222
        a.st_mode = kind | perm
        a.st_uid = st.st_uid if self.uid is None else self.uid
        a.st_gid = st.st_gid if self.gid is None else self.gid
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def _fuse_error(exc: BaseException) -> pyfuse3.FUSEError:
    """The errno a client gets: an OSError's own, a CachefsError's class errno, else EIO."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    return pyfuse3.FUSEError(errno_of(exc))


def translated(fn):
    """Run a handler; log and translate anything that is not already a FUSEError.

    The log line (and the mount's last_failure) names the request, its image and range (fuse/failures.py).
    """
    name = fn.__name__

    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (OSError, CachefsError) as exc:
            self.failed(name, args, reason(exc))
            raise _fuse_error(exc) from None
        except Exception:
            log.exception("%s failed", describe(self, name, args))
            self.failed(name, args, "EIO: internal error (a traceback is in the log)", logged=True)
            raise pyfuse3.FUSEError(errno.EIO) from None
    wrapper.__name__ = name
    return wrapper


def refused(err: int):
    """A handler for what a directory of disk images cannot hold (directories, links)."""
    async def handler(self, *args):
        raise pyfuse3.FUSEError(err)
    return handler


class CachefsOperations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, catalog: Catalog, *, show: Presentation = Presentation(),
                 create_qcow2: bool = True, root_info: dict[str, str] | None = None, fast=None,
                 growable: bool = False):
        super().__init__()
        # The data plane's side of each handle (cachefs/dataplane/plane.py): publish at open, take
        # back at release, pause around a resize or a live switch. NoFastPaths: --dataplane off.
        self.fast = fast or NoFastPaths()
        self._invalidate = self.fast.invalidate or _invalidate
        self.catalog = catalog
        self.show = show
        self.read_only = show.read_only
        self.create_qcow2 = create_qcow2
        self.growable = growable  # -o growable: a write past a disk's end grows it (else ENOSPC)
        self.root_info = root_info or {}
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.invalidations = 0
        self.in_progress = 0  # reads and writes being served now
        self.peak_in_progress = 0
        self.failures = Failures()  # requests answered with an error, for `cachefs stats`
        self.snapshot_requests = SnapshotRequests(self)  # user.cachefs.snapshot.*
        self.settings = ImageSettings(self.fast, _invalidate)  # user.cachefs.cache|compress|passthrough

    def failed(self, name: str, args: tuple, why: str, *, logged: bool = False) -> None:
        """A request failed: one line naming it, its image and range, and why; kept as the last failure."""
        line = f"{describe(self, name, args)}: {why}"
        if not logged:
            log.warning("%s", line)
        self.failures.record(line)

    # -------------------------------------------------------------- attributes

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        # Names are looked up again at every path walk: the image directory
        # may have changed under them (fuse/catalog.py), and a lookup is cheap.
        a.entry_timeout = 0
        a.attr_timeout = 1.0
        if inode == pyfuse3.ROOT_INODE:
            self.show.fill(a, os.stat(self.catalog.image_dir), stat.S_IFDIR, True)
            a.st_nlink = 2
            return a
        img = self._image(inode)
        st = os.fstat(img.backends.fd)
        self.show.fill(a, st, stat.S_IFREG, img.writable)
        a.st_nlink = 1
        a.st_size = img.size
        a.st_blksize = max(4096, img.cluster_size)
        a.st_blocks = st.st_blocks  # what the image really occupies, so du and ls -s tell the truth
        return a

    def _entry(self, inode: int) -> Entry:
        e = self.catalog.entry(inode)
        if e is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return e

    def _image(self, inode: int) -> Image:
        return self._entry(inode).image

    def _in_root(self, parent_inode: int) -> None:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _writable_mount(self) -> None:
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)

    @translated
    async def lookup(self, parent_inode, name, ctx=None):
        self._in_root(parent_inode)
        name = os.fsdecode(name)
        await self.catalog.refresh()
        if self.catalog.named(name) is None and visible_name(name) == name:
            await self.catalog.refresh(force=True)  # an image QEMU held may be free now
        e = self.catalog.named(name)
        if e is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(e.inode)

    @translated
    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    @translated
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)  # the image directory is not ours to change
        img = self._image(inode)
        if fields.update_size:
            self._writable_mount()
            if attr.st_size < img.size and img.writable:
                raise UnsupportedOperation(
                    f"shrinking the disk from {img.size} to {attr.st_size} bytes is refused: the guest's data "
                    f"past the new end would be lost (qemu-img resize --shrink does it on the unmounted image)")
            if attr.st_size != img.size:
                async with self.fast.paused(inode):
                    await img.truncate(attr.st_size)
        # Owner, modes and times are the image file's own (issue 9): a VM
        # that runs as another user needs its disk to be really its own.
        fd = img.backends.fd
        if fields.update_mode:
            if attr.st_mode & (stat.S_ISUID | stat.S_ISGID):
                # A disk image is no program; and the data plane takes FUSE_HANDLE_KILLPRIV_V2
                # (native/dp_passthrough.c), promising to clear these bits on writes it never sees.
                raise pyfuse3.FUSEError(errno.EPERM)
            os.fchmod(fd, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.fchown(fd, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.fstat(fd)
            os.utime(fd, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                             attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._attr(inode)

    @translated
    async def statfs(self, ctx):
        sv = os.statvfs(self.catalog.image_dir)
        out = pyfuse3.StatvfsData()
        out.f_bsize, out.f_frsize = sv.f_bsize, sv.f_frsize
        out.f_blocks, out.f_bfree, out.f_bavail = sv.f_blocks, sv.f_bfree, sv.f_bavail
        out.f_files, out.f_ffree, out.f_favail = sv.f_files, sv.f_ffree, sv.f_favail
        out.f_namemax = 255
        return out

    # -------------------------------------------------------------- directory

    @translated
    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @translated
    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            await self.catalog.refresh(force=True)
        names = self.catalog.names()
        for i, name in enumerate(names[start_id:], start=start_id):
            e = self.catalog.named(name)
            if e is None:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(e.inode), i + 1):
                break

    async def releasedir(self, fh):
        return None

    @translated
    async def create(self, parent_inode, name, mode, flags, ctx):
        e = await self._new_image(parent_inode, name, mode, ctx)
        fi = self._open_entry(e, flags, ctx)
        self.handles[fi.fh].created = True
        await self._opened(fi.fh)
        return fi, self._attr(e.inode)

    @translated
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # only disk images live here
        return self._attr((await self._new_image(parent_inode, name, mode, ctx)).inode)

    async def _new_image(self, parent_inode, name, mode, ctx) -> Entry:
        self._in_root(parent_inode)
        self._writable_mount()
        owner = (ctx.uid, ctx.gid) if os.geteuid() == 0 else None
        return await self.catalog.create(os.fsdecode(name), qcow2=self.create_qcow2, owner=owner,
                                         perm=stat.S_IMODE(mode) & ~ctx.umask)

    @translated
    async def unlink(self, parent_inode, name, ctx):
        self._in_root(parent_inode)
        self._writable_mount()
        await self.catalog.unlink(os.fsdecode(name))

    @translated
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._in_root(parent_inode_old)
        self._in_root(parent_inode_new)
        self._writable_mount()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self.catalog.rename(os.fsdecode(name_old), os.fsdecode(name_new),
                                  replace=not flags & pyfuse3.RENAME_NOREPLACE)

    # A flat directory of disk images: no subdirectories, no links.
    mkdir = refused(errno.EPERM)
    rmdir = refused(errno.ENOTDIR)
    link = refused(errno.EPERM)
    symlink = refused(errno.EPERM)

    # -------------------------------------------------------------- files

    @translated
    async def open(self, inode, flags, ctx):
        fi = self._open_entry(self._entry(inode), flags, ctx)
        await self._opened(fi.fh)
        return fi

    async def _opened(self, fh: int) -> None:
        """Before the reply: C may serve the handle's next request, or the kernel itself may
        (passthrough, dataplane/passthrough.py), which keeps no page cache of the inode either."""
        h = self.handles[fh]
        h.passthrough = await self.fast.opened(fh, h)
        if h.passthrough is not None:
            h.direct_io = True

    def _open_entry(self, e: Entry, flags: int, ctx) -> pyfuse3.FileInfo:
        img, writable = e.image, flags & os.O_ACCMODE != os.O_RDONLY
        if writable and (self.read_only or not img.writable):
            raise pyfuse3.FUSEError(errno.EROFS)
        why = self.catalog.open_conflict(e, writable, self._written)
        if why is not None:
            raise ImageLocked(f"{e.visible}: {why}")
        mode = img.mode.for_open(flags)
        img.backends.get(mode)  # open its descriptor now: a refusal fails open(2), not every read
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(e, flags, mode.direct, ctx.pid)
        self.catalog.opened(e)
        # keep_cache=False: a cached open starts from what the image holds now.
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=mode.direct)

    def _written(self, e: Entry) -> bool:
        """Is ``e`` open for writing through the mount now?"""
        return any(h.entry is e and h.flags & os.O_ACCMODE != os.O_RDONLY for h in self.handles.values())

    def _handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    @translated
    async def read(self, fh, off, size):
        h = self._handle(fh)
        self._begin()
        try:
            return await h.image.read(off, size, h.mode)
        finally:
            self.in_progress -= 1

    @translated
    async def write(self, fh, off, buf):
        h = self._handle(fh)
        if off + len(buf) > h.image.size and h.image.writable and not self.read_only:
            buf = await self._past_the_end(h, off, buf)
        self._begin()
        try:
            await h.image.write(off, buf, h.mode)
        finally:
            self.in_progress -= 1
        h.wrote = True
        if h.direct_io:
            await self._invalidate_cached(h.inode)
        return len(buf)

    async def _past_the_end(self, h: Handle, off: int, buf):
        """A write reaching past the disk's end. A disk is a block device to its guest: only a
        resize (truncate) changes its size, so the write is cut at the end and one wholly past
        it gets ENOSPC (blkdev_write_iter; qemu-storage-daemon's growable=off). A mount with
        ``-o growable``, and the handle that created the image here (cp, dd into a new file),
        grow the disk instead, as a file grows. (C forwards every write reaching past the end.)"""
        if self.growable or h.created:
            async with self.fast.paused(h.inode):
                await h.image.grow_to(off + len(buf))
            return buf
        # An O_DIRECT write through a cached handle is the kernel's async direct I/O, which
        # turns a short answer into EIO (fs/fuse/file.c, fuse_get_res_by_io): refuse it whole.
        if off >= h.image.size or h.flags & os.O_DIRECT and not h.direct_io:
            raise OSError(errno.ENOSPC, f"the write goes past the end of the disk ({h.image.size} bytes; "
                                        f"resize it with truncate, or mount -o growable)")
        return buf[:h.image.size - off]

    def _begin(self) -> None:
        """Count a read or write being served: the peak shows how many requests
        the kernel and pyfuse3 let through at once (cachefs/fuse/queue_limit.py)."""
        self.in_progress += 1
        if self.in_progress > self.peak_in_progress:
            self.peak_in_progress = self.in_progress

    async def _invalidate_cached(self, inode: int) -> None:
        """Drop the kernel's cached pages of ``inode`` if a cached handle could read them."""
        if any(not o.direct_io and o.inode == inode for o in self.handles.values()):
            self.invalidations += 1
            # In a thread: the kernel waits for page locks that a cached read
            # holds until this very loop answers it.
            await trio.to_thread.run_sync(self._invalidate, inode)

    @translated
    async def flush(self, fh):
        # close(2) of a handle that wrote makes its data durable, as the
        # mission's "flush-on-close" promises; readers closing cost nothing.
        h = self._handle(fh)
        if self.fast.take_wrote(fh) | h.wrote:  # its writes may have been served in C
            h.wrote = False
            await self._settle_passthrough_growth(h)
            await h.image.flush(h.mode)

    @translated
    async def fsync(self, fh, datasync):
        await self.sync_handle(fh, self._handle(fh))

    async def sync_handle(self, fh, h) -> None:
        """fsync of a handle (also direct_requests.DirectRequests's FSYNC, which the data plane hands Python)."""
        self.fast.take_wrote(fh)  # this sync covers the handle's fast writes too
        h.wrote = False
        await self._settle_passthrough_growth(h)
        await h.image.flush(h.mode)

    async def _settle_passthrough_growth(self, h: Handle) -> None:
        """A passthrough writer's writes past the disk's end reach the image file without us
        (dataplane/passthrough.py): the kernel grows the file. Its next flush or fsync sees that
        and, as a block device would have refused those writes, cuts the file back to the disk's
        size and fails with ENOSPC (or, on a growable mount, the disk takes the new size). What
        lay inside the disk was written, as by a write cut at the end."""
        if h.passthrough != THROUGH or h.image.backend.size() <= h.image.size:
            return
        async with self.fast.paused(h.inode):
            cut = await h.image.settle_unseen_growth(growable=self.growable)
        self.fast.invalidate(h.inode)  # the kernel grew its size of the inode: ask again
        if cut:
            log.warning("%s: %d bytes written past the end of the disk through kernel passthrough were cut off",
                        h.entry.visible or h.image.path, cut)
            raise OSError(errno.ENOSPC, f"writes went past the end of the disk ({h.image.size} bytes; "
                                        f"resize it with truncate, or mount -o growable)")

    async def release(self, fh):
        await self.fast.released(fh)  # unpublished and drained: C no longer uses its descriptor
        h = self.handles.pop(fh, None)
        if h is not None:
            await self.catalog.released(h.entry)

    def open_handles(self) -> list[str]:
        """One line per open handle: which image, who opened it, how (for the log of a forced stop)."""
        return [f"{h.entry.visible or h.image.path} opened by pid {h.pid} ({command_of(h.pid)}), "
                f"{'read-write' if h.flags & os.O_ACCMODE else 'read-only'}, mode {h.mode.name}"
                f"{f', passthrough ({h.passthrough})' if h.passthrough else ''}"
                for h in self.handles.values()]

    # -------------------------------------------------------------- xattrs

    def _xattrs(self, inode: int) -> dict[str, str]:
        if inode == pyfuse3.ROOT_INODE:
            return {"pid": str(os.getpid()), "images": str(len(self.catalog.by_name)),
                    "skipped": json.dumps(self.catalog.skipped), "invalidations": str(self.invalidations),
                    "buffer_pool": json.dumps(buffer_pool_stats()),
                    "peak_requests": str(self.peak_in_progress), "open_handles": str(len(self.handles)),
                    **self.failures.root_info(),
                    **self.fast.root_info(), **self.root_info}
        img = self._image(inode)
        out = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in img.info().items()}
        out["cache"] = img.mode.name
        out["compress"] = img.compress or "off"
        out["path"] = img.path
        if holders := self.catalog.holders(img):  # overlays reading it as their backing file
            out["backing_users"] = json.dumps([os.path.basename(p) for p in holders])
        if self.read_only and "read_only" in self.root_info:  # the whole mount's reason is each image's too
            out.setdefault("read_only_reason", self.root_info["read_only"])
        if img.switch_error:
            out["cache_error"] = img.switch_error
        if why := self.settings.switch_refused.get(inode):
            out["cache_error"] = why
        out.update(self.fast.image_info(inode))
        if img.compress_error:
            out["compress_error"] = img.compress_error
        if why := self.snapshot_requests.errors.get(inode):
            out["snapshot_error"] = why
        out.update({f"stats.{k}": str(v) for k, v in self.fast.merge_stats(inode, img.stats()).items()})
        return out

    @translated
    async def listxattr(self, inode, ctx):
        return [os.fsencode(XATTR_PREFIX + k) for k in self._xattrs(inode)]

    @translated
    async def getxattr(self, inode, name, ctx):
        key = os.fsdecode(name)
        if not key.startswith(XATTR_PREFIX):
            # The data plane gives this answer itself (dp_loop.c dp_foreign_xattr): keep them alike.
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if inode != pyfuse3.ROOT_INODE and key == SNAPSHOT_PREFIX + "list":
            return await self.snapshot_requests.listing(self._entry(inode))
        if inode != pyfuse3.ROOT_INODE and key.startswith(XATTR_PREFIX + "stats."):
            # What the data plane allocated counts as allocated (dataplane/lending.py): adopted first.
            await self._image(inode).adopt_fast_allocations()
        value = self._xattrs(inode).get(key[len(XATTR_PREFIX):])
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode()

    @translated
    async def setxattr(self, inode, name, value, ctx):
        key = os.fsdecode(name)
        if inode == pyfuse3.ROOT_INODE and key == XATTR_PREFIX + "flush":
            await self._flush_all()  # cachefs umount: flush errors reach the admin, not just the log
            return
        if inode != pyfuse3.ROOT_INODE and key.startswith(SNAPSHOT_PREFIX):
            await self._snapshot_request(inode, key[len(SNAPSHOT_PREFIX):], value, ctx)
            return
        if inode == pyfuse3.ROOT_INODE or key not in SETTABLE:
            raise pyfuse3.FUSEError(errno.ENOTSUP)  # the cache mode, compress-on-write and passthrough only
        self._writable_mount()
        img = self._image(inode)
        if ctx.uid not in (0, os.fstat(img.backends.fd).st_uid):
            raise pyfuse3.FUSEError(errno.EPERM)  # a mode is a promise about the owner's data
        await self.settings.set(inode, img, key, value)

    async def _snapshot_request(self, inode: int, operation: str, value: bytes, ctx) -> None:
        """user.cachefs.snapshot.create/delete/apply = NAME (fuse/snapshot_requests.py)."""
        if operation not in OPERATIONS:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        self._writable_mount()
        e = self._entry(inode)
        if ctx.uid not in (0, os.fstat(e.image.backends.fd).st_uid):
            raise pyfuse3.FUSEError(errno.EPERM)  # a snapshot holds the owner's data
        await self.snapshot_requests.change(e, operation, value)

    # -------------------------------------------------------------- lifecycle

    async def _flush_all(self) -> None:
        failed = await flush_images(self.catalog.images())
        if failed:
            raise pyfuse3.FUSEError(errno.EIO)


async def flush_images(images: list[Image]) -> list[str]:
    """Flush every writable image, trying all of them; returns the failures, one line each."""
    failed = []
    for img in images:
        try:
            if img.writable:
                await img.flush()
        except (CachefsError, OSError) as exc:
            log.error("flush of %s failed: %s", img.path, exc)
            failed.append(f"{img.path}: {exc}")
    return failed


def _invalidate(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode, attr_only=False)
    except OSError as exc:  # ENOENT: the kernel has forgotten the inode; nothing is cached
        log.debug("invalidate_inode(%d): %s", inode, exc)
