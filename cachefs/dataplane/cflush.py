"""Guest flushes served in C: Python's half (issue 24; docs/design.md "Guest flushes served in C").

C serves a guest FSYNC itself when every change since the last flush is its own
allocations into L2 tables already on disk (cachefs/native/dp_cflush.c): it
writes those L2 entries and issues the one fdatasync. This module decides when
it may, per qcow2 image, and keeps C's view of what it may write true:

- **the gate.** Closed whenever the image takes its write lock (every change
  and every write of metadata happens under it; Qcow2Image.write_lock calls
  :meth:`FlushInC.held`). C's entry writes run under dp->lock, so once the
  gate call returned none is under way, and Python adopts C's log (entries C
  wrote included) before it writes any L2 page: it never writes a page older
  than C's over it. Opened again on release (:meth:`FlushInC.released`) only
  when the metadata queue holds nothing: nothing dirty, nothing written and
  unsynced, no free pending. Then every lent cluster's refcount raise is
  durable (invariant 1), and every write Python served, data and metadata, was
  covered by a completed sync.
- **the tables C may write** (``dp_cflush_table``): at each opening, every
  cached L2 table that is on disk and synced (not new, clean) and owned (L1
  COPIED: a shared table is copied on write, never written in place), at its
  host offset. A table leaving the cache is taken back at once.
- **what C made durable**: the oldest log records whose entries C wrote and
  synced are adopted without dirtying their tables (Engine.adopt ``durable``);
  C's fast writes covered by its last good fdatasync are not owed another
  (BackendSet.unsynced); a failed fdatasync, C's or Python's, is sticky for
  both.
- **reserving ahead**: with few lent clusters left, C forwards the flush, so
  Python's flush raises the next reservation's refcounts in its one sync
  (metaqueue.prepare_flush) and lends them.

``CACHEFS_CFLUSH=off`` in the daemon's environment keeps every flush in Python.
"""

from __future__ import annotations

import errno
import logging
import os

from cachefs.qcow2 import format as fmt

log = logging.getLogger("cachefs.dataplane.plane")

#: Off switch (tests compare, and a safe point to fall back to): ``CACHEFS_CFLUSH=off``.
ENABLED = os.environ.get("CACHEFS_CFLUSH", "on") != "off"
#: What a flush reserves at the least while flushes are served in C (MetaQueue.reserve_at_least):
#: C forwards a flush once its lent clusters run low, and a reservation of one interval's worth
#: would make every other flush Python's. Unused reserved clusters are leaks only after a crash
#: (the dirty bit repairs them at the next open); a clean close gives them back.
RESERVE_BYTES = 32 << 20

#: Tests only (tests/test_powercut_daemon.py, sabotage): ``skip-sync`` makes C answer its flushes
#: without the fdatasync, which the power-cut judge must catch.
TESTHOOK = os.environ.get("CACHEFS_CFLUSH_TESTHOOK", "")


class FlushInC:
    """One qcow2 image's flushes in C; see the module docstring."""

    def __init__(self, plane, inode: int, image, allocs) -> None:
        self.plane = plane
        self.inode = inode
        self.image = image
        self.allocs = allocs
        self.engine = image.engine
        self.per_table = self.engine.map.l2_entries
        self._open = False
        self._tables: dict[int, int] = {}  # L2 table index -> host offset C was given
        self._ntables = 0
        self.enabled = ENABLED and image.writable
        self.opened = 0  # counters, for stats and tests
        if self.enabled:
            self.engine.cache.listeners.append(self)
            self.engine.queue.reserve_at_least(RESERVE_BYTES)
        if self.enabled and TESTHOOK == "skip-sync":
            log.warning("%s: CACHEFS_CFLUSH_TESTHOOK=skip-sync: flushes in C skip their fdatasync", image.path)
            plane.cflush_testhook(inode, True)

    # ------------------------------------------------------------ the gate

    def held(self) -> None:
        """The image took its write lock: C writes no L2 entry until released()."""
        if self._open:
            self._open = False
            self.plane.cflush_gate(self.inode, False, 0)

    def released(self) -> None:
        """The image lets go of its write lock: open the gate if nothing is queued."""
        if not self.enabled or not self.allocs.allowed or not self._may_open():
            return
        try:
            self._publish_tables()
        except OSError as exc:  # C refused (image withdrawn): stays closed, Python serves flushes
            log.debug("%s: no flushes in C: %s", self.image.path, exc)
            return
        self.plane.cflush_gate(self.inode, True, 2 * self.allocs.low_water)
        self._open = True
        self.opened += 1

    def _may_open(self) -> bool:
        img = self.image
        return (img.writable and img.sync_error is None and not img.compress
                and not self.engine.queue.dirty and self.plane.alive)

    def _publish_tables(self) -> None:
        """C may write entries into every cached, synced, owned L2 table."""
        need = -(-self.engine.size // self.engine.cs // self.per_table)
        if need > self._ntables:  # first opening, or the disk grew: C's table of tables too
            self.plane.cflush_setup(self.inode, self.per_table.bit_length() - 1, need)
            self._ntables, self._tables = need, {}
        l1 = self.engine.map.l1
        now = {}
        for table in self.engine.cache.values():
            i = table.l1_index
            if (table.kind == "l2" and 0 <= i < min(len(l1), self._ntables) and table.durable
                    and not table.new and l1[i] & fmt.L1_COPIED and l1[i] & fmt.OFFSET_MASK == table.offset):
                now[i] = table.offset
        for i in self._tables.keys() - now.keys():
            self.plane.cflush_table(self.inode, i, 0)
        for i, off in now.items():
            if self._tables.get(i) != off:
                self.plane.cflush_table(self.inode, i, off)
        self._tables = now

    # ------------------------------------------------------------ the table cache

    def entered(self, table) -> None:
        pass  # published at the next opening, once it is known to be synced

    def left(self, table) -> None:
        if self._tables.get(table.l1_index) == table.offset:
            del self._tables[table.l1_index]
            self.plane.cflush_table(self.inode, table.l1_index, 0)

    # ------------------------------------------------------------ what C made durable

    def durable_logged(self) -> int:
        return self.plane.cflush_status(self.inode)[0] if self.enabled and self.plane.alive else 0

    def sync_error(self) -> int | None:
        if not self.enabled or not self.plane.alive:
            return None
        err = self.plane.cflush_status(self.inode)[1]
        return -err if err else None

    def sync_failed(self, err: int) -> None:
        if self.enabled and self.plane.alive:
            self.plane.cflush_fail(self.inode, -(err or errno.EIO))

    def synced_writes(self) -> int | None:
        return self.plane.cflush_status(self.inode)[2] if self.enabled and self.plane.alive else None

    def stats(self) -> dict:
        return {"fast_flush_tables": len(self._tables), "fast_flush_gate_opened": self.opened}
