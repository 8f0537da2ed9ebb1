"""EventfdBackend: batched submission and eventfd completion, for AIO and io_uring.

The ``native`` and ``io_uring`` submitters hand requests to the kernel in
batches and learn of completions through an eventfd whose readiness trio
awaits, so a request costs no worker-thread round trip. Linux AIO
(``AioBackend``) and io_uring (``UringBackend``) differ only in the context
that talks to the kernel (``native.AioContext`` / ``native.UringContext``,
one contract); everything between a caller and that context lives here,
once.

How a request travels:

- the calling task queues a ``Request`` and parks (``wait_task_rescheduled``);
- the *batcher* task, woken by the first request of a scheduler batch,
  runs after every task of that batch has queued its own, and hands them
  all to one ``submit_many`` (at most ``depth`` in flight; the rest wait);
- the *reaper* task waits for the eventfd (``trio.lowlevel.wait_readable``),
  reaps every completion and reschedules each waiting task with its result.

The two tasks run as one trio *system task*, started lazily by the first
request and stopped by ``close``. Why a system task: ``open`` is
synchronous and nursery-free like FileBackend's, and a backend outlives the
FUSE handler that first touches it, so no caller nursery has the right
lifetime. A system task lives as long as the trio run, needs no nursery,
and is cancelled when the main task exits, so an unclosed backend never
keeps ``trio.run`` from returning. A system task must never raise (trio
would turn it into TrioInternalError), so its failures are delivered to the
waiting requests as EIO instead.

Cancellation: a task cancelled while its read or sync is in flight stops
waiting at once; the kernel may still fill the buffer, which the context
keeps referenced until the completion is reaped, and the result is
dropped. A *write* cannot be abandoned once submitted: its range lock must
stay held until the kernel is done, or a neighbouring read-modify-write
could be overwritten by the late write. Its cancellation takes effect when
it completes (one device round trip), as with FileBackend's threads.

The subclass provides the context (``ctx``), its request type
(``_request``) and opcodes (``OP_READ``/``OP_WRITE``), and what differs
(open, fdatasync, buffered I/O). Everything else, O_DIRECT read-modify-write
included, is ``base.BackingFile``'s.
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
from ..errors import CachefsError
from .base import ALIGN, BackingFile


class SubmitterUnavailable(CachefsError, native.NativeUnavailable):
    """A native ``--aio`` submitter cannot run here (no compiled module, or
    the kernel refused the context). The mount is refused, never silently
    served by another submitter."""


@attrs.define(eq=False)
class Request:
    """One request between its caller, the batcher and the reaper."""

    opcode: int
    fd: int
    buf: object
    offset: int
    # The waiting task. Invariant: None once it no longer waits (completed,
    # failed, or cancelled); a queued op with task None is never submitted.
    task: object
    abortable: bool
    flags: int = 0
    submitted: bool = False


class EventfdBackend(BackingFile):
    """Base of the backends whose requests complete into an eventfd."""

    OP_READ: int
    OP_WRITE: int
    #: For task names and messages ("aio", "io_uring").
    label = "native"
    #: Submit a request from its own task when nothing is queued (see ``_io``).
    submit_inline = True

    def __init__(self, ctx, fd: int, path: str, *, direct: bool, sync: bool, writable: bool) -> None:
        super().__init__(fd, path, direct=direct, sync=sync, writable=writable)
        self.ctx = ctx
        self._pending: deque[Request] = deque()  # queued, not yet submitted
        self._live: set[Request] = set()  # ops whose task waits, for close()
        self._batcher = None  # the batcher task while it is parked
        self._tasks_scope: trio.CancelScope | None = None  # set while the tasks run

    def _request(self, op: Request):
        """The context's request object for ``op`` (token: the op itself)."""
        raise NotImplementedError

    def close(self) -> None:
        """Fail waiting requests (EBADF), stop the tasks, tear the context down.

        Blocks until the kernel is done with in-flight buffers (only requests
        of cancelled or failed callers can still be there).
        """
        fd, self.fd = self.fd, None
        if fd is None:
            return
        scope, self._tasks_scope = self._tasks_scope, None
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
            trio.lowlevel.notify_closing(self.ctx.eventfd)
        self.ctx.close()
        os.close(fd)

    # -------------------------------------------------------------- what BackingFile builds on

    async def _direct_read(self, fd: int, buf: memoryview, offset: int) -> int:
        done = 0
        while done < len(buf):
            n = await self._io(fd, self.OP_READ, buf[done:], offset + done, abortable=True)
            done += n
            if n == 0 or n % ALIGN:
                break  # EOF (mid-block: the next offset would be unaligned)
        return done

    async def _write_loop(self, fd: int, buf: memoryview, offset: int, *, direct: bool) -> None:
        """Write all of ``buf`` (a short write continues where it stopped)."""
        done = 0
        while done < len(buf):
            n = await self._io(fd, self.OP_WRITE, buf[done:], offset + done, abortable=False)
            if n == 0 or (direct and n % ALIGN):
                raise OSError(errno.EIO, f"short write at offset {offset + done}")
            done += n

    async def _truncate_fd(self, fd: int, size: int) -> None:
        await trio.to_thread.run_sync(os.ftruncate, fd, size)

    # -------------------------------------------------------------- submission and completion

    async def _io(self, fd: int, opcode: int, buf, offset: int, *, abortable: bool, flags: int = 0) -> int:
        """Queue one request, wait for its completion; bytes moved, or OSError."""
        if self.fd is None:
            raise OSError(errno.EBADF, f"{self.path}: backend is closed")
        if self._tasks_scope is None:
            self._start_tasks()
        op = Request(opcode, fd, buf, offset, current_task(), abortable, flags)
        self._live.add(op)
        if self.submit_inline and not self._pending and not self.ctx.in_flight:
            # Nothing in flight (QD1): submit from this task. Waking the batcher
            # would cost a whole scheduler round on every request's latency.
            # With requests in flight they queue, so that the ones that arrive
            # together share one submission.
            op.submitted = True
            for _op, err in self.ctx.submit_many([self._request(op)]):
                self._live.discard(op)
                raise OSError(-err, f"{self.path}: {os.strerror(-err)}")
            done = self._reaped_at_once(op) if opcode == self.OP_WRITE else None
            if done is not None:
                return done
            self._count_in_flight()
        else:
            self._pending.append(op)
            self._kick()

        def abort(_raise_cancel) -> Abort:
            if op.submitted and not op.abortable:
                return Abort.FAILED  # a write in flight: wait for it (module docstring)
            op.task = None  # the buffer stays referenced by the context until reaped
            self._live.discard(op)
            return Abort.SUCCEEDED

        res = await wait_task_rescheduled(abort)
        if res < 0:
            raise OSError(-res, f"{self.path}: {os.strerror(-res)}")
        return res

    def _reaped_at_once(self, op: Request) -> int | None:
        """The result of ``op`` if it completed during its submission, else None.

        io_uring runs a buffered write inline when it can (a 4 KiB table page at a write-through
        flush): taking its completion now saves the epoll wakeup and the scheduler round that
        waiting for the eventfd would cost on that request's latency. Anything else reaped is
        handed to its waiter as the reap loop would. Writes only: reads that arrive together
        (a guest's queue of them) keep sharing one submission, which an early return would
        split into one submission each.
        """
        mine = None
        for done, res in self.ctx.reap():
            if done is op:
                mine = res
            else:
                self._complete(done, res)
        if mine is None:
            return None
        op.task = None
        self._live.discard(op)
        self._count_in_flight()
        if mine < 0:
            raise OSError(-mine, f"{self.path}: {os.strerror(-mine)}")
        return mine

    def _complete(self, op: Request, result) -> None:
        task, op.task = op.task, None
        if task is None:
            return  # its caller was cancelled: drop the result
        self._live.discard(op)
        reschedule(task, result if isinstance(result, outcome.Outcome) else outcome.Value(result))

    def _kick(self) -> None:
        """Wake the parked batcher if there is something it can submit."""
        if self._batcher is not None and self._pending and self.ctx.free_slots:
            task, self._batcher = self._batcher, None
            reschedule(task)

    def _start_tasks(self) -> None:
        scope = self._tasks_scope = trio.CancelScope()
        trio.lowlevel.spawn_system_task(self._run_tasks, scope, name=f"cachefs-{self.label} {self.path}")

    async def _run_tasks(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._batch_loop)
                    nursery.start_soon(self._reap_loop)
        except Exception as exc:  # noqa: BLE001 - a system task must not raise
            for op in list(self._live):
                err = OSError(errno.EIO, f"{self.path}: {self.label} submitter failed: {exc!r}")
                self._complete(op, outcome.Error(err))
        finally:
            self._batcher = None
            if self._tasks_scope is scope:
                self._tasks_scope = None

    async def _batch_loop(self) -> None:
        while True:
            while not (self._pending and self.ctx.free_slots):
                self._batcher = current_task()

                def abort(_raise_cancel) -> Abort:
                    self._batcher = None
                    return Abort.SUCCEEDED

                await wait_task_rescheduled(abort)
            self._submit_pending()

    def _submit_pending(self) -> None:
        batch: list[Request] = []
        room = self.ctx.free_slots
        while self._pending and len(batch) < room:
            op = self._pending.popleft()
            if op.task is not None:  # else cancelled while queued: never submitted
                op.submitted = True
                batch.append(op)
        if batch:
            for op, err in self.ctx.submit_many([self._request(op) for op in batch]):
                self._complete(op, err)
            self._count_in_flight()

    def _count_in_flight(self) -> None:
        c = self.counters
        c.in_flight = self.ctx.in_flight
        c.peak_in_flight = max(c.peak_in_flight, c.in_flight)

    async def _reap_loop(self) -> None:
        efd = self.ctx.eventfd
        # Checked before every wait: a backend closed before this system task
        # first ran (every request failed at submission, none waited) has
        # closed the eventfd, and epoll would refuse it (EBADF).
        while self.fd is not None:
            try:
                await trio.lowlevel.wait_readable(efd)
            except trio.ClosedResourceError:
                return  # close() is tearing the context down
            if self.fd is None:
                return  # closed while this task was already runnable
            for op, res in self.ctx.reap():
                self._complete(op, res)
            self.counters.in_flight = self.ctx.in_flight
            self._kick()
