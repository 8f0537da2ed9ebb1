"""QEMU's cache modes as policy objects (docs/cache-modes.md; seeds 000-002).

A mode is three independent answers, and every other layer asks the mode
instead of branching on its name (STYLE.md habit 3):

- ``direct``: the backend is opened O_DIRECT and the guest's file handles are
  opened ``direct_io``, so no page cache holds guest data anywhere on the
  host (seed 000: a cache that can go stale under you is worse than none).
- ``write_through``: every write is on stable storage before it is
  acknowledged. The backend is opened O_DSYNC, so each completed pwrite is
  durable by itself, and the qcow2 metadata a write changed is written out
  before the write returns: it is never queued (seed 002, Kevin Wolf: "we
  need to disable the queueing for cache=writethrough").
- ``honour_flush``: a guest flush makes everything acknowledged so far
  durable. Only ``unsafe`` says no (seed 001: scratch disks, ~25% faster).

Kevin Wolf's point in seed 002 is that these are separate dimensions:
``none`` and ``writeback`` give the guest the same integrity (a volatile
write cache it must flush); they differ only in whether the host's page
cache is used.

``auto`` is not a fourth answer but a rule for picking a mode per open from
the opener's flags, so QEMU's own ``cache=none`` (which opens O_DIRECT) gets
``none`` and ``cat`` gets ``writeback`` on the same mount.
"""

from __future__ import annotations

import os

import attrs


@attrs.frozen
class CacheMode:
    name: str
    direct: bool
    write_through: bool
    honour_flush: bool
    summary: str

    @property
    def queue_metadata(self) -> bool:
        """Whether qcow2 metadata may stay dirty in memory after a write is acknowledged."""
        return not self.write_through

    @property
    def default(self) -> CacheMode:
        """The concrete mode for image-level work (open, switch, unmount)."""
        return self

    def for_open(self, flags: int) -> CacheMode:
        """The concrete mode for one open of the guest file with these open(2) flags."""
        return self


WRITEBACK = CacheMode("writeback", direct=False, write_through=False, honour_flush=True,
                      summary="host page cache; a guest flush makes everything durable")
WRITETHROUGH = CacheMode("writethrough", direct=False, write_through=True, honour_flush=True,
                         summary="host page cache for reads; every write durable before it is acknowledged")
NONE = CacheMode("none", direct=True, write_through=False, honour_flush=True,
                 summary="O_DIRECT, no host page cache; a guest flush makes everything durable")
DIRECTSYNC = CacheMode("directsync", direct=True, write_through=True, honour_flush=True,
                       summary="O_DIRECT and every write durable before it is acknowledged")
UNSAFE = CacheMode("unsafe", direct=False, write_through=False, honour_flush=False,
                   summary="host page cache; guest flushes ignored (a clean unmount still writes everything)")

_BY_FLAGS = {(m.direct, m.write_through): m for m in (WRITEBACK, WRITETHROUGH, NONE, DIRECTSYNC)}


@attrs.frozen
class AutoMode:
    """Pick the mode per open: O_DIRECT -> none, O_DSYNC/O_SYNC -> writethrough, both -> directsync."""

    name: str = "auto"
    summary: str = "per open, from the opener's O_DIRECT / O_DSYNC / O_SYNC flags"

    @property
    def default(self) -> CacheMode:
        return WRITEBACK

    def for_open(self, flags: int) -> CacheMode:
        # O_SYNC is O_DSYNC plus a bit on Linux, so one test covers both.
        return _BY_FLAGS[(bool(flags & os.O_DIRECT), bool(flags & os.O_DSYNC))]


AUTO = AutoMode()

Mode = CacheMode | AutoMode

MODES: dict[str, Mode] = {m.name: m for m in (WRITEBACK, WRITETHROUGH, NONE, DIRECTSYNC, UNSAFE, AUTO)}


def mode_named(name: str) -> Mode:
    """The mode called ``name``; ValueError naming the choices otherwise."""
    try:
        return MODES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown cache mode {name!r}; choose one of {', '.join(MODES)}") from None
