"""The backend layer against real files on a real disk (not tmpfs).

O_DIRECT behaviour (alignment, EOF, bounce buffers) only shows on a
filesystem that really does direct I/O, so the file tests run in a
directory on one: tmp_path when it qualifies, else the repo's tmp/ or
/var/tmp.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from cachefs import native
from cachefs.backend import (
    ALIGN,
    Backend,
    FaultyBackend,
    FileBackend,
    MemoryBackend,
    RecordingBackend,
    Sync,
    Truncate,
    Write,
    filesystem_type,
    replay,
)
from cachefs.backend import base as base_mod
from cachefs.errors import UnsupportedImage
from directio import O_DIRECT_FLAG, O_DSYNC_FLAG, disk_dir, fdinfo_flags, make_file, pattern  # noqa: F401 (a fixture)



# ---------------------------------------------------------------- buffered


async def test_roundtrip_buffered(disk_dir):
    path = make_file(disk_dir, b"")
    with FileBackend.open(path, writable=True) as be:
        assert isinstance(be, Backend)
        assert not fdinfo_flags(be.fd) & O_DIRECT_FLAG
        data = pattern(100_000, 1)
        await be.pwrite(12_345, data)
        await be.pwrite(0, memoryview(b"head"))
        assert be.size() == 12_345 + len(data)
        assert await be.pread(12_345, len(data)) == data
        assert await be.pread(0, 8) == b"head\0\0\0\0"  # the gap reads as zeros
        await be.fdatasync()
        await be.truncate(5000)
        assert be.size() == 5000
        c = be.counters
        assert (c.writes, c.reads, c.fdatasyncs) == (2, 2, 1)
        assert c.bytes_written == len(data) + 4 and c.bytes_read == len(data) + 8
        assert c.bounce_requests == 0 and c.direct_bytes == 0
    assert be.fd is None
    assert path.read_bytes() == b"head" + bytes(4996)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
async def test_short_read_at_eof(disk_dir, direct):
    data = pattern(10_000, 2)
    path = make_file(disk_dir, data)
    with FileBackend.open(path, writable=False, direct=direct) as be:
        assert await be.pread(9000, 4096) == data[9000:]  # short, not padded
        assert await be.pread(8192, 4096) == data[8192:]  # aligned, EOF mid-block
        assert await be.pread(10_000, 10) == b""
        assert await be.pread(50_000, 4096) == b""
        assert await be.pread(0, 0) == b""
        assert await be.pread(0, 20_000) == data


async def test_readonly_refuses_writes(disk_dir):
    path = make_file(disk_dir, b"x" * 10)
    with FileBackend.open(path, writable=False) as be:
        with pytest.raises(OSError) as info:
            await be.pwrite(0, b"y")
        assert info.value.errno == errno.EBADF


async def test_closed_backend_raises_ebadf(disk_dir):
    be = FileBackend.open(make_file(disk_dir, b"abc"), writable=True)
    be.close()
    be.close()  # idempotent
    with pytest.raises(OSError) as info:
        await be.pread(0, 1)
    assert info.value.errno == errno.EBADF


async def test_create_does_not_clobber(disk_dir):
    path = disk_dir / "new"
    with FileBackend.open(path, writable=True, create=True) as be:
        assert be.size() == 0
    with pytest.raises(FileExistsError):
        FileBackend.open(path, writable=True, create=True)


# ---------------------------------------------------------------- O_DIRECT


async def test_open_flags_in_fdinfo(disk_dir):
    path = make_file(disk_dir, bytes(8192))
    with FileBackend.open(path, writable=True, direct=True) as be:
        flags = fdinfo_flags(be.fd)
        assert flags & O_DIRECT_FLAG and not flags & O_DSYNC_FLAG
    with FileBackend.open(path, writable=True, direct=True, sync=True) as be:
        flags = fdinfo_flags(be.fd)
        assert flags & O_DIRECT_FLAG and flags & O_DSYNC_FLAG
    with FileBackend.open(path, writable=True, sync=True) as be:
        flags = fdinfo_flags(be.fd)
        assert not flags & O_DIRECT_FLAG and flags & O_DSYNC_FLAG


async def test_direct_aligned_write_from_aligned_buffer_needs_no_bounce(disk_dir):
    path = make_file(disk_dir, b"")
    with FileBackend.open(path, writable=True, direct=True) as be:
        buf = base_mod.aligned_memory(2 * ALIGN)
        buf[:] = pattern(2 * ALIGN, 3)
        await be.pwrite(ALIGN, buf)
        assert be.counters.bounce_requests == 0
        assert be.counters.direct_bytes == 2 * ALIGN
        assert await be.pread(ALIGN, 2 * ALIGN) == bytes(buf)
        assert be.counters.bounce_requests == 0
        # Same offsets from a bytes object: unaligned address, so one copy.
        await be.pwrite(0, bytes(ALIGN))
        assert be.counters.bounce_requests == 1
    assert path.read_bytes() == bytes(ALIGN) + bytes(buf)


async def test_direct_unaligned_io_matches_model(disk_dir):
    """Random unaligned reads and writes (growing the file too) via bounce."""
    rng = random.Random(4)
    model = bytearray(pattern(3 * ALIGN + 100, 5))  # size not block-aligned
    path = make_file(disk_dir, bytes(model))
    with FileBackend.open(path, writable=True, direct=True) as be:
        assert fdinfo_flags(be.fd) & O_DIRECT_FLAG
        for i in range(300):
            offset = rng.choice([rng.randrange(0, len(model) + 3 * ALIGN), rng.randrange(0, 8) * ALIGN])
            length = rng.choice([rng.randrange(1, 3 * ALIGN), rng.randrange(1, 4) * ALIGN, 1])
            if rng.random() < 0.5:
                data = rng.randbytes(length)
                await be.pwrite(offset, data)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + length] = data
                assert be.size() == len(model), f"step {i}: size after write {offset}+{length}"
            else:
                assert await be.pread(offset, length) == bytes(model[offset : offset + length]), i
        assert be.counters.bounce_requests > 0
        assert be.counters.direct_bytes >= be.counters.bytes_read + be.counters.bytes_written
    assert path.read_bytes() == model


async def test_direct_concurrent_writes_to_one_block(disk_dir):
    """Read-modify-write must not lose a neighbour's bytes in the same block."""
    path = make_file(disk_dir, bytes(3 * ALIGN))
    pieces = [(i * 150 + 3, pattern(140, i)) for i in range(90)]
    end = pieces[-1][0] + 140
    assert end > 3 * ALIGN  # the last writes grow the file mid-block
    model = bytearray(end)
    with FileBackend.open(path, writable=True, direct=True) as be:
        async with trio.open_nursery() as nursery:
            for offset, data in pieces:
                model[offset : offset + len(data)] = data
                nursery.start_soon(be.pwrite, offset, data)
        assert be.size() == end
    assert path.read_bytes() == model


async def test_direct_concurrent_extending_writes(disk_dir):
    path = make_file(disk_dir, b"")
    writes = [(i * 5000 + 1, pattern(3000, 100 + i)) for i in range(20)]
    with FileBackend.open(path, writable=True, direct=True) as be:
        async with trio.open_nursery() as nursery:
            for offset, data in reversed(writes):
                nursery.start_soon(be.pwrite, offset, data)
        assert be.size() == writes[-1][0] + 3000
    content = path.read_bytes()
    for offset, data in writes:
        assert content[offset : offset + len(data)] == data


async def test_deep_queue_of_reads(disk_dir):
    data = pattern(256 * ALIGN, 6)
    path = make_file(disk_dir, data)
    results: dict[int, bytes] = {}
    with FileBackend.open(path, writable=False, direct=True) as be:

        async def read(i: int) -> None:
            results[i] = await be.pread(i * ALIGN + 7, ALIGN)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(read, i)
    assert all(results[i] == data[i * ALIGN + 7 : (i + 1) * ALIGN + 7] for i in range(200))


async def test_direct_without_native_module(disk_dir, monkeypatch):
    """The mmap bounce buffer and ctypes address check stand in for native."""
    monkeypatch.setattr(native, "available", lambda: False)
    assert base_mod.aligned_memory(100).readonly is False
    path = make_file(disk_dir, pattern(5000, 7))
    model = bytearray(path.read_bytes())
    with FileBackend.open(path, writable=True, direct=True) as be:
        buf = base_mod.aligned_memory(ALIGN)
        assert base_mod.buffer_address(buf) % ALIGN == 0
        buf[:] = pattern(ALIGN, 8)
        await be.pwrite(0, buf)
        assert be.counters.bounce_requests == 0
        await be.pwrite(4000, b"z" * 1500)
        model[0:ALIGN] = buf
        model[4000:5500] = b"z" * 1500
        assert await be.pread(1, 5499) == bytes(model[1:])
    assert path.read_bytes() == model


# ---------------------------------------------------------------- refusal


@contextlib.contextmanager
def mounted(fstype: str, where: Path):
    where.mkdir()
    subprocess.run(["mount", "-t", fstype, "cachefs-test", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
@pytest.mark.parametrize("fstype", ["ramfs", "tmpfs"])
async def test_filesystem_without_odirect_is_refused_by_name(tmp_path, fstype):
    with mounted(fstype, tmp_path / "mnt") as mnt:
        assert filesystem_type(mnt) == fstype
        path = make_file(mnt, b"\0" * ALIGN, "vm.qcow2")
        try:
            os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
            kernel_refuses = False
        except OSError as exc:
            assert exc.errno == errno.EINVAL
            kernel_refuses = True
        if kernel_refuses:
            with pytest.raises(UnsupportedImage) as info:
                FileBackend.open(path, writable=True, direct=True)
            msg = str(info.value)
            assert msg == (
                f"{path}: the backing filesystem ({fstype}) does not support "
                "O_DIRECT (cache modes none and directsync need it); "
                "use --cache writeback or put the images on ext4/xfs"
            )
            assert "\n" not in msg
            # A refused create leaves no empty file behind.
            with pytest.raises(UnsupportedImage):
                FileBackend.open(mnt / "new.qcow2", writable=True, direct=True, create=True)
            assert not (mnt / "new.qcow2").exists()
        else:
            # tmpfs accepts O_DIRECT since Linux 6.6 (it is memory already):
            # then it must simply work, not be refused.
            assert fstype == "tmpfs"
            with FileBackend.open(path, writable=True, direct=True) as be:
                await be.pwrite(10, b"abc")
                assert await be.pread(8, 6) == b"\0\0abc\0"
    if fstype == "ramfs":
        assert kernel_refuses, "ramfs is expected to refuse O_DIRECT"


def test_filesystem_type_agrees_with_findmnt(tmp_path):
    if shutil.which("findmnt") is None:
        pytest.skip("findmnt not installed")
    out = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", str(tmp_path)], capture_output=True, text=True
    )
    assert filesystem_type(tmp_path) == out.stdout.strip()
    assert filesystem_type(tmp_path / "does-not-exist-yet") == out.stdout.strip()


# ---------------------------------------------------------------- memory


async def test_memory_backend():
    be = MemoryBackend(b"hello")
    assert isinstance(be, Backend) and be.fd is None and not be.direct
    await be.pwrite(8, b"world")
    assert be.size() == 13
    assert await be.pread(0, 100) == b"hello\0\0\0world"
    assert await be.pread(20, 5) == b""
    await be.truncate(2)
    assert bytes(be.data) == b"he"
    await be.fdatasync()
    assert (be.counters.writes, be.counters.reads, be.counters.fdatasyncs) == (1, 2, 1)
    be.close()
    with pytest.raises(OSError):
        await be.pread(0, 1)


async def test_memory_backend_counts_what_odirect_would_bounce():
    be = MemoryBackend(direct=True)
    await be.pwrite(0, bytes(ALIGN))
    assert be.counters.bounce_requests == 0
    await be.pwrite(100, b"x")
    await be.pread(0, 10)
    assert be.counters.bounce_requests == 2
    assert be.counters.direct_bytes == 3 * ALIGN


# ---------------------------------------------------------------- faults


@pytest.fixture(params=["memory", "file"])
def inner(request, disk_dir):
    if request.param == "memory":
        yield MemoryBackend(bytes(3 * ALIGN))
    else:
        be = FileBackend.open(make_file(disk_dir, bytes(3 * ALIGN)), writable=True)
        yield be
        be.close()


async def test_fault_once_then_success(inner):
    be = FaultyBackend(inner)
    fault = be.inject("pwrite", errno.EIO)
    with pytest.raises(OSError) as info:
        await be.pwrite(0, b"lost")
    assert info.value.errno == errno.EIO
    assert await be.pread(0, 4) == bytes(4)  # the failed write did nothing
    await be.pwrite(0, b"kept")
    assert await be.pread(0, 4) == b"kept"
    assert fault.hits == 1 and be.injected == 1 and be.faults == []


async def test_fault_always_and_offset_range(inner):
    be = FaultyBackend(inner)
    be.inject("pwrite", errno.ENOSPC, times=None, offset_range=(ALIGN, 2 * ALIGN))
    be.inject("pread", errno.EIO, times=2)
    for _ in range(3):
        with pytest.raises(OSError) as info:
            await be.pwrite(ALIGN - 2, b"overlaps")
        assert info.value.errno == errno.ENOSPC
    await be.pwrite(0, b"before")
    await be.pwrite(2 * ALIGN, b"after")
    for _ in range(2):
        with pytest.raises(OSError) as info:
            await be.pread(0, 6)
        assert info.value.errno == errno.EIO
    assert await be.pread(0, 6) == b"before"


async def test_fault_on_fdatasync(inner):
    be = FaultyBackend(inner)
    be.inject("fdatasync", errno.EIO)
    with pytest.raises(OSError) as info:
        await be.fdatasync()
    assert info.value.errno == errno.EIO
    await be.fdatasync()
    assert be.counters.fdatasyncs == 1  # only the one that reached the file
    with pytest.raises(ValueError):
        be.inject("fdatasync", errno.EIO, offset_range=(0, 1))
    with pytest.raises(ValueError):
        be.inject("fsync", errno.EIO)  # type: ignore[arg-type]


async def test_recording_backend_logs_in_order(inner):
    base = await inner.pread(0, inner.size())
    be = RecordingBackend(inner)
    await be.pwrite(0, b"one")
    await be.fdatasync()
    buf = bytearray(b"two")
    await be.pwrite(ALIGN, buf)
    buf[:] = b"XXX"  # reusing the buffer must not change the record
    await be.truncate(ALIGN + 2)
    assert be.events == [Write(0, b"one"), Sync(covers=1), Write(ALIGN, b"two"), Truncate(ALIGN + 2)]
    assert be.last_sync() == 2
    assert replay(base, be.events) == await inner.pread(0, inner.size())
    assert replay(base, be.events[: be.last_sync()])[:3] == b"one"


# ---------------------------------------------------------------- layering


def test_backend_does_not_import_upper_layers():
    code = (
        "import sys, cachefs.backend; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'pyfuse3' "
        "or m.startswith('cachefs.qcow2')); print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
