"""AioBackend: O_DIRECT file I/O through Linux native AIO, no thread per request.

DESIGN.md section 4 (seed 004): requests go to the kernel with io_submit and
complete into an eventfd whose readiness trio awaits, so a 4 KiB read costs
no worker-thread round trip. The protocol, the counters and the O_DIRECT
bounce-buffer rules are FileBackend's (see cachefs.backend.file): unaligned
reads read the covering aligned range and return the caller's slice;
unaligned writes are read-modify-write under the same two invariants
(``_ranges`` held over a write's aligned range, ``_eof_lock`` over any write
that may move end-of-file). Linux AIO is only asynchronous for O_DIRECT
(buffered io_submit silently blocks the submitter), so O_DIRECT is required.

How a request travels:

- the calling task queues an ``_Op`` and parks (``wait_task_rescheduled``);
- the *submitter* task, woken by the first request of a scheduler batch,
  runs after every task of that batch has queued its own, and hands them
  all to one io_submit (at most ``depth`` in flight; the rest wait);
- the *reaper* task waits for the eventfd (``trio.lowlevel.wait_readable``),
  reaps every completion and reschedules each waiting task with its result.

The two engine tasks run as one trio *system task*, started lazily by the
first request and stopped by ``close``. Why a system task: ``open`` is
synchronous and nursery-free like FileBackend's, and a backend outlives the
FUSE handler that first touches it, so no caller nursery has the right
lifetime. A system task lives as long as the trio run, needs no nursery,
and is cancelled when the main task exits, so an unclosed backend never
keeps ``trio.run`` from returning. A system task must never raise (trio
would turn it into TrioInternalError), so engine failures are delivered to
the waiting requests as EIO instead.

Writes that move end-of-file go through a worker thread instead: ext4 runs
such a direct write synchronously *inside* io_submit (ext4_dio_write_iter:
IOMAP_DIO_FORCE_WAIT when ext4_extending_io), stalling the trio thread for a
whole device write (measured here: 0.6-0.9 ms in io_submit per 1 MiB append,
under 0.13 ms for an overwrite or a write into a hole below EOF). They hold
``_eof_lock`` already, so routing them is simple; ``extend_via_thread =
False`` keeps them on AIO (XFS, for one, updates the size at completion).
io_submit may still block briefly (block allocation, extent-tree reads, a
full device queue): that is Linux AIO as it is.

Cancellation: a task cancelled while its read or fdatasync is in flight
stops waiting at once; the kernel may still fill the buffer, which
AioContext keeps referenced until the completion is reaped, and the result
is dropped. A *write* cannot be abandoned once submitted: its range lock
must stay held until the kernel is done, or a neighbouring read-modify-write
could be overwritten by the late write. Its cancellation takes effect when
it completes (one device round trip), as with FileBackend's threads.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections import deque

import attrs
import outcome
import trio
from trio.lowlevel import Abort, current_task, reschedule, wait_task_rescheduled

from .. import native
from ..errors import CachefsError, DirectIOUnsupported
from . import ALIGN, IOCounters
from . import file as file_mod
from .file import Buffer, _as_bytes_view, _down, _RangeLocks, _up, filesystem_type

#: Requests in flight per backend. io_setup charges about twice this against
#: the system-wide fs.aio-max-nr (65536 by default).
DEFAULT_DEPTH = 128

# Read at call time (tests swap in an invalid opcode to force the fallback).
IOCB_CMD_FDSYNC = native.IOCB_CMD_FDSYNC


class AioUnavailable(CachefsError, native.NativeUnavailable):
    """Native AIO cannot be used: no compiled module, or io_setup refused."""


@attrs.define(eq=False)
class _Op:
    """One request between its caller, the submitter and the reaper."""

    opcode: int
    fd: int
    buf: object
    offset: int
    # The waiting task. Invariant: None once it no longer waits (completed,
    # failed, or cancelled); a queued op with task None is never submitted.
    task: object
    abortable: bool
    submitted: bool = False


class AioBackend(file_mod.DirectWrites):
    """An O_DIRECT backing file driven by native AIO (the Backend protocol)."""

    def __init__(self, fd: int, path: str, *, sync: bool, writable: bool, depth: int = DEFAULT_DEPTH) -> None:
        self.aio = native.AioContext(depth)  # first: it may raise, and then holds nothing
        self.fd: int | None = fd
        self.path = path
        self.direct = True
        self.sync = sync
        self.writable = writable
        self.align = ALIGN
        self.counters = IOCounters()
        #: False: fdatasync runs os.fdatasync in a thread (IOCB_CMD_FDSYNC was refused).
        self.native_fdsync = True
        #: Writes that move EOF go through a thread (module docstring); counted.
        self.extend_via_thread = True
        self.thread_writes = 0
        self._ranges = _RangeLocks()
        self._eof_lock = trio.Lock()
        self._pending: deque[_Op] = deque()  # queued, not yet submitted
        self._live: set[_Op] = set()  # ops whose task waits, for close()
        self._submitter = None  # the submitter task while it is parked
        self._engine_scope: trio.CancelScope | None = None  # set while the engine runs

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        writable: bool,
        sync: bool = False,
        create: bool = False,
        depth: int = DEFAULT_DEPTH,
    ) -> AioBackend:
        """Open ``path`` O_DIRECT (plus O_DSYNC with ``sync``) with an AIO context.

        Raises AioUnavailable without the native module or when io_setup
        fails, DirectIOUnsupported (an UnsupportedImage) when the filesystem
        refuses O_DIRECT, else OSError.
        """
        path = os.fspath(path)
        if not native.available():
            reason = native.unavailable_reason() or "disabled"
            raise AioUnavailable(
                f"{path}: native AIO needs the compiled cachefs.native module ({reason}); "
                "rebuild it (python cachefs/native/build.py) or use --aio threads"
            )
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_DIRECT
        flags |= (os.O_DSYNC if sync else 0) | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            if create:  # Linux creates the file before refusing O_DIRECT
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise DirectIOUnsupported(
                f"{path}: the backing filesystem ({filesystem_type(path)}) does not support "
                "O_DIRECT, which native AIO needs; use --aio threads or put the images on ext4/xfs"
            ) from None
        try:
            return cls(fd, path, sync=sync, writable=writable, depth=depth)
        except OSError as exc:
            os.close(fd)
            raise AioUnavailable(
                f"{path}: io_setup({depth}) failed ({exc.strerror}); "
                "raise fs.aio-max-nr or use --aio threads"
            ) from None

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        return f"<AioBackend {self.path!r} fd={self.fd} {mode},direct{',sync' if self.sync else ''}>"

    def __enter__(self) -> AioBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- protocol

    def _fd(self) -> int:
        if self.fd is None:
            raise OSError(errno.EBADF, f"{self.path}: backend is closed")
        return self.fd

    def size(self) -> int:
        return os.fstat(self._fd()).st_size

    def drop_page_cache(self) -> None:
        native.fadvise(self._fd(), 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Fail waiting requests (EBADF), stop the engine, destroy the context.

        Blocks in io_destroy until the kernel is done with in-flight buffers
        (only requests of cancelled or failed callers can still be there).
        """
        fd, self.fd = self.fd, None
        if fd is None:
            return
        scope, self._engine_scope = self._engine_scope, None
        if scope is not None:
            scope.cancel()
        for op in list(self._live):
            task, op.task = op.task, None
            if task is not None:
                err = OSError(errno.EBADF, f"{self.path}: backend closed during the request")
                reschedule(task, outcome.Error(err))
        self._live.clear()
        self._pending.clear()
        with contextlib.suppress(RuntimeError):  # outside trio nothing can wait on it
            trio.lowlevel.notify_closing(self.aio.eventfd)
        self.aio.close()
        os.close(fd)

    async def truncate(self, size: int) -> None:
        fd = self._fd()
        async with self._eof_lock:
            await trio.to_thread.run_sync(os.ftruncate, fd, size)

    async def fdatasync(self) -> None:
        fd = self._fd()
        if self.native_fdsync:
            try:
                await self._io(fd, IOCB_CMD_FDSYNC, None, 0, abortable=True)
            except OSError as exc:
                # IOCB_CMD_FDSYNC needs Linux 4.18 and a filesystem with
                # ->fsync; otherwise it is refused with EINVAL. A real EINVAL
                # from the sync itself is raised again by os.fdatasync.
                if exc.errno != errno.EINVAL:
                    raise
                self.native_fdsync = False
        if not self.native_fdsync:
            await trio.to_thread.run_sync(os.fdatasync, fd)
        self.counters.fdatasyncs += 1

    async def pread(self, offset: int, length: int) -> bytes:
        fd = self._fd()
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, f"bad read range {offset}+{length}")
        data = b""
        if length:
            lo, hi = _down(offset), _up(offset + length)
            if (lo, hi) != (offset, offset + length):
                self.counters.bounce_requests += 1
            # Unzeroed: only the bytes the kernel filled are looked at.
            buf = memoryview(native.aligned_buffer(hi - lo, ALIGN, zero=False))
            n = await self._direct_read(fd, buf, lo)
            self.counters.direct_bytes += n
            start = offset - lo
            # The one copy: the callers want bytes (image.py pads with ljust),
            # and bytes cannot live in aligned memory.
            data = bytes(buf[start : min(n, start + length)]) if n > start else b""
        self.counters.reads += 1
        self.counters.bytes_read += len(data)
        return data

    async def pwrite(self, offset: int, data: Buffer) -> None:
        fd = self._fd()
        mv = _as_bytes_view(data)
        if offset < 0:
            raise OSError(errno.EINVAL, f"bad write offset {offset}")
        if len(mv):
            await self._pwrite_direct(fd, offset, mv)
        self.counters.writes += 1
        self.counters.bytes_written += len(mv)

    # -------------------------------------------------------------- O_DIRECT
    # The primitives file.DirectWrites builds its unaligned writes on.

    async def _direct_read(self, fd: int, buf: memoryview, offset: int) -> int:
        done = 0
        while done < len(buf):
            n = await self._io(fd, native.IOCB_CMD_PREAD, buf[done:], offset + done, abortable=True)
            done += n
            if n == 0 or n % ALIGN:
                break  # EOF (mid-block: the next offset would be unaligned)
        return done

    async def _direct_write(self, fd: int, buf: memoryview, offset: int, *, extends: bool = False) -> None:
        if extends and self.extend_via_thread:
            self.thread_writes += 1
            await trio.to_thread.run_sync(file_mod._write_all, fd, buf, offset, True)
            return
        done = 0
        while done < len(buf):
            n = await self._io(fd, native.IOCB_CMD_PWRITE, buf[done:], offset + done, abortable=False)
            if n == 0 or n % ALIGN:
                raise OSError(errno.EIO, f"short write at offset {offset + done}")
            done += n

    async def _truncate_fd(self, fd: int, size: int) -> None:
        await trio.to_thread.run_sync(os.ftruncate, fd, size)

    # -------------------------------------------------------------- engine

    async def _io(self, fd: int, opcode: int, buf, offset: int, *, abortable: bool) -> int:
        """Queue one iocb, wait for its completion; bytes moved, or OSError."""
        if self.fd is None:
            raise OSError(errno.EBADF, f"{self.path}: backend is closed")
        if self._engine_scope is None:
            self._start_engine()
        op = _Op(opcode, fd, buf, offset, current_task(), abortable)
        self._pending.append(op)
        self._live.add(op)
        self._kick()

        def abort(_raise_cancel) -> Abort:
            if op.submitted and not op.abortable:
                return Abort.FAILED  # a write in flight: wait for it (module docstring)
            op.task = None  # the buffer stays referenced by AioContext until reaped
            self._live.discard(op)
            return Abort.SUCCEEDED

        res = await wait_task_rescheduled(abort)
        if res < 0:
            raise OSError(-res, f"{self.path}: {os.strerror(-res)}")
        return res

    def _complete(self, op: _Op, result) -> None:
        task, op.task = op.task, None
        if task is None:
            return  # its caller was cancelled: drop the result
        self._live.discard(op)
        reschedule(task, result if isinstance(result, outcome.Outcome) else outcome.Value(result))

    def _kick(self) -> None:
        """Wake the parked submitter if there is something it can submit."""
        if self._submitter is not None and self._pending and self.aio.free_slots:
            task, self._submitter = self._submitter, None
            reschedule(task)

    def _start_engine(self) -> None:
        scope = self._engine_scope = trio.CancelScope()
        trio.lowlevel.spawn_system_task(self._engine, scope, name=f"cachefs-aio {self.path}")

    async def _engine(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._submit_loop)
                    nursery.start_soon(self._reap_loop)
        except Exception as exc:  # noqa: BLE001 - a system task must not raise
            for op in list(self._live):
                err = OSError(errno.EIO, f"{self.path}: AIO engine failed: {exc!r}")
                self._complete(op, outcome.Error(err))
        finally:
            self._submitter = None
            if self._engine_scope is scope:
                self._engine_scope = None

    async def _submit_loop(self) -> None:
        while True:
            while not (self._pending and self.aio.free_slots):
                self._submitter = current_task()

                def abort(_raise_cancel) -> Abort:
                    self._submitter = None
                    return Abort.SUCCEEDED

                await wait_task_rescheduled(abort)
            self._submit_pending()

    def _submit_pending(self) -> None:
        batch: list[_Op] = []
        room = self.aio.free_slots
        while self._pending and len(batch) < room:
            op = self._pending.popleft()
            if op.task is not None:  # else cancelled while queued: never submitted
                op.submitted = True
                batch.append(op)
        if batch:
            reqs = [native.AioRequest(op.opcode, op.fd, op.buf, op.offset, op) for op in batch]
            for op, err in self.aio.submit_many(reqs):
                self._complete(op, err)

    async def _reap_loop(self) -> None:
        efd = self.aio.eventfd
        while True:
            try:
                await trio.lowlevel.wait_readable(efd)
            except trio.ClosedResourceError:
                return  # close() is tearing the context down
            if self.fd is None:
                return  # closed while this task was already runnable
            for op, res in self.aio.reap():
                self._complete(op, res)
            self._kick()
