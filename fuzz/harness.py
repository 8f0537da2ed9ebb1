"""What every fuzz target shares: an image file in memory, the error contract, and the drivers.

The contract (tests/test_hostile.py, DESIGN.md section 3): a hostile image is
refused, or a damaged range fails, with the project's own error types
(cachefs.errors: CorruptImage, UnsupportedImage, DamagedMetadata, all
CachefsError), never with any other exception, a hang or unbounded memory.
:data:`REFUSALS` is that list; a target lets them pass and anything else
propagate, which atheris reports as a crash.

:class:`MemFile` is the image file. Its pread behaves as the production
backends' (cachefs/backend/file.py: os.pread allocates the whole length it
is asked for, O_DIRECT an aligned buffer of it), so a request no real file
could serve, or one that would allocate more than any table the spec allows,
is a bug here too (:class:`HarnessBug`), although a bytearray slice would
quietly serve it. Writes past :data:`MAX_FILE` fail with EFBIG, as a file
system's size limit would: that is an I/O error, which the image layer turns
into EIO, not a bug.
"""

from __future__ import annotations

import errno

from cachefs.errors import CachefsError
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.plan import run_sync

#: The project's refusals (cachefs/errors.py): anything else escaping a target is a bug.
REFUSALS = (CachefsError,)
#: The largest read a table can need: the refcount table (QEMU's QCOW_MAX_REFTABLE_SIZE).
MAX_READ = fmt.MAX_REFTABLE_BYTES
#: Keep the in-memory file small: beyond this, writes fail as on a full file system.
MAX_FILE = 16 << 20
#: os.pread's offset is an off_t.
MAX_OFFSET = (1 << 63) - 1


class FileTooLarge(OSError):
    """A write or truncate past MAX_FILE: EFBIG, an I/O error (the image layer's EIO), not a bug.

    A hostile refcount block can say clusters far past the end are in use, so
    the next allocation lands there; on a real file that is a sparse write.
    """


class HarnessBug(AssertionError):
    """The core asked for I/O no real backend could carry out (a bug in the core)."""


class MemFile:
    """An image file in a bytearray, with plan.py's pread and its io object (pwrite, sync, ...)."""

    def __init__(self, data: bytes) -> None:
        self.buf = bytearray(data)
        # The image's compress-on-write fill cache (qcow2/compress.FillCache), if any: host bytes
        # not written yet are read from it, as compressed_writes.FillReader does.
        self.fill = None

    def __len__(self) -> int:
        return len(self.buf)

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > MAX_OFFSET:
            raise HarnessBug(f"read of {length} bytes at {offset} is no valid pread")
        if length > MAX_READ:
            raise HarnessBug(f"read of {length} bytes exceeds every table the spec allows")
        if self.fill is None or not self.fill.pending:
            return bytes(self.buf[offset:offset + length])
        parts, pos, end, cb = [], offset, offset + length, self.fill.cb
        while pos < end:
            n = min(end, (pos >> cb) + 1 << cb) - pos
            held = self.fill.held(pos >> cb)
            src = self.buf if held is None else held.buf
            base = 0 if held is None else held.offset
            parts.append(bytes(src[pos - base:pos - base + n]))
            pos += n
        return b"".join(parts)

    def _extend(self, end: int) -> None:
        if end > MAX_FILE:
            raise FileTooLarge(errno.EFBIG, f"file would grow to {end} bytes")
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))

    def pwrite(self, offset: int, data) -> None:
        if offset < 0:
            raise HarnessBug(f"write at {offset}")
        self._extend(offset + len(data))
        self.buf[offset:offset + len(data)] = data

    def sync(self) -> None:
        pass

    def truncate(self, size: int, grow: bool) -> None:
        if size < 0:
            raise HarnessBug(f"truncate to {size}")
        if grow:
            self._extend(size)
        elif size < len(self.buf):
            del self.buf[size:]

    def discard(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise HarnessBug(f"discard of {length} bytes at {offset}")
        end = min(offset + length, len(self.buf))
        if end > offset:
            self.buf[offset:end] = bytes(end - offset)

    @staticmethod
    def backing(guest_offset: int, length: int) -> bytes:
        """The backing chain's guest bytes: the core never opens a backing file (the image layer
        does), so an overlay under fuzzing reads a pattern there, nonzero so a lost copy shows."""
        if guest_offset < 0 or length < 0 or length > MAX_READ:
            raise HarnessBug(f"backing read at {guest_offset}+{length}")
        return b"\xbb" * length

    def run(self, gen):
        """Drive a core generator on this file (plan.run_sync)."""
        try:
            return run_sync(gen, self.pread, self, backing=self.backing)
        except HarnessBug as bug:
            # Raised again at the request's yield: the traceback then names the core's line.
            gen.throw(bug)
            raise


def refused(fn, *args):
    """``fn(*args)``, or None when it refuses with the project's error type."""
    try:
        return fn(*args)
    except REFUSALS:
        return None
