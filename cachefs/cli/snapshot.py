"""`cachefs snapshot list|create|delete|apply IMAGE [NAME]`: internal snapshots (issue 23).

Spelled as ``qemu-img snapshot -l|-c|-d|-a``, with its output for ``list``
(cli/info.py's snapshot table) and none for the others.

- **An image file** (not served) is held under QEMU's write lock for the whole
  operation (image/locking.py: an image QEMU or a mount has open is refused in
  one line, "in use"), and the operation runs as a metadata generation
  (qcow2/generation.py): new tables in fresh clusters, a sync, the header
  sector that switches to them, a sync. A crash at any point leaves the image
  as it was or with the operation done, leaks at most. An image that was not
  closed cleanly (the dirty bit) or is marked corrupt is refused with the
  remedy: its refcounts are not to be trusted until ``cachefs check --repair all``.
- **A file of a cachefs mount** (it has ``user.cachefs.path``): the daemon does
  it, asked through the file's xattrs (``user.cachefs.snapshot.create`` =
  NAME and so on; ``user.cachefs.snapshot.list`` is JSON in qemu-img info's
  "snapshots" keys). A refusal comes back as an errno, said in one line.
"""

from __future__ import annotations

import errno
import json
import os
import time

import click

from cachefs.cli.info import snapshot_info, snapshot_lines
from cachefs.cli.served import serving_mount
from cachefs.errors import CachefsError, CorruptImage, ImageLocked
from cachefs.image.locking import ImageLock
from cachefs.qcow2 import format as fmt
from cachefs.qcow2 import generation, snapshots
from cachefs.qcow2.plan import run_sync

XATTR = "user.cachefs.snapshot."
#: What a mount's errno means for a snapshot request (the daemon says more in ``snapshot_error``).
ERRNO_REASONS = {
    errno.EEXIST: "a snapshot with that name exists already",
    errno.ENOENT: "no snapshot with that ID or name",
    errno.EBUSY: "the image is busy; try again",
    errno.EROFS: "the image is served read-only",
    errno.EOPNOTSUPP: "internal snapshots are not supported for this image",
}
IMAGE_ARG = click.argument("image", type=click.Path(exists=True, dir_okay=False))
NAME_ARG = click.argument("name")


@click.group()
def snapshot():
    """Internal snapshots of a qcow2 image, or of a file a cachefs mount serves (qemu-img snapshot).

    Crash-safe: each change is written as new metadata and switched to by one header write.
    """


@snapshot.command("list")
@IMAGE_ARG
def list_(image):
    """List IMAGE's snapshots (qemu-img snapshot -l)."""
    if _served(image):
        infos = json.loads(_get(image, "list"))
    else:
        infos = [snapshot_info(e.summary()) for e in _offline(image, None)]
    if infos:
        click.echo("\n".join(snapshot_lines(infos)))


@snapshot.command()
@IMAGE_ARG
@NAME_ARG
def create(image, name):
    """Take a snapshot NAME of IMAGE's current contents (qemu-img snapshot -c)."""
    _change(image, "create", name)


@snapshot.command()
@IMAGE_ARG
@NAME_ARG
def delete(image, name):
    """Delete the snapshot with ID or name NAME (qemu-img snapshot -d); its clusters are freed."""
    _change(image, "delete", name)


@snapshot.command()
@IMAGE_ARG
@NAME_ARG
def apply(image, name):
    """Revert IMAGE to the snapshot with ID or name NAME (qemu-img snapshot -a); the snapshot stays."""
    _change(image, "apply", name)


def _change(image: str, op: str, name: str) -> None:
    if _served(image):
        _set(image, op, name)
    else:
        _offline(image, (op, name))


# ------------------------------------------------------------------ a served file

def _served(path: str) -> bool:
    try:
        os.getxattr(path, "user.cachefs.path")
    except OSError:
        return False
    return True


def _get(image: str, op: str) -> str:
    try:
        return os.getxattr(image, XATTR + op).decode()
    except OSError as exc:
        raise CachefsError(f"{image}: {_reason(image, op, exc)}") from None


def _set(image: str, op: str, name: str) -> None:
    try:
        os.setxattr(image, XATTR + op, name.encode())
    except OSError as exc:
        raise CachefsError(f"{image}: cannot {op} snapshot '{name}': {_reason(image, op, exc)}") from None


def _reason(image: str, op: str, exc: OSError) -> str:
    try:
        said = os.getxattr(image, "user.cachefs.snapshot_error").decode()
    except OSError:
        said = ""
    if said:
        return said
    if exc.errno in (errno.ENODATA, errno.ENOTSUP) and op == "list":
        return "this cachefs mount does not serve snapshots"
    return ERRNO_REASONS.get(exc.errno, os.strerror(exc.errno or errno.EIO))


# ------------------------------------------------------------------ an image file

def _offline(image: str, change: tuple[str, str] | None):
    """The snapshot entries (``change`` None), or the change made, under QEMU's lock."""
    fd = os.open(image, (os.O_RDWR if change else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        with ImageLock.acquire(fd, image, bool(change)):
            return _locked(fd, change)
    except ImageLocked as exc:
        live = serving_mount(image)
        if live is None:
            raise
        raise ImageLocked(f"{exc}; a cachefs mount serves it as {live.served}: run the command on that file") from None
    except CachefsError as exc:
        if str(exc).startswith(image):
            raise
        raise type(exc)(f"{image}: {exc}") from None
    finally:
        os.close(fd)


def _locked(fd: int, change: tuple[str, str] | None):
    read = lambda off, n: os.pread(fd, n, off)  # noqa: E731
    size = os.fstat(fd).st_size
    if os.pread(fd, 4, 0) != fmt.MAGIC:
        raise CachefsError("not a qcow2 image: only qcow2 images have internal snapshots")
    hdr = run_sync(fmt.read_header(size), read)
    if change is None:
        return run_sync(snapshots.read_entries(hdr, size), read)
    if hdr.dirty:
        raise CorruptImage("the image was not closed cleanly (dirty: its refcounts may be stale); "
                           "run 'cachefs check --repair all' first")
    op, name = change
    if op == "create":
        gen = run_sync(generation.create_snapshot(hdr, size, 0, name, time.time_ns()), read)
    else:
        gen = run_sync({"delete": generation.delete_snapshot, "apply": generation.apply_snapshot}[op](
            hdr, size, 0, name), read)
    run_sync(generation.write_generation(gen), read, _FileIO(fd))


class _FileIO:
    """plan.run_sync's io on the image's fd: each SyncRequest is an fdatasync."""

    def __init__(self, fd: int):
        self.fd = fd

    def pwrite(self, offset: int, data) -> None:
        if os.pwrite(self.fd, data, offset) != len(data):
            raise OSError(errno.EIO, "short write")

    def sync(self) -> None:
        os.fdatasync(self.fd)
