"""What an image's owner may set through xattrs: its cache mode, compress-on-write, and whether its
next opens may pass through to the kernel (``setfattr -n user.cachefs.cache|compress|passthrough``).

A refusal is an errno (EINVAL for a value the image cannot take, EBUSY for a cache mode an open
passthrough handle cannot keep); its one-line reason is the image's ``cache_error`` or
``compress_error`` xattr, and the log's.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3
import trio

from cachefs.errors import CachefsError, UnsupportedOperation
from cachefs.policy import mode_named

log = logging.getLogger("cachefs.fuse.operations")

PREFIX = "user.cachefs."
#: The image xattrs an owner may set.
SETTABLE = tuple(PREFIX + k for k in ("cache", "compress", "passthrough"))


class ImageSettings:
    """The setters; ``fast`` is the mount's FastPaths (or NoFastPaths), ``invalidate(inode)`` drops
    the kernel's cached pages of an image (blocking: run in a thread)."""

    def __init__(self, fast, invalidate) -> None:
        self.fast = fast
        self.invalidate = invalidate
        self.switch_refused: dict[int, str] = {}  # inode -> why its last cache switch was refused (EBUSY)

    async def set(self, inode: int, img, key: str, value: bytes) -> None:
        text = value.decode(errors="replace").strip()
        if key == PREFIX + "compress":
            await self._set_compress(inode, img, text)
        elif key == PREFIX + "passthrough":
            self._set_passthrough(inode, img, text)
        else:
            await self._switch_cache(inode, img, value.decode(errors="replace"))

    async def _switch_cache(self, inode: int, img, name: str) -> None:
        try:
            mode = mode_named(name)
        except ValueError as exc:
            log.warning("setxattr cache: %s", exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        try:
            async with self.fast.paused(inode):  # drained first: the descriptors C uses are reopened
                # Open passthrough handles keep the flags they were opened with (dataplane/passthrough.py).
                if why := self.fast.switch_conflict(inode, mode):
                    self.switch_refused[inode] = why
                    log.error("%s: cache=%s refused: %s", img.path, mode.name, why)
                    raise pyfuse3.FUSEError(errno.EBUSY)
                self.switch_refused.pop(inode, None)
                await img.switch_mode(mode)
        except CachefsError as exc:
            # Whatever refused the new flags (no O_DIRECT here, no io_uring), the old mode stays:
            # to setxattr that is a value this file cannot take. The reason is in cache_error.
            log.error("%s: %s", img.path, exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        # Whatever the kernel cached under the old mode is dropped.
        await trio.to_thread.run_sync(self.invalidate, inode)

    def _set_passthrough(self, inode: int, img, value: str) -> None:
        """on|off: whether the image's next opens may pass through to the kernel
        (dataplane/passthrough.py). Off: the daemon serves them, and counts every request."""
        try:
            if value not in ("on", "off"):
                raise OSError(errno.EINVAL, f"passthrough {value!r}: on or off")
            self.fast.turn_passthrough(inode, value == "on")
        except OSError as exc:
            log.error("%s: %s", img.path, exc.strerror)
            raise pyfuse3.FUSEError(exc.errno) from None
        log.info("%s: passthrough %s for its next opens", img.path, value)

    async def _set_compress(self, inode: int, img, name: str) -> None:
        """zlib, zstd or off (docs/design.md, "Compress-on-write images"). A refusal is EINVAL, its
        reason in compress_error (as for the cache mode)."""
        try:
            if name not in ("zlib", "zstd", "off"):
                raise UnsupportedOperation(f"unknown compression {name!r} (zlib, zstd or off)")
            # Paused: the data plane forwards every write of a compress-on-write
            # image and republishes once the setting changed.
            async with self.fast.paused(inode):
                await img.set_compress(None if name == "off" else name)
        except (CachefsError, OSError) as exc:
            img.compress_error = str(exc)
            log.error("%s: %s", img.path, exc)
            raise pyfuse3.FUSEError(exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL) from None
        img.compress_error = None
