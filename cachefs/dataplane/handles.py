"""Which handles the data plane serves: the policy fuse/operations.py asks at open, release, resize and mode switch.

The data plane (dataplane/plane.py) is the C thread and its calls; this module
decides what it is given (../shared/DATAPLANE.md, "The mapping contract"):

- a raw image is one identity mapping; a qcow2 image's clusters are published
  from its cached L2 tables (mapping.MappingPublisher), and C allocates into
  clusters Python lends it (lending.FastAllocations, issue 14);
- per handle: the descriptor of its concrete cache mode, whether its writes
  may be fast (coherence: not while a cached and a direct handle share the
  inode, DESIGN.md section 2), and for write-through modes the twin without
  O_DSYNC that C allocates through (dp_park.c);
- the tasks that answer C's wakes for the mount's life: refills and adoption
  (:meth:`FastPaths.serve_allocations`), the syncs parked write-through
  writes wait for (:meth:`FastPaths.serve_syncs`);
- the counters ``stats`` shows, C's added to Python's;
- backing chains (issue 22): an overlay's backing images are published too,
  each once (the mount's own inode for a base it serves, one of
  :data:`BASE_INODES` for a base it does not), with the descriptor C reads
  them through, and the overlay linked to the image below it
  (:meth:`FastPaths._publish_chain`). C then serves the overlay's reads of
  unallocated clusters from the base's own published mapping.

``NoFastPaths`` is ``--dataplane off``: every request is pyfuse3's.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os

import attrs
import trio

from cachefs.dataplane.plane import HANDLE_COUNTERS
from cachefs.dataplane.cflush import FlushInC
from cachefs.dataplane.lending import FastAllocations
from cachefs.dataplane.mapping import MappingPublisher
from cachefs.dataplane.passthrough import THROUGH, Passthrough
from cachefs.errors import CachefsError
from cachefs.image.hooks import PlaneHooks
from cachefs.policy import MODES

log = logging.getLogger("cachefs.dataplane.plane")

#: C's inode numbers for backing images the mount does not serve (--backing-dir, a subdirectory):
#: from 2**63 up. The catalog numbers its images from 2 one by one, so no FUSE inode is ever one,
#: and the kernel never sends a request for them: C only reads them below an overlay.
BASE_INODES = 1 << 63


class Wake:
    """A wakeup C's callbacks may fire any number of times: :meth:`wait` returns once per burst
    of :meth:`set` calls, and a set() while the waiter works makes the next wait() return at once."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


@attrs.define
class _Published:
    inode: int
    handle: object     # fs.Handle: .image, .flags, .direct_io, .mode
    fast_write: bool = False
    mode: object = None  # the concrete mode whose descriptor C was given
    # Of C's handle counters: what is charged to a mode already, and the writes at the last flush.
    counted: list[int] = attrs.Factory(lambda: [0] * len(HANDLE_COUNTERS))
    flushed_writes: int = 0
    passthrough: str | None = None  # passthrough.THROUGH or SERVED: no page cache of the FUSE inode


class FastPaths:
    """Which handles the data plane serves, asked by fuse/operations.py at open, release, resize and mode switch.

    A raw image is one identity mapping; a qcow2 image's clusters are published
    from its cached L2 tables (mapping.MappingPublisher).
    """

    def __init__(self, plane: DataPlane, *, read_only: bool, served_inode=None) -> None:
        self.plane = plane
        self.read_only = read_only
        # image -> the mount's inode for it, or None (a base the mount does not serve): fuse/catalog.py.
        self._served_inode = served_inode or (lambda image: None)
        self._base_inodes: dict[object, int] = {}  # unserved bases -> their BASE_INODES number
        self.handles: dict[int, _Published] = {}
        self._images: dict[int, object] = {}
        # inode -> concrete mode name -> fast HANDLE_COUNTERS served through that mode's descriptor.
        self._by_mode: dict[int, dict[str, list[int]]] = {}
        self._pauses: dict[int, int] = {}  # inode -> callers inside paused()
        self.mappings: dict[int, MappingPublisher] = {}  # qcow2 images' published mappings
        self.allocations: dict[int, FastAllocations] = {}  # and their allocation in C (dataplane/lending.py)
        self.flushes: dict[int, FlushInC] = {}  # and their guest flushes served in C (dataplane/cflush.py)
        self._alloc_wake, self._sync_wake = Wake(), Wake()
        plane.on_alloc_wake = self._alloc_wake.set
        plane.on_sync_wake = self._sync_wake.set
        self._dead: set[int] = set()  # images C must not serve again (corrupt: read-only)
        self.invalidate = plane.invalidate_inode
        self.passthrough = Passthrough(plane)  # kernel passthrough (issue 24; dataplane/passthrough.py)

    def _publish_image(self, inode: int, image, depth: int = 0) -> None:
        raw = image.format == "raw"
        self.plane.publish_image(inode, size=image.size, cluster_size=image.cluster_size, identity=raw)
        log.debug("inode %d: %s, %d bytes", inode, image.format, image.size)
        # The descriptor C reads the image through when it is an overlay's backing image: its
        # default mode's, the one Python's reads of it as a base use (BackingImage.read). A switch
        # that reopens it pauses the image first (paused), and this runs again after.
        be = image.backend
        self.plane.set_reader(inode, be.fd, direct=be.direct)
        if inode not in self._images:
            self._images[inode] = image
            self._connect(inode, image)
        self._publish_chain(inode, image, depth)

    def _publish_chain(self, inode: int, image, depth: int) -> None:
        """Backing chains (issue 22): the image below ``image`` is published (the mount's inode if it
        serves it, else one of BASE_INODES) and linked, so C reads the overlay's unallocated
        clusters from it. Why C's entries of a base stay true: docs/design.md "Backing chains"."""
        backing = getattr(image, "backing", None)
        if backing is None or depth >= self.plane.chain_limit:
            self.plane.set_backing(inode, 0)  # its clusters from backing, if any, are forwarded
            return
        base = backing.image
        base_inode = self._base_inode(base)
        self._publish_image(base_inode, base, depth + 1)
        self.plane.set_backing(inode, base_inode)

    def _base_inode(self, base) -> int:
        for inode, image in self._images.items():
            if image is base:
                return inode
        served = self._served_inode(base)
        if served is not None:
            return served
        return self._base_inodes.setdefault(base, BASE_INODES + len(self._base_inodes))

    def _connect(self, inode: int, image) -> None:
        """Once per image: the hooks it calls (image/hooks.py). C's writes count for the image's
        next fdatasync; a qcow2 image's clusters are also published as its L2 tables enter the
        cache (stage 2), and C allocates into clusters it lends (dataplane/lending.py)."""
        def fast_writes() -> int:  # C's writes, and the flushes owed to passthrough writers' unseen ones
            return self.plane.unsynced_writes(inode) + self.passthrough.owed(inode)
        if image.format == "raw":
            image.connect_plane(PlaneHooks(fast_writes=fast_writes))
            return
        # C copies on write of shared clusters (dp_cow.c) in a writable image that is not
        # compress-on-write; never in a snapshot's view (read-only).
        pub = self.mappings[inode] = MappingPublisher(
            self.plane, inode, image.engine, may_cow=lambda: image.writable and not image.compress)
        allocs = self.allocations[inode] = FastAllocations(self.plane, inode, image, pub)
        flushes = self.flushes[inode] = FlushInC(self.plane, inode, image, allocs)

        def queue_ran() -> None:
            pub.settle()  # mappings that became durable may be written in place in C
            allocs.top_up()  # and C is lent what the reservation holds
        image.connect_plane(PlaneHooks(fast_writes=fast_writes, fence_frees=pub.fence, queue_ran=queue_ran,
                                       read_only=functools.partial(self._read_only, inode), lender=allocs,
                                       flushes=flushes))
        pub.republish()

    def _read_only(self, inode: int) -> None:
        """Corruption made the image read-only: C serves nothing of it from now on (forwarded,
        where Python refuses writes with EROFS and answers reads from what is still valid)."""
        self.plane.pause_image(inode, True)
        self.allocations[inode].allow(False)
        self.mappings[inode].stop()
        self._dead.add(inode)

    async def opened(self, fh: int, handle) -> str | None:
        """A handle exists: publish it before its OPEN reply reaches the kernel. Returns what kernel
        passthrough it got (dataplane/passthrough.py: THROUGH, SERVED, or None); either kind keeps no
        page cache of the FUSE inode, as a direct_io handle."""
        inode = handle.inode
        self._publish_image(inode, handle.image)
        cached = any(p.inode == inode and not p.handle.direct_io and not p.passthrough for p in self.handles.values())
        kind, backing_id = self.passthrough.decide(fh, handle, cached_open=cached, paused=inode in self._pauses)
        self.handles[fh] = _Published(inode, handle, passthrough=kind)
        await self._publish_inode(inode)
        if kind is not None:
            self.plane.handle_passthrough(fh, backing_id, served=kind != THROUGH)
        return kind

    def switch_conflict(self, inode: int, mode) -> str | None:
        """Why a live switch of ``inode`` to ``mode`` would break an open passthrough handle's promise."""
        return self.passthrough.switch_conflict(inode, mode, self._pairs())

    def _pairs(self) -> list:
        return [(fh, p.handle) for fh, p in self.handles.items()]

    def image_info(self, inode: int) -> dict[str, str]:
        return {"passthrough": self.passthrough.info(inode, self._pairs())}

    def turn_passthrough(self, inode: int, on: bool) -> None:
        """The image's next opens may pass through (on), or are served and counted here (off)."""
        if on and not self.plane.passthrough:
            raise OSError(errno.EOPNOTSUPP, f"passthrough is {self.plane.passthrough_state()}")
        self.passthrough.turn(inode, on)

    def take_wrote(self, fh: int) -> bool:
        """A fast write went through ``fh`` since the last call: its close owes a flush (fs.flush)."""
        p = self.handles.get(fh)
        if p is None:
            return False
        unseen = self.passthrough.wrote(fh, p.inode)  # a passthrough writer: the image owes a sync
        now = self.plane.handle_counters(fh)
        if not now:
            return unseen
        # A guest flush C served (dp_cflush.c) covered the writes counted when it was taken.
        flushed = max(p.flushed_writes, now[HANDLE_COUNTERS.index("writes_flushed")])
        wrote, p.flushed_writes = now[1] != flushed, now[1]
        return wrote or unseen

    def _charge(self, fh: int, p: _Published) -> None:
        """Charge the handle's fast requests since the last look to the mode it was published with."""
        now = self.plane.handle_counters(fh)
        if now is None or p.mode is None:
            return
        acc = self._by_mode.setdefault(p.inode, {}).setdefault(p.mode.name, [0] * len(HANDLE_COUNTERS))
        for i, (n, seen) in enumerate(zip(now, p.counted)):
            acc[i] += n - seen
        p.counted = now

    async def released(self, fh: int) -> None:
        p = self.handles.get(fh)
        if p is None:
            return
        self._charge(fh, p)
        del self.handles[fh]
        await self.plane.drain(self.plane.unpublish_handle(fh))
        self.passthrough.released(fh, p.inode)
        await self._publish_inode(p.inode)  # a cached handle gone: direct writes may be fast again

    async def _publish_inode(self, inode: int) -> None:
        """(Re)publish every handle on ``inode``; drain when one lost its fast writes (coherence)."""
        mine = [(fh, p) for fh, p in self.handles.items() if p.inode == inode]
        kinds = {p.handle.direct_io or p.passthrough is not None for _, p in mine}
        mixed = len(kinds) == 2  # a cached and a direct handle: Python must see the direct writes
        plan = [(fh, p, self._may_write(p, mixed)) for fh, p in mine]
        self._hold_for_write_through(inode, any(w and p.handle.mode.write_through for _, p, w in plan))
        self._allow_allocation(inode, any(w for _, _, w in plan))
        withdrawn = False
        for fh, p, fast_write in plan:
            image, mode = p.handle.image, p.handle.mode
            be = image.backends.get(mode)
            withdrawn |= p.fast_write and not fast_write
            self._charge(fh, p)
            p.fast_write, p.mode = fast_write, mode
            # Write-through allocates in C through the twin without O_DSYNC; the write is answered
            # after Python's one sync (dp_park.c, FastAllocations.sync_parked).
            batch = image.backends.batch(mode) if fast_write and mode.write_through and inode in self.allocations else None
            self.plane.publish_handle(fh, inode, be.fd, direct=be.direct, fast_write=fast_write,
                                      sync=mode.write_through, batch_fd=batch.fd if batch is not None else -1)
            # Its FSYNCs may be served in C (dataplane/cflush.py) where a flush is the queue's
            # drain and one fdatasync: writeback and none (unsafe ignores it, write-through has
            # nothing left to do). C still forwards it whenever the gate is closed.
            self.plane.handle_cflush(fh, inode in self.flushes and self.flushes[inode].enabled
                                     and mode.honour_flush and mode.queue_metadata)
            log.debug("fh %d of inode %d: fd %d (%s)%s", fh, inode, be.fd, mode.name, "" if fast_write else ", reads")
        if withdrawn:
            await self.plane.drain(self.plane.ticket())

    def _may_write(self, p: _Published, mixed: bool) -> bool:
        image = p.handle.image
        return (image.writable and not self.read_only and not mixed
                and not image.compress  # compressed in Python only
                and p.handle.flags & os.O_ACCMODE != os.O_RDONLY)

    def _hold_for_write_through(self, inode: int, write_through: bool) -> None:
        """Before a write-through handle may write in C: mappings not durable yet are published
        read-only (mapping, "Durable before writable"), those already published included."""
        pub = self.mappings.get(inode)
        if pub is None or pub.write_through == write_through:
            return
        pub.write_through = write_through
        if write_through:
            pub.republish()

    def _allow_allocation(self, inode: int, fast_writes: bool) -> None:
        """C allocates while the image has fast writes (write-through ones too, dp_park.c), is
        writable and not compress-on-write (dataplane/lending.py)."""
        allocs = self.allocations.get(inode)
        if allocs is None:
            return
        image = allocs.image
        allocs.allow(fast_writes and inode not in self._dead and image.writable and not image.compress)
        if allocs.allowed and not image.write_lock.locked():  # top_up runs under the lock, as after a queue run
            allocs.top_up()  # what the reservation holds already (a flush lends the rest)

    async def serve_allocations(self) -> None:
        """For the mount's life: when C runs short of lent clusters or its log fills, refill and adopt."""
        while True:
            await self._alloc_wake.wait()
            for allocs in list(self.allocations.values()):
                try:
                    await allocs.refill()
                except (OSError, CachefsError) as exc:  # the image's own error paths report it; the next wake retries
                    log.warning("%s: allocating for the data plane: %s", allocs.image.path, exc)

    async def serve_syncs(self) -> None:
        """For the mount's life: write-through writes C parked get their sync (group commit)."""
        while True:
            await self._sync_wake.wait()
            for allocs in list(self.allocations.values()):
                await allocs.sync_parked()

    @contextlib.asynccontextmanager
    async def paused(self, inode: int):
        """Forward the image's requests while its descriptors or size change (a live mode switch, a
        resize); then publish it again with what is there now.

        Invariant: the image stays paused in C while any caller is inside (``_pauses``): two
        appenders growing the disk, or a grow during a switch, must not resume C while the other
        is still changing what C would use.
        """
        image = self._images.get(inode)
        if image is None:
            yield
            return
        self._pauses[inode] = self._pauses.get(inode, 0) + 1
        try:
            await self.plane.drain(self.plane.pause_image(inode, True))
            yield
        finally:
            self._pauses[inode] -= 1
            if not self._pauses[inode]:
                del self._pauses[inode]
                self._publish_image(inode, image)
                if inode in self.mappings:
                    self.mappings[inode].republish()  # the size may have changed
                await self._publish_inode(inode)
                if inode not in self._pauses and inode not in self._dead:  # nobody paused it again
                    self.plane.pause_image(inode, False)

    #: Image counters that count both planes: stats key -> C counter added to it.
    FOLDED = {"guest_reads": "fast_reads", "guest_writes": "fast_writes", "guest_bytes_read": "fast_bytes_read",
              "guest_bytes_written": "fast_bytes_written", "backend_reads": "fast_reads",
              "backend_writes": "fast_writes", "backend_bytes_written": "fast_bytes_written"}

    def merge_stats(self, inode: int, stats: dict) -> dict:
        """The image's stats with C's counters added: guest_*, backend_* and the per-mode guest_writes
        and direct_bytes count both planes (a fast request is a guest request and a backend one, through
        that mode's descriptor); fast_* and forwarded are the C part."""
        for fh, p in list(self.handles.items()):
            if p.inode == inode:
                self._charge(fh, p)
        fast = self.plane.image_counters(inode)
        out = dict(stats)
        for key, part in self.FOLDED.items():
            if key in out:
                out[key] += fast[part]
        for name, (_, writes, bytes_read, bytes_written, flushes, syncs, _) in self._by_mode.get(inode, {}).items():
            out[f"{name}.guest_writes"] = out.get(f"{name}.guest_writes", 0) + writes
            if flushes or syncs:  # guest flushes served in C (dataplane/cflush.py), and their fdatasyncs
                out[f"{name}.guest_flushes"] = out.get(f"{name}.guest_flushes", 0) + flushes
                out[f"{name}.fdatasyncs"] = out.get(f"{name}.fdatasyncs", 0) + syncs
            if MODES[name].direct:  # the kernel moved them on the O_DIRECT descriptor
                out[f"{name}.direct_bytes"] = out.get(f"{name}.direct_bytes", 0) + bytes_read + bytes_written
                out["direct_bytes"] = out.get("direct_bytes", 0) + bytes_read + bytes_written
        out.update(fast)
        # Guest flushes served in C (dataplane/cflush.py) are guest flushes, their fdatasyncs backend ones.
        if "guest_flushes" in out:
            out["guest_flushes"] += fast["fast_flushes"]
            out["backend_fdatasyncs"] += fast["fast_fdatasyncs"]
            honoured = out["guest_flushes"] - sum(v for k, v in out.items() if k.endswith(".flushes_ignored"))
            out["fdatasyncs_per_flush"] = f"{out['backend_fdatasyncs'] / honoured:.3f}" if honoured else "0"
        out.update(self.passthrough.stats(inode, self._pairs()))
        pub = self.mappings.get(inode)
        if pub is not None:  # the mapping C holds: bounded by the L2 cache
            out.update(fast_map_bytes=self.plane.map_bytes(inode), fast_tables=len(pub.tables),
                       fast_fences=pub.fences, fast_held=len(pub.unsettled), fast_settled=pub.settled,
                       **self.allocations[inode].stats(), **self.flushes[inode].stats())
        return out

    def root_info(self) -> dict[str, str]:
        return {"dataplane": "on", "dataplane_counters": json.dumps(self.plane.counters()),
                "passthrough": self.plane.passthrough_state(), "transport": self.plane.transport_state(),
                "init": json.dumps(self.plane.init_info())}


class NoFastPaths:
    """``--dataplane off``: every request is pyfuse3's, as before."""

    invalidate = None

    async def opened(self, fh: int, handle) -> None:
        return None

    def switch_conflict(self, inode: int, mode) -> None:
        return None

    def image_info(self, inode: int) -> dict[str, str]:
        return {"passthrough": "off: --dataplane off"}

    def turn_passthrough(self, inode: int, on: bool) -> None:
        if on:
            raise OSError(errno.EOPNOTSUPP, "passthrough is off: --dataplane off")

    async def released(self, fh: int) -> None:
        pass

    def take_wrote(self, fh: int) -> bool:
        return False

    @contextlib.asynccontextmanager
    async def paused(self, inode: int):
        yield

    def merge_stats(self, inode: int, stats: dict) -> dict:
        return stats

    def root_info(self) -> dict[str, str]:
        return {"dataplane": "off", "passthrough": "off: --dataplane off",
                "transport": "dev: --dataplane off (pyfuse3 reads /dev/fuse itself)"}
