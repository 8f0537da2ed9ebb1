"""The optional compiled helpers (cffi, built at install time by build.py).

Only ``cachefs.backend`` imports this package. Everything here has a pure
Python fallback or a clear "not available" answer, so a checkout without a
compiled module (or a broken one) still imports and runs: ``available()``
then returns False, and ``unavailable_reason()`` says why.

What it provides today:

- ``aligned_buffer(size, align=4096)``: writable memory whose address is
  aligned, for O_DIRECT, from ``POOL`` (a ``BufferPool``): reused when the
  garbage collector drops it.
- ``address_of(buf)``: the address of any buffer-protocol object.
- ``fadvise(fd, offset, length, advice)`` and the ``POSIX_FADV_*`` constants.
- ``AioContext(depth)``: Linux native AIO (io_submit and friends as raw
  syscalls) completing into an eventfd, for ``cachefs.backend.aio``.
- ``UringContext(depth)``: an io_uring (liburing) completing into an
  eventfd, for ``cachefs.backend.uring``. ``uring_available()`` says
  whether the module was built with liburing.
- ``IMAGE_COUNTERS``, ``HANDLE_COUNTERS``, ``CONNECTION_COUNTERS``: the data
  plane's counter names, in C's order, read from C (``cachefs.dataplane.plane``).
"""

from __future__ import annotations

import errno
import os
import threading
import weakref

import attrs

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
    "BufferPool",
    "POOL",
    "address_of",
    "fadvise",
    "POSIX_FADV_NORMAL",
    "POSIX_FADV_RANDOM",
    "POSIX_FADV_SEQUENTIAL",
    "POSIX_FADV_WILLNEED",
    "POSIX_FADV_DONTNEED",
    "POSIX_FADV_NOREUSE",
    "AioContext",
    "AioRequest",
    "IOCB_CMD_PREAD",
    "IOCB_CMD_PWRITE",
    "IOCB_CMD_FDSYNC",
    "UringContext",
    "UringRequest",
    "uring_available",
    "IORING_OP_READ",
    "IORING_OP_WRITE",
    "IORING_OP_FSYNC",
    "IORING_FSYNC_DATASYNC",
    "AbiMismatch",
    "counter_names",
    "IMAGE_COUNTERS",
    "HANDLE_COUNTERS",
    "CONNECTION_COUNTERS",
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


def aligned_buffer(size: int, align: int = 4096, *, zero: bool = True):
    """Zeroed, writable memory of ``size`` bytes at an ``align``-aligned address.

    ``zero=False`` skips the memset, for a buffer a read overwrites anyway
    (only the bytes the read filled may then be looked at).

    Returns a cffi buffer: ``memoryview(buf)`` is writable and C-contiguous,
    and it supports slicing and ``buf[a:b] = data``. When the last reference
    to the buffer (or to a memoryview of it) goes away, the memory goes back
    to the pool (see ``BufferPool``) or is freed. Raises NativeUnavailable
    without the compiled module.
    """
    _require()
    if size < 0:
        raise ValueError(f"negative buffer size {size}")
    if align < ffi.sizeof("void *") or align & (align - 1):
        raise ValueError(f"alignment {align} is not a power of two >= pointer size")
    if align <= POOL.align:
        ptr = POOL.take(size)
    else:
        ptr = ffi.gc(_memalign(size, align), lib.free, size=size)
    if zero:
        lib.memset(ptr, 0, size)
    # ffi.buffer keeps ``ptr`` (the owner) alive as long as it lives.
    return ffi.buffer(ptr, size)


def _memalign(size: int, align: int):
    out = ffi.new("void **")
    # posix_memalign(…, 0) may return NULL; a 1-byte allocation keeps the
    # pointer valid and the buffer is still 0 bytes long.
    rc = lib.posix_memalign(out, align, max(size, 1))
    if rc != 0:
        raise MemoryError(f"posix_memalign({size}, {align}) failed: {os.strerror(rc)}")
    return ffi.cast("char *", out[0])


class BufferPool:
    """Aligned buffers reused across requests instead of allocated for each.

    Every O_DIRECT read and bounce buffer needs aligned memory; allocating it
    per request costs a posix_memalign, and for large buffers fresh pages
    (page faults) each time. Buffers come in power-of-two size classes from
    4 KiB to ``max_class``; a buffer whose last reference dies goes back on
    its class's free list while the pool holds less than ``limit`` bytes,
    else it is freed. ``limit`` bounds what the pool can add to the
    daemon's RSS. Larger buffers are plain allocations.

    Thread-safe: a buffer may be dropped in a worker thread.
    """

    def __init__(self, *, align: int = 4096, min_class: int = 4096, max_class: int = 4 << 20,
                 limit: int = 32 << 20) -> None:
        self.align, self.min_class, self.max_class, self.limit = align, min_class, max_class, limit
        self.pooled_bytes = 0
        self.hits = 0
        self.misses = 0
        self._free: dict[int, list[int]] = {}
        self._releasers: dict[int, object] = {}
        self._lock = threading.Lock()

    def take(self, size: int):
        """A gc-managed ``char *`` of at least ``size`` bytes."""
        cls = max(self.min_class, 1 << max(size - 1, 0).bit_length())
        if cls > self.max_class:
            return ffi.gc(_memalign(size, self.align), lib.free, size=size)
        with self._lock:
            free = self._free.get(cls)
            addr = free.pop() if free else None
            if addr is not None:
                self.pooled_bytes -= cls
                self.hits += 1
            else:
                self.misses += 1
        ptr = ffi.cast("char *", addr) if addr is not None else _memalign(cls, self.align)
        return ffi.gc(ptr, self._releaser(cls), size=cls)

    def _releaser(self, cls: int):
        fn = self._releasers.get(cls)
        if fn is None:
            def fn(ptr, cls=cls):
                with self._lock:
                    if self.pooled_bytes + cls <= self.limit:
                        self._free.setdefault(cls, []).append(int(ffi.cast("uintptr_t", ptr)))
                        self.pooled_bytes += cls
                        return
                lib.free(ptr)
            self._releasers[cls] = fn
        return fn

    def stats(self) -> dict[str, int]:
        return {"pool_hits": self.hits, "pool_misses": self.misses, "pool_bytes": self.pooled_bytes}


POOL = BufferPool()


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


# ---------------------------------------------------------------- the data plane's counters
# Their names come from C (dp_names.c, in the stub build too), each at its enum's index, so the
# stats keys and C's counts cannot drift apart; dataplane/plane.py takes these tuples. Without the
# compiled module there is no data plane, nothing to count, and they are empty.


class AbiMismatch(RuntimeError):
    """C's tables of names and its counts disagree: a build of the native module to fix."""


def counter_names(lib, ffi) -> dict[str, tuple[str, ...]]:
    """Each counter table's names, read from ``dp_counter_name``; AbiMismatch unless each table
    has exactly the entries its count in dp_abi.h says (DP_C_NIMAGE, DP_H_N, DP_G_N)."""
    tables = {"image": (lib.DP_COUNTERS_IMAGE, lib.DP_C_NIMAGE), "handle": (lib.DP_COUNTERS_HANDLE, lib.DP_H_N),
              "connection": (lib.DP_COUNTERS_CONNECTION, lib.DP_G_N)}
    out = {}
    for table, (which, count) in tables.items():
        names = []
        while len(names) <= count and (p := lib.dp_counter_name(which, len(names))) != ffi.NULL:
            names.append(ffi.string(p).decode())
        if len(names) != count or len(set(names)) != count:
            raise AbiMismatch(f"dp_counter_name gives the {table} counters {names}, dp_abi.h counts {count} "
                              "(dp_names.c and dp_abi.h disagree: rebuild, or fix dp_names.c)")
        out[table] = tuple(names)
    return out


_names = counter_names(lib, ffi) if lib is not None else {}
#: dp_image_counters()'s order, as stats names them.
IMAGE_COUNTERS: tuple[str, ...] = _names.get("image", ())
#: dp_handle_counters()'s order.
HANDLE_COUNTERS: tuple[str, ...] = _names.get("handle", ())
#: dp_counters()'s order (the whole connection).
CONNECTION_COUNTERS: tuple[str, ...] = _names.get("connection", ())
del _names


# ---------------------------------------------------------------- Linux AIO
# The opcodes of <linux/aio_abi.h>. They are kernel ABI, so they have the
# same values with or without the compiled module.
IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_CMD_FDSYNC = 3

_READS_INTO_BUFFER = frozenset({IOCB_CMD_PREAD})


@attrs.frozen
class AioRequest:
    """One iocb to submit. ``buf`` is the memory the kernel reads or fills
    (None for the sync opcodes); ``token`` is handed back by ``reap``."""

    opcode: int
    fd: int
    buf: object = None
    offset: int = 0
    token: object = None


class _SlotContext:
    """What AioContext and UringContext share: ``depth`` request slots (a
    slot is taken from submission until its completion is reaped) and a
    ``_finalizer`` that tears the kernel context down."""

    depth: int
    _free: list[int]
    _closed: bool
    _finalizer: weakref.finalize

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return self.depth - len(self._free)

    def close(self) -> None:
        """Tear the context down; waits for the kernel's in-flight requests."""
        self._closed = True
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AioContext(_SlotContext):
    """An io_setup context of ``depth`` slots whose completions signal ``eventfd``.

    What it owns, and why:

    - Invariant: a buffer stays referenced (``_slots``) from ``submit_many``
      until its completion is reaped or the context is destroyed. The kernel
      writes into it asynchronously, and a caller that stops waiting (a
      cancelled trio task) must not let it be freed or reused meanwhile.
    - At most ``depth`` requests are in flight: more would make io_submit
      fail with EAGAIN, so callers queue and check ``free_slots``.
    - Destroying the context (``close``, or the finalizer of a context that
      was dropped) blocks in io_destroy until the kernel is done with every
      buffer; only then are the references released.

    Not thread-safe: one trio thread drives it.
    """

    def __init__(self, depth: int) -> None:
        _require()
        if not 0 < depth <= 65536:
            raise ValueError(f"AIO depth {depth} out of range")
        self.depth = depth
        self.submit_calls = 0  # io_submit syscalls (batching shows as submitted / submit_calls)
        self.submitted = 0  # requests the kernel accepted
        self.reaped = 0
        self._iocbs = ffi.new("struct iocb[]", depth)
        self._ptrs = ffi.new("struct iocb *[]", depth)
        self._scratch = ffi.new("struct io_event[]", depth)
        self._data = ffi.new("uint64_t[]", depth)
        self._res = ffi.new("int64_t[]", depth)
        cctx = ffi.new("aio_context_t *")
        rc = lib.cachefs_io_setup(depth, cctx)
        if rc < 0:
            raise OSError(-rc, f"io_setup({depth}): {os.strerror(-rc)}")
        efd = lib.cachefs_eventfd()
        if efd < 0:
            lib.cachefs_io_destroy(cctx[0])
            raise OSError(-efd, f"eventfd: {os.strerror(-efd)}")
        self._ctx = cctx[0]
        #: Readable when completions are waiting (IOCB_FLAG_RESFD on every iocb).
        self.eventfd: int = efd
        # slot -> (token, buffer keep-alive) while in flight, else None.
        self._slots: list[tuple[object, object] | None] = [None] * depth
        self._free = list(range(depth - 1, -1, -1))
        self._closed = False
        # Runs close's cleanup if the context is dropped unclosed (or at exit).
        self._finalizer = weakref.finalize(
            self, _destroy, self._ctx, efd, self._slots, self._iocbs
        )

    def submit_many(self, requests) -> list[tuple[object, int]]:
        """Submit ``requests`` (AioRequest) with as few io_submit calls as possible.

        Returns ``(token, -errno)`` for every request the kernel refused at
        submission (e.g. EBADF); those never show up in ``reap``. Raises
        ValueError for more requests than free slots.
        """
        if self._closed:
            raise OSError(errno.EBADF, "AIO context is closed")
        n = len(requests)
        if n > len(self._free):
            raise ValueError(f"{n} requests but only {len(self._free)} free AIO slots")
        prep, efd, slots = lib.cachefs_iocb_prep, self.eventfd, self._slots
        iocbs, ptrs, free = self._iocbs, self._ptrs, self._free
        taken: list[int] = []
        try:
            for pos, req in enumerate(requests):
                slot = free.pop()
                taken.append(slot)
                if req.buf is None:
                    cbuf, size = ffi.NULL, 0
                else:
                    writable = req.opcode in _READS_INTO_BUFFER
                    cbuf = ffi.from_buffer("char[]", req.buf, require_writable=writable)
                    size = len(cbuf)
                slots[slot] = (req.token, cbuf)
                prep(iocbs, ptrs, pos, slot, req.opcode, req.fd, cbuf, size, req.offset, efd)
        except BaseException:  # a bad buffer: nothing was submitted, give the slots back
            for slot in taken:
                slots[slot] = None
                free.append(slot)
            raise
        rejected = []
        done = 0
        while done < n:
            self.submit_calls += 1
            rc = lib.cachefs_io_submit(self._ctx, n - done, ptrs + done)
            if rc > 0:
                self.submitted += rc
                done += rc
                continue
            # The kernel took none: the error is the first remaining iocb's.
            err = rc if rc < 0 else -errno.EAGAIN
            slot = taken[done]
            rejected.append((slots[slot][0], err))
            slots[slot] = None
            free.append(slot)
            done += 1
        return rejected

    def reap(self, min_nr: int = 0) -> list[tuple[object, int]]:
        """Completed requests as ``(token, result)``: bytes moved, or -errno.

        Reads the eventfd counter *before* collecting events: a completion
        lands in the ring before it signals the eventfd (fs/aio.c
        aio_complete), so one that arrives after the counter was read leaves
        the eventfd readable and is seen on the next wakeup. ``min_nr > 0``
        blocks until that many are done (not for the trio thread).
        """
        if self._closed:
            raise OSError(errno.EBADF, "AIO context is closed")
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass
        out: list[tuple[object, int]] = []
        slots, free = self._slots, self._free
        while self.in_flight:
            cap = self.in_flight
            n = lib.cachefs_io_reap(self._ctx, min(min_nr, cap), cap, self._scratch, self._data, self._res)
            if n == -errno.EINTR:
                continue
            if n < 0:
                raise OSError(-n, f"io_getevents: {os.strerror(-n)}")
            for slot, res in zip(ffi.unpack(self._data, n), ffi.unpack(self._res, n)):
                out.append((slots[slot][0], res))
                slots[slot] = None
                free.append(slot)
            self.reaped += n
            min_nr = max(0, min_nr - n)
            if n < cap and min_nr == 0:
                break
        return out

    def cancel(self, token) -> int:
        """io_cancel the in-flight request with ``token``: 0, or -errno.

        Regular-file I/O cannot be cancelled (-EINVAL); the request then
        completes normally and is reaped as usual. -ENOENT: no such token.
        """
        for slot, entry in enumerate(self._slots):
            if entry is not None and entry[0] is token:
                rc = lib.cachefs_io_cancel(self._ctx, self._iocbs + slot)
                return 0 if rc == -errno.EINPROGRESS else rc
        return -errno.ENOENT


# Buffers of a context io_destroy failed on: the kernel may still use them.
_LEAKED: list[object] = []


def _destroy(ctx, efd: int, slots: list, iocbs) -> None:
    rc = lib.cachefs_io_destroy(ctx)
    if rc < 0:  # never expected; freeing memory the kernel may write is worse than a leak
        _LEAKED.append((slots[:], iocbs))
    slots[:] = [None] * len(slots)
    os.close(efd)


# ---------------------------------------------------------------- io_uring
# <linux/io_uring.h> values: kernel ABI, defined with or without the module.
IORING_OP_FSYNC = 3
IORING_OP_READ = 22
IORING_OP_WRITE = 23
IORING_FSYNC_DATASYNC = 1

_URING_READS_INTO_BUFFER = frozenset({IORING_OP_READ})


def uring_available() -> str | None:
    """None when io_uring rings can be asked for, else why not (module, liburing).

    Whether the kernel grants a ring (kernel.io_uring_disabled, seccomp,
    CONFIG_IO_URING) is only known by trying: ``UringContext`` raises OSError.
    """
    if lib is None:
        return f"cachefs native module not available ({_IMPORT_ERROR})"
    if not lib.cachefs_uring_built():
        return "cachefs.native was built without liburing (install liburing-dev and rebuild it)"
    return None


@attrs.frozen
class UringRequest:
    """One SQE to submit: as AioRequest, plus ``flags`` (the SQE's rw/fsync
    flags word: IORING_FSYNC_DATASYNC for a data-only sync)."""

    opcode: int
    fd: int
    buf: object = None
    offset: int = 0
    token: object = None
    flags: int = 0


class UringContext(_SlotContext):
    """An io_uring of ``depth`` entries whose completions signal ``eventfd``.

    The same contract as AioContext, so one backend class drives either:

    - Invariant: a buffer stays referenced (``_slots``) from ``submit_many``
      until its completion is reaped or the ring is torn down; a cancelled
      caller's buffer may still be written by the kernel meanwhile.
    - At most ``depth`` requests are in flight (the SQ ring has ``depth``
      entries and the CQ ring twice that, so completions never overflow).
    - Teardown (``close``, or the finalizer) waits for the completion of
      every request the kernel took before unmapping the ring and releasing
      the buffers: closing an io_uring does not wait by itself.

    Differences from Linux AIO: a bad request (a bad fd, an unaligned
    O_DIRECT buffer) is not refused by the submission but completes with
    -errno; and there is no per-request cancel here (file I/O cannot be
    cancelled through either context).

    Not thread-safe: one trio thread drives it.
    """

    def __init__(self, depth: int) -> None:
        _require()
        if not 0 < depth <= 4096:
            raise ValueError(f"io_uring depth {depth} out of range")
        why = uring_available()
        if why is not None:
            raise NativeUnavailable(why)
        self.depth = depth
        self.submit_calls = 0  # io_uring_submit calls (batching shows as submitted / submit_calls)
        self.submitted = 0  # SQEs the kernel consumed
        self.reaped = 0
        self._data = ffi.new("uint64_t[]", depth)
        self._res = ffi.new("int64_t[]", depth)
        efd = lib.cachefs_eventfd()
        if efd < 0:
            raise OSError(-efd, f"eventfd: {os.strerror(-efd)}")
        ring = ffi.new("struct io_uring *")
        rc = lib.cachefs_uring_init(ring, depth, efd)
        if rc < 0:
            os.close(efd)
            raise OSError(-rc, f"io_uring_setup({depth}): {os.strerror(-rc)}")
        self._ring = ring
        #: Readable when completions are waiting (io_uring_register_eventfd).
        self.eventfd: int = efd
        # slot -> (token, buffer keep-alive) while in flight, else None.
        self._slots: list[tuple[object, object] | None] = [None] * depth
        self._free = list(range(depth - 1, -1, -1))
        self._closed = False
        self._finalizer = weakref.finalize(self, _uring_destroy, ring, efd, self._slots)

    def submit_many(self, requests) -> list[tuple[object, int]]:
        """Prep one SQE per request (UringRequest) and submit them with one io_uring_submit.

        Returns ``(token, -errno)`` for the requests a failed io_uring_submit
        left unsubmitted (resource shortage; they are taken back out of the
        ring). Anything wrong with a request itself (a bad fd, an unaligned
        O_DIRECT buffer) comes back as its completion instead. Raises
        ValueError for more requests than free slots.
        """
        if self._closed:
            raise OSError(errno.EBADF, "io_uring is closed")
        n = len(requests)
        if n > len(self._free):
            raise ValueError(f"{n} requests but only {len(self._free)} free io_uring slots")
        # Every buffer is checked (a read into read-only memory raises) before
        # the first SQE is prepped, so a refusal leaves the ring untouched.
        cbufs = [
            ffi.NULL if req.buf is None
            else ffi.from_buffer("char[]", req.buf, require_writable=req.opcode in _URING_READS_INTO_BUFFER)
            for req in requests
        ]
        prep, ring, slots, free = lib.cachefs_uring_prep, self._ring, self._slots, self._free
        taken: list[int] = []
        for req, cbuf in zip(requests, cbufs):
            slot = free.pop()
            taken.append(slot)
            slots[slot] = (req.token, cbuf)
            size = 0 if req.buf is None else len(cbuf)
            rc = prep(ring, req.opcode, req.fd, cbuf, size, req.offset, req.flags, slot)
            if rc < 0:  # no SQE: impossible while in_flight <= depth
                lib.cachefs_uring_unprep(ring)
                for s in taken:
                    slots[s] = None
                    free.append(s)
                raise OSError(-rc, f"io_uring_get_sqe: {os.strerror(-rc)}")
        rejected: list[tuple[object, int]] = []
        while lib.cachefs_uring_sq_ready(ring):
            self.submit_calls += 1
            rc = lib.cachefs_uring_submit(ring)
            if rc == -errno.EINTR:
                continue
            if rc > 0:
                self.submitted += rc
                continue
            # Nothing taken (EAGAIN, EBUSY, ...): the rest is refused, as
            # io_submit refuses, and taken back out of the ring.
            err = rc if rc < 0 else -errno.EAGAIN
            for slot in taken[len(taken) - lib.cachefs_uring_unprep(ring) :]:
                rejected.append((slots[slot][0], err))
                slots[slot] = None
                free.append(slot)
        return rejected

    def reap(self, min_nr: int = 0) -> list[tuple[object, int]]:
        """Completed requests as ``(token, result)``: bytes moved, or -errno.

        Reads the eventfd counter *before* collecting CQEs: the kernel posts
        a CQE before it signals the eventfd, so one that lands after the
        counter was read leaves the eventfd readable for the next wakeup.
        ``min_nr > 0`` blocks until that many are done (not for the trio thread).
        """
        if self._closed:
            raise OSError(errno.EBADF, "io_uring is closed")
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass
        out: list[tuple[object, int]] = []
        cap = self.in_flight
        if not cap:
            return out
        while True:
            n = lib.cachefs_uring_reap(self._ring, min(min_nr, cap), cap, self._data, self._res)
            if n != -errno.EINTR:
                break
        if n < 0:
            raise OSError(-n, f"io_uring_wait_cqe: {os.strerror(-n)}")
        slots, free = self._slots, self._free
        for slot, res in zip(ffi.unpack(self._data, n), ffi.unpack(self._res, n)):
            out.append((slots[slot][0], res))
            slots[slot] = None
            free.append(slot)
        self.reaped += n
        return out


def _uring_destroy(ring, efd: int, slots: list) -> None:
    in_flight = sum(entry is not None for entry in slots)
    rc = lib.cachefs_uring_exit(ring, in_flight)
    if rc < 0:  # never expected; the kernel may still write the buffers: leak them
        _LEAKED.append((slots[:], ring))
    slots[:] = [None] * len(slots)
    os.close(efd)
