"""What an open image asks of the data plane: one typed object, :class:`PlaneHooks`.

The image layer sits below the data plane (STYLE.md: image/ never imports
dataplane/), yet at a few named points it must let the data plane act
(../shared/DATAPLANE.md, "The mapping contract"):

- ``fast_writes``: C's count of completed fast writes through descriptors that
  are not O_DSYNC; they never pass ModeBackend.pwrite, so the BackendSet asks
  this count whether an fdatasync is owed (image/backends.py, ``unsynced``);
- ``fence_frees``: awaited before the metadata queue runs, the only place a
  deferred free is applied, so that no fast request still uses a host cluster
  being freed (dataplane/mapping.py, MappingPublisher.fence);
- ``queue_ran``: after a queue run, mappings that became durable may be
  written in place in C, and C may be lent what the reservation now holds;
- ``read_only``: corruption made the image read-only, C must serve none of it;
- ``lender``: allocation in C (dataplane/lending.py, FastAllocations): the
  image claims ranges out of C's reach and adopts C's log of allocations;
- ``flushes``: guest flushes served in C (dataplane/cflush.py, FlushInC): the
  image tells it when it takes and lets go of its write lock (C's flush gate),
  and shares the sticky fdatasync error and C's sync of fast writes with it.

Every hook has a do-nothing default, :data:`NO_HOOKS`: an image nobody serves
in C (``--dataplane off``, the tools, most tests) behaves exactly as one whose
data plane has nothing to say.

Why a connection, not a constructor argument: the catalog opens an image
before the data plane is asked to serve it (at the first open of a handle),
and the hooks the data plane builds need the open image (its engine's tables
and refcounts: MappingPublisher, FastAllocations). So the image is built with
:data:`NO_HOOKS` and the data plane connects it once, with one call,
``Image.connect_plane(hooks)``; nothing else assigns to an image from outside.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import attrs


class Lender(Protocol):
    """What the image asks of allocation in C (dataplane/lending.py, FastAllocations)."""

    def claim(self, first: int, count: int) -> int | None:
        """C allocates nothing in guest clusters [first, first+count) until :meth:`unclaim`."""

    def unclaim(self, claim: int) -> None: ...

    def logged(self) -> bool:
        """C logged allocations not adopted yet."""

    def peek_log(self) -> list[tuple[int, int]]:
        """Every (guest cluster, host offset) C logged, oldest first, kept until :meth:`drop_log`."""

    def drop_log(self, count: int) -> None: ...

    def adopted_clusters(self, vclusters: Iterable[int]) -> None:
        """These guest clusters' entries are the image's now."""

    def adopted_copies(self, count: int) -> None:
        """``count`` of them were C's copies on write: the old host clusters' frees must wait for
        every fast request dispatched so far (one may still read an old cluster)."""

    async def copies_done(self, first: int, count: int) -> None:
        """After :meth:`claim`: C's copies on write in flight in the range have completed and are
        logged (dp_cow.c), so the adoption that follows sees them."""

    def python_allocated(self) -> None:
        """The image allocated a host cluster itself: C may need a refill."""

    def allow(self, on: bool) -> None:
        """Let C allocate, or stop it (compress-on-write allocates in Python only)."""

    def take_back(self) -> None:
        """C's unused lent clusters return to the reservation (a clean close)."""

    def durable_logged(self) -> int:
        """How many of the oldest logged records C wrote into their L2 tables and synced itself."""


class Flushes(Protocol):
    """What the image asks of guest flushes served in C (dataplane/cflush.py, FlushInC)."""

    def held(self) -> None:
        """The image took its write lock: C writes no L2 entry until :meth:`released`."""

    def released(self) -> None:
        """The image lets go of its write lock: C may serve flushes again if nothing is queued."""

    def sync_error(self) -> int | None:
        """errno of a failed fdatasync of C's (sticky), or None."""

    def sync_failed(self, err: int) -> None:
        """Python's fdatasync failed: C's flushes fail from now on too."""

    def synced_writes(self) -> int | None:
        """C's fast-write count that its last good fdatasync covers (BackendSet.unsynced)."""


class NoFlushes:
    """No flush is served in C."""

    def held(self) -> None:
        pass

    def released(self) -> None:
        pass

    def sync_error(self) -> None:
        return None

    def sync_failed(self, err: int) -> None:
        pass

    def synced_writes(self) -> None:
        return None


class NoLender:
    """Nothing allocates in C: no claims, an empty log."""

    def claim(self, first: int, count: int) -> None:
        return None

    def unclaim(self, claim: int) -> None:
        pass

    def logged(self) -> bool:
        return False

    def peek_log(self) -> list[tuple[int, int]]:
        return []

    def drop_log(self, count: int) -> None:
        pass

    def adopted_clusters(self, vclusters: Iterable[int]) -> None:
        pass

    def adopted_copies(self, count: int) -> None:
        pass

    async def copies_done(self, first: int, count: int) -> None:
        pass

    def python_allocated(self) -> None:
        pass

    def allow(self, on: bool) -> None:
        pass

    def take_back(self) -> None:
        pass

    def durable_logged(self) -> int:
        return 0


def no_fast_writes() -> int:
    return 0  # constant: never differs from the count at the last sync


async def no_fence() -> None:
    pass


def nothing() -> None:
    pass


@attrs.frozen
class PlaneHooks:
    """The data plane's hooks into one image; see the module docstring for when each is called."""

    fast_writes: Callable[[], int] = no_fast_writes
    fence_frees: Callable[[], Awaitable[None]] = no_fence
    queue_ran: Callable[[], None] = nothing
    read_only: Callable[[], None] = nothing
    lender: Lender = attrs.field(factory=NoLender)
    flushes: Flushes = attrs.field(factory=NoFlushes)


#: An image no data plane serves.
NO_HOOKS = PlaneHooks()
