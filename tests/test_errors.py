"""Errors at the layer boundaries (issue 10, item 4; docs/design.md, "Errors").

Each error class carries its errno and fs.py's ``_fuse_error`` is the one
translation, so these tests check the class a request raises and the errno the
client would get for it.
"""

from __future__ import annotations

import errno

import pytest
import trio

from cachefs.backend import MemoryBackend
from cachefs.backendset import BackendSet
from cachefs.errors import UnsupportedOperation
from cachefs.fs import _fuse_error
from cachefs.image import RawImage
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
