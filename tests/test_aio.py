"""Linux native AIO: the raw AioContext and AioBackend, on real files on a real disk.

O_DIRECT and AIO only behave like production on a filesystem that really
does direct I/O (tmpfs accepts O_DIRECT since 6.6 but never goes to a
device), so every file lives in a directory under /var/tmp, or tmp_path,
whichever is such a filesystem.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import select
import subprocess
import sys

import pytest
import trio
import trio.testing

from cachefs import native
from cachefs.backend import ALIGN, AioBackend, AioUnavailable, Backend, FileBackend
from cachefs.backend import aio as aio_mod
from cachefs.errors import CachefsError, UnsupportedImage
from directio import O_DIRECT_FLAG, O_DSYNC_FLAG, disk_dir, fdinfo_flags, make_file, pattern  # noqa: F401

needs_native = pytest.mark.skipif(not native.available(), reason="native module not built")
pytestmark = needs_native


def wait_events(ctx: native.AioContext, want: int, timeout: float = 10.0) -> list:
    """Reap until ``want`` completions arrived, sleeping on the eventfd in between."""
    got: list = []
    while len(got) < want:
        ready, _, _ = select.select([ctx.eventfd], [], [], timeout)
        assert ready, "eventfd never became readable"
        got += ctx.reap()
    return got


# ---------------------------------------------------------------- the raw context


def test_opcodes_are_the_kernel_abi():
    for name in ("PREAD", "PWRITE", "FDSYNC"):
        assert getattr(native, f"IOCB_CMD_{name}") == getattr(native.lib, f"IOCB_CMD_{name}")
    assert native.ffi.sizeof("struct iocb") == 64  # <linux/aio_abi.h>: "64 bytes"
    assert native.ffi.sizeof("struct io_event") == 32


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


def test_context_needs_the_module(monkeypatch):
    with pytest.raises(ValueError):
        native.AioContext(0)
    monkeypatch.setattr(native, "lib", None)
    with pytest.raises(native.NativeUnavailable):
        native.AioContext(8)


# ---------------------------------------------------------------- the backend


async def test_backend_protocol_and_open_flags(disk_dir):
    path = make_file(disk_dir, bytes(2 * ALIGN))
    with AioBackend.open(path, writable=True) as be:
        assert isinstance(be, Backend) and be.direct
        assert fdinfo_flags(be.fd) & O_DIRECT_FLAG and not fdinfo_flags(be.fd) & O_DSYNC_FLAG
        assert be.size() == 2 * ALIGN
    with AioBackend.open(path, writable=False, sync=True) as be:
        assert fdinfo_flags(be.fd) & O_DSYNC_FLAG
        with pytest.raises(OSError) as info:
            await be.pwrite(0, bytes(ALIGN))  # O_RDONLY: refused by io_submit
        assert info.value.errno == errno.EBADF
    with AioBackend.open(disk_dir / "new", writable=True, create=True) as be:
        assert be.size() == 0
    with pytest.raises(FileExistsError):
        AioBackend.open(disk_dir / "new", writable=True, create=True)


@pytest.mark.parametrize("via_thread", [True, False], ids=["extend-thread", "extend-aio"])
async def test_random_io_matches_model(disk_dir, via_thread):
    """Aligned and unaligned reads and writes, growing the file, against a bytearray."""
    rng = random.Random(5)
    model = bytearray(pattern(3 * ALIGN + 100, 6))
    path = make_file(disk_dir, bytes(model))
    with AioBackend.open(path, writable=True) as be:
        be.extend_via_thread = via_thread
        for i in range(600):
            offset = rng.choice([rng.randrange(0, len(model) + 3 * ALIGN), rng.randrange(0, 10) * ALIGN])
            length = rng.choice([rng.randrange(1, 3 * ALIGN), rng.randrange(1, 4) * ALIGN, 1])
            if rng.random() < 0.5:
                data = rng.randbytes(length)
                if rng.random() < 0.3:  # an aligned buffer, so aligned writes go zero-copy
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
        assert c.bounce_requests > 0 and c.direct_bytes >= c.bytes_read + c.bytes_written
        assert c.reads + c.writes == 600
        assert (be.thread_writes > 0) == via_thread
    assert path.read_bytes() == model


async def test_eof_short_reads_and_extending_writes(disk_dir):
    data = pattern(10_000, 7)
    path = make_file(disk_dir, data)
    with AioBackend.open(path, writable=True) as be:
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
        assert be.thread_writes == 2  # both moved EOF: not inside io_submit (ext4 would block)
        await be.pwrite(ALIGN, b"inside")
        assert be.thread_writes == 2
        assert await be.pread(9990, 30) == data[9990:] + b"\0" * 5 + b"tail" + b"\0" * 11
        assert await be.pread(ALIGN - 1, 8) == data[ALIGN - 1 : ALIGN] + b"inside" + data[ALIGN + 6 : ALIGN + 7]
        await be.truncate(100)
        assert be.size() == 100 and await be.pread(0, 4096) == data[:100]
    assert path.read_bytes() == data[:100]


async def test_concurrent_requests_all_complete(disk_dir):
    data = pattern(256 * ALIGN, 8)
    path = make_file(disk_dir, data)
    results: dict[int, bytes] = {}
    with AioBackend.open(path, writable=True, depth=16) as be:
        peak = 0

        async def read(i: int) -> None:
            nonlocal peak
            results[i] = await be.pread(i * ALIGN + 7 * (i % 2), ALIGN)
            peak = max(peak, be.aio.in_flight)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(read, i)
        # More requests than slots: the rest queued until slots came back.
        assert peak <= 16 and be.aio.free_slots == 16
        # Writes to neighbouring bytes of one block: read-modify-write must not lose any.
        pieces = [(i * 150 + 3, pattern(140, 100 + i)) for i in range(64)]
        model = bytearray(data)
        async with trio.open_nursery() as nursery:
            for offset, piece in pieces:
                model[offset : offset + len(piece)] = piece
                nursery.start_soon(be.pwrite, offset, piece)
    assert all(results[i] == data[i * ALIGN + 7 * (i % 2) :][:ALIGN] for i in range(200))
    assert path.read_bytes() == model


async def test_concurrent_extending_writes(disk_dir):
    path = make_file(disk_dir, b"")
    writes = [(i * 5000 + 1, pattern(3000, 200 + i)) for i in range(20)]
    with AioBackend.open(path, writable=True) as be:
        async with trio.open_nursery() as nursery:
            for offset, data in reversed(writes):
                nursery.start_soon(be.pwrite, offset, data)
        assert be.size() == writes[-1][0] + 3000
    content = path.read_bytes()
    for offset, data in writes:
        assert content[offset : offset + len(data)] == data


async def test_one_tick_of_requests_is_one_io_submit(disk_dir):
    data = pattern(64 * ALIGN, 9)
    path = make_file(disk_dir, data)
    with AioBackend.open(path, writable=False) as be:
        await be.pread(0, ALIGN)  # starts the batcher and reaper
        calls, submitted = be.aio.submit_calls, be.aio.submitted
        out: dict[int, bytes] = {}

        async def read(i: int) -> None:
            out[i] = await be.pread(i * ALIGN, ALIGN)

        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(read, i)
        assert be.aio.submitted - submitted == 64
        assert be.aio.submit_calls - calls <= 2, "64 reads started together should share an io_submit"
    assert b"".join(out[i] for i in range(64)) == data


async def test_aligned_buffer_write_needs_no_bounce(disk_dir):
    path = make_file(disk_dir, b"")
    with AioBackend.open(path, writable=True) as be:
        buf = native.aligned_buffer(2 * ALIGN)
        buf[:] = pattern(2 * ALIGN, 10)
        await be.pwrite(ALIGN, memoryview(buf))
        assert await be.pread(ALIGN, 2 * ALIGN) == bytes(buf)
        assert be.counters.bounce_requests == 0 and be.counters.direct_bytes == 4 * ALIGN
        await be.pwrite(0, bytes(ALIGN))  # aligned range, unaligned bytes object: one copy
        assert be.counters.bounce_requests == 1


async def test_errors_are_oserror_with_errno(disk_dir):
    path = make_file(disk_dir, pattern(4 * ALIGN, 11))
    be = AioBackend.open(path, writable=True)
    os.close(be.fd)  # pulled out from under it: io_submit says EBADF
    for call in (be.pread(0, ALIGN), be.pwrite(1, b"x"), be.fdatasync()):
        with pytest.raises(OSError) as info:
            await call
        assert info.value.errno == errno.EBADF
    assert be.native_fdsync  # EBADF is not "FDSYNC unsupported"
    be.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)  # so close() has its own fd to close
    be.close()
    be.close()  # idempotent
    with pytest.raises(OSError) as info:
        await be.pread(0, 1)
    assert info.value.errno == errno.EBADF


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


def hold_completions(be: AioBackend) -> list:
    """Completions the kernel delivered but the backend has not seen yet.

    Makes "cancelled while its I/O is in flight" deterministic: the reaper
    keeps reaping (so the kernel is done with the buffers) but the results
    are held back until the test hands them over with ``release``.
    """
    held: list = []
    real = be.aio.reap
    be.aio.reap = lambda min_nr=0: held.extend(real(min_nr)) or []
    return held


def release(be: AioBackend, held: list) -> None:
    del be.aio.reap  # the class's method again
    for op, res in held:
        be._complete(op, res)


async def test_cancelled_reads_are_dropped_and_backend_stays_usable(disk_dir):
    data = pattern(64 * ALIGN, 12)
    path = make_file(disk_dir, data)
    with AioBackend.open(path, writable=True) as be:
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
        # Cancelled before the submitter ran: never submitted at all.
        with trio.move_on_after(0):
            await be.pread(0, len(data))
        # Cancelled with the kernel still busy (in 4 of 5 runs here: a disk
        # read of 256 KiB takes longer than the scheduler needs to get here).
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(be.pread, 0, len(data))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        gc.collect()  # the abandoned buffers survive this: AioContext holds them
        assert await be.pread(0, len(data)) == data
    # close() waited for whatever was still in flight.


async def test_cancelled_write_in_flight_still_completes(disk_dir):
    path = make_file(disk_dir, bytes(2 * ALIGN))
    with AioBackend.open(path, writable=True) as be:
        await be.pread(0, 1)
        held = hold_completions(be)
        done = []

        async def write() -> None:
            with trio.CancelScope() as scope:
                nursery_scope.append(scope)
                await be.pwrite(ALIGN, b"w" * ALIGN)
                done.append("returned")

        nursery_scope: list[trio.CancelScope] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            with trio.fail_after(10):
                while not held:
                    await trio.sleep(0.001)
            nursery_scope[0].cancel()  # the write is submitted: it cannot be abandoned
            await trio.testing.wait_all_tasks_blocked()
            assert be._live and be._ranges._held, "the write still holds its range lock"
            release(be, held)
        assert done == ["returned"]  # it finished; the cancel lands at its next checkpoint
        assert await be.pread(ALIGN, ALIGN) == b"w" * ALIGN


async def test_close_fails_waiting_requests(disk_dir):
    path = make_file(disk_dir, pattern(4 * ALIGN, 13))
    be = AioBackend.open(path, writable=True)
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


def test_backend_across_trio_runs(disk_dir):
    """The batcher and reaper are a system task of whichever run uses the backend; an
    unclosed backend does not keep trio.run from returning."""
    data = pattern(8 * ALIGN, 14)
    be = AioBackend.open(make_file(disk_dir, data), writable=True)

    async def use() -> bytes:
        return await be.pread(3, 5 * ALIGN)

    assert trio.run(use) == data[3 : 3 + 5 * ALIGN]
    assert be._tasks_scope is None  # stopped with its run
    assert trio.run(use) == data[3 : 3 + 5 * ALIGN]
    be.close()


# ---------------------------------------------------------------- refusals and fallbacks


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
