"""A raw image: guest bytes are file bytes, passed straight through to the backing file."""

from __future__ import annotations

import errno

from cachefs.errors import UnsupportedOperation
from cachefs.image.base import Image, zero_padded


class RawImage(Image):
    """A raw image: bytes pass straight through to the backing file."""

    format = "raw"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._size = self.backend.size()

    @property
    def size(self) -> int:
        return self._size

    async def _read(self, be, offset: int, length: int):
        return zero_padded(await be.pread_view(offset, length), length)

    async def _write(self, be, offset: int, data) -> None:
        await be.pwrite(offset, data)

    async def truncate(self, size: int) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "image is read-only")
        if size < self.size:
            raise UnsupportedOperation("shrinking an image is refused")
        async with self.backends.in_use():
            await self.backend.truncate(size)
        self._size = size

    async def settle_unseen_growth(self, *, growable: bool) -> int:
        """The image file grew past the disk through writes the daemon never saw (kernel passthrough,
        dataplane/passthrough.py). On a growable mount the disk takes the file's size; otherwise the
        file is cut back to the disk's size, since only a resize changes a disk's (tests/test_disk_size.py).
        Returns the bytes cut off."""
        grown = self.backend.size()
        if grown <= self._size or not self.writable:
            return 0
        if growable:
            self._size = grown
            return 0
        async with self.backends.in_use():
            await self.backend.truncate(self._size)
        return grown - self._size
