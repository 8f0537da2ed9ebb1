"""The pyfuse3 front end: one flat directory of guest disks.

This is the one place where errors become FUSEError (STYLE.md habit 4):
OSError keeps its errno, damaged metadata and detected corruption become EIO,
a refused operation on a valid image becomes its errno. Everything else about
an image belongs to image.py.

Handlers never block the trio thread: all backend I/O goes through the
backend's worker threads.

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
import time

import attrs
import pyfuse3
import trio

from cachefs import native
from cachefs.errors import CachefsError, CorruptImage, DamagedMetadata, DirectIOUnsupported, UnsupportedImage
from cachefs.image import Image
from cachefs.policy import CacheMode, mode_named

log = logging.getLogger("cachefs.fs")

XATTR_PREFIX = "user.cachefs."


@attrs.define
class Handle:
    image: Image
    inode: int
    flags: int       # the opener's open(2) flags, for ``auto``
    direct_io: bool  # fixed by the kernel for the life of the handle
    wrote: bool = False

    @property
    def mode(self) -> CacheMode:
        return self.image.mode.for_open(self.flags)


def _fuse_error(exc: BaseException) -> pyfuse3.FUSEError:
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, OSError) and exc.errno:
        return pyfuse3.FUSEError(exc.errno)
    if isinstance(exc, (DamagedMetadata, CorruptImage)):
        return pyfuse3.FUSEError(errno.EIO)
    if isinstance(exc, UnsupportedImage):
        return pyfuse3.FUSEError(errno.EROFS)
    return pyfuse3.FUSEError(errno.EIO)


def translated(fn):
    """Run a handler; log and translate anything that is not already a FUSEError."""
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (OSError, CachefsError) as exc:
            log.warning("%s%r: %s", fn.__name__, args[:2], exc)
            raise _fuse_error(exc) from None
        except Exception:
            log.exception("%s%r failed", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
    wrapper.__name__ = fn.__name__
    return wrapper


class CachefsOperations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, images: dict[str, Image], *, skipped: dict[str, str] | None = None,
                 read_only: bool = False):
        super().__init__()
        # Invariant: inode numbers are stable for the life of the mount.
        self.names = sorted(images)
        self.by_inode = {pyfuse3.ROOT_INODE + 1 + i: images[n] for i, n in enumerate(self.names)}
        self.inode_of = {n: pyfuse3.ROOT_INODE + 1 + i for i, n in enumerate(self.names)}
        self.skipped = skipped or {}
        self.read_only = read_only
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.started = time.time()
        self.invalidations = 0
        self.in_progress = 0  # reads and writes being served now
        self.peak_in_progress = 0

    # -------------------------------------------------------------- attributes

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.attr_timeout = a.entry_timeout = 1.0
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
            ns = int(self.started * 1e9)
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
            return a
        img = self._image(inode)
        st = os.fstat(img.backends.fd)
        a.st_mode = stat.S_IFREG | (0o644 if img.writable and not self.read_only else 0o444)
        a.st_nlink = 1
        a.st_size = img.size
        a.st_blksize = max(4096, img.cluster_size)
        a.st_blocks = st.st_blocks  # what the image really occupies, so du and ls -s tell the truth
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return a

    def _image(self, inode: int) -> Image:
        img = self.by_inode.get(inode)
        if img is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return img

    @translated
    async def lookup(self, parent_inode, name, ctx=None):
        inode = self.inode_of.get(os.fsdecode(name)) if parent_inode == pyfuse3.ROOT_INODE else None
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    @translated
    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    @translated
    async def setattr(self, inode, attr, fields, fh, ctx):
        img = self._image(inode)
        if fields.update_size:
            if self.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            if attr.st_size != img.size:
                await img.truncate(attr.st_size)
        # Mode, owner and times belong to the backing files; they are not stored.
        return self._attr(inode)

    @translated
    async def statfs(self, ctx):
        any_img = next(iter(self.by_inode.values()), None)
        sv = os.fstatvfs(any_img.backends.fd) if any_img else os.statvfs("/")
        out = pyfuse3.StatvfsData()
        out.f_bsize, out.f_frsize = sv.f_bsize, sv.f_frsize
        out.f_blocks, out.f_bfree, out.f_bavail = sv.f_blocks, sv.f_bfree, sv.f_bavail
        out.f_files, out.f_ffree, out.f_favail = len(self.by_inode) + 1, 0, 0
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
        for i, name in enumerate(self.names[start_id:], start=start_id):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(self.inode_of[name]), i + 1):
                break

    async def releasedir(self, fh):
        return None

    # -------------------------------------------------------------- files

    @translated
    async def open(self, inode, flags, ctx):
        img = self._image(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY and (self.read_only or not img.writable):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._next_fh
        self._next_fh += 1
        mode = img.mode.for_open(flags)
        try:
            img.backends.get(mode)  # open its descriptor now: a refusal fails open(2), not every read
        except DirectIOUnsupported as exc:
            log.warning("open of %s: %s", img.path, exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None  # what the filesystem itself would say
        direct = mode.direct
        self.handles[fh] = Handle(img, inode, flags, direct)
        # keep_cache=False: a cached open starts from what the image holds now.
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=direct)

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
        self._begin()
        try:
            await h.image.write(off, buf, h.mode)
        finally:
            self.in_progress -= 1
        h.wrote = True
        if h.direct_io:
            await self._invalidate_cached(h.inode)
        return len(buf)

    def _begin(self) -> None:
        """Count a read or write being served: the peak shows how many requests
        the kernel and pyfuse3 let through at once (cachefs/fuseconn.py)."""
        self.in_progress += 1
        if self.in_progress > self.peak_in_progress:
            self.peak_in_progress = self.in_progress

    async def _invalidate_cached(self, inode: int) -> None:
        """Drop the kernel's cached pages of ``inode`` if a cached handle could read them."""
        if any(not o.direct_io and o.inode == inode for o in self.handles.values()):
            self.invalidations += 1
            # In a thread: the kernel waits for page locks that a cached read
            # holds until this very loop answers it.
            await trio.to_thread.run_sync(_invalidate, inode)

    @translated
    async def flush(self, fh):
        # close(2) of a handle that wrote makes its data durable, as the
        # mission's "flush-on-close" promises; readers closing cost nothing.
        h = self._handle(fh)
        if h.wrote:
            h.wrote = False
            await h.image.flush(h.mode)

    @translated
    async def fsync(self, fh, datasync):
        h = self._handle(fh)
        h.wrote = False
        await h.image.flush(h.mode)

    async def release(self, fh):
        self.handles.pop(fh, None)

    # -------------------------------------------------------------- xattrs

    def _xattrs(self, inode: int) -> dict[str, str]:
        if inode == pyfuse3.ROOT_INODE:
            return {"pid": str(os.getpid()), "images": str(len(self.by_inode)),
                    "skipped": json.dumps(self.skipped), "invalidations": str(self.invalidations),
                    "buffer_pool": json.dumps(native.POOL.stats()),
                    "peak_requests": str(self.peak_in_progress)}
        img = self._image(inode)
        out = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in img.info().items()}
        out["cache"] = img.mode.name
        out["path"] = img.path
        if img.switch_error:
            out["cache_error"] = img.switch_error
        out.update({f"stats.{k}": str(v) for k, v in img.stats().items()})
        return out

    @translated
    async def listxattr(self, inode, ctx):
        return [os.fsencode(XATTR_PREFIX + k) for k in self._xattrs(inode)]

    @translated
    async def getxattr(self, inode, name, ctx):
        key = os.fsdecode(name)
        if not key.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = self._xattrs(inode).get(key[len(XATTR_PREFIX):])
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode()

    @translated
    async def setxattr(self, inode, name, value, ctx):
        key = os.fsdecode(name)
        if inode == pyfuse3.ROOT_INODE or key != XATTR_PREFIX + "cache":
            raise pyfuse3.FUSEError(errno.ENOTSUP)  # only the cache mode can be set
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            mode = mode_named(value.decode(errors="replace"))
        except ValueError as exc:
            log.warning("setxattr cache: %s", exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        img = self._image(inode)
        try:
            await img.switch_mode(mode)
        except UnsupportedImage as exc:
            log.error("%s: %s", img.path, exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        # Whatever the kernel cached under the old mode is dropped.
        await trio.to_thread.run_sync(_invalidate, inode)

    # -------------------------------------------------------------- lifecycle

    async def close_all(self) -> list[str]:
        """Flush and close every image; returns the problems (one line each)."""
        problems = []
        for name in self.names:
            img = self.inode_of[name]
            try:
                with trio.CancelScope(shield=True):
                    await self.by_inode[img].close()
            except (OSError, CachefsError) as exc:
                problems.append(f"{name}: {exc}")
                log.error("closing %s failed: %s", name, exc)
        return problems


def _invalidate(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode, attr_only=False)
    except OSError as exc:  # ENOENT: the kernel has forgotten the inode; nothing is cached
        log.debug("invalidate_inode(%d): %s", inode, exc)
