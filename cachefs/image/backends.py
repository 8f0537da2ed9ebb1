"""The open descriptors of one image file: one backend per cache mode in use.

Under ``auto`` one image can be open in several modes at once (QEMU with
cache=none opens it O_DIRECT while ``cat`` reads it buffered), and a live
switch replaces the mode of the whole image. Each concrete mode therefore
gets its own backend, opened on first use with that mode's flags (O_DIRECT
for ``direct``, O_DSYNC for ``write_through``). Linux keeps an O_DIRECT and a
buffered descriptor of one file coherent: a direct write invalidates the
cached pages it covers, a direct read first writes back dirty ones.

Two facts live here because every backend of the image shares them:

- ``unsynced``: some completed pwrite may not be durable yet. Writes through
  an O_DSYNC backend are durable when they complete, so they leave it alone;
  anything else sets it. An fdatasync clears it *before* it starts, so a
  write completing during the sync sets it again (invariant below).
- per-mode counters, kept across switches and reopenings, for stats.

A write-through mode may get a second descriptor (``batch``): the same
O_DIRECT-ness without O_DSYNC, for the writes one shared fdatasync makes
durable before the acknowledgement (an allocating write's data and the
metadata that maps it; docs/cache-modes.md, "One sync per write"). It counts
under its mode's name and is not a mode of its own in ``modes_open``.

The image's lock is held on a descriptor of its own (``lock_fd``), so a
switch can close and reopen every I/O descriptor without dropping the lock
QEMU would look for.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable

import attrs
import trio

from cachefs.backend import SUBMITTERS, AioBackend, Backend, FileBackend, IOCounters, UringBackend
from cachefs.errors import CachefsError
from cachefs.image.hooks import no_fast_writes
from cachefs.policy import CacheMode


def file_opener(path: str, writable: bool, aio: str = "threads", *,
                via_fd: int | None = None) -> Callable[[CacheMode], Backend]:
    """Open ``path`` with the flags a mode asks for (UnsupportedImage if O_DIRECT is refused).

    ``via_fd``: reopen the file that descriptor holds (``/proc/self/fd/N``)
    rather than whatever ``path`` names now. The image directory is live
    (fuse/catalog.py): by a later mode switch the image may have been renamed or
    removed while open, and its name may even hold another image.

    ``aio`` names the submitter (see cachefs.backend). ``"threads"`` serves
    every descriptor from worker threads. ``"native"`` serves the direct
    modes' descriptors with Linux AIO on an eventfd (seed 004: no thread hop
    per request). Linux AIO is only asynchronous with O_DIRECT, so buffered
    descriptors stay on threads. ``"io_uring"`` serves every descriptor,
    buffered ones included, with io_uring (issue 5); UringUnavailable when
    the kernel will not give one.
    """
    if aio not in SUBMITTERS:
        raise ValueError(f"unknown submitter {aio!r} (one of {', '.join(SUBMITTERS)})")

    def open_for(mode: CacheMode) -> Backend:
        if via_fd is None:
            return open_path(path, mode)
        proc = f"/proc/self/fd/{via_fd}"
        try:
            return open_path(proc, mode)
        except CachefsError as exc:  # one line that names the image, not the descriptor
            raise type(exc)(str(exc).replace(proc, path)) from None

    def open_path(path: str, mode: CacheMode) -> Backend:
        if aio == "io_uring":
            return UringBackend.open(path, writable=writable, direct=mode.direct, sync=mode.write_through)
        if aio == "native" and mode.direct:
            return AioBackend.open(path, writable=writable, sync=mode.write_through)
        return FileBackend.open(path, writable=writable, direct=mode.direct, sync=mode.write_through)
    return open_for


#: Backend class -> the ``--aio`` name of its submitter.
_SUBMITTER_OF = {"AioBackend": "native", "UringBackend": "io_uring"}


def submitter_name(backend) -> str:
    """Which submitter serves a descriptor (for stats)."""
    inner = getattr(backend, "inner", backend)
    return _SUBMITTER_OF.get(type(inner).__name__, "threads")


#: The key suffix of a write-through mode's batch descriptor (BackendSet.batch).
_BATCH = "+batch"


class ModeBackend:
    """A backend seen through one mode: records whether its writes still need a sync."""

    def __init__(self, inner: Backend, mode: CacheMode, owner: BackendSet, *, dsync: bool | None = None) -> None:
        self.inner = inner
        self.mode = mode
        #: Opened O_DSYNC: a completed write is durable. False for a write-through mode's batch twin.
        self.dsync = mode.write_through if dsync is None else dsync
        self._owner = owner

    fd = property(lambda self: self.inner.fd)
    direct = property(lambda self: self.inner.direct)
    counters = property(lambda self: self.inner.counters)

    def size(self) -> int:
        return self.inner.size()

    async def pread(self, offset: int, length: int) -> bytes:
        return await self.inner.pread(offset, length)

    async def pread_view(self, offset: int, length: int) -> memoryview:
        """Guest data without a copy: a view of the backend's own read buffer
        where it has one (an O_DIRECT read lands in aligned memory, which
        FUSE can reply from directly), else a view of ``pread``'s bytes."""
        inner_view = getattr(self.inner, "pread_view", None)
        if inner_view is not None:
            return await inner_view(offset, length)
        return memoryview(await self.inner.pread(offset, length))

    async def pwrite(self, offset: int, data) -> None:
        await self.inner.pwrite(offset, data)
        if not self.dsync:
            self._owner.unsynced = True

    async def truncate(self, size: int) -> None:
        await self.inner.truncate(size)
        self._owner.unsynced = True  # O_DSYNC covers writes, not ftruncate

    async def fdatasync(self) -> None:
        # Invariant: ``unsynced`` is False only while every completed write is
        # covered by a completed or running fdatasync. Clearing it first keeps
        # that true for writes that complete while this one runs.
        self._owner.unsynced = False
        try:
            await self.inner.fdatasync()
        except BaseException:
            self._owner.unsynced = True
            raise


class BackendSet:
    def __init__(self, opener: Callable[[CacheMode], Backend], lock_fd: int | None = None) -> None:
        self._opener = opener
        self.lock_fd = lock_fd
        self._open: dict[str, ModeBackend] = {}
        self.counters: dict[str, IOCounters] = {}
        self._unsynced = False
        # The data plane's count of completed fast writes through descriptors that are not
        # O_DSYNC (cachefs/dataplane/plane.py), which never pass ModeBackend.pwrite.
        self._fast_writes: Callable[[], int] = no_fast_writes
        self._fast_synced = 0  # that count when the last fdatasync started
        # That count when the data plane's own last good fdatasync started (a guest flush served
        # in C, dataplane/cflush.py), or None: writes up to it are durable too.
        self._fast_synced_in_c: Callable[[], int | None] = lambda: None
        # Invariant: ``_users`` counts calls that may touch a backend right
        # now; ``close_all`` runs only when it is zero and ``_closed`` keeps
        # new calls out meanwhile, so no worker thread ever uses a closed fd.
        self._users = 0
        self._in_use = _InUse(self._enter, self._leave)
        self._idle: trio.Event | None = None  # set when _users drops to 0 while a quiesce waits
        self._reopened: trio.Event | None = None

    @property
    def unsynced(self) -> bool:
        """Some completed write may not be durable yet: a pwrite here, or a fast write in C."""
        if self._unsynced:
            return True
        now = self._fast_writes()
        return now != self._fast_synced and now != self._fast_synced_in_c()

    @unsynced.setter
    def unsynced(self, value: bool) -> None:
        # Cleared when an fdatasync starts: the fast writes counted so far are covered by it.
        self._unsynced = value
        if not value:
            self._fast_synced = self._fast_writes()

    def count_fast_writes(self, counter: Callable[[], int], synced: Callable[[], int | None] | None = None) -> None:
        """Writes that bypass this set count too (Image.connect_plane: PlaneHooks.fast_writes);
        ``synced``: that count as far as the data plane's own fdatasyncs cover it."""
        self._fast_writes = counter
        if synced is not None:
            self._fast_synced_in_c = synced

    def get(self, mode: CacheMode) -> ModeBackend:
        be = self._open.get(mode.name)
        if be is None:
            inner = self._opener(mode)
            inner.counters = self.counters.setdefault(mode.name, inner.counters)
            be = self._open[mode.name] = ModeBackend(inner, mode, self)
        return be

    def batch(self, mode: CacheMode) -> ModeBackend:
        """The descriptor for writes a later fdatasync covers: ``mode``'s own unless it is
        write-through, else its twin without O_DSYNC (same O_DIRECT-ness), opened on first use.

        QEMU emulates writethrough the same way (data, then metadata, then one flush before
        the completion): an O_DSYNC descriptor would make each of those writes a device sync
        of its own. Its writes set ``unsynced`` (ModeBackend.pwrite), so the image's sync runs.
        """
        if not mode.write_through:
            return self.get(mode)
        key = mode.name + _BATCH
        be = self._open.get(key)
        if be is None:
            inner = self._opener(attrs.evolve(mode, write_through=False))
            inner.counters = self.counters.setdefault(mode.name, inner.counters)
            be = self._open[key] = ModeBackend(inner, mode, self, dsync=False)
        return be

    def modes_open(self) -> list[str]:
        return sorted(k for k in self._open if not k.endswith(_BATCH))

    def submitters(self) -> dict[str, str]:
        """Concrete mode -> submitter of its open descriptor."""
        return {name: submitter_name(be) for name, be in sorted(self._open.items()) if not name.endswith(_BATCH)}

    @property
    def fd(self) -> int | None:
        """A descriptor for fstat: the lock's, or any open backend's."""
        if self.lock_fd is not None:
            return self.lock_fd
        return next((b.fd for b in self._open.values() if b.fd is not None), None)

    def in_use(self) -> _InUse:
        """Hold this around anything that may call a backend (see ``quiesced``).

        ``async with backends.in_use():`` -- a plain class rather than an
        asynccontextmanager: it wraps every guest request, and a generator
        based context manager costs several microseconds more each time.
        """
        return self._in_use  # stateless: one per set, not one per request

    async def _enter(self) -> None:
        while self._reopened is not None:
            await self._reopened.wait()
        self._users += 1

    def _leave(self) -> None:
        self._users -= 1
        # The event exists only while a quiesce waits: every request would
        # otherwise make one each time the image turns busy (issue 10, hot path).
        if self._users == 0 and self._idle is not None:
            self._idle.set()

    @contextlib.asynccontextmanager
    async def quiesced(self):
        """Keep new I/O out and wait for running I/O, e.g. to swap descriptors."""
        while self._reopened is not None:
            await self._reopened.wait()
        self._reopened = trio.Event()
        try:
            if self._users:
                self._idle = trio.Event()
                await self._idle.wait()
                self._idle = None
            yield
        finally:
            ev, self._reopened = self._reopened, None
            ev.set()

    def close_all(self) -> None:
        backends, self._open = list(self._open.values()), {}
        for be in backends:
            be.inner.close()

    def close(self) -> None:
        self.close_all()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


@attrs.frozen
class _InUse:
    """BackendSet.in_use's context manager, made once: its enter and leave, bound."""
    enter: Callable[[], Awaitable[None]]
    leave: Callable[[], None]

    async def __aenter__(self) -> None:
        await self.enter()

    async def __aexit__(self, *exc: object) -> None:
        self.leave()
