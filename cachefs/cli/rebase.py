"""`cachefs rebase -u`: name another backing file in an overlay's header (issue 22).

As ``qemu-img rebase -u`` (unsafe): only the header changes, no data is
copied, so the overlay's guest contents become whatever its unallocated
clusters read in the new base. It is for a base that was moved, renamed or
converted (the same guest bytes under another name), or, with ``-b ""``, for
dropping a backing file (the unallocated clusters then read as zeros). The
safe rebase, which copies the clusters that differ, is not here: without
``-u`` the command says so in one line.

- **The name rule first.** The new base must pass the rule a mount follows
  backing names by (image/backing_names.py; the overlay's directory and each
  ``--backing-dir``), and so must every base below it, walked for loops and
  depth, so `rebase` never records a chain a mount would refuse. Nothing
  is checked for ``-b ""``.
- **Locked and durable.** The overlay is held under QEMU's write lock for the
  whole rewrite (an image a mount or QEMU has open is refused in one line).
  The first cluster is rewritten by ``format.with_backing`` (every other
  header field and extension kept, byte for byte) in one pwrite, then
  fsync'ed: as QEMU's qcow2_update_header rewrites it.
"""

from __future__ import annotations

import os

import click

from cachefs.cli.chain import BACKING_DIR_OPTION, check_new_chain, read_engine
from cachefs.errors import CachefsError, CorruptImage
from cachefs.image.formats import format_by_name, image_format
from cachefs.image.locking import ImageLock
from cachefs.qcow2 import format as fmt


@click.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("-u", "unsafe", is_flag=True, help="Unsafe: rewrite the header only, copy nothing (required).")
@click.option("-b", "--backing", "backing", required=True, metavar="BASE",
              help='The new backing file, recorded as given (relative to IMAGE\'s directory); "" removes it.')
@click.option("-F", "--backing-format", "backing_fmt", type=click.Choice(["qcow2", "raw"]), default=None,
              help="The new backing file's format (required with a backing file, as qemu-img requires).")
@BACKING_DIR_OPTION
def rebase(image, unsafe, backing, backing_fmt, backing_dir):
    """Make IMAGE (qcow2) an overlay of BASE, or of nothing with -b "" (qemu-img rebase -u).

    The header only: IMAGE's unallocated clusters then read BASE. Refused while IMAGE is in use
    (a mount or QEMU holds its lock).
    """
    if not unsafe:
        raise click.UsageError("only the unsafe rebase is supported: -u (the header only; "
                               "a safe rebase would copy the clusters that differ)")
    if format_by_name(image) != "qcow2":
        raise CachefsError(f"{image}: only a qcow2 image (*.qcow2) has a backing file")
    name = backing or None
    if name is not None and backing_fmt is None:
        raise click.BadParameter("a backing file needs its format: -F qcow2 or -F raw (as qemu-img requires)",
                                 param_hint="-F")
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        with ImageLock.acquire(fd, image, True):
            image_format(image, os.pread(fd, 4, 0))  # a *.qcow2 must be one
            cs = _checked_cluster_size(image, fd)
            if name is not None:
                check_new_chain(image, name, backing_fmt, backing_dir, overlay_exists=True)
            rewrite_header(image, fd, cs, name, None if name is None else backing_fmt)
    finally:
        os.close(fd)


def _checked_cluster_size(image: str, fd: int) -> int:
    """The overlay opens as a mount would open it (header and tables validated)."""
    try:
        return read_engine(fd).cs
    except CachefsError as exc:
        raise type(exc)(f"{image}: {exc}") from None


def rewrite_header(image: str, fd: int, cs: int, name: str | None, name_fmt: str | None) -> None:
    """The header cluster naming ``name`` (None: no backing file), written and fsync'ed."""
    old = os.pread(fd, cs, 0)
    try:
        new = fmt.with_backing(old, name, name_fmt)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="-b") from None
    except CorruptImage as exc:
        raise CorruptImage(f"{image}: {exc}") from None
    if new != old:
        os.pwrite(fd, new, 0)
    os.fsync(fd)
