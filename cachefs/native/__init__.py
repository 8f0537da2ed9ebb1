"""The optional compiled helpers (cffi, built at install time by build.py).

Only ``cachefs.backend`` imports this package. Everything here has a pure
Python fallback or a clear "not available" answer, so a checkout without a
compiled module (or a broken one) still imports and runs: ``available()``
then returns False, and ``unavailable_reason()`` says why.

What it provides today:

- ``aligned_buffer(size, align=4096)``: writable memory whose address is
  aligned, for O_DIRECT. Freed by the garbage collector.
- ``address_of(buf)``: the address of any buffer-protocol object.
- ``fadvise(fd, offset, length, advice)`` and the ``POSIX_FADV_*`` constants.

Later: the Linux AIO and io_uring engines (DESIGN.md section 4).
"""

from __future__ import annotations

import os

try:
    from ._cachefs_native import ffi, lib
except ImportError as exc:  # not built, or built for another Python
    ffi = lib = None
    _IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None

__all__ = [
    "NativeUnavailable",
    "available",
    "unavailable_reason",
    "aligned_buffer",
    "address_of",
    "fadvise",
    "POSIX_FADV_NORMAL",
    "POSIX_FADV_RANDOM",
    "POSIX_FADV_SEQUENTIAL",
    "POSIX_FADV_WILLNEED",
    "POSIX_FADV_DONTNEED",
    "POSIX_FADV_NOREUSE",
]


class NativeUnavailable(RuntimeError):
    """The compiled module is missing; callers fall back to pure Python."""


def available() -> bool:
    """True when the compiled module imported."""
    return lib is not None


def unavailable_reason() -> str | None:
    """Why the compiled module did not import (None when it did)."""
    return _IMPORT_ERROR


def _require() -> None:
    if lib is None:
        raise NativeUnavailable(f"cachefs native module not available ({_IMPORT_ERROR})")


# The constants come from <fcntl.h> via the compiled module; the os module has
# the same values on Linux, so they are defined either way.
_src = lib if lib is not None else os
POSIX_FADV_NORMAL: int = _src.POSIX_FADV_NORMAL
POSIX_FADV_RANDOM: int = _src.POSIX_FADV_RANDOM
POSIX_FADV_SEQUENTIAL: int = _src.POSIX_FADV_SEQUENTIAL
POSIX_FADV_WILLNEED: int = _src.POSIX_FADV_WILLNEED
POSIX_FADV_DONTNEED: int = _src.POSIX_FADV_DONTNEED
POSIX_FADV_NOREUSE: int = _src.POSIX_FADV_NOREUSE
del _src


def aligned_buffer(size: int, align: int = 4096):
    """Zeroed, writable memory of ``size`` bytes at an ``align``-aligned address.

    Returns a cffi buffer: ``memoryview(buf)`` is writable and C-contiguous,
    and it supports slicing and ``buf[a:b] = data``. The memory is freed
    (``free``) when the last reference to the buffer (or to a memoryview of
    it) goes away. Raises NativeUnavailable without the compiled module.
    """
    _require()
    if size < 0:
        raise ValueError(f"negative buffer size {size}")
    if align < ffi.sizeof("void *") or align & (align - 1):
        raise ValueError(f"alignment {align} is not a power of two >= pointer size")
    out = ffi.new("void **")
    # posix_memalign(…, 0) may return NULL; a 1-byte allocation keeps the
    # pointer valid and the buffer is still 0 bytes long.
    rc = lib.posix_memalign(out, align, max(size, 1))
    if rc != 0:
        raise MemoryError(f"posix_memalign({size}, {align}) failed: {os.strerror(rc)}")
    ptr = ffi.gc(ffi.cast("char *", out[0]), lib.free, size=size)
    lib.memset(ptr, 0, size)
    # ffi.buffer keeps ``ptr`` (the owner) alive as long as it lives.
    return ffi.buffer(ptr, size)


def address_of(buf) -> int:
    """Address of the first byte of a buffer-protocol object (read-only too)."""
    _require()
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
    """posix_fadvise(2); raises OSError. Falls back to os.posix_fadvise."""
    if lib is None:
        os.posix_fadvise(fd, offset, length, advice)
        return
    rc = lib.posix_fadvise(fd, offset, length, advice)
    if rc != 0:
        raise OSError(rc, os.strerror(rc))
