"""The project's error types. Each carries the errno a client gets for it;
fuse/failures.errno_of is the one place that picks a reply's errno (STYLE.md habit 4),
for fuse/operations.py and fuse/direct_requests.py alike.
"""

import errno as _errno


class CachefsError(Exception):
    """Base class: a user-facing problem whose message is one line."""

    errno = _errno.EIO


class CorruptImage(CachefsError):
    """On-disk metadata violates the qcow2 specification: the image is marked corrupt and read-only."""

    errno = _errno.EIO


class UnsupportedImage(CachefsError):
    """A valid image that uses something cachefs cannot serve (or cannot write).

    A write it refuses fails as on a read-only medium."""

    errno = _errno.EROFS


class UnsupportedOperation(UnsupportedImage):
    """A request a writable image cannot carry out: shrinking it, or a size whose L1 table is too large.
    (``qemu-img resize`` without ``--shrink`` refuses the first the same way.)"""

    errno = _errno.EOPNOTSUPP


class DirectIOUnsupported(UnsupportedImage):
    """The backing filesystem refuses O_DIRECT, which cache modes none and directsync need.

    EINVAL is what open(2) with O_DIRECT says on such a filesystem, which is what QEMU and dd probe for."""

    errno = _errno.EINVAL


class ImageLocked(CachefsError):
    """Another process (QEMU, or another cachefs) holds the image."""

    errno = _errno.EBUSY


class DamagedMetadata(CachefsError):
    """One table entry is invalid: only the guest range behind it fails (EIO)."""

    errno = _errno.EIO


class UnsafeBackingName(CachefsError):
    """A qcow2 overlay's backing file name that cachefs will not follow (image/backing_names.py):
    a json: or protocol name, a target outside the allowed directories, not a regular file,
    missing, of a format its name does not give, or a loop or too deep a chain.

    EACCES: the overlay is refused by policy, not damaged (EIO) nor read-only (EROFS), and asking
    again will not help; the message says which rule refused it."""

    errno = _errno.EACCES


class SnapshotNotFound(CachefsError):
    """No internal snapshot has the ID or name asked for (qemu-img snapshot: ENOENT)."""

    errno = _errno.ENOENT


class SnapshotExists(CachefsError):
    """An internal snapshot with that name (or ID) exists already (qemu-img snapshot -c: EEXIST)."""

    errno = _errno.EEXIST
