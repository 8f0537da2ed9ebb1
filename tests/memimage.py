"""The production image layer over memory: the core's test bench.

``open_memory`` builds what ``image.open_image`` builds for a file (an engine,
its metadata queue, a Qcow2Image over a BackendSet), but over a MemoryBackend
that writes into a given bytearray in place, so a test can look at the bytes.

``MemImage`` is the same image for synchronous tests (the hypothesis state
machine): each call runs the image's own coroutine in a fresh ``trio.run``.
Nothing here carries out a plan or a flush itself.
"""

from __future__ import annotations

import trio

from cachefs.backend import MemoryBackend
from cachefs.image.backends import BackendSet
from cachefs.image.qcow2image import Qcow2Image
from cachefs.policy import WRITEBACK
from cachefs.qcow2.create import new_image
from cachefs.qcow2.engine import Engine, open_engine
from cachefs.qcow2.plan import run_async


def new_buffer(size: int, **kw) -> bytearray:
    """A fresh image file's bytes (create.new_image's writes)."""
    buf = bytearray()
    for off, data in new_image(size, **kw):
        if len(buf) < off + len(data):
            buf.extend(bytes(off + len(data) - len(buf)))
        buf[off:off + len(data)] = data
    return buf


async def open_memory(buf: bytearray, *, writable: bool = True, cache_bytes: int | None = None,
                      mode=WRITEBACK) -> Qcow2Image:
    store = MemoryBackend(buf)
    backends = BackendSet(lambda m: store)
    kw = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    engine = await run_async(open_engine(len(buf), writable=writable, **kw), backends.get(mode.default).pread)
    return Qcow2Image("mem.qcow2", backends, None, writable, engine, mode)


async def read_all(buf: bytearray, length: int | None = None) -> bytes:
    """The guest view of an image file's bytes, through a read-only open."""
    img = await open_memory(buf, writable=False)
    return bytes(await img.read(0, img.size if length is None else length))


class MemImage:
    """A Qcow2Image over ``buf``, called synchronously."""

    def __init__(self, buf: bytearray, *, writable: bool = True, cache_bytes: int = 1 << 20):
        self.buf = buf
        self.image: Qcow2Image = trio.run(lambda: open_memory(buf, writable=writable, cache_bytes=cache_bytes))
        self.engine: Engine = self.image.engine

    @classmethod
    def create(cls, size: int, **kw) -> "MemImage":
        cache = kw.pop("cache_bytes", 1 << 20)
        return cls(new_buffer(size, **kw), cache_bytes=cache)

    def read(self, off: int, length: int) -> bytes:
        return bytes(trio.run(self.image.read, off, length))

    def write(self, off: int, data) -> None:
        trio.run(self.image.write, off, data)

    def resize(self, size: int) -> None:
        trio.run(self.image.truncate, size)

    def flush(self) -> None:
        """A guest flush, then the refcounts it freed written too.

        The production flush applies due frees in memory after its one sync;
        they go out with the next flush (one fdatasync per flush). The model
        checks the file for leaks right after a flush, so the queue is
        settled here with the image's own write-everything path.
        """
        trio.run(self.image.flush)
        trio.run(self.image.write_back)

    def close(self) -> None:
        """A clean close's writeout (reservation given back, file trimmed); the image stays usable."""
        trio.run(self.image.write_back_all)
