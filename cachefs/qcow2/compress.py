"""Compress-on-write: the setting, and the cluster-fill cache (seed 003). No I/O.

An image marked compress-on-write (a backup target) stores every full-cluster
write compressed, in qcow2's own compressed-cluster format, so qemu-img and
QEMU read it (spec "Compressed Clusters Descriptor"). The compressing itself
happens elsewhere (cachefs/image/compressor.py, worker threads); this module decides
where the compressed bytes go and what the metadata says about them.

**The setting** lives in the image: a header extension of cachefs's own
(``format.EXT_CACHEFS_COMPRESS``) holding the algorithm's name. The spec lets
every reader skip an unknown extension, and QEMU keeps unknown extensions when
it rewrites the header. The algorithm itself is the header's
``compression_type`` (zstd needs the incompatible "compression type" bit, spec
"Header"); it applies to every compressed cluster of the image, so it cannot
change once the image holds compressed clusters, and the setting may only
name the type the header has.

**The cluster-fill cache** (seed 003: a compressed backup target written with
O_DIRECT took 300 s for 1000 MB, each small unaligned chunk a read-modify-
write; packing chunks in memory until the host cluster is full: 4.4 s).
Compressed chunks are packed byte by byte into the current host cluster, held
in memory (:class:`FillCluster`). A chunk that does not fit continues into the
next host cluster when the allocator hands out the adjacent one (the spec lets
a compressed cluster's sectors run into "the next contiguous host cluster", as
QEMU's qcow2_alloc_bytes does); otherwise the rest of the current cluster stays
zeros. Each host cluster is written exactly once, whole: by the image layer
when it is full, or by the metadata queue at a flush (placing it seals it:
later chunks go to a new cluster). So an O_DIRECT backend never reads, patches
and rewrites a block. At most two clusters are held: the open one, and one the
chunk that filled it spilled out of, until the image layer writes it.

**Refcounts** (spec "Host cluster management" and QEMU's qcow2_alloc_bytes):
a host cluster holding compressed data has one reference per compressed
cluster whose bytes touch it. The allocation gives the first chunk its 1;
every later chunk touching the cluster adds 1. A full refcount (refcount_bits
may be 1) starts a new cluster. Overwriting or discarding a compressed cluster
drops one reference per host cluster its descriptor spans (cluster.remap).

**Ordering** (docs/design.md, crash invariants): a compressed cluster's L2
entry depends on the fill clusters holding its bytes (written and synced
first: invariant 3, the data before the entry that exposes it) and on the
refcount blocks counting them (invariant 1). A fill cluster is a
:class:`meta.MetaItem` of kind "data" that the queue tracks, so the usual
flush rounds order it: fill clusters and refcount blocks, sync, L2 tables.
"""

from __future__ import annotations

import attrs

from cachefs.errors import UnsupportedOperation
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.meta import MetaItem, State

ALGORITHMS = {"zlib": fmt.COMPRESSION_DEFLATE, "zstd": fmt.COMPRESSION_ZSTD}
NAMES = {v: k for k, v in ALGORITHMS.items()}


# ---------------------------------------------------------------- the setting

def compress_of(hdr: fmt.Header) -> str | None:
    """The image's compress-on-write algorithm ("zlib", "zstd"), or None (off).

    The header's compression_type decides the algorithm; an extension naming
    another one (written by hand) is ignored rather than trusted.
    """
    if hdr.extension(fmt.EXT_CACHEFS_COMPRESS) is None:
        return None
    return NAMES.get(hdr.compression_type)


def header_fields(hdr: fmt.Header, algorithm: str | None, *, empty: bool = False) -> dict:
    """The header fields that mark ``hdr``'s image compress-on-write with ``algorithm`` (None: off).

    ``empty``: the image holds no compressed cluster yet (a new image), so
    the compression type may still change. Otherwise asking for another
    algorithm than the header's is refused, in one line.
    """
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise UnsupportedOperation(f"unknown compression {algorithm!r} (zlib, zstd or off)")
    exts = tuple(e for e in hdr.extensions if e[0] != fmt.EXT_CACHEFS_COMPRESS)
    if algorithm is None:
        return {"extensions": exts}
    ctype = ALGORITHMS[algorithm]
    fields = {"extensions": exts + ((fmt.EXT_CACHEFS_COMPRESS, algorithm.encode()),)}
    if ctype == hdr.compression_type:
        return fields
    if not empty:
        raise UnsupportedOperation(f"the image's compression type is {NAMES[hdr.compression_type]} "
                                   f"(qcow2 header); {algorithm} needs a new image "
                                   f"(cachefs create --compress {algorithm})")
    if hdr.version < 3:
        raise UnsupportedOperation("zstd needs a qcow2 v3 image (the compression type field)")
    incompat = hdr.incompatible & ~fmt.INCOMPAT_COMPRESSION
    if ctype != fmt.COMPRESSION_DEFLATE:
        incompat |= fmt.INCOMPAT_COMPRESSION  # spec: a non-deflate type needs this bit
    return {**fields, "compression_type": ctype, "incompatible": incompat,
            "header_length": max(hdr.header_length, 112)}


# ---------------------------------------------------------------- the fill cache

@attrs.define(eq=False)
class FillCluster(MetaItem):
    """One host cluster of compressed chunks, in memory until it is written.

    Invariant: ``used`` bytes of ``buf`` hold chunks; the rest is zeros.
    Invariant: once ``sealed``, no chunk is added (the cluster is written
    once, whole).
    """

    cluster: int = 0
    offset: int = 0
    buf: bytearray | None = attrs.field(default=None, repr=False)
    used: int = 0
    refs: int = 0  # chunks touching it = its refcount
    sealed: bool = False
    owner: "FillCache | None" = attrs.field(default=None, repr=False)

    def placed(self) -> tuple[int, bytes]:
        """Written by the metadata queue (a flush): sealed first, so later chunks go elsewhere
        (unless the owner keeps it open: write-through, see FillCache.keep_open)."""
        if self.owner is not None:
            self.owner.counters.flush_writes += 1
            if not self.owner.keep_open:
                self.owner.seal(self)
        return self.offset, bytes(self.buf)


@attrs.frozen
class Placement:
    """Where one compressed chunk went."""

    offset: int
    length: int
    clusters: tuple[FillCluster, ...]  # the one or two host clusters it touches

    def entry(self, cluster_bits: int) -> int:
        return fmt.encode_compressed(self.offset, self.length, cluster_bits)


@attrs.define
class FillCounters:
    chunks: int = 0            # compressed clusters placed
    chunk_bytes: int = 0       # their compressed bytes
    host_clusters: int = 0     # host clusters opened for them
    spanning: int = 0          # chunks continued into the adjacent host cluster
    full_writes: int = 0       # host clusters written full by the image layer
    flush_writes: int = 0      # host clusters written by the metadata queue (a flush or writeout)


class FillCache:
    """The host clusters compressed chunks are being packed into.

    ``pending`` is tracked by the metadata queue (MetaQueue.track): every
    fill cluster not written yet, by host cluster index. The image layer
    takes the full ones (:meth:`take_full`) and writes them; a flush writes
    the rest.
    """

    def __init__(self, engine):
        self.engine = engine
        self.cs = engine.cs
        self.cb = engine.cb
        self.open: FillCluster | None = None
        # Invariant: every FillCluster whose bytes are not in the file yet is
        # here (DIRTY); reads and COW of its chunks are served from ``buf``.
        self.pending: dict[int, FillCluster] = {}
        self.full: list[FillCluster] = []
        self.counters = FillCounters()
        # Write-through modes (writethrough, directsync) write out after every
        # guest write. Sealing then would give each write a host cluster of its
        # own; instead the open cluster is written whole again each time. The
        # chunks already there are rewritten with the same bytes, so a torn
        # write cannot change them, and the new ones are referenced only once
        # that write is durable. Still whole, aligned writes: no read-modify-write.
        self.keep_open = False
        engine.queue.track(self.pending)
        engine.queue.holds = self.holds

    def holds(self, cluster: int) -> bool:
        """Chunks may still be added to host cluster ``cluster``: its frees wait (MetaQueue.holds).

        Only the open cluster: a sealed one is written by the writeout that could
        free it, before the free, and never again."""
        return self.open is not None and self.open.cluster == cluster

    def close(self) -> None:
        """The image closes: no chunk goes anywhere any more, so the open cluster's frees may apply."""
        if self.open is not None:
            self.seal(self.open)

    # ------------------------------------------------------------ placing

    def place(self, payload):
        """Generator: put one compressed chunk (< a cluster) into the fill cache. Returns a Placement."""
        n, cur = len(payload), self.open
        if cur is not None and cur.refs >= self.engine.refs.max_refcount:
            self.seal(cur)  # refcount_bits too narrow for one more chunk here
            cur = None
        if cur is not None and cur.used + n <= self.cs:
            at, touched = cur.offset + cur.used, (cur,)
            yield from self._count(cur)
            cur.used += n
        else:
            nxt = yield from self._new_cluster()
            if cur is not None and nxt.cluster == cur.cluster + 1 and cur.used < self.cs:
                # spec: a compressed cluster's sectors may run into the next
                # contiguous host cluster; packing across leaves no gap.
                at, touched = cur.offset + cur.used, (cur, nxt)
                yield from self._count(cur)
                nxt.used = n - (self.cs - cur.used)
                cur.used = self.cs
                self.counters.spanning += 1
            else:
                at, touched = nxt.offset, (nxt,)
                nxt.used = n
            if cur is not None:
                self.seal(cur)
            self.open = nxt
        self._copy(at, payload, touched)
        if self.open.used == self.cs:
            self.seal(self.open)
        self.counters.chunks += 1
        self.counters.chunk_bytes += n
        return Placement(at, n, touched)

    def _new_cluster(self):
        """Generator: a freshly allocated host cluster (refcount 1: the chunk that opens it)."""
        a = yield from self.engine.map.allocate("data")
        off = a.cluster << self.cb
        c = FillCluster(name=f"zfill@{off:#x}", kind="data", state=State.DIRTY, cluster=a.cluster,
                        offset=off, buf=bytearray(self.cs), refs=1, owner=self)
        self.engine.refs.note_written(off + self.cs)
        self.pending[a.cluster] = c
        self.counters.host_clusters += 1
        return c

    def _count(self, c: FillCluster):
        """Generator: one more chunk touches ``c``: one more reference (spec "Compressed Clusters")."""
        yield from self.engine.refs.change(c.cluster, 1)
        c.refs += 1
        c.touch()  # dirty again if a write-through writeout kept it open (keep_open)

    def _copy(self, at: int, payload, touched) -> None:
        pos = 0
        for c in touched:
            start = max(at + pos, c.offset) - c.offset
            n = min(len(payload) - pos, self.cs - start)
            c.buf[start:start + n] = payload[pos:pos + n]
            pos += n

    def seal(self, c: FillCluster) -> None:
        """No more chunks go into ``c``; a full one waits for the image layer's write."""
        if c.sealed:
            return
        c.sealed = True
        if self.open is c:
            self.open = None
        if c.used == self.cs and c.state is State.DIRTY:
            self.full.append(c)

    # ------------------------------------------------------------ writing

    def take_full(self) -> list[FillCluster]:
        """The full clusters to write now (the image layer, under its write lock)."""
        out = [c for c in self.full if c.state is State.DIRTY]
        self.full.clear()
        return out

    def written(self, c: FillCluster) -> None:
        """``c``'s bytes are in the file (not durable yet): the memory goes."""
        self.pending.pop(c.cluster, None)
        c.buf = None

    def prune(self) -> None:
        """Forget clusters the metadata queue wrote at a flush."""
        for cluster in [k for k, c in self.pending.items() if c.state is not State.DIRTY and c is not self.open]:
            self.written(self.pending[cluster])

    # ------------------------------------------------------------ reading

    def held(self, cluster: int) -> FillCluster | None:
        """The in-memory fill cluster at host cluster index ``cluster``, if its bytes are not in the file."""
        c = self.pending.get(cluster)
        return c if c is not None and c.state is State.DIRTY else None


def plan_compressed(engine, fill: FillCache, vcluster: int, payload):
    """Generator: store one guest cluster as ``payload`` (its compressed bytes). Caller holds the write lock.

    The L2 entry changes now, in memory (reads find the chunk in the fill
    cache); on disk it waits for the fill clusters and their refcounts.
    """
    engine.overlap.check_writable()  # corruption found meanwhile made the image read-only
    table, idx = yield from engine.map.table_for_write(vcluster)
    engine.map.validate(table.entries[idx], vcluster)
    p = yield from fill.place(payload)
    deps: list[MetaItem] = list(p.clusters)
    for c in p.clusters:
        deps.extend((yield from engine.refs.counted(c.cluster)))
    engine.map.remap(vcluster, table, idx, p.entry(engine.cb), deps)
    return p
