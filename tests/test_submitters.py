"""The native submitters, Linux AIO and io_uring: their raw contexts and their backends, on real
files on a real disk.

One suite for both: each backend test runs for AioBackend and for UringBackend
(and for io_uring's buffered descriptors too: AIO only opens O_DIRECT ones).
The raw contexts (AioContext, UringContext) and what exists for one submitter
only (AIO's thread for extending writes and its FDSYNC fallback; io_uring's
opener, its refusals and ENOSPC) have their own tests below.

Every file lives on a filesystem that really does direct I/O
(tests/directio.py); nothing about the submitters is mocked. The only stand-in
is ``hold_completions``, which lets the kernel finish but delays handing
results to the backend, to make "cancelled while in flight" deterministic.

A submitter the machine lacks is skipped, as before the merge: AIO without
the native module, io_uring without liburing in it.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import select
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from cachefs import native
from cachefs.backend import (ALIGN, AioBackend, AioUnavailable, Backend, FileBackend, SubmitterUnavailable,
                             UringBackend, UringUnavailable)
from cachefs.backend import aio as aio_mod
from cachefs.backend import uring as uring_mod
from cachefs.errors import CachefsError, UnsupportedImage
from cachefs.image.backends import file_opener, submitter_name
from cachefs.policy import mode_named
from directio import O_DIRECT_FLAG, O_DSYNC_FLAG, disk_dir, fdinfo_flags, make_file, pattern  # noqa: F401

HERE = Path(__file__).resolve().parent

needs_native = pytest.mark.skipif(not native.available(), reason="native module not built")
needs_uring = pytest.mark.skipif(native.uring_available() is not None, reason=str(native.uring_available()))


@attrs.frozen
class Submitter:
    """One native submitter under test."""

    name: str
    backend: type
    directs: tuple[bool, ...]   # the descriptors it opens: AIO only O_DIRECT ones, io_uring both
    opcodes: tuple[str, ...]    # its kernel ABI constants, mirrored in cachefs.native
    context: str                # the raw context's class in cachefs.native

    def open(self, path, *, direct: bool | None = None, **kw):
        """The backend on ``path``; ``direct`` None: the submitter's default (AIO: O_DIRECT)."""
        direct = self.directs[0] if direct is None else direct
        if self.backend is AioBackend:
            assert direct, "native AIO opens O_DIRECT descriptors only"
            return AioBackend.open(path, **kw)
        return UringBackend.open(path, direct=direct, **kw)


AIO = Submitter("aio", AioBackend, (True,), ("IOCB_CMD_PREAD", "IOCB_CMD_PWRITE", "IOCB_CMD_FDSYNC"),
                "AioContext")
URING = Submitter("io_uring", UringBackend, (False, True),
                  ("IORING_OP_READ", "IORING_OP_WRITE", "IORING_OP_FSYNC", "IORING_FSYNC_DATASYNC"),
                  "UringContext")
NEEDS = {AIO: needs_native, URING: needs_uring}


def kind(direct: bool) -> str:
    return "direct" if direct else "buffered"


#: Each submitter (its default descriptor: AIO O_DIRECT, io_uring buffered).
EACH = pytest.mark.parametrize("sub", [pytest.param(s, marks=NEEDS[s], id=s.name) for s in (AIO, URING)])
#: Each submitter with each kind of descriptor it opens.
EACH_KIND = pytest.mark.parametrize("sub,direct", [
    pytest.param(s, d, marks=NEEDS[s], id=f"{s.name}-{kind(d)}") for s in (AIO, URING) for d in s.directs])


def wait_events(ctx, want: int, timeout: float = 10.0) -> list:
    """Reap until ``want`` completions arrived, sleeping on the eventfd in between."""
    got: list = []
    while len(got) < want:
        ready, _, _ = select.select([ctx.eventfd], [], [], timeout)
        assert ready, "eventfd never became readable"
        got += ctx.reap()
    return got


# ---------------------------------------------------------------- the raw contexts


@EACH
def test_opcodes_are_the_kernel_abi(sub):
    for name in sub.opcodes:
        assert getattr(native, name) == getattr(native.lib, name)
    if sub is AIO:
        assert native.ffi.sizeof("struct iocb") == 64  # <linux/aio_abi.h>: "64 bytes"
        assert native.ffi.sizeof("struct io_event") == 32


@EACH
def test_context_needs_the_module(sub, monkeypatch):
    context = getattr(native, sub.context)
    with pytest.raises(ValueError):
        context(0)
    monkeypatch.setattr(native, "lib", None)
    if sub is URING:
        assert "not available" in native.uring_available()
    with pytest.raises(native.NativeUnavailable):
        context(8)


@needs_native
def test_context_batches_reads_and_writes(disk_dir):
    data = pattern(16 * ALIGN, 1)
    path = make_file(disk_dir, data)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        with native.AioContext(16) as ctx:
            assert fcntl_flags_nonblock_cloexec(ctx.eventfd)
            bufs = [native.aligned_buffer(ALIGN) for _ in range(8)]
            reqs = [native.AioRequest(native.IOCB_CMD_PREAD, fd, b, i * ALIGN, token=i) for i, b in enumerate(bufs)]
            assert ctx.submit_many(reqs) == []
            assert (ctx.submit_calls, ctx.submitted, ctx.in_flight) == (1, 8, 8)
            got = dict(wait_events(ctx, 8))
            assert got == {i: ALIGN for i in range(8)} and ctx.in_flight == 0
            assert all(bytes(b) == data[i * ALIGN : (i + 1) * ALIGN] for i, b in enumerate(bufs))
            # A write from a buffer, then FDSYNC, in one io_submit.
            new = native.aligned_buffer(ALIGN)
            new[:] = pattern(ALIGN, 2)
            ctx.submit_many([
                native.AioRequest(native.IOCB_CMD_PWRITE, fd, new, 15 * ALIGN, token="w"),
                native.AioRequest(native.IOCB_CMD_FDSYNC, fd, token="s"),
            ])
            assert ctx.submit_calls == 2
            assert dict(wait_events(ctx, 2)) == {"w": ALIGN, "s": 0}
    finally:
        os.close(fd)
    assert path.read_bytes() == data[: 15 * ALIGN] + pattern(ALIGN, 2)


def fcntl_flags_nonblock_cloexec(fd: int) -> bool:
    import fcntl
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK) and bool(
        fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    )


@needs_native
def test_context_errors_come_back_as_negative_errno(disk_dir):
    path = make_file(disk_dir, pattern(4 * ALIGN, 3))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with native.AioContext(8) as ctx:
            buf = native.aligned_buffer(2 * ALIGN)
            misaligned = memoryview(buf)[512 + 3 : 512 + 3 + ALIGN]
            bad_fd = os.open(os.devnull, os.O_RDONLY)
            os.close(bad_fd)
            rejected = ctx.submit_many([
                native.AioRequest(native.IOCB_CMD_PREAD, fd, buf, 0, token="ok"),
                native.AioRequest(native.IOCB_CMD_PREAD, bad_fd, buf, 0, token="ebadf"),
                native.AioRequest(native.IOCB_CMD_PREAD, fd, misaligned, 0, token="einval"),
                native.AioRequest(native.IOCB_CMD_PWRITE, fd, buf, 0, token="rdonly"),
            ])
            results = dict(rejected)
            assert results.get("ebadf") == -errno.EBADF  # io_submit refuses the fd itself
            # The others fail (or succeed) on completion; the kernel decides where.
            results.update(wait_events(ctx, 4 - len(rejected)))
            assert results == {
                "ok": 2 * ALIGN, "ebadf": -errno.EBADF, "einval": -errno.EINVAL, "rdonly": -errno.EBADF,
            }
            assert ctx.free_slots == 8 and ctx.submit_calls >= 2
            with pytest.raises(ValueError):
                ctx.submit_many([native.AioRequest(native.IOCB_CMD_FDSYNC, fd)] * 9)
            with pytest.raises(BufferError):  # a read into read-only memory
                ctx.submit_many([native.AioRequest(native.IOCB_CMD_PREAD, fd, bytes(ALIGN))])
            assert ctx.free_slots == 8  # nothing leaked by the refusals
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        ctx.reap()
    assert info.value.errno == errno.EBADF


@needs_native
def test_context_keeps_buffers_alive_until_reaped(disk_dir):
    """The caller drops its buffers right after submitting; the kernel still fills them."""
    data = pattern(64 * ALIGN, 4)
    path = make_file(disk_dir, data)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        ctx = native.AioContext(64)
        ctx.submit_many([
            native.AioRequest(native.IOCB_CMD_PREAD, fd, native.aligned_buffer(ALIGN), i * ALIGN, token=i)
            for i in range(64)
        ])
        gc.collect()
        assert ctx.cancel(0) in (-errno.EINVAL, 0)  # file I/O is not cancellable
        assert ctx.cancel("no such token") == -errno.ENOENT
        assert sorted(wait_events(ctx, 64)) == [(i, ALIGN) for i in range(64)]
        # In flight when the context goes: io_destroy waits for them.
        ctx.submit_many([
            native.AioRequest(native.IOCB_CMD_PREAD, fd, native.aligned_buffer(ALIGN), 0) for _ in range(32)
        ])
        ctx.close()
        ctx.close()  # idempotent
        # Dropped unclosed: the finalizer destroys it (and waits the same way).
        ctx = native.AioContext(4)
        ctx.submit_many([native.AioRequest(native.IOCB_CMD_PREAD, fd, native.aligned_buffer(ALIGN), 0)])
        del ctx
        gc.collect()
    finally:
        os.close(fd)


def req(opcode, fd, buf=None, offset=0, token=None, flags=0) -> native.UringRequest:
    return native.UringRequest(opcode, fd, buf, offset, token, flags)


READ, WRITE, FSYNC = native.IORING_OP_READ, native.IORING_OP_WRITE, native.IORING_OP_FSYNC


@needs_uring
def test_ring_batches_reads_writes_and_datasync(disk_dir):
    data = pattern(16 * ALIGN, 1)
    path = make_file(disk_dir, data)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        with native.UringContext(16) as ctx:
            bufs = [native.aligned_buffer(ALIGN) for _ in range(8)]
            assert ctx.submit_many([req(READ, fd, b, i * ALIGN, i) for i, b in enumerate(bufs)]) == []
            assert (ctx.submit_calls, ctx.submitted) == (1, 8)
            assert dict(wait_events(ctx, 8)) == {i: ALIGN for i in range(8)} and ctx.in_flight == 0
            assert all(bytes(b) == data[i * ALIGN : (i + 1) * ALIGN] for i, b in enumerate(bufs))
            new = native.aligned_buffer(ALIGN)
            new[:] = pattern(ALIGN, 2)
            ctx.submit_many([req(WRITE, fd, new, 15 * ALIGN, "w")])
            assert dict(wait_events(ctx, 1)) == {"w": ALIGN}
            ctx.submit_many([req(FSYNC, fd, token="s", flags=native.IORING_FSYNC_DATASYNC)])
            assert dict(wait_events(ctx, 1)) == {"s": 0}
            assert ctx.submit_calls == 3 and ctx.reaped == 10
    finally:
        os.close(fd)
    assert path.read_bytes() == data[: 15 * ALIGN] + pattern(ALIGN, 2)


@needs_uring
def test_ring_errors_are_completions_with_negative_errno(disk_dir):
    path = make_file(disk_dir, pattern(4 * ALIGN, 3))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with native.UringContext(8) as ctx:
            buf = native.aligned_buffer(2 * ALIGN)
            misaligned = memoryview(buf)[512 + 3 : 512 + 3 + ALIGN]
            bad_fd = os.open(os.devnull, os.O_RDONLY)
            os.close(bad_fd)
            rejected = ctx.submit_many([
                req(READ, fd, buf, 0, "ok"),
                req(READ, bad_fd, buf, 0, "ebadf"),
                req(READ, fd, misaligned, 0, "einval"),
                req(WRITE, fd, buf, 0, "rdonly"),
                req(255, fd, buf, 0, "opcode"),
            ])
            assert rejected == [] and ctx.submit_calls == 1  # SUBMIT_ALL: one bad SQE stops nothing
            assert dict(wait_events(ctx, 5)) == {
                "ok": 2 * ALIGN, "ebadf": -errno.EBADF, "einval": -errno.EINVAL,
                "rdonly": -errno.EBADF, "opcode": -errno.EINVAL,
            }
            with pytest.raises(ValueError):
                ctx.submit_many([req(FSYNC, fd)] * 9)
            with pytest.raises(BufferError):  # a read into read-only memory: nothing prepped
                ctx.submit_many([req(READ, fd, buf, 0), req(READ, fd, bytes(ALIGN), 0)])
            assert ctx.free_slots == 8 and native.lib.cachefs_uring_sq_ready(ctx._ring) == 0
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        ctx.reap()
    assert info.value.errno == errno.EBADF


@needs_uring
def test_ring_keeps_buffers_alive_and_close_waits(disk_dir):
    """Buffers dropped by the caller right after submitting are still filled;
    close and the finalizer wait for in-flight requests."""
    data = pattern(64 * ALIGN, 4)
    path = make_file(disk_dir, data)
    fd = os.open(path, os.O_RDONLY)  # buffered: cold-cache reads take a while
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        ctx = native.UringContext(64)
        ctx.submit_many([req(READ, fd, bytearray(ALIGN), i * ALIGN, i) for i in range(64)])
        gc.collect()
        assert sorted(wait_events(ctx, 64)) == [(i, ALIGN) for i in range(64)]
        ctx.close()
        for _ in range(3):  # a close that did not wait fails about half of these rounds
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            ctx = native.UringContext(8)
            keep = [bytearray(len(data)) for _ in range(8)]
            ctx.submit_many([req(READ, fd, b, 0) for b in keep])
            assert ctx.in_flight == 8
            ctx.close()  # waits for the 8 reads
            assert all(b == data for b in keep), "close returned before the kernel finished"
        ctx.close()  # idempotent
        ctx = native.UringContext(4)  # dropped unclosed: the finalizer waits the same way
        ctx.submit_many([req(READ, fd, bytearray(ALIGN), 0)])
        del ctx
        gc.collect()
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the backends


@EACH_KIND
async def test_backend_protocol_and_open_flags(disk_dir, sub, direct):
    path = make_file(disk_dir, bytes(2 * ALIGN))
    with sub.open(path, writable=True, direct=direct) as be:
        assert isinstance(be, Backend) and be.direct == direct
        assert bool(fdinfo_flags(be.fd) & O_DIRECT_FLAG) == direct and not fdinfo_flags(be.fd) & O_DSYNC_FLAG
        assert be.size() == 2 * ALIGN and sub.backend.__name__ in repr(be)
    with sub.open(path, writable=True, direct=direct, sync=True) as be:
        assert be.direct == direct and bool(fdinfo_flags(be.fd) & O_DIRECT_FLAG) == direct
        assert fdinfo_flags(be.fd) & O_DSYNC_FLAG
    with sub.open(path, writable=False, direct=direct, sync=True) as be:
        assert fdinfo_flags(be.fd) & O_DSYNC_FLAG
        with pytest.raises(OSError) as info:
            await be.pwrite(0, bytes(ALIGN))  # O_RDONLY: refused (io_submit; io_uring's completion)
        assert info.value.errno == errno.EBADF
    with sub.open(disk_dir / "new", writable=True, create=True, direct=direct) as be:
        assert be.size() == 0
    with pytest.raises(FileExistsError):
        sub.open(disk_dir / "new", writable=True, create=True, direct=direct)


@pytest.mark.parametrize("sub,direct,via_thread", [
    pytest.param(AIO, True, True, marks=needs_native, id="aio-extend-thread"),
    pytest.param(AIO, True, False, marks=needs_native, id="aio-extend-aio"),
    pytest.param(URING, False, None, marks=needs_uring, id="io_uring-buffered"),
    pytest.param(URING, True, None, marks=needs_uring, id="io_uring-direct"),
])
async def test_random_io_matches_model(disk_dir, sub, direct, via_thread):
    """Aligned and unaligned reads and writes (read-modify-write when direct),
    growing the file, against a bytearray."""
    rng = random.Random(5)
    model = bytearray(pattern(3 * ALIGN + 100, 6))
    path = make_file(disk_dir, bytes(model))
    with sub.open(path, writable=True, direct=direct) as be:
        if via_thread is not None:
            be.extend_via_thread = via_thread
        for i in range(600):
            offset = rng.choice([rng.randrange(0, len(model) + 3 * ALIGN), rng.randrange(0, 10) * ALIGN])
            length = rng.choice([rng.randrange(1, 3 * ALIGN), rng.randrange(1, 4) * ALIGN, 1])
            if rng.random() < 0.5:
                data = rng.randbytes(length)
                if rng.random() < 0.3:  # an aligned buffer, so aligned direct writes go zero-copy
                    buf = native.aligned_buffer(length)
                    buf[:] = data
                    data = memoryview(buf)
                await be.pwrite(offset, data)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + length] = data
                assert be.size() == len(model), f"step {i}: size after write {offset}+{length}"
            else:
                got = await be.pread(offset, length)
                assert type(got) is bytes
                assert got == bytes(model[offset : offset + length]), i
        c = be.counters
        assert c.reads + c.writes == 600
        if direct:
            assert c.bounce_requests > 0 and c.direct_bytes >= c.bytes_read + c.bytes_written
        else:
            assert c.bounce_requests == 0 and c.direct_bytes == 0
        if via_thread is not None:
            assert (be.thread_writes > 0) == via_thread
        await be.fdatasync()
        assert c.fdatasyncs == 1
    assert path.read_bytes() == model


@EACH_KIND
async def test_eof_short_reads_and_extending_writes(disk_dir, sub, direct):
    data = pattern(10_000, 7)
    path = make_file(disk_dir, data)
    with sub.open(path, writable=True, direct=direct) as be:
        assert await be.pread(9000, 4096) == data[9000:]  # short, not padded
        assert await be.pread(8192, 4096) == data[8192:]  # aligned, EOF mid-block
        assert await be.pread(10_000, 10) == b""
        assert await be.pread(50_000, 4096) == b""
        assert await be.pread(0, 0) == b""
        assert await be.pread(0, 20_000) == data
        with pytest.raises(OSError) as info:
            await be.pread(-1, 10)
        assert info.value.errno == errno.EINVAL
        await be.pwrite(10_005, b"tail")  # unaligned, past EOF: the gap reads as zeros
        assert be.size() == 10_009
        await be.pwrite(4 * ALIGN, bytes(range(256)) * 16)  # aligned, extends to a block boundary
        assert be.size() == 5 * ALIGN
        if sub is AIO:
            assert be.thread_writes == 2  # both moved EOF: not inside io_submit (ext4 would block)
        await be.pwrite(ALIGN, b"inside")
        if sub is AIO:
            assert be.thread_writes == 2
        assert await be.pread(9990, 30) == data[9990:] + b"\0" * 5 + b"tail" + b"\0" * 11
        assert await be.pread(ALIGN - 1, 8) == data[ALIGN - 1 : ALIGN] + b"inside" + data[ALIGN + 6 : ALIGN + 7]
        await be.truncate(100)
        assert be.size() == 100 and await be.pread(0, 4096) == data[:100]
    assert path.read_bytes() == data[:100]


@EACH
async def test_concurrent_requests_and_neighbouring_rmw(disk_dir, sub):
    data = pattern(256 * ALIGN, 8)
    path = make_file(disk_dir, data)
    results: dict[int, bytes] = {}
    with sub.open(path, writable=True, direct=True, depth=16) as be:
        peak = 0

        async def read(i: int) -> None:
            nonlocal peak
            results[i] = await be.pread(i * ALIGN + 7 * (i % 2), ALIGN)
            peak = max(peak, be.ctx.in_flight)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(read, i)
        # More requests than slots: the rest queued until slots came back.
        assert peak <= 16 and be.ctx.free_slots == 16
        # Writes to neighbouring bytes of one block: read-modify-write must not lose any.
        pieces = [(i * 150 + 3, pattern(140, 100 + i)) for i in range(64)]
        model = bytearray(data)
        async with trio.open_nursery() as nursery:
            for offset, piece in pieces:
                model[offset : offset + len(piece)] = piece
                nursery.start_soon(be.pwrite, offset, piece)
    assert all(results[i] == data[i * ALIGN + 7 * (i % 2) :][:ALIGN] for i in range(200))
    assert path.read_bytes() == model


@EACH_KIND
async def test_concurrent_extending_writes(disk_dir, sub, direct):
    """Extending writes race each other (the _eof_lock keeps their tails right)."""
    path = make_file(disk_dir, b"")
    writes = [(i * 5000 + 1, pattern(3000, 200 + i)) for i in range(20)]
    with sub.open(path, writable=True, direct=direct) as be:
        async with trio.open_nursery() as nursery:
            for offset, data in reversed(writes):
                nursery.start_soon(be.pwrite, offset, data)
        assert be.size() == writes[-1][0] + 3000
    content = path.read_bytes()
    for offset, data in writes:
        assert content[offset : offset + len(data)] == data
    model = bytearray()
    for offset, data in writes:
        model.extend(bytes(offset - len(model)))
        model[offset:] = data
    assert content == model


@EACH_KIND
async def test_one_tick_of_requests_is_one_submit(disk_dir, sub, direct):
    data = pattern(64 * ALIGN, 9)
    path = make_file(disk_dir, data)
    with sub.open(path, writable=False, direct=direct) as be:
        await be.pread(0, ALIGN)  # starts the batcher and reaper
        calls, submitted = be.ctx.submit_calls, be.ctx.submitted
        out: dict[int, bytes] = {}

        async def read(i: int) -> None:
            out[i] = await be.pread(i * ALIGN, ALIGN)

        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(read, i)
        assert be.ctx.submitted - submitted == 64
        assert be.ctx.submit_calls - calls <= 2, "64 reads started together should share a submit"
        assert be.ctx.submitted / be.ctx.submit_calls > 1
    assert b"".join(out[i] for i in range(64)) == data


@EACH
async def test_aligned_buffer_direct_write_needs_no_bounce(disk_dir, sub):
    path = make_file(disk_dir, b"")
    with sub.open(path, writable=True, direct=True) as be:
        buf = native.aligned_buffer(2 * ALIGN)
        buf[:] = pattern(2 * ALIGN, 10)
        await be.pwrite(ALIGN, memoryview(buf))
        assert await be.pread(ALIGN, 2 * ALIGN) == bytes(buf)
        assert be.counters.bounce_requests == 0 and be.counters.direct_bytes == 4 * ALIGN
        await be.pwrite(0, bytes(ALIGN))  # aligned range, unaligned bytes object: one copy
        assert be.counters.bounce_requests == 1


@EACH_KIND
async def test_errors_are_oserror_with_errno(disk_dir, sub, direct):
    path = make_file(disk_dir, pattern(4 * ALIGN, 11))
    be = sub.open(path, writable=True, direct=direct)
    os.close(be.fd)  # pulled out from under it: io_submit (every io_uring completion) says EBADF
    for call in (be.pread(0, ALIGN), be.pwrite(1, b"x"), be.fdatasync()):
        with pytest.raises(OSError) as info:
            await call
        assert info.value.errno == errno.EBADF
    if sub is AIO:
        assert be.native_fdsync  # EBADF is not "FDSYNC unsupported"
    be.fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))  # so close() has its own fd to close
    be.close()
    be.close()  # idempotent
    with pytest.raises(OSError) as info:
        await be.pread(0, 1)
    assert info.value.errno == errno.EBADF


# ---------------------------------------------------------------- cancellation and close


def hold_completions(be) -> list:
    """Completions the kernel delivered but the backend has not seen yet.

    Makes "cancelled while its I/O is in flight" deterministic: the reaper
    keeps reaping (so the kernel is done with the buffers) but the results
    are held back until the test hands them over with ``release``.
    """
    held: list = []
    real = be.ctx.reap
    be.ctx.reap = lambda min_nr=0: held.extend(real(min_nr)) or []
    return held


def release(be, held: list) -> None:
    del be.ctx.reap  # the class's method again
    for op, res in held:
        be._complete(op, res)


@EACH_KIND
async def test_cancelled_reads_are_dropped_and_buffers_survive(disk_dir, sub, direct):
    data = pattern(64 * ALIGN, 12)
    path = make_file(disk_dir, data)
    with sub.open(path, writable=True, direct=direct) as be:
        await be.pread(0, 1)
        held = hold_completions(be)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(be.pread, i * ALIGN + 1, ALIGN)
                with trio.fail_after(10):
                    while len(held) < 16:
                        await trio.sleep(0.001)
                scope.cancel()
        assert scope.cancelled_caught and be._live == set()
        release(be, held)  # late completions of abandoned reads: dropped
        gc.collect()
        assert await be.pread(5, 3 * ALIGN) == data[5 : 5 + 3 * ALIGN]
        with trio.move_on_after(0):  # cancelled before the submitter ran: never submitted
            await be.pread(0, len(data))
        # Cancelled with the kernel (maybe) still busy on a cold cache (in 4 of 5 runs here:
        # a disk read of 256 KiB takes longer than the scheduler needs to get here).
        be.drop_page_cache()
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(be.pread, 0, len(data))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        gc.collect()  # the abandoned buffers survive this: the context's slots hold them
        assert await be.pread(0, len(data)) == data
    # close() waited for whatever was still in flight.


@EACH_KIND
async def test_cancelled_write_in_flight_still_completes(disk_dir, sub, direct):
    path = make_file(disk_dir, bytes(2 * ALIGN))
    with sub.open(path, writable=True, direct=direct) as be:
        await be.pread(0, 1)
        held = hold_completions(be)
        done = []
        scopes: list[trio.CancelScope] = []

        async def write() -> None:
            with trio.CancelScope() as scope:
                scopes.append(scope)
                await be.pwrite(ALIGN, b"w" * ALIGN)
                done.append("returned")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            with trio.fail_after(10):
                while not held:
                    await trio.sleep(0.001)
            scopes[0].cancel()  # the write is submitted: it cannot be abandoned
            await trio.testing.wait_all_tasks_blocked()
            assert be._live, "the write still waits for its completion"
            if sub is AIO:
                assert be._ranges._held, "the write still holds its range lock"
            release(be, held)
        assert done == ["returned"]  # it finished; the cancel lands at its next checkpoint
        assert await be.pread(ALIGN, ALIGN) == b"w" * ALIGN


@EACH
async def test_close_fails_waiting_requests(disk_dir, sub):
    path = make_file(disk_dir, pattern(4 * ALIGN, 13))
    be = sub.open(path, writable=True)
    await be.pread(0, 1)
    held = hold_completions(be)
    errors = []

    async def read() -> None:
        try:
            await be.pread(0, ALIGN)
        except OSError as exc:
            errors.append(exc.errno)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(read)
        with trio.fail_after(10):
            while len(held) < 4:
                await trio.sleep(0.001)
        be.close()
    assert errors == [errno.EBADF] * 4 and be.fd is None


@EACH_KIND
async def test_close_with_io_in_flight(disk_dir, sub, direct):
    """Waiting callers get EBADF; close returns only once the kernel is done
    with their buffers (cold-cache 1 MiB reads: usually still in flight)."""
    data = pattern(256 * ALIGN, 13)
    path = make_file(disk_dir, data)
    be = sub.open(path, writable=True, direct=direct)
    be.drop_page_cache()
    await be.pread(0, 1)
    errors = []

    async def read() -> None:
        try:
            await be.pread(0, len(data))
        except OSError as exc:
            errors.append(exc.errno)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        ctx = be.ctx
        in_flight = [entry[1] for entry in ctx._slots if entry is not None]
        be.close()
        assert all(entry is None for entry in ctx._slots)
    assert len(errors) == len(in_flight) and set(errors) <= {errno.EBADF}
    # Whatever was in flight at close was complete when close returned.
    assert all(bytes(native.ffi.buffer(cbuf)) == data for cbuf in in_flight)
    assert be.fd is None


@EACH
def test_backend_across_trio_runs(disk_dir, sub):
    """The batcher and reaper are a system task of whichever run uses the backend; an
    unclosed backend does not keep trio.run from returning."""
    data = pattern(8 * ALIGN, 14)
    be = sub.open(make_file(disk_dir, data), writable=True)

    async def use() -> bytes:
        return await be.pread(3, 5 * ALIGN)

    assert trio.run(use) == data[3 : 3 + 5 * ALIGN]
    assert be._tasks_scope is None  # stopped with its run
    assert trio.run(use) == data[3 : 3 + 5 * ALIGN]
    be.close()


# ---------------------------------------------------------------- AIO only: fallbacks and refusals


@needs_native
async def test_fdatasync_native_and_thread_fallback(disk_dir, monkeypatch):
    path = make_file(disk_dir, bytes(ALIGN))
    thread_syncs = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (thread_syncs.append(fd), real(fd))[1])
    with AioBackend.open(path, writable=True) as be:
        await be.pwrite(0, b"a" * ALIGN)
        before = be.aio.submitted
        await be.fdatasync()  # IOCB_CMD_FDSYNC (Linux >= 4.18 on ext4/xfs)
        assert be.native_fdsync and be.aio.submitted == before + 1 and thread_syncs == []
        be.native_fdsync = False  # forced: the thread path
        await be.fdatasync()
        assert be.aio.submitted == before + 1 and thread_syncs == [be.fd]
        assert be.counters.fdatasyncs == 2
    # The kernel refusing the opcode (EINVAL) switches to the thread for good.
    monkeypatch.setattr(aio_mod, "IOCB_CMD_FDSYNC", 99)
    with AioBackend.open(path, writable=True) as be:
        await be.fdatasync()
        assert not be.native_fdsync and thread_syncs[-1] == be.fd
        await be.fdatasync()
        assert len(thread_syncs) == 3 and be.counters.fdatasyncs == 2


@needs_native
async def test_without_native_module_open_refuses_and_filebackend_works(disk_dir, monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    path = make_file(disk_dir, pattern(5000, 15))
    with pytest.raises(AioUnavailable) as info:
        AioBackend.open(path, writable=True)
    msg = str(info.value)
    assert isinstance(info.value, CachefsError) and isinstance(info.value, native.NativeUnavailable)
    assert "\n" not in msg and str(path) in msg and "--aio threads" in msg
    with FileBackend.open(path, writable=True, direct=True) as be:  # the thread pool still works
        await be.pwrite(4000, b"z" * 1500)
        assert await be.pread(3999, 1502) == path.read_bytes()[3999:4000] + b"z" * 1500 + b""


@needs_native
def test_package_imports_without_the_compiled_module(tmp_path):
    code = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "cachefs.native._cachefs_native":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
from cachefs.backend import AioBackend, AioUnavailable
try:
    AioBackend.open(sys.argv[1], writable=True)
except AioUnavailable as exc:
    assert "blocked for the test" in str(exc), exc
    print("refused")
"""
    path = tmp_path / "f"
    path.write_bytes(bytes(ALIGN))
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused"


@needs_native
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_filesystem_without_odirect_is_refused_by_name(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "cachefs-test", str(mnt)], check=True)
    try:
        path = make_file(mnt, bytes(ALIGN), "vm.qcow2")
        with pytest.raises(UnsupportedImage) as info:
            AioBackend.open(path, writable=True)
        assert str(info.value) == (
            f"{path}: the backing filesystem (ramfs) does not support O_DIRECT, "
            "which native AIO needs; use --aio threads or put the images on ext4/xfs"
        )
        with pytest.raises(UnsupportedImage):
            AioBackend.open(mnt / "new.qcow2", writable=True, create=True)
        assert not (mnt / "new.qcow2").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ---------------------------------------------------------------- io_uring only: ENOSPC, selection, refusals


@needs_uring
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_enospc_comes_back_as_errno(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "cachefs-test", str(mnt)], check=True)
    try:
        with UringBackend.open(mnt / "f", writable=True, create=True) as be:
            with pytest.raises(OSError) as info:
                for i in range(128):
                    await be.pwrite(i * 8192, bytes(8192))
            assert info.value.errno == errno.ENOSPC
            assert await be.pread(0, 10) == bytes(10)  # still usable
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@needs_uring
def test_file_opener_serves_every_mode_with_io_uring(disk_dir):
    path = make_file(disk_dir, bytes(ALIGN))
    open_for = file_opener(str(path), True, "io_uring")
    for name in ("writeback", "writethrough", "unsafe", "none", "directsync"):
        mode = mode_named(name)
        with open_for(mode) as be:
            assert isinstance(be, UringBackend) and be.direct == mode.direct
            assert submitter_name(be) == "io_uring"
    with pytest.raises(ValueError):
        file_opener(str(path), True, "io-uring")


@needs_uring
@pytest.mark.parametrize("why", ["no-liburing", "eperm"])
def test_unavailable_is_one_line_naming_the_reason(disk_dir, monkeypatch, why):
    path = make_file(disk_dir, bytes(ALIGN))
    if why == "no-liburing":
        monkeypatch.setattr(native, "uring_available", lambda: "cachefs.native was built without liburing")
        want = "built without liburing"
    else:
        def refuse(depth):
            raise OSError(errno.EPERM, "io_uring_setup: Operation not permitted")
        monkeypatch.setattr(native, "UringContext", refuse)
        want = "kernel.io_uring_disabled"
    with pytest.raises(UringUnavailable) as info:
        UringBackend.open(path, writable=True)
    msg = str(info.value)
    assert isinstance(info.value, SubmitterUnavailable) and isinstance(info.value, CachefsError)
    assert "\n" not in msg and str(path) in msg and want in msg and "--aio threads" in msg
    assert sorted(os.listdir(disk_dir)) == ["img"]  # nothing opened, nothing created


@needs_uring
def test_kernel_refusal_under_seccomp(disk_dir):
    """The real thing: io_uring_setup denied (as in a Docker container)."""
    code = r"""
import sys
from cachefs.backend import UringBackend, UringUnavailable
try:
    UringBackend.open(sys.argv[1], writable=True)
except UringUnavailable as exc:
    print(exc)
"""
    path = make_file(disk_dir, bytes(ALIGN))
    out = subprocess.run([sys.executable, str(HERE / "no_io_uring.py"), sys.executable, "-c", code, str(path)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"{path}: --aio io_uring is not available: io_uring_setup failed (Operation not permitted): "
        "io_uring is disabled here (sysctl kernel.io_uring_disabled, or a seccomp filter); use --aio threads"
    )


@needs_uring
def test_module_default_depth_fits_the_ring():
    assert 0 < uring_mod.DEFAULT_DEPTH <= 4096
