"""io_uring: the raw UringContext and UringBackend, on real files on a real disk.

Like tests/test_aio.py (with its disk fixture and helpers, tests/directio.py): every
file lives on a filesystem that really does direct I/O, nothing about the
submitter is mocked. The only stand-in is ``hold_completions``, which lets the
kernel finish but delays handing results to the backend, to make
"cancelled while in flight" deterministic.
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

import pytest
import trio
import trio.testing

from cachefs import native
from cachefs.backend import ALIGN, Backend, SubmitterUnavailable, UringBackend, UringUnavailable
from cachefs.backend import uring as uring_mod
from cachefs.image.backends import file_opener, submitter_name
from cachefs.errors import CachefsError
from cachefs.policy import mode_named
from directio import O_DIRECT_FLAG, O_DSYNC_FLAG, disk_dir, fdinfo_flags, make_file, pattern  # noqa: F401

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(native.uring_available() is not None, reason=str(native.uring_available()))

BOTH = pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])


def wait_events(ctx: native.UringContext, want: int, timeout: float = 10.0) -> list:
    """Reap until ``want`` completions arrived, sleeping on the eventfd in between."""
    got: list = []
    while len(got) < want:
        ready, _, _ = select.select([ctx.eventfd], [], [], timeout)
        assert ready, "eventfd never became readable"
        got += ctx.reap()
    return got


def req(opcode, fd, buf=None, offset=0, token=None, flags=0) -> native.UringRequest:
    return native.UringRequest(opcode, fd, buf, offset, token, flags)


READ, WRITE, FSYNC = native.IORING_OP_READ, native.IORING_OP_WRITE, native.IORING_OP_FSYNC


# ---------------------------------------------------------------- the raw ring


def test_opcodes_are_the_kernel_abi():
    for name in ("IORING_OP_READ", "IORING_OP_WRITE", "IORING_OP_FSYNC", "IORING_FSYNC_DATASYNC"):
        assert getattr(native, name) == getattr(native.lib, name)


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


def test_ring_needs_the_module(monkeypatch):
    with pytest.raises(ValueError):
        native.UringContext(0)
    monkeypatch.setattr(native, "lib", None)
    assert "not available" in native.uring_available()
    with pytest.raises(native.NativeUnavailable):
        native.UringContext(8)


# ---------------------------------------------------------------- the backend


async def test_backend_protocol_and_open_flags(disk_dir):
    path = make_file(disk_dir, bytes(2 * ALIGN))
    with UringBackend.open(path, writable=True) as be:
        assert isinstance(be, Backend) and not be.direct
        assert not fdinfo_flags(be.fd) & (O_DIRECT_FLAG | O_DSYNC_FLAG)
        assert be.size() == 2 * ALIGN and "UringBackend" in repr(be)
    with UringBackend.open(path, writable=True, direct=True, sync=True) as be:
        assert be.direct and fdinfo_flags(be.fd) & O_DIRECT_FLAG and fdinfo_flags(be.fd) & O_DSYNC_FLAG
    with UringBackend.open(path, writable=False) as be:
        with pytest.raises(OSError) as info:
            await be.pwrite(0, b"x")  # O_RDONLY: the completion says EBADF
        assert info.value.errno == errno.EBADF
    with UringBackend.open(disk_dir / "new", writable=True, create=True) as be:
        assert be.size() == 0
    with pytest.raises(FileExistsError):
        UringBackend.open(disk_dir / "new", writable=True, create=True)


@BOTH
async def test_random_io_matches_model(disk_dir, direct):
    """Aligned and unaligned reads and writes (read-modify-write when direct),
    growing the file, against a bytearray."""
    rng = random.Random(5)
    model = bytearray(pattern(3 * ALIGN + 100, 6))
    path = make_file(disk_dir, bytes(model))
    with UringBackend.open(path, writable=True, direct=direct) as be:
        for i in range(500):
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
        assert c.reads + c.writes == 500
        if direct:
            assert c.bounce_requests > 0 and c.direct_bytes >= c.bytes_read + c.bytes_written
        else:
            assert c.bounce_requests == 0 and c.direct_bytes == 0
        await be.fdatasync()
        assert c.fdatasyncs == 1
    assert path.read_bytes() == model


@BOTH
async def test_eof_short_reads_and_extending_writes(disk_dir, direct):
    data = pattern(10_000, 7)
    path = make_file(disk_dir, data)
    with UringBackend.open(path, writable=True, direct=direct) as be:
        assert await be.pread(9000, 4096) == data[9000:]  # short, not padded
        assert await be.pread(8192, 4096) == data[8192:]
        assert await be.pread(10_000, 10) == b""
        assert await be.pread(50_000, 4096) == b""
        assert await be.pread(0, 0) == b""
        assert await be.pread(0, 20_000) == data
        with pytest.raises(OSError) as info:
            await be.pread(-1, 10)
        assert info.value.errno == errno.EINVAL
        await be.pwrite(10_005, b"tail")  # past EOF: the gap reads as zeros
        assert be.size() == 10_009
        await be.pwrite(4 * ALIGN, bytes(range(256)) * 16)
        assert be.size() == 5 * ALIGN
        assert await be.pread(9990, 30) == data[9990:] + b"\0" * 5 + b"tail" + b"\0" * 11
        await be.truncate(100)
        assert be.size() == 100 and await be.pread(0, 4096) == data[:100]
    assert path.read_bytes() == data[:100]


async def test_concurrent_requests_and_neighbouring_rmw(disk_dir):
    data = pattern(256 * ALIGN, 8)
    path = make_file(disk_dir, data)
    results: dict[int, bytes] = {}
    with UringBackend.open(path, writable=True, direct=True, depth=16) as be:
        peak = 0

        async def read(i: int) -> None:
            nonlocal peak
            results[i] = await be.pread(i * ALIGN + 7 * (i % 2), ALIGN)
            peak = max(peak, be.uring.in_flight)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(read, i)
        assert peak <= 16 and be.uring.free_slots == 16
        # Writes to neighbouring bytes of one block: read-modify-write must not lose any.
        pieces = [(i * 150 + 3, pattern(140, 100 + i)) for i in range(64)]
        model = bytearray(data)
        async with trio.open_nursery() as nursery:
            for offset, piece in pieces:
                model[offset : offset + len(piece)] = piece
                nursery.start_soon(be.pwrite, offset, piece)
        # Extending writes race each other (the _eof_lock keeps their tails right).
        writes = [(len(data) + i * 5000 + 1, pattern(3000, 200 + i)) for i in range(10)]
        async with trio.open_nursery() as nursery:
            for offset, piece in reversed(writes):
                nursery.start_soon(be.pwrite, offset, piece)
        for offset, piece in writes:
            model.extend(bytes(offset - len(model)))
            model[offset:] = piece
    assert all(results[i] == data[i * ALIGN + 7 * (i % 2) :][:ALIGN] for i in range(200))
    assert path.read_bytes() == model


@BOTH
async def test_one_tick_of_requests_is_one_submit(disk_dir, direct):
    data = pattern(64 * ALIGN, 9)
    path = make_file(disk_dir, data)
    with UringBackend.open(path, writable=False, direct=direct) as be:
        await be.pread(0, ALIGN)  # starts the batcher and reaper
        calls, submitted = be.uring.submit_calls, be.uring.submitted
        out: dict[int, bytes] = {}

        async def read(i: int) -> None:
            out[i] = await be.pread(i * ALIGN, ALIGN)

        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(read, i)
        assert be.uring.submitted - submitted == 64
        assert be.uring.submit_calls - calls <= 2, "64 reads started together should share a submit"
        assert be.uring.submitted / be.uring.submit_calls > 1
    assert b"".join(out[i] for i in range(64)) == data


async def test_aligned_buffer_direct_write_needs_no_bounce(disk_dir):
    path = make_file(disk_dir, b"")
    with UringBackend.open(path, writable=True, direct=True) as be:
        buf = native.aligned_buffer(2 * ALIGN)
        buf[:] = pattern(2 * ALIGN, 10)
        await be.pwrite(ALIGN, memoryview(buf))
        assert await be.pread(ALIGN, 2 * ALIGN) == bytes(buf)
        assert be.counters.bounce_requests == 0 and be.counters.direct_bytes == 4 * ALIGN


@BOTH
async def test_errors_are_oserror_with_errno(disk_dir, direct):
    path = make_file(disk_dir, pattern(4 * ALIGN, 11))
    be = UringBackend.open(path, writable=True, direct=direct)
    os.close(be.fd)  # pulled out from under it: every completion says EBADF
    for call in (be.pread(0, ALIGN), be.pwrite(1, b"x"), be.fdatasync()):
        with pytest.raises(OSError) as info:
            await call
        assert info.value.errno == errno.EBADF
    be.fd = os.open(path, os.O_RDONLY)  # so close() has its own fd to close
    be.close()
    be.close()  # idempotent
    with pytest.raises(OSError) as info:
        await be.pread(0, 1)
    assert info.value.errno == errno.EBADF


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


# ---------------------------------------------------------------- cancellation and close


def hold_completions(be: UringBackend) -> list:
    """Completions the kernel delivered but the backend has not seen yet (see test_aio)."""
    held: list = []
    real = be.uring.reap
    be.uring.reap = lambda min_nr=0: held.extend(real(min_nr)) or []
    return held


def release(be: UringBackend, held: list) -> None:
    del be.uring.reap
    for op, res in held:
        be._complete(op, res)


@BOTH
async def test_cancelled_reads_are_dropped_and_buffers_survive(disk_dir, direct):
    data = pattern(64 * ALIGN, 12)
    path = make_file(disk_dir, data)
    with UringBackend.open(path, writable=True, direct=direct) as be:
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
        # Cancelled with the kernel (maybe) still busy on a cold cache.
        be.drop_page_cache()
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(be.pread, 0, len(data))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        gc.collect()  # the abandoned buffers survive this: the ring's slots hold them
        assert await be.pread(0, len(data)) == data


@BOTH
async def test_cancelled_write_in_flight_still_completes(disk_dir, direct):
    path = make_file(disk_dir, bytes(2 * ALIGN))
    with UringBackend.open(path, writable=True, direct=direct) as be:
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
            scopes[0].cancel()  # submitted: it cannot be abandoned
            await trio.testing.wait_all_tasks_blocked()
            assert be._live, "the write still waits for its completion"
            release(be, held)
        assert done == ["returned"]
        assert await be.pread(ALIGN, ALIGN) == b"w" * ALIGN


@BOTH
async def test_close_with_io_in_flight(disk_dir, direct):
    """Waiting callers get EBADF; close returns only once the kernel is done
    with their buffers (cold-cache 1 MiB reads: usually still in flight)."""
    data = pattern(256 * ALIGN, 13)
    path = make_file(disk_dir, data)
    be = UringBackend.open(path, writable=True, direct=direct)
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
        ring = be.uring
        in_flight = [entry[1] for entry in ring._slots if entry is not None]
        be.close()
        assert all(entry is None for entry in ring._slots)
    assert len(errors) == len(in_flight) and set(errors) <= {errno.EBADF}
    # Whatever was in flight at close was complete when close returned.
    assert all(bytes(native.ffi.buffer(cbuf)) == data for cbuf in in_flight)
    assert be.fd is None


def test_backend_across_trio_runs(disk_dir):
    data = pattern(8 * ALIGN, 14)
    be = UringBackend.open(make_file(disk_dir, data), writable=True)

    async def use() -> bytes:
        return await be.pread(3, 5 * ALIGN)

    assert trio.run(use) == data[3 : 3 + 5 * ALIGN]
    assert be._tasks_scope is None  # stopped with its run
    assert trio.run(use) == data[3 : 3 + 5 * ALIGN]
    be.close()


# ---------------------------------------------------------------- selection and refusals


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


def test_module_default_depth_fits_the_ring():
    assert 0 < uring_mod.DEFAULT_DEPTH <= 4096
