"""fallocate and lseek on an open image: discard, write-zeroes, preallocation, SEEK_DATA/SEEK_HOLE.

The requests arrive through the data plane (fuse/direct_requests.py: pyfuse3 registers no
FUSE fallocate or lseek); Image's methods of the same names call these.

- **raw**: the same fallocate(2), or lseek(2), on the image file. The host
  filesystem does the work and knows the holes.
- **qcow2**: the mapping changes (qcow2/discard.py plans it, no I/O there;
  Qcow2Image.remap runs each L2 table's plan).
  Whole clusters become unallocated (discard) or zero clusters (write-zeroes,
  keeping an owned host cluster preallocated, as ZERO_RANGE keeps blocks on
  a local filesystem); the host clusters dropped are freed through the
  metadata queue, which
  punches the freed space out of the image file once the refcount drops
  (metaqueue.apply_frees), so a guest's TRIM shrinks the file's allocation
  as QEMU's ``discard=unmap`` does. The partial clusters at the edges get
  zeros through the ordinary write path, unless they read as zeros already.
  Preallocation (mode 0) makes preallocated zero clusters (v3) whose host
  clusters get their space, as ``qemu-img create -o preallocation=falloc``.

Every request follows its handle's cache mode, as a write does: in
writethrough and directsync it is durable when it returns (the metadata
queue's writeout, or an fdatasync for raw: O_DSYNC covers writes, not
fallocate), otherwise the next flush makes it durable.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os

import trio

from cachefs.qcow2.discard import (SeekBacking, plan_allocate, plan_clear, plan_seek, reads_as_zeros,
                                   refuse_v2_backed, whole_clusters)
from cachefs.qcow2.metaqueue import cluster_runs

log = logging.getLogger("cachefs.image.sparse")

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) (Python's os has only posix_fallocate, without modes). Blocks: call it in a thread."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate: {os.strerror(err)}")


async def punch(be, offset: int, length: int) -> bool:
    """Give freed host bytes back to the filesystem (the queue's DiscardRequest); False if it refused.

    A refusal (a filesystem without punch-hole) fails nothing: the clusters
    are free in the image all the same, the file just keeps their space.
    """
    if be.fd is None:
        return False  # a backend with no file (tests' memory backend)
    try:
        await trio.to_thread.run_sync(fallocate, be.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as exc:
        log.debug("punching freed clusters at %#x+%#x: %s", offset, length, exc)
        return False
    return True


def _clamped(img, offset: int, length: int) -> int:
    """The length of [offset, offset+length) inside the guest; EROFS on a read-only image."""
    if not img.writable:
        raise OSError(errno.EROFS, "image is read-only")
    return max(0, min(offset + length, img.size) - offset)


async def discard(img, offset: int, length: int, mode) -> None:
    length = _clamped(img, offset, length)
    img.guest.discards += 1
    img.guest.bytes_discarded += length
    await _clear(img, offset, length, mode, zero=False)


async def zero_range(img, offset: int, length: int, mode) -> None:
    length = _clamped(img, offset, length)
    img.guest.write_zeroes += 1
    await _clear(img, offset, length, mode, zero=True)


async def allocate(img, offset: int, length: int, mode) -> None:
    """fallocate mode 0: reserve the space (raw: on the image file; qcow2: preallocated zero clusters
    whose host clusters are given their space, qemu-img's preallocation=falloc)."""
    length = _clamped(img, offset, length)
    if img.format == "raw":
        await _raw(img, FALLOC_FL_KEEP_SIZE, offset, length, mode)
        return
    if not length:
        return
    async with img.backends.in_use():
        be = img.backends.get(mode)
        cs, per, eng = img.cluster_size, img.engine.map.l2_entries, img.engine
        vcl, end = offset // cs, -(-(offset + length) // cs)  # a partial cluster is preallocated whole
        while vcl < end:
            n = min(end, (vcl // per + 1) * per) - vcl
            await img.remap(be, vcl, vcl + n, functools.partial(plan_allocate, eng, vcl, n),
                            before_commit=functools.partial(_give_space, img, be))
            vcl += n
        if mode.write_through:
            await img.make_durable(be)


async def _give_space(img, be, plan) -> None:
    """fallocate the plan's new host clusters (mode 0: the file grows over any past its end); the data
    item is touched so that a flush syncs that before the entries that need it (plan_allocate)."""
    cb, clusters = img.engine.cb, [u.new_cluster for u in plan.updates]
    for first, count in cluster_runs(clusters):
        start, n = first << cb, count << cb
        if be.fd is None:  # a memory backend (tests): the file only has to cover them
            if start + n > be.size():
                await be.truncate(start + n)
        else:
            await trio.to_thread.run_sync(fallocate, be.fd, 0, start, n)
    if clusters:
        img.backends.unsynced = True
        img.queue.data_written()


async def _clear(img, offset: int, length: int, mode, *, zero: bool) -> None:
    if not length:
        return
    if img.format == "raw":
        flags = FALLOC_FL_ZERO_RANGE if zero else FALLOC_FL_PUNCH_HOLE
        await _raw(img, flags | FALLOC_FL_KEEP_SIZE, offset, length, mode)
        return
    async with img.backends.in_use():
        be = img.backends.get(mode)
        await _qcow2_clear(img, be, offset, length, zero=zero)
        if mode.write_through:
            await img.make_durable(be)  # writethrough: durable when it returns, metadata included


async def _raw(img, flags: int, offset: int, length: int, mode) -> None:
    if not length:
        return
    async with img.backends.in_use():
        be = img.backends.get(mode)
        await trio.to_thread.run_sync(fallocate, be.fd, flags, offset, length)
        img.backends.unsynced = True  # O_DSYNC covers writes, not fallocate: the next sync must run
        if mode.write_through:
            await img.make_durable(be)


async def _qcow2_clear(img, be, offset: int, length: int, *, zero: bool) -> None:
    """Zeros on the partial edges, then the whole clusters one L2 table at a time (the write lock
    is let go between tables, and a cache full of dirty tables is written out, as writes do)."""
    eng = img.engine
    refuse_v2_backed(eng, "write-zeroes" if zero else "discard")  # before the edges get zeros
    first, count, edges = whole_clusters(offset, length, img.cluster_size)
    await img.adopt_fast_allocations(be)  # an edge C allocated is not zeros any more
    for off, n in edges:
        entry = await img.query(eng.map.entry(off // img.cluster_size), be)
        if not reads_as_zeros(entry, backed=eng.backing is not None):
            await img.write_plain(be, off, bytes(n))  # a partial cluster: never compressed
    per, vcl, end = eng.map.l2_entries, first, first + count
    while vcl < end:
        n = min(end, (vcl // per + 1) * per) - vcl
        await img.remap(be, vcl, vcl + n, functools.partial(plan_clear, eng, vcl, n, zero=zero))
        vcl += n


async def seek(img, offset: int, *, data: bool) -> int:
    """lseek SEEK_DATA (``data``) or SEEK_HOLE from ``offset``; ENXIO past the end or past the last data."""
    if offset < 0 or offset >= img.size:
        raise OSError(errno.ENXIO, "offset beyond the end of the disk")
    async with img.backends.in_use():
        if img.format == "raw":
            whence = os.SEEK_DATA if data else os.SEEK_HOLE
            pos = await trio.to_thread.run_sync(os.lseek, img.backends.fd, offset, whence)
            return min(pos, img.size)
        await img.adopt_fast_allocations()  # a cluster C allocated is data
        pos = await img.query(plan_seek(img.engine, offset, data=data))
        while isinstance(pos, SeekBacking):  # unallocated here: the backing chain answers there
            below = await _seek_backing(img.backing.image, pos.start, data=data)
            if below is not None and below < pos.end:
                pos = below
            elif pos.end >= img.size:
                pos = None if data else img.size
            else:
                pos = await img.query(plan_seek(img.engine, pos.end, data=data))
    if pos is None:
        raise OSError(errno.ENXIO, "no data after this offset")
    return pos


async def _seek_backing(base, offset: int, *, data: bool) -> int | None:
    """The backing image's own answer from ``offset``; past its end it reads zeros (a hole)."""
    if offset >= base.size:
        return None if data else offset
    try:
        return await (base.seek_data(offset) if data else base.seek_hole(offset))
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        return None
