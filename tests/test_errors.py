"""Errors at the layer boundaries (issue 10, item 4; docs/design.md, "Errors").

Each error class carries its errno and fuse/operations.py's ``_fuse_error`` is the one
translation, so these tests check the class a request raises and the errno the
client would get for it.
"""

from __future__ import annotations

import errno

import pytest
import trio

from cachefs.backend import MemoryBackend
from cachefs.image.backends import BackendSet
from cachefs.errors import CorruptImage, UnsupportedImage, UnsupportedOperation
from cachefs.fuse.operations import _fuse_error
from cachefs.image.raw import RawImage
from cachefs.policy import WRITEBACK, WRITETHROUGH
from cachefs.qcow2 import format as fmt
from memimage import new_buffer, open_memory

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _client_errno(exc: BaseException) -> int:
    return _fuse_error(exc).errno


# ---------------------------------------------------------------- refused operations

def test_qcow2_shrink_is_an_unsupported_operation():
    async def main():
        img = await open_memory(new_buffer(16 * MiB))
        with pytest.raises(UnsupportedOperation) as info:
            await img.truncate(8 * MiB)
        assert _client_errno(info.value) == errno.EOPNOTSUPP
        assert img.size == 16 * MiB
        await img.write(0, b"x" * 4096)  # still writable
        await img.close()
    trio.run(main)


def test_qcow2_l1_beyond_32mib_is_an_unsupported_operation():
    async def main():
        img = await open_memory(new_buffer(16 * MiB, cluster_bits=9))
        with pytest.raises(UnsupportedOperation) as info:
            await img.truncate(1 << 40)  # 512-byte clusters: an L1 of 256 MiB
        assert _client_errno(info.value) == errno.EOPNOTSUPP
        assert img.size == 16 * MiB
        await img.write(0, b"x" * 4096)
        await img.close()
    trio.run(main)


def test_raw_shrink_is_an_unsupported_operation():
    async def main():
        store = MemoryBackend(bytearray(1 * MiB))
        img = RawImage("mem.raw", BackendSet(lambda m: store), None, True)
        with pytest.raises(UnsupportedOperation) as info:
            await img.truncate(4096)
        assert _client_errno(info.value) == errno.EOPNOTSUPP
        assert img.size == 1 * MiB
        await img.truncate(2 * MiB)
        assert img.size == 2 * MiB
    trio.run(main)


# ---------------------------------------------------------------- corruption found in the core

CS = 64 * KiB


def _underflow_image() -> tuple[bytearray, int]:
    """An image whose guest cluster 0 maps to a host cluster with refcount 0 (and its host offset).

    Its L2 entry still says COPIED (refcount 1), so the engine writes over it
    in place; a full cluster of zeros frees it, and that free is the one that
    would take its refcount below zero.
    """
    buf = new_buffer(16 * MiB)

    async def fill():
        img = await open_memory(buf)
        await img.write(0, b"\x5a" * CS)
        await img.close()
    trio.run(fill)
    hdr = fmt.parse_header_untrusted(bytes(buf[:CS]), len(buf))
    l2 = int.from_bytes(buf[hdr.l1_table_offset:hdr.l1_table_offset + 8], "big") & fmt.OFFSET_MASK
    host = int.from_bytes(buf[l2:l2 + 8], "big") & fmt.OFFSET_MASK
    assert host and hdr.refcount_order == 4
    block = int.from_bytes(buf[hdr.refcount_table_offset:hdr.refcount_table_offset + 8], "big") & fmt.OFFSET_MASK
    at = block + 2 * (host // CS)
    assert int.from_bytes(buf[at:at + 2], "big") == 1
    buf[at:at + 2] = (0).to_bytes(2, "big")
    return buf, host


def _corrupt_bit(buf: bytearray) -> bool:
    return fmt.parse_header_untrusted(bytes(buf[:CS]), len(buf)).corrupt


@pytest.mark.parametrize("mode", [WRITEBACK, WRITETHROUGH], ids=lambda m: m.name)
def test_refcount_underflow_marks_the_image_corrupt(mode):
    """refcount.py's CorruptImage fails the request that met it (EIO), leaves the
    image read-only (EROFS for the next write) and sets the header's corrupt
    bit by close, as QEMU's qcow2_signal_corruption does. Under writeback the
    free is applied by the flush; under writethrough by the write's own writeout."""
    buf, _ = _underflow_image()

    async def main():
        img = await open_memory(buf, mode=mode)
        assert img.engine.writable
        with pytest.raises(CorruptImage) as info:
            await img.write(0, bytes(CS))     # zeros: the cluster is freed
            await img.flush()
        assert "would become -1" in str(info.value)
        assert _client_errno(info.value) == errno.EIO
        assert not img.engine.writable
        with pytest.raises(UnsupportedImage) as info:
            await img.write(CS, b"\xa5" * 4096)
        assert _client_errno(info.value) == errno.EROFS
        assert await img.read(CS, 4096) == bytes(4096)  # reads go on
        await img.close()
    trio.run(main)
    assert _corrupt_bit(buf)

    async def reopen():
        img = await open_memory(buf)
        assert not img.engine.writable  # marked corrupt: served read-only from now on
        with pytest.raises((OSError, UnsupportedImage)) as info:
            await img.write(0, b"x" * 4096)
        assert _client_errno(info.value) == errno.EROFS
    trio.run(reopen)


def test_corruption_is_not_written_to_a_read_only_open():
    """A CorruptImage met through a read-only open marks nothing on disk."""
    buf = new_buffer(16 * MiB)
    before = bytes(buf)

    async def main():
        img = await open_memory(buf, writable=False)

        def bad():
            raise CorruptImage("found while reading")
            yield
        with pytest.raises(CorruptImage):
            await img._core(bad(), img.backend)
        await img.flush()
        await img.close()
    trio.run(main)
    assert bytes(buf) == before


# ---------------------------------------------------------------- a writeout tries every ready item

def test_failed_metadata_write_does_not_stop_the_round():
    """A flush whose first metadata write fails still writes the round's other
    ready items, reports the first error, and keeps the failed item dirty: the
    next flush writes it, and the image closes clean (STYLE.md habit 4)."""
    from cachefs.backend.faulty import Sync, Write
    from cachefs.qcow2.check import check_image
    from cachefs.qcow2.meta import State
    from cachefs.qcow2.plan import run_sync
    from recorded import open_recorded

    buf = new_buffer(64 * MiB)
    hdr = fmt.parse_header_untrusted(bytes(buf[:CS]), len(buf))
    block = int.from_bytes(buf[hdr.refcount_table_offset:hdr.refcount_table_offset + 8], "big") & fmt.OFFSET_MASK
    assert block > 0

    async def main():
        img, rec, faulty = await open_recorded(buf, WRITEBACK, faulty=True)
        await img.write(0, b"\x11" * CS)
        await img.write(8 * MiB, b"\x22" * CS)
        q = img.queue
        started = len(rec.events)
        # The first flush reserves, so its first round writes the header's dirty
        # bit (offset 0, first by offset) and the refcount block (tests/test_metaqueue.py).
        fault = faulty.inject("pwrite", errno.EIO, times=1, offset_range=(0, 512))
        with pytest.raises(OSError) as info:
            await img.flush()
        assert info.value.errno == errno.EIO and fault.hits == 1
        after = rec.events[started:]
        assert not any(isinstance(e, Write) and e.offset < 512 for e in after)
        assert any(isinstance(e, Write) and block <= e.offset < block + CS for e in after), \
            "the refcount block in the failed header's round was not written"
        assert not any(isinstance(e, Sync) for e in after[1:])  # reported before the round's sync
        assert q.header.state is State.DIRTY  # the failed item waits for the next flush
        await img.flush()
        assert not q.dirty
        assert bytes(await img.read(0, CS)) == b"\x11" * CS
        assert bytes(await img.read(8 * MiB, CS)) == b"\x22" * CS
        await img.close()
    trio.run(main)
    result = run_sync(check_image(len(buf)), lambda o, n: bytes(buf[o:o + n]))
    assert not result.corruptions and not result.leaks
