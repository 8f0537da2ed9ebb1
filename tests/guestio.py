"""A guest's block I/O on a served file: aligned buffers for O_DIRECT (plain helper module)."""

from __future__ import annotations

import mmap
import os

BLOCK = 4096
O_DIRECT = os.O_DIRECT  # 0o40000 on x86_64


def aligned(data: bytes) -> mmap.mmap:
    """A page-aligned buffer holding ``data`` (what O_DIRECT wants)."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


def pwrite_block(fd: int, data: bytes, offset: int) -> None:
    assert os.pwrite(fd, aligned(data), offset) == len(data)


def pread_block(fd: int, offset: int, length: int = BLOCK) -> bytes:
    buf = mmap.mmap(-1, length)
    n = os.preadv(fd, [buf], offset)
    return bytes(buf[:n])
