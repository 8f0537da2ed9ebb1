"""`cachefs commit`: fold an overlay into its backing file, offline (issue 22; `qemu-img commit`).

Every cluster the overlay allocated (data, compressed or zero clusters) is
written into its backing file at the same guest offsets, through cachefs's
own image layer (``open_image(base, writable=True)``: a qcow2 base gets its
refcounts and tables right and copies on write from its own backing file, a
raw one is written in place); zero clusters become zeros there (write-zeroes,
or written zeros where the base refuses it). The ranges the overlay leaves to
its base are not touched. A base smaller than the overlay is grown first, as
qemu-img grows it. The base is flushed and closed (durable) before the
overlay changes at all.

Then, unless ``-d``, the overlay is emptied as qemu-img empties it
(qcow2_make_empty's common case, make_completely_empty): a new, empty image
with the same size, cluster size, refcount width, lazy-refcounts bit,
compress-on-write setting and backing name and format, written to a
temporary file beside it, fsync'ed, and renamed over it (the directory
fsync'ed after). "Empty" means truly unallocated, so that it reads the base,
which now holds the data: discarding through the engine would make zero
clusters (an overlay's discard must not uncover its base), and a crash
half-way through rewriting tables in place could leave it unreadable, while a
crash around the rename leaves either the old overlay (whose data the base
now equals) or the new empty one. Recreating keeps nothing else of it, so an
overlay with something else to keep is refused before anything is written
(one line; ``-d`` commits and keeps it): a v2 image (new images are v3),
internal snapshots, persistent bitmaps, a zstd compression type without
compress-on-write, or another hard link (the rename would split it).

Both files are held under QEMU's write lock (the overlay for the whole
command, the base while it is written): an image a mount serves or QEMU has
open is refused in one line. The base is reached only by the name rule a mount
follows (cli/chain.py), and so is every base below it.
"""

from __future__ import annotations

import os

import click
import trio

from cachefs.cli.chain import BACKING_DIR_OPTION, allowed_dirs, read_engine
from cachefs.errors import CachefsError, CorruptImage, UnsupportedOperation
from cachefs.image.formats import format_by_name, image_format
from cachefs.image.locking import ImageLock
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.plan import ExtentKind, run_sync

#: Bytes copied per write into the base (whole clusters of any size up to 2 MiB).
CHUNK = 4 << 20


@click.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("-d", "keep", is_flag=True, help="Keep the overlay's contents (do not empty it).")
@BACKING_DIR_OPTION
def commit(image, keep, backing_dir):
    """Write what IMAGE (a qcow2 overlay) holds into its backing file, then empty IMAGE (unless -d).

    Offline: refused while a mount or QEMU has either file open.
    """
    if format_by_name(image) != "qcow2":
        raise CachefsError(f"{image}: only a qcow2 image (*.qcow2) has a backing file")
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        with ImageLock.acquire(fd, image, True):
            image_format(image, os.pread(fd, 4, 0))
            engine = _engine(image, fd)
            if engine.backing is None:
                raise CachefsError(f"{image}: it has no backing file to commit into")
            if not keep:
                refuse_unemptiable(image, fd, engine)
            trio.run(fold, image, fd, engine, allowed_dirs(image, backing_dir))
            if not keep:
                empty_overlay(image, fd, engine)
    finally:
        os.close(fd)
    click.echo("Image committed.")


def _engine(image: str, fd: int):
    try:
        return read_engine(fd)
    except CachefsError as exc:
        raise type(exc)(f"{image}: {exc}") from None


def refuse_unemptiable(image: str, fd: int, engine) -> None:
    """What emptying by recreation would lose, refused before anything is written."""
    from cachefs.qcow2.compress import compress_of
    hdr = engine.hdr
    why = ("it is qcow2 v2 (an emptied overlay would be v3)" if hdr.version < 3 else
           "it has internal snapshots" if hdr.nb_snapshots else
           "it has persistent bitmaps" if hdr.extension(fmt.EXT_BITMAPS) is not None else
           "its compression type is zstd" if hdr.compression_type != fmt.COMPRESSION_DEFLATE
           and compress_of(hdr) is None else
           "it has another hard link" if os.fstat(fd).st_nlink != 1 else None)
    if why is not None:
        raise UnsupportedOperation(f"{image}: cannot empty it after the commit: {why}; "
                                   f"-d commits and keeps its contents")


async def fold(image: str, fd: int, engine, dirs: list[str]) -> None:
    """Every range the overlay allocated, written into its base; the base durable and closed."""
    from cachefs.image.backing import Bases
    from cachefs.image.backing_names import ChainWalk, open_checked, resolve_backing
    from cachefs.image.opening import open_image

    async def base_opener(bf, walk):  # the base's own backing files: read-only, by the rule
        return await open_image(bf.path, writable=False, fd=open_checked(bf, os.O_RDONLY), bases=bases,
                                walk=walk)
    bases = Bases(dirs, base_opener)
    walk = ChainWalk(image)
    bf = resolve_backing(image, engine.backing.name, engine.backing.format, allowed_dirs=dirs)
    walk.enter(bf)
    base = await open_image(bf.path, writable=True, fd=open_checked(bf, os.O_RDONLY), bases=bases, walk=walk)
    try:
        if base.read_only_reason:
            raise CachefsError(f"{bf.path}: cannot commit into it: {base.read_only_reason}")
        if base.size < engine.size:
            await base.truncate(engine.size)
        await _copy_allocated(image, fd, engine, base)
        await base.flush()
    finally:
        await base.close()


async def _copy_allocated(image: str, fd: int, engine, base) -> None:
    from cachefs.qcow2.cluster import MappingKind
    from cachefs.qcow2.discard import plan_map
    for start, length, kind, _host in run_sync(plan_map(engine), lambda o, n: os.pread(fd, n, o)):
        if kind in (MappingKind.BACKING, MappingKind.UNALLOCATED):
            continue
        for off in range(start, start + length, CHUNK):
            n = min(CHUNK, start + length - off)
            if kind is MappingKind.ZERO:
                await _zeros(base, off, n)
            else:
                await base.write(off, overlay_bytes(image, fd, engine, off, n))


async def _zeros(base, offset: int, length: int) -> None:
    """Zeros in the base: write-zeroes where it takes one (a v2 qcow2 over a backing file does not)."""
    try:
        await base.zero_range(offset, length)
    except UnsupportedOperation:
        await base.write(offset, bytes(length))


def overlay_bytes(image: str, fd: int, engine, offset: int, length: int) -> bytes:
    """The overlay's own guest bytes of an allocated range (plain, compressed or zero clusters)."""
    parts = []
    for ext in run_sync(engine.plan_read(offset, length), lambda o, n: os.pread(fd, n, o)):
        if ext.kind is ExtentKind.ZERO:
            parts.append(bytes(ext.length))
        elif ext.kind is ExtentKind.DATA:
            parts.append(os.pread(fd, ext.length, ext.host_offset).ljust(ext.length, b"\0"))
        elif ext.kind is ExtentKind.COMPRESSED:
            desc = ext.compressed
            whole = engine.decompress(desc, os.pread(fd, desc.max_length, desc.offset))
            parts.append(whole[ext.in_cluster:ext.in_cluster + ext.length])
        else:  # DAMAGED (or BACKING in a range plan_map called allocated: the same damage)
            raise CorruptImage(f"{image}: damaged metadata at guest offset {ext.guest_offset}")
    return b"".join(parts)


def empty_overlay(image: str, fd: int, engine) -> None:
    """Replace the overlay by an empty one with the same layout and backing file (module docstring)."""
    from cachefs.qcow2.compress import compress_of
    from cachefs.qcow2.create import new_image
    hdr = engine.hdr
    pieces = new_image(engine.size, cluster_bits=hdr.cluster_bits, refcount_order=hdr.refcount_order,
                       lazy_refcounts=hdr.lazy_refcounts, compress=compress_of(hdr),
                       backing_name=engine.backing.name, backing_format=engine.backing.format)
    st = os.fstat(fd)
    head, tail = os.path.split(os.path.abspath(image))
    tmp = os.path.join(head, f".{tail}.commit-{os.getpid()}")
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
            os.fchown(out, st.st_uid, st.st_gid)
        os.fchmod(out, st.st_mode & 0o7777)
        for off, data in pieces:
            os.pwrite(out, data, off)
        os.fsync(out)
        os.rename(tmp, image)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(out)
    dfd = os.open(head, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
