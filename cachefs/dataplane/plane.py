"""The Python side of the data plane: start and stop it, publish, unpublish, drain, count.

The data plane (cachefs/native/dp_*.c) is one C thread that owns ``/dev/fuse``.
It serves the READs and WRITEs of published handles whose whole range maps, on
io_uring, and forwards every other request unchanged to libfuse (pyfuse3, the
control plane) over a socketpair. This module is the contract between the two
halves (../shared/DATAPLANE.md, "The mapping contract"); it imports the native
module and never pyfuse3.

What it owns, and why:

- ``DataPlane``: the C object's lifecycle (create, start, stop reading, quit),
  the wakeups the C thread sends (an eventfd trio awaits), and the calls that
  publish images and handles.
- its calls for allocation in C (``alloc_*``, ``sync_*``; dataplane/lending.py, dp_alloc.c, dp_park.c).

The policy of what C is given, per handle and image, is dataplane/handles.py.

The invariant (DATAPLANE.md): C never uses a descriptor or a mapping Python
has taken back. So whatever changes them (closing a handle, a live mode
switch that reopens the descriptors, a resize) first unpublishes, then
*drains*: waits until every fast request dispatched before the unpublish has
completed (a ticket: the C dispatch count at that moment). Only then does the
change take effect.

Coherence (DESIGN.md section 2): while a cached (page cache) and a direct_io
handle are open on one inode, the direct handle's writes are forwarded, so
Python's invalidation of the cached pages keeps working; reads stay fast.

Durability: a fast write never passes ``ModeBackend.pwrite``, which is what
marks a backend ``unsynced``. The image's BackendSet gets ``fast_writes``, C's
count of completed fast writes through descriptors that are not O_DSYNC, and
its sync decision compares it with the count at the last fdatasync. C answers
a write only once the backend write completed, so a flush the kernel sends
after that answer sees it counted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket

import attrs
import trio

from cachefs import native
from cachefs.backend import ALIGN
from cachefs.dataplane.transport import Transport
from cachefs.errors import CachefsError

log = logging.getLogger("cachefs.dataplane.plane")

#: What the C thread may have in flight on the kernel's side (the INIT reply's
#: max_background; congestion at 3/4, the kernel's own ratio).
MAX_BACKGROUND = 64
#: Socket send buffer asked for on both ends of the socketpair: a forwarded
#: 1 MiB WRITE and a 1 MiB READ reply are single messages (a unix datagram
#: longer than sk_sndbuf - 32 is refused with EMSGSIZE).
SOCKET_BUFFER = 16 << 20
SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>: beyond wmem_max, for root

#: dp_image_counters()'s order, with the names they get in stats: C's own (dp_names.c).
IMAGE_COUNTERS = native.IMAGE_COUNTERS
HANDLE_COUNTERS = native.HANDLE_COUNTERS  # dp_handle_counters()
CONNECTION_COUNTERS = native.CONNECTION_COUNTERS  # dp_counters()


@attrs.frozen
class DirectRequest:
    """A request C handed to Python as it copied it (struct dp_pyreq): ``mode`` is fallocate's mode
    or lseek's whence."""

    unique: int
    opcode: int
    fh: int
    offset: int
    length: int
    mode: int
    pid: int


class DataPlaneUnavailable(CachefsError):
    """``--dataplane on`` cannot run here; the message is one line saying why."""

    errno = errno.ENOSYS


def why_unavailable() -> str | None:
    """None when the module has the data plane; else why not (io_uring itself is known only by trying)."""
    if native.lib is None:
        return f"the native module is not built ({native.unavailable_reason()})"
    if not native.lib.dp_built():
        return "cachefs.native was built without liburing (install liburing-dev and rebuild it)"
    return None


def _socketpair() -> tuple[socket.socket, socket.socket, int]:
    """SOCK_SEQPACKET keeps each request and reply one message: libfuse reads one per read(2)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (ours, theirs):
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER)
        except PermissionError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)  # capped at wmem_max
    # The kernel reports the doubled value it compares with; keep a margin for its header.
    limit = min(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) for s in (ours, theirs)) - 64
    return ours, theirs, limit


class DataPlane:
    """One C data-plane thread over one mounted ``/dev/fuse`` descriptor.

    Lifecycle: ``DataPlane()`` (refused in one line when io_uring is, before
    anything is mounted), ``libfuse_fd`` to pyfuse3.init as ``/dev/fd/N``,
    ``start(fuse_fd)`` once mounted, ``serve()``
    as a task for the mount's life, ``stop()`` (SIGTERM), ``finish()`` after
    pyfuse3's loop has returned, ``close()`` once every image is closed.
    """

    def __init__(self, *, max_background: int = MAX_BACKGROUND, passthrough: bool = True,
                 transport: Transport = Transport(False, "not asked for")) -> None:
        why = why_unavailable()
        if why is not None:
            raise DataPlaneUnavailable(f"--dataplane on is not available: {why}; use --dataplane off")
        ffi, lib = native.ffi, native.lib
        ours, theirs, limit = _socketpair()
        evt = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        out = ffi.new("struct dp **")
        rc = lib.dp_create(ours.fileno(), evt, max_background, limit, out)
        if rc < 0:
            ours.close()
            theirs.close()
            os.close(evt)
            why = ("the kernel could not allocate the ring's memory for 2 s (memory is short)" if rc == -errno.ENOMEM
                   else "io_uring is disabled here (sysctl kernel.io_uring_disabled, or a seccomp filter)")
            raise DataPlaneUnavailable(
                f"--dataplane on is not available: io_uring_setup failed ({os.strerror(-rc)}): {why}; "
                "use --dataplane off")
        self._dp = out[0]
        lib.dp_passthrough_want(self._dp, int(passthrough))  # taken at INIT if the kernel offers it
        self._passthrough_wanted = passthrough
        self._uring_why_not = transport.why_not
        if transport.uring:
            self._want_uring()
        self._uring_logged = False
        self._sock = ours
        self._evt = evt
        #: libfuse's end; fuse_session_destroy (pyfuse3.close) closes it.
        self.libfuse_fd = theirs.detach()
        self._changed = trio.Event()
        self._last_counters: dict[int, list[int]] = {}
        self.lost = False  # the kernel ended the connection (unmount)
        self._cflush_buf = native.ffi.new("uint64_t[3]")
        self._status_buf = ffi.new("uint64_t[2]")
        self.on_alloc_wake = None  # FastPaths: C's lent clusters run low or its log fills
        self.on_sync_wake = None  # FastPaths: write-through writes wait for a sync (dp_park.c)

    # -------------------------------------------------------------- lifecycle

    def start(self, fuse_fd: int) -> None:
        """Serve the mounted ``/dev/fuse`` descriptor (non-blocking; the caller keeps it open)."""
        rc = native.lib.dp_start(self._dp, fuse_fd)
        if rc < 0:
            raise OSError(-rc, f"data plane thread: {os.strerror(-rc)}")

    def state(self) -> int:
        return native.lib.dp_state(self._dp) if self._dp is not None else native.lib.DP_ST_EXITED

    async def serve(self, on_lost) -> None:
        """For the mount's life: wake drains, and call ``on_lost()`` once the kernel ended the connection."""
        lib = native.lib
        while True:
            await trio.lowlevel.wait_readable(self._evt)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._evt)
            changed, self._changed = self._changed, trio.Event()
            changed.set()
            if lib.dp_alloc_woken(self._dp) and self.on_alloc_wake is not None:
                self.on_alloc_wake()
            if lib.dp_sync_woken(self._dp) and self.on_sync_wake is not None:
                self.on_sync_wake()
            state = self.state()
            if state & lib.DP_ST_URING and not self._uring_logged:
                self._uring_logged = True
                log.info("transport: %s", self.transport_state())
            if state & lib.DP_ST_DEAD and not self.lost:
                self.lost = True
                log.info("the kernel ended the FUSE connection")
                on_lost()
            if state & lib.DP_ST_EXITED:
                return

    async def _until(self, bits: int) -> None:
        while not self.state() & bits:
            changed = self._changed
            with trio.move_on_after(0.1):  # serve() wakes us; the timeout only guards its absence
                await changed.wait()

    async def stop(self) -> None:
        """Stop reading /dev/fuse and wait for the fast requests in flight (SIGTERM)."""
        native.lib.dp_request(self._dp, native.lib.DP_STOP_READING)
        await self._until(native.lib.DP_ST_STOPPED)

    async def finish(self) -> None:
        """After pyfuse3's loop returned: relay its last replies, end the thread, join it."""
        if self._dp is None:
            return
        native.lib.dp_request(self._dp, native.lib.DP_QUIT)
        rc = await trio.to_thread.run_sync(native.lib.dp_join, self._dp)
        if rc < 0:
            log.error("data plane thread join: %s", os.strerror(-rc))

    def close(self) -> None:
        """Free the C side (after ``finish``); counters read afterwards are the last ones seen."""
        if self._dp is None:
            return
        for ino in list(self._last_counters):
            self.image_counters(ino)
        native.lib.dp_destroy(self._dp)
        self._dp = None
        self._sock.close()
        os.close(self._evt)

    # -------------------------------------------------------------- publishing

    def publish_image(self, ino: int, *, size: int, cluster_size: int = 512, identity: bool) -> None:
        """An image's guest size and layout; a raw image is one identity mapping."""
        self._check(native.lib.dp_image_publish(self._dp, ino, size, cluster_size.bit_length() - 1, int(identity)))
        self._last_counters.setdefault(ino, [0] * len(IMAGE_COUNTERS))

    def pause_image(self, ino: int, paused: bool) -> int:
        """Forward every request of the image (True) or serve again; returns a drain ticket."""
        self._check(native.lib.dp_image_pause(self._dp, ino, int(paused)))
        return self.ticket()

    @staticmethod
    def map_states() -> tuple[int, int, int, int]:
        """The low bits of a published entry (dp_abi.h): writable, read-only, reads as zeros, and
        the flag that lets C allocate a zeros entry (dp_alloc.c)."""
        lib = native.lib
        return lib.DP_MAP_WRITABLE, lib.DP_MAP_READONLY, lib.DP_MAP_ZERO, lib.DP_MAP_ALLOC

    @staticmethod
    def cow_state() -> int:
        """The flag on a shared data cluster's read-only entry that lets C copy on write (dp_abi.h
        DP_MAP_COW, dp_cow.c)."""
        return native.lib.DP_MAP_COW

    @staticmethod
    def backing_state() -> int:
        """An overlay's unallocated cluster (dp_abi.h DP_MAP_BACKING): C reads the backing chain."""
        return native.lib.DP_MAP_BACKING

    def map_tables(self, ino: int, table_bits: int, first: int, entries: list[int]) -> None:
        """The entry of every cluster of L2 tables [first, first + len(entries)) that has no entry of its
        own (its L1 entry points at no table); 0 takes it back (dp_map_tables)."""
        if entries:
            self._check(native.lib.dp_map_tables(self._dp, ino, table_bits, first, len(entries),
                                                 native.ffi.new("uint64_t[]", entries)))

    def set_backing(self, ino: int, backing_ino: int) -> None:
        """``ino``'s DP_MAP_BACKING clusters read from image ``backing_ino`` (0: forwarded)."""
        self._check(native.lib.dp_image_backing(self._dp, ino, backing_ino))

    def set_reader(self, ino: int, fd: int, *, direct: bool) -> None:
        """The descriptor C reads ``ino`` through as an overlay's backing image (-1: none)."""
        self._check(native.lib.dp_image_reader(self._dp, ino, fd, ALIGN if direct else 1))

    def map_clusters(self, ino: int, first: int, entries: list[int]) -> None:
        """Publish guest clusters [first, first + len(entries)): each ``host_offset | DP_MAP_*`` state."""
        if entries:
            self._check(native.lib.dp_map_clusters(self._dp, ino, first, len(entries),
                                                   native.ffi.new("uint64_t[]", entries)))

    def unmap_clusters(self, ino: int, first: int, count: int) -> None:
        """Take clusters back: their next request is forwarded (drain before changing what they mapped)."""
        self._check(native.lib.dp_unmap_clusters(self._dp, ino, first, count))

    def map_bytes(self, ino: int) -> int:
        """Memory C holds for the image's published mapping."""
        return native.lib.dp_image_map_bytes(self._dp, ino) if self._dp is not None else 0

    def publish_handle(self, fh: int, ino: int, fd: int, *, direct: bool, fast_write: bool, sync: bool,
                       batch_fd: int = -1) -> None:
        """``batch_fd``: a write-through handle's twin without O_DSYNC, for the writes that wait for a
        sync anyway (an allocating write, dp_park.c); -1: none."""
        self._check(native.lib.dp_handle_publish(self._dp, fh, ino, fd, ALIGN if direct else 1, int(fast_write),
                                                 int(sync), batch_fd))

    def unpublish_handle(self, fh: int) -> int:
        """The handle's next request is forwarded; returns a drain ticket."""
        native.lib.dp_handle_unpublish(self._dp, fh)
        return self.ticket()

    def handle_counters(self, fh: int) -> list[int] | None:
        """C's counts of a published handle's fast requests (HANDLE_COUNTERS), at dispatch."""
        out = native.ffi.new("uint64_t[]", len(HANDLE_COUNTERS))
        if self._dp is None or native.lib.dp_handle_counters(self._dp, fh, out, len(HANDLE_COUNTERS)) < 0:
            return None
        return list(out)

    def ticket(self) -> int:
        return native.lib.dp_ticket(self._dp)

    async def drain(self, ticket: int) -> None:
        """Wait until every fast request dispatched up to ``ticket`` has completed."""
        lib, dp = native.lib, self._dp
        if dp is None or lib.dp_drained(dp, ticket):
            return
        lib.dp_waiting(dp, 1)
        try:
            while True:
                changed = self._changed
                if lib.dp_drained(dp, ticket):
                    return
                with trio.move_on_after(0.1):
                    await changed.wait()
        finally:
            lib.dp_waiting(dp, -1)

    # -------------------------------------------------------------- allocation in C (dataplane/lending.py)

    @property
    def alive(self) -> bool:
        return self._dp is not None

    alloc_capacity = property(lambda self: native.lib.DP_SPARE)  # lent clusters one image holds at most
    chain_limit = property(lambda self: native.lib.DP_MAXCHAIN)  # backing images C follows down at most

    def alloc_set(self, ino: int, on: bool, low_water: int) -> None:
        self._check(native.lib.dp_alloc_set(self._dp, ino, int(on), low_water))

    def alloc_give(self, ino: int, hosts: list[int]) -> int:
        """Lend host clusters (offsets); returns how many C took."""
        rc = native.lib.dp_alloc_give(self._dp, ino, native.ffi.new("uint64_t[]", hosts), len(hosts))
        self._check(rc)
        return rc

    def alloc_take_spares(self, ino: int) -> list[int]:
        out = native.ffi.new("uint64_t[]", native.lib.DP_SPARE)
        n = native.lib.dp_alloc_take_spares(self._dp, ino, out, native.lib.DP_SPARE)
        self._check(n)
        return list(out[0:n])

    def alloc_peek_log(self, ino: int) -> list[tuple[int, int]]:
        """Every (guest cluster, host offset) logged, oldest first; C keeps them (alloc_drop_log)."""
        lib = native.lib
        logged = self.alloc_status(ino)[1]  # usually none: no 64 KiB buffer for nothing
        if not logged:
            return []
        out = native.ffi.new("uint64_t[]", 2 * logged)
        n = lib.dp_alloc_peek_log(self._dp, ino, out, logged)
        self._check(n)
        flat = list(out[0:2 * n])
        return list(zip(flat[0::2], flat[1::2]))

    def alloc_drop_log(self, ino: int, count: int) -> None:
        self._check(native.lib.dp_alloc_drop_log(self._dp, ino, count))

    def alloc_claim(self, ino: int, first: int, count: int) -> int:
        rc = native.lib.dp_alloc_claim(self._dp, ino, first, count)
        self._check(rc)
        return rc

    def cow_inflight(self, ino: int, first: int, count: int) -> int:
        """C's copies on write in flight in guest clusters [first, first+count) (dp_cow.c)."""
        rc = native.lib.dp_cow_inflight(self._dp, ino, first, count)
        self._check(rc)
        return rc

    def alloc_unclaim(self, ino: int, claim: int) -> None:
        native.lib.dp_alloc_unclaim(self._dp, ino, claim)

    def sync_ticket(self, ino: int) -> int:
        """The image's last parked write-through write (0: none waits); a sync started now covers it."""
        return native.lib.dp_sync_ticket(self._dp, ino)

    def sync_release(self, ino: int, ticket: int, err: int) -> None:
        """The sync for ``ticket`` ended with ``err`` (0 or -errno): C answers those writes."""
        native.lib.dp_sync_release(self._dp, ino, ticket, err)

    def alloc_status(self, ino: int) -> tuple[int, int]:
        out = self._status_buf
        self._check(native.lib.dp_alloc_status(self._dp, ino, out))
        return out[0], out[1]

    # Guest flushes served in C (dp_cflush.c; dataplane/cflush.py). Called with the image's write
    # lock taken or let go: they never raise (an image withdrawn from C just keeps Python's path).

    def cflush_setup(self, ino: int, table_bits: int, ntables: int) -> None:
        """C may serve the image's flushes: its L2 tables' size (dp_cflush.c)."""
        self._check(native.lib.dp_cflush_setup(self._dp, ino, table_bits, ntables))

    def cflush_gate(self, ino: int, open_: bool, min_spare: int) -> None:
        if self._dp is not None:
            native.lib.dp_cflush_gate(self._dp, ino, int(open_), min_spare)

    def cflush_table(self, ino: int, index: int, offset: int) -> None:
        if self._dp is not None:
            native.lib.dp_cflush_table(self._dp, ino, index, offset)

    def cflush_status(self, ino: int) -> tuple[int, int, int]:
        """(log records C made durable, its sticky -errno or 0, fast writes its last sync covers)."""
        out = self._cflush_buf
        if self._dp is None or native.lib.dp_cflush_status(self._dp, ino, out) < 0:
            return 0, 0, 0
        err = out[1] - (1 << 64) if out[1] >= 1 << 63 else out[1]
        return out[0], err, out[2]

    def cflush_fail(self, ino: int, err: int) -> None:
        if self._dp is not None:
            native.lib.dp_cflush_fail(self._dp, ino, err)

    def cflush_testhook(self, ino: int, skip_sync: bool) -> None:
        self._check(native.lib.dp_cflush_testhook(self._dp, ino, int(skip_sync)))

    def handle_cflush(self, fh: int, on: bool) -> None:
        native.lib.dp_handle_cflush(self._dp, fh, int(on))

    @staticmethod
    def _check(rc: int) -> None:
        if rc < 0:
            raise OSError(-rc, f"data plane: {os.strerror(-rc)}")

    # -------------------------------------------------------------- counters

    def image_counters(self, ino: int) -> dict[str, int]:
        """C's counters of one image (zeros for an image never published)."""
        last = self._last_counters.get(ino)
        if self._dp is not None and last is not None:
            out = native.ffi.new("uint64_t[]", len(IMAGE_COUNTERS))
            if native.lib.dp_image_counters(self._dp, ino, out, len(IMAGE_COUNTERS)) == 0:
                last[:] = list(out)
        return dict(zip(IMAGE_COUNTERS, last or [0] * len(IMAGE_COUNTERS)))

    def unsynced_writes(self, ino: int) -> int:
        return self.image_counters(ino)["fast_unsynced_writes"]

    def counters(self) -> dict[str, int]:
        if self._dp is None:
            return {}
        out = native.ffi.new("uint64_t[]", len(CONNECTION_COUNTERS))
        native.lib.dp_counters(self._dp, out, len(CONNECTION_COUNTERS))
        return dict(zip(CONNECTION_COUNTERS, out))

    # -------------------------------------------------------------- notifications

    def invalidate_inode(self, ino: int) -> None:
        """Drop the kernel's cached pages of ``ino``; blocks until it has (call it from a worker thread).

        Written to /dev/fuse by the calling thread, not through libfuse: a
        notification through the socket would be written asynchronously by
        the C thread, and the reply that follows could overtake it.
        """
        if self._dp is None:
            return
        rc = native.lib.dp_notify_inval_inode(self._dp, ino, 0, 0)
        if rc < 0 and rc not in (-errno.ENOENT, -errno.ENODEV):
            log.debug("invalidate_inode(%d): %s", ino, os.strerror(-rc))

    # -------------------------------------------------------------- kernel passthrough (dp_passthrough.c)

    @property
    def passthrough(self) -> bool:
        """INIT took FUSE_PASSTHROUGH: OPEN replies may pass handles through to the kernel."""
        return self._dp is not None and bool(native.lib.dp_passthrough(self._dp) & native.lib.DP_PT_ON)

    def passthrough_state(self) -> str:
        """One line for the root's ``passthrough`` xattr: on, or off and why."""
        lib = native.lib
        bits = lib.dp_passthrough(self._dp) if self._dp is not None else 0
        if bits & lib.DP_PT_ON:
            return "on"
        if not self._passthrough_wanted:
            return "off: --passthrough off"
        if self._dp is None or not lib.dp_state(self._dp) & lib.DP_ST_INIT_DONE:
            return "off: not negotiated yet"
        if bits & lib.DP_PT_WBCACHE:
            return "off: the kernel refuses it beside the writeback cache"
        return ("off: the kernel did not offer it at INIT (Linux 6.9 or later with "
                "CONFIG_FUSE_PASSTHROUGH, and CAP_SYS_ADMIN)")

    # -------------------------------------------------------------- transport and INIT (dp_uring.c)

    def _want_uring(self) -> None:
        """The ring made again with 128-byte SQEs, taken at INIT if the kernel offers it; else why not."""
        lib = native.lib
        rc = lib.dp_uring_want(self._dp, 1)
        test_payload = os.environ.get("CACHEFS_TEST_URING_PAYLOAD")  # tests: a refused registration
        if rc == 0 and test_payload and hasattr(lib, "dp_test_uring_payload"):
            lib.dp_test_uring_payload(self._dp, int(test_payload))
        if rc == -errno.E2BIG:
            self._uring_why_not = "more possible CPUs than the ring has entries for (4 each at least)"
        elif rc < 0:
            self._uring_why_not = f"the io_uring of 128-byte SQEs it needs was refused ({os.strerror(-rc)})"
        if rc < 0:
            log.info("FUSE over io_uring: %s; serving over /dev/fuse", self._uring_why_not)

    def transport_state(self) -> str:
        """One line for the root's ``transport`` xattr: uring or dev, and why."""
        lib = native.lib
        bits = lib.dp_uring(self._dp) if self._dp is not None else 0
        info = self.init_info()
        if bits & lib.DP_UR_REGISTERED:
            return f"uring: {info['queues']} queues of {info['depth']} entries"
        if bits & lib.DP_UR_FAILED:
            return (f"dev: the kernel refused the ring's registration "
                    f"({os.strerror(info['uring_error']) if info['uring_error'] else 'unknown error'})")
        if not bits & lib.DP_UR_WANTED:
            return f"dev: {self._uring_why_not}"
        if self._dp is None or not lib.dp_state(self._dp) & lib.DP_ST_INIT_DONE:
            return "dev: not negotiated yet"
        if not bits & lib.DP_UR_OFFERED:
            return "dev: the kernel did not offer FUSE_OVER_IO_URING at INIT"
        return "dev: registering the ring"

    def init_info(self) -> dict[str, int]:
        """What INIT negotiated (flags as the kernel offered them and as the reply took them: flags2 in
        the high 32 bits), and the ring's shape (queues, entries per queue, a registration's errno)."""
        names = ("kernel_flags", "flags", "max_write", "max_pages", "max_background", "congestion_threshold",
                 "queues", "depth", "uring_error")
        out = native.ffi.new("uint64_t[]", len(names))
        if self._dp is not None:
            native.lib.dp_init_info(self._dp, out, len(names))
        info = dict(zip(names, out))
        info["async_dio"] = int(bool(info["flags"] & (1 << 15)))  # FUSE_ASYNC_DIO
        return info

    def backing_open(self, fd: int) -> int:
        """A backing id for the file ``fd`` holds (FUSE_DEV_IOC_BACKING_OPEN); OSError if refused."""
        rc = native.lib.dp_backing_open(self._dp, fd)
        if rc < 0:
            raise OSError(-rc, f"FUSE_DEV_IOC_BACKING_OPEN: {os.strerror(-rc)}")
        return rc

    def backing_close(self, backing_id: int) -> None:
        if self._dp is not None:
            rc = native.lib.dp_backing_close(self._dp, backing_id)
            if rc < 0:
                log.debug("FUSE_DEV_IOC_BACKING_CLOSE %d: %s", backing_id, os.strerror(-rc))

    def handle_passthrough(self, fh: int, backing_id: int, *, served: bool) -> None:
        """The published handle's OPEN reply carries FOPEN_PASSTHROUGH and ``backing_id``; ``served``:
        FOPEN_DIRECT_IO too, so its reads and writes still come to the daemon."""
        self._check(native.lib.dp_handle_passthrough(self._dp, fh, backing_id, int(served)))

    # -------------------------------------------------------------- requests C hands to Python

    def direct_requests_fd(self) -> int:
        """The eventfd C writes when it has queued a FALLOCATE, LSEEK or FSYNC for Python (dp_pyq.c)."""
        return native.lib.dp_pyq_fd(self._dp)

    def take_direct_requests(self) -> list[DirectRequest]:
        """The queued requests, each taken once; every one must get exactly one ``answer_direct``."""
        lib = native.lib
        buf = native.ffi.new("struct dp_pyreq[]", lib.DP_PYQ)
        return [DirectRequest(r.unique, r.opcode, r.fh, r.offset, r.length, r.mode, r.pid)
                for r in buf[0:lib.dp_pyq_take(self._dp, buf, lib.DP_PYQ)]]

    def answer_direct(self, unique: int, err: int, offset: int) -> int:
        """Reply to a taken request from this thread (one write to /dev/fuse); 0 or -errno."""
        return native.lib.dp_pyq_reply(self._dp, unique, -err, offset)

