"""A new, empty qcow2 v3 image as bytes to write (no I/O here).

Layout as qemu-img lays it out: header cluster, refcount table, refcount
blocks, then the L1 table; every one of those clusters has refcount 1. A
backing file name goes in the header cluster after the header extensions,
its format in the backing-format extension (spec "Header extensions"), as
``qemu-img create -b NAME -F FORMAT`` writes them. The name is stored, never
opened or resolved here.
"""

from __future__ import annotations

import attrs

from cachefs.qcow2 import format as fmt
from cachefs.qcow2.compress import header_fields


def new_image(size: int, *, cluster_bits: int = 16, refcount_order: int = 4,
              lazy_refcounts: bool = False, compress: str | None = None,
              backing_name: str | None = None, backing_format: str | None = None) -> list[tuple[int, bytes]]:
    """(offset, bytes) pieces of a fresh image; the last piece ends at the file's size.

    ``compress``: "zlib" or "zstd" makes it compress-on-write (qcow2/compress.py).
    ``backing_name``/``backing_format``: an overlay of that backing file (ValueError, one line,
    when the name is empty, holds NUL, or does not fit in the header cluster).
    """
    fmt.check_backing(backing_name, backing_format)
    if not fmt.MIN_CLUSTER_BITS <= cluster_bits <= fmt.MAX_CLUSTER_BITS:
        raise ValueError("cluster size must be a power of two from 512 B to 2 MiB")
    if not 0 <= refcount_order <= 6:
        raise ValueError("refcount bits must be a power of two from 1 to 64")
    size = -(-size // 512) * 512
    cs = 1 << cluster_bits
    l1_entries = fmt.max_l1_entries(size, cluster_bits)
    if l1_entries * 8 > fmt.MAX_L1_BYTES:
        raise ValueError("size too large for this cluster size (L1 table over 32 MiB)")
    # An empty L1 (virtual size 0) has no cluster and offset 0, as qemu-img lays it out: growing it
    # later frees nothing (qcow2_grow_l1_table frees old_l1_size * 8 bytes), so nothing may leak.
    l1_clusters = -(-l1_entries * 8 // cs)
    per_block = cs * 8 >> refcount_order
    rt_clusters, blocks, total = _refcount_layout(cs, per_block, l1_clusters)
    rt_off = cs
    block_off = rt_off + rt_clusters * cs
    l1_off = block_off + blocks * cs
    hdr = fmt.Header(
        version=3, cluster_bits=cluster_bits, size=size, l1_size=l1_entries,
        l1_table_offset=l1_off if l1_clusters else 0, refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters, refcount_order=refcount_order,
        compatible=fmt.COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
        header_length=112,
    )
    if compress is not None:
        hdr = attrs.evolve(hdr, **header_fields(hdr, compress, empty=True))
    if backing_name is not None:
        fmt_ext = () if backing_format is None else ((fmt.EXT_BACKING_FORMAT, backing_format.encode()),)
        hdr = attrs.evolve(hdr, backing_name=backing_name, extensions=fmt_ext + hdr.extensions)
    reftable = [block_off + i * cs for i in range(blocks)]
    reftable += [0] * (rt_clusters * cs // 8 - len(reftable))
    counts = [1] * total + [0] * (blocks * per_block - total)
    refblocks = b"".join(
        fmt.RefcountBlock.encode(counts[i * per_block:(i + 1) * per_block], refcount_order)
        for i in range(blocks))
    pieces = [
        (0, hdr.encode().ljust(cs, b"\0")),  # encode() refuses a header that passes the cluster
        (rt_off, fmt.encode_table(reftable)),
        (block_off, refblocks),
    ]
    if l1_clusters:
        pieces.append((l1_off, bytes(l1_clusters * cs)))
    return pieces


def _refcount_layout(cs: int, per_block: int, l1_clusters: int) -> tuple[int, int, int]:
    """(refcount table clusters, refcount blocks, clusters in use): the refcount structures
    must count themselves, so their sizes are found by iterating to a fixed point."""
    rt_clusters, blocks = 1, 1
    while True:
        total = 1 + rt_clusters + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_rt = -(-need_blocks * 8 // cs)
        if (need_blocks, need_rt) == (blocks, rt_clusters):
            return rt_clusters, blocks, total
        blocks, rt_clusters = need_blocks, need_rt
