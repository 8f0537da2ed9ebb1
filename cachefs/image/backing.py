"""Backing images: what an overlay reads where it has allocated nothing (issue 22).

A qcow2 overlay's unallocated clusters read from its backing image at the same
guest offset, down a chain of any depth (spec "Header": backing_file_offset),
and as zeros past the end of a shorter backing image. The core says which
ranges those are (ExtentKind.BACKING, BackingReadRequest for a copy-on-write);
this module is where their bytes come from.

Who opens a base, and how often: one open per base file (keyed by st_dev and
st_ino), shared by every overlay above it, with one L2 cache. A base the mount
serves itself (a file of the image directory) is the catalog's own open image;
any other base (a subdirectory, ``--backing-dir``) is opened here, read-only,
under QEMU's lock for a backing file: shared read, no writer allowed
(image/locking.py: a reader unshares write and resize). When its last overlay
lets go, it is closed.

Which file a name means is image/backing_names.py's rule, never the opener's
guess: the resolved path stays inside the allowed directories, is a regular
file, agrees with the recorded format, and no chain loops or runs deeper than
MAX_CHAIN_DEPTH.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence

from cachefs.errors import CorruptImage
from cachefs.image.backing_names import BackingFile, ChainWalk, resolve_backing
from cachefs.image.base import Image

log = logging.getLogger("cachefs.image.backing")

#: Opens a base read-only as its own image: (the resolved file, walk) -> Image (image/opening.open_image
#: on backing_names.open_checked's descriptor; it attaches the base's own backing through the same Bases).
BaseOpener = Callable[[BackingFile, ChainWalk], Awaitable[Image]]
#: The mount's own open image of a file, if it serves it: (path, (st_dev, st_ino)) -> Image | None.
ServedLookup = Callable[[str, tuple[int, int]], Awaitable[Image | None]]


async def _not_served(path: str, ident: tuple[int, int]) -> Image | None:
    return None


class BackingImage:
    """The image below one overlay, as that overlay reads it: same guest offsets, zeros past its end."""

    def __init__(self, image: Image, file: BackingFile, release: Callable[[], Awaitable[None]]) -> None:
        self.image = image
        self.file = file
        self._release = release

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the chain at guest ``offset`` (spec: past a shorter backing
        image's end the overlay reads zeros)."""
        n = max(0, min(length, self.image.size - offset))
        data = bytes(await self.image.read(offset, n)) if n else b""
        return data + bytes(length - len(data)) if len(data) < length else data

    async def release(self) -> None:
        await self._release()


class _Shared:
    """One open base and the overlays reading it."""

    def __init__(self, image: Image, owned: bool) -> None:
        self.image = image
        self.owned = owned  # opened here (closed here); else the catalog's served image
        self.users: set[str] = set()


class Bases:
    """The bases of one mount (or one command), each opened once."""

    def __init__(self, allowed_dirs: Sequence[str], opener: BaseOpener,
                 served: ServedLookup = _not_served) -> None:
        self.allowed_dirs = tuple(allowed_dirs)
        self._open = opener
        self._served = served
        self._by_ident: dict[tuple[int, int], _Shared] = {}

    def holders(self, image: Image) -> list[str]:
        """The overlays (paths) reading ``image`` as their backing file now."""
        return sorted(next((s.users for s in self._by_ident.values() if s.image is image), ()))

    def take_over(self, image: Image) -> None:
        """The mount stops serving ``image`` (its file left the image directory) while overlays
        still read it: it is closed here, with the last of them."""
        for s in self._by_ident.values():
            if s.image is image:
                s.owned = True

    def shared(self) -> list[Image]:
        return [s.image for s in self._by_ident.values()]

    async def attach(self, overlay: str, name: str, recorded_format: str | None,
                     walk: ChainWalk | None = None) -> BackingImage:
        """The backing image of ``overlay`` (its name and format as its header records them),
        opened or shared. Raises a one-line CachefsError when the name breaks the rule."""
        walk = walk or ChainWalk(overlay)
        bf = resolve_backing(overlay, name, recorded_format, allowed_dirs=self.allowed_dirs)
        walk.enter(bf)
        ident = (bf.st_dev, bf.st_ino)
        shared = self._by_ident.get(ident)
        if shared is None:
            shared = await self._open_base(bf, ident, walk)
        if shared.image.format != bf.format:
            raise _format_clash(overlay, bf, shared.image.format)
        shared.users.add(overlay)
        log.info("%s: backing file %s (%s)", overlay, bf.path, bf.format)
        return BackingImage(shared.image, bf, lambda: self._detach(ident, overlay))

    async def _open_base(self, bf: BackingFile, ident: tuple[int, int], walk: ChainWalk) -> _Shared:
        served = await self._served(bf.path, ident)
        shared = _Shared(served, owned=False) if served is not None else \
            _Shared(await self._open(bf, walk), owned=True)
        self._by_ident[ident] = shared
        return shared

    async def _detach(self, ident: tuple[int, int], overlay: str) -> None:
        shared = self._by_ident.get(ident)
        if shared is None:
            return
        shared.users.discard(overlay)
        if not shared.users:
            del self._by_ident[ident]
            if shared.owned:
                await shared.image.close()


def _format_clash(overlay: str, bf: BackingFile, opened: str) -> CorruptImage:
    return CorruptImage(f"{os.path.basename(overlay)}: backing file {bf.name!r} is {opened}, "
                        f"the overlay records {bf.format}")

