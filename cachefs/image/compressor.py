"""Compressing guest clusters off the trio thread (seed 003, compress-on-write).

zlib and zstandard release the GIL while they work, so a few worker threads
compress clusters truly in parallel while the trio thread keeps serving
requests (STYLE.md habit 7: handlers never block the trio thread). A large
request (a 1 MiB ``dd`` block is 16 clusters of 64 KiB) is split into one
batch per worker, and the batches run at once; a one-cluster request is one
thread hop.

The output is what QEMU writes, so a compress-on-write image and a
``qemu-img convert -c`` of the same data come out alike in size:

- zlib: raw deflate (no zlib header), level 6, window 2^12, memLevel 9
  (QEMU's qcow2_compress in block/qcow2-threads.c);
- zstd: one frame at zstd's default level 3 (qcow2_zstd_compress);
- a cluster whose compressed form is not smaller than the cluster, less one
  byte, is stored normally (QEMU: ``-ENOMEM`` from the compressor, then an
  ordinary write).

A cluster of one repeated byte (filler, erased flash, the seed's 0x01 test
disk) compresses to the same bytes every time, so its output is kept per
byte value (:meth:`Compressor.uniform`): checked with one memcmp on the trio
thread, no worker thread, byte for byte what the compressor would give.
Zeros never get here: a zero cluster stays a zero cluster.
"""

from __future__ import annotations

import threading
import zlib

import trio

#: Worker threads compressing at once. The machine this was written on has
#: two cores; more threads would only queue behind them.
THREADS = 2

_local = threading.local()


def _zstd_compress(data) -> bytes:
    c = getattr(_local, "zstd", None)
    if c is None:
        import zstandard
        c = _local.zstd = zstandard.ZstdCompressor(level=3)  # a context per thread: not thread-safe
    return c.compress(data)


def _zlib_compress(data) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -12, 9)
    return c.compress(data) + c.flush()


COMPRESSORS = {"zlib": _zlib_compress, "zstd": _zstd_compress}


class Compressor:
    """Compresses whole clusters with one algorithm on a small thread pool."""

    def __init__(self, algorithm: str, cluster_size: int, threads: int = THREADS):
        self.algorithm = algorithm
        self.cs = cluster_size
        self._fn = COMPRESSORS[algorithm]
        self.threads = threads
        self.limiter = trio.CapacityLimiter(threads)
        # byte value -> (the cluster it fills, its compressed form); a few entries only.
        self._uniform: dict[int, tuple[bytes, bytes | None]] = {}

    def uniform(self, data) -> tuple[bool, bytes | None]:
        """(True, output) when ``data`` is one byte repeated and its output is known; else (False, None)."""
        if not len(data):
            return False, None
        known = self._uniform.get(data[0])
        if known is not None and len(data) == len(known[0]) and known[0].startswith(data):  # memcmp
            return True, known[1]
        return False, None

    def _remember(self, data, out: bytes | None) -> None:
        """Keep ``out`` if ``data`` is one repeated byte (first, middle and last bytes tell most others apart)."""
        b = data[0]
        if b in self._uniform or len(self._uniform) >= 8 or not b == data[-1] == data[len(data) // 2]:
            return
        whole = bytes(data)
        if whole.count(whole[:1]) == len(whole):
            self._uniform[b] = (whole, out)

    def compress_one(self, data) -> bytes | None:
        """``data`` (one cluster) compressed, or None when it does not shrink (stored normally)."""
        out = self._fn(data)
        return out if len(out) < self.cs else None

    def _batch(self, clusters: list) -> list[bytes | None]:
        return [self.compress_one(c) for c in clusters]

    async def compress(self, clusters: list) -> list[bytes | None]:
        """Each cluster compressed (None: stored normally), in worker threads, batches in parallel."""
        known = [self.uniform(c) for c in clusters]
        todo = [c for c, (hit, _) in zip(clusters, known) if not hit]
        done = iter(await self._compress(todo) if todo else ())
        out = [value if hit else next(done) for hit, value in known]
        for c, (hit, _), value in zip(clusters, known, out):
            if not hit:
                self._remember(c, value)
        return out

    async def _compress(self, clusters: list) -> list[bytes | None]:
        if len(clusters) <= 1:
            return await trio.to_thread.run_sync(self._batch, clusters, limiter=self.limiter)
        groups = min(self.threads, len(clusters))
        out: list[list[bytes | None]] = [[] for _ in range(groups)]

        async def run(i: int) -> None:
            out[i] = await trio.to_thread.run_sync(self._batch, clusters[i::groups], limiter=self.limiter)

        async with trio.open_nursery() as nursery:
            for i in range(groups):
                nursery.start_soon(run, i)
        result: list[bytes | None] = [None] * len(clusters)
        for i in range(groups):
            result[i::groups] = out[i]
        return result
