"""Opening an image file: lock it, decide its format by name, validate it, and build its Image."""

from __future__ import annotations

import logging
import os

import trio

from cachefs.image.backends import BackendSet, file_opener
from cachefs.errors import CorruptImage, UnsupportedImage
from cachefs.image.backing import Bases
from cachefs.image.backing_names import ChainWalk
from cachefs.image.base import Image
from cachefs.image.formats import format_by_name, image_format
from cachefs.image.raw import RawImage
from cachefs.image.locking import ImageLock
from cachefs.policy import WRITEBACK, Mode
from cachefs.qcow2.create import new_image
from cachefs.qcow2.engine import open_engine
from cachefs.qcow2.plan import run_async
from cachefs.image.qcow2image import Qcow2Image
from cachefs.image.repair_file import repair_dirty_sync
from cachefs.image import internal_snapshots

log = logging.getLogger("cachefs.image.base")


def _repair_buffered(path: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # the repair does unaligned I/O: never O_DIRECT
    try:
        repair_dirty_sync(fd)
    finally:
        os.close(fd)


def _why_dirty(hdr) -> str:
    """The dirty bit says the image was not closed cleanly: under lazy refcounts (QEMU's writer,
    or cachefs's, killed), or with the reservation a cachefs mount had not given back yet
    (metaqueue.py sets it on any v3 image, lazy refcounts or not)."""
    if hdr.lazy_refcounts:
        return "was not closed cleanly (lazy refcounts: its refcounts may lag its tables)"
    return ("was not closed cleanly (the dirty bit without lazy refcounts: a cachefs mount that was killed "
            "leaves it, with the clusters it held in reserve)")


async def _header_first(img: Qcow2Image) -> None:
    """The header changed at open (autoclear bits cleared, bitmaps deleted): durable before any
    guest write, so no crash leaves data changed under a header vouching for stale bitmaps
    (spec "autoclear_features"; QEMU's qcow2_do_open writes it at once too)."""
    await img.write_back()
    dropped = img.engine.dropped_bitmaps
    if dropped:
        names, freed = dropped
        log.warning("%s: -o drop_bitmaps: deleted its persistent bitmaps (%s); %d clusters freed",
                    img.path, ", ".join(names), freed)


async def _attach_backing(path: str, backing, bases: Bases | None, walk: ChainWalk | None):
    """The overlay's backing image, opened or shared through ``bases`` (the name's rule is there)."""
    if bases is None:
        raise UnsupportedImage(f"{path}: it has a backing file ({backing.name!r}), and nothing here opens one")
    return await bases.attach(path, backing.name, backing.format, walk)


async def open_image(path: str, *, writable: bool, mode: Mode = WRITEBACK,
                     cache_bytes: int | None = None, aio: str = "threads", drop_bitmaps: bool = False,
                     bases: Bases | None = None, walk: ChainWalk | None = None, fd: int | None = None) -> Image:
    """Open, lock and validate one image file. Raises CachefsError subclasses (one line).

    ``drop_bitmaps`` (-o drop_bitmaps): an image with persistent bitmaps is opened writable and
    its bitmaps deleted; without it such an image is served read-only (Image.read_only_reason).
    ``bases``: where an overlay's backing image comes from (image/backing.py); an overlay opened
    without it is refused. ``walk``: the chain this image is opened for, as a base (loops, depth).
    ``fd``: the file already opened read-only by the caller (a base: backing_names.open_checked,
    so the file opened is the file the name's rule accepted); it belongs to the image from now on.
    """
    lock_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if fd is None else fd
    backends = BackendSet(file_opener(path, writable, aio, via_fd=lock_fd), lock_fd)
    lock = img = None
    try:
        lock = ImageLock.acquire(lock_fd, path, writable)
        be = backends.get(mode.default)
        # The name decides the format; the content is read only to check a qcow2's magic.
        magic = await be.pread(0, 4) if format_by_name(path) == "qcow2" else None
        kind = image_format(path, magic)
        if kind == "raw":
            return RawImage(path, backends, lock, writable, mode)
        kw = {"drop_bitmaps": drop_bitmaps} | ({} if cache_bytes is None else {"cache_bytes": cache_bytes})
        engine = await run_async(open_engine(be.size(), writable=writable, **kw), be.pread)
        if engine.needs_repair and writable and engine.writable:
            # Not closed cleanly: rebuild the refcounts before the first write, as QEMU does.
            log.warning("%s: %s; rebuilding its refcounts before the first write", path, _why_dirty(engine.hdr))
            await trio.to_thread.run_sync(_repair_buffered, path)
            engine = await run_async(open_engine(be.size(), writable=writable, **kw), be.pread)
            if engine.needs_repair:
                raise CorruptImage(f"{path}: {_why_dirty(engine.hdr)}, and rebuilding its refcounts "
                                   f"did not clear the dirty bit")
        img = Qcow2Image(path, backends, lock, writable, engine, mode)
        if engine.backing is not None:
            img.backing = await _attach_backing(path, engine.backing, bases, walk)
        if img.writable and not engine.header.durable:
            await _header_first(img)
        if img.writable and engine.needs_unshare:
            # Made by `qemu-img snapshot -c`: its L2 tables are shared with a snapshot, and the
            # engine writes only private ones (qcow2/generation.py).
            await internal_snapshots.unshare(img)
        return img
    except BaseException:
        if lock is not None:
            lock.release()
        backends.close()
        if isinstance(img, Qcow2Image) and img.backing is not None:
            with trio.CancelScope(shield=True):
                await img.backing.release()
        raise


def create_image_file(path: str, qcow2: bool, owner: tuple[int, int] | None, perm: int) -> None:
    """Write an empty image file (O_EXCL: never clobber one), owned by whoever created it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perm)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, perm)  # the creator's umask is already in perm; the daemon's is not ours to apply
        for off, data in new_image(0) if qcow2 else ():
            os.pwrite(fd, data, off)
        os.fsync(fd)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
