"""The image layer's side of compress-on-write (seed 003): compress, place, write.

A write to a compress-on-write qcow2 image (qcow2/compress.py) is split by
guest cluster:

- every whole cluster of the request is compressed in worker threads
  (image/compressor.py), all of them at once, before any lock is taken;
- a cluster of zeros, one that does not shrink, and the partial head and
  tail take the ordinary path (Qcow2Image.write_plain): a zero cluster stays
  a zero cluster, the others become normal clusters (a partial write
  copies-on-write out of a compressed one);
- the compressed chunks are placed in the fill cache and their L2 entries
  change, under the image's write lock (so concurrent writers fill the same
  host cluster); a host cluster that became full is written then, whole, still
  under the lock, so a flush never finds one half written. That is one
  Qcow2Image.remap: the placement is its planner (it changes the entries
  itself, so there is nothing left to commit) and the full clusters' writes
  the I/O before its commit.

Reads of a chunk whose host cluster is still in memory are served from it,
and so is the old data a copy-on-write keeps (:class:`FillReader`).
"""

from __future__ import annotations

import functools

import attrs

from cachefs.backend.base import bytes_view
from cachefs.errors import UnsupportedOperation
from cachefs.image.compressor import Compressor
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.compress import FillCache, compress_of, header_fields, plan_compressed
from cachefs.qcow2.plan import WritePlan


@attrs.define
class CompressCounters:
    compressed: int = 0       # guest clusters stored compressed
    stored_normally: int = 0  # whole clusters that did not shrink
    zero_clusters: int = 0    # whole clusters of zeros (zero clusters, no data)


class CompressedWrites:
    """One qcow2 image's compress-on-write state: its fill cache and compressor."""

    def __init__(self, image):
        self.image = image
        self.engine = image.engine
        self.cs = image.engine.cs
        self.fill = FillCache(image.engine)
        self.counters = CompressCounters()
        self._compressor: Compressor | None = None
        self._seen = None  # the header object ``_algorithm`` was read from
        self._algorithm: str | None = None

    @property
    def algorithm(self) -> str | None:
        """The header's setting. Asked on every write, so read again only when the header changed
        (HeaderItem.update makes a new Header object)."""
        hdr = self.engine.header.hdr
        if hdr is not self._seen:
            self._seen, self._algorithm = hdr, compress_of(hdr)
        return self._algorithm

    def compressor(self, algorithm: str) -> Compressor:
        if self._compressor is None or self._compressor.algorithm != algorithm:
            self._compressor = Compressor(algorithm, self.cs)
        return self._compressor

    def stats(self) -> dict:
        f = self.fill.counters
        stored = f.host_clusters * self.cs
        return {"compress": self.algorithm or "off", "compressed_clusters": self.counters.compressed,
                "compressed_bytes": f.chunk_bytes, "compress_host_clusters": f.host_clusters,
                "compress_spanning": f.spanning, "compress_full_writes": f.full_writes,
                "compress_flush_writes": f.flush_writes, "stored_normally": self.counters.stored_normally,
                "compress_zero_clusters": self.counters.zero_clusters,
                "compress_ratio": f"{self.counters.compressed * self.cs / stored:.2f}" if stored else "0"}

    # ------------------------------------------------------------ writing

    def whole_clusters(self, offset: int, length: int) -> range:
        """Guest byte offsets of the whole clusters inside [offset, offset + length)."""
        first = -(-offset // self.cs) * self.cs
        return range(first, (offset + length) // self.cs * self.cs, self.cs)

    async def write(self, be, offset: int, data) -> None:
        """A guest write with compression for its whole clusters."""
        mv = bytes_view(data)
        whole = self.whole_clusters(offset, len(mv))
        algorithm = self.algorithm
        if not whole or algorithm is None:
            return await self.image.write_plain(be, offset, data)
        views = [mv[p - offset:p - offset + self.cs] for p in whole]
        zero = [self.engine.all_zero(v) for v in views]
        packed = iter(await self.compressor(algorithm).compress([v for v, z in zip(views, zero) if not z]))
        chunks, plain, start = [], [], 0  # plain: runs [start, end) of the request taking the ordinary path
        for p, z in zip(whole, zero):
            payload = None if z else next(packed)
            if payload is None:
                self.counters.zero_clusters += z
                self.counters.stored_normally += not z
                continue
            chunks.append((p // self.cs, payload))
            plain.append((start, p - offset))
            start = p - offset + self.cs
        plain.append((start, len(mv)))
        if chunks:
            await self._store(be, chunks)
        for lo, hi in plain:
            if hi > lo:
                await self.image.write_plain(be, offset + lo, mv[lo:hi])

    async def _store(self, be, chunks: list) -> None:
        """Place the chunks and change their entries, then write the fill clusters that became full.

        Settled first: an allocating write in flight on one of these clusters commits first
        (image/inflight.py). Shielded (remap): a cancel between a placement and its L2 change
        would leave a chunk counted that nothing references (a leak).
        """
        async def write_full(plan) -> None:
            await self.write_full(be)
        await self.image.remap(be, chunks[0][0], chunks[-1][0] + 1, functools.partial(self._plan, chunks),
                               before_commit=write_full)

    def _plan(self, chunks: list):
        """Generator: place every chunk and point its entry there; a WritePlan with nothing left to commit."""
        self.fill.keep_open = self.image.mode.default.write_through
        self.fill.prune()
        for vcluster, payload in chunks:
            yield from plan_compressed(self.engine, self.fill, vcluster, payload)
        self.counters.compressed += len(chunks)
        return WritePlan((), ())

    async def write_full(self, be) -> None:
        """Write the host clusters that became full, each once, whole. Caller holds the write lock.

        A failed write leaves the cluster in memory and dirty: the next flush
        writes it again (and reports the error if it fails again).
        """
        for c in self.fill.take_full():
            await be.pwrite(c.offset, c.buf)
            self.image.queue.written_by_caller(c)
            self.fill.written(c)
            self.fill.counters.full_writes += 1

    # ------------------------------------------------------------ the setting

    async def set_algorithm(self, algorithm: str | None) -> None:
        """Turn compress-on-write on ("zlib", "zstd") or off (None); durable when this returns.

        Refused in one line (UnsupportedOperation) when the header's
        compression type is another algorithm and the image may hold
        compressed clusters (compress.header_fields). An image without a
        single L2 table (a new one) holds none, so its type may still change.
        """
        img = self.image
        async with img.write_lock:
            img.engine.overlap.check_writable()
            empty = not any(e & fmt.OFFSET_MASK for e in self.engine.map.l1)
            fields = header_fields(self.engine.hdr, algorithm, empty=empty)
            try:  # the extension must fit in the first cluster with the backing name (spec "Header")
                attrs.evolve(self.engine.hdr, **fields).encode()
            except ValueError as exc:
                raise UnsupportedOperation(f"compress-on-write: {exc}") from None
            self.engine.header.update(**fields)
        await img.write_back()


class FillReader:
    """A backend's ``pread`` that serves host bytes still in the fill cache from memory."""

    __slots__ = ("fill", "be")

    def __init__(self, fill: FillCache, be) -> None:
        self.fill, self.be = fill, be

    async def pread(self, offset: int, length: int) -> bytes:
        cb, end, parts, pos = self.fill.cb, offset + length, [], offset
        while pos < end:
            c = pos >> cb
            n = min(end, (c + 1) << cb) - pos
            held = self.fill.held(c)
            if held is not None:
                parts.append(bytes(held.buf[pos - held.offset:pos - held.offset + n]))
            else:
                parts.append(bytes(await self.be.pread(pos, n)))
            pos += n
        return b"".join(parts)
