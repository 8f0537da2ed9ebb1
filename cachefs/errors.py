"""The project's error types, translated to errno only at the FUSE boundary (fs.py)."""


class CachefsError(Exception):
    """Base class: a user-facing problem whose message is one line."""


class CorruptImage(CachefsError):
    """On-disk metadata violates the qcow2 specification."""


class UnsupportedImage(CachefsError):
    """A valid image that uses something cachefs cannot serve (or cannot write)."""


class DirectIOUnsupported(UnsupportedImage):
    """The backing filesystem refuses O_DIRECT, which cache modes none and directsync need."""


class ImageLocked(CachefsError):
    """Another process (QEMU, or another cachefs) holds the image."""


class DamagedMetadata(CachefsError):
    """One table entry is invalid: only the guest range behind it fails (EIO)."""
