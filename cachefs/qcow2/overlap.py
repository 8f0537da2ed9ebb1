"""Which metadata owns each host cluster, and the corrupt bit (QEMU's overlap check).

Before every metadata write and every allocation we ask who owns the target
cluster: the header, the L1 table, the refcount table, an L2 table, a
refcount block, the snapshot table, or nobody (data or free). A conflict
means our own bookkeeping or the image is wrong; writing on would destroy
metadata. QEMU's rule (qcow2_pre_write_overlap_check, qcow2_signal_corruption)
is followed: set the header's corrupt bit (v3), make the image read-only,
and fail the request with CorruptImage, which is a different path from EIO
(docs/design.md, "Validation and damage").

The read-only state lives here too: the reason an image may not be written,
whether it was opened so, could not be (snapshots, a corrupt bit already set),
or became so.
"""

from __future__ import annotations

from cachefs.errors import CorruptImage, UnsupportedImage
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.meta import HeaderItem, MetaItem
from cachefs.qcow2.refcount import Refcounts

#: The owner a metadata item's clusters must have before it is written.
EXPECTED_OWNER = {"l2": "l2", "refblock": "refblock", "l1": "l1", "reftable": "reftable", "header": "header",
                  "data": None}  # a host cluster of compressed chunks (qcow2/compress.py): no metadata's


class Overlap:
    def __init__(self, header: HeaderItem, refs: Refcounts, read_only_reason: str | None):
        self.header = header
        self.refs = refs
        self.cb = header.hdr.cluster_bits
        # Clusters of the active L1 table; cluster.ClusterMap moves it (resize).
        self.l1_clusters = range(0)
        # Invariant: every cluster an L1 entry points at is here (and only those).
        self.l2_clusters: set[int] = set()
        self.read_only_reason = read_only_reason

    @property
    def writable(self) -> bool:
        return self.read_only_reason is None

    def check_writable(self) -> None:
        if self.read_only_reason:
            raise UnsupportedImage(f"read-only: {self.read_only_reason}")

    def owner(self, cluster: int) -> str | None:
        """Which metadata lives in a host cluster, or None."""
        if cluster == 0:
            return "header"
        if cluster in self.l1_clusters:
            return "l1"
        rt = self.refs.table_offset >> self.cb
        if rt <= cluster < rt + self.refs.table_clusters:
            return "reftable"
        if cluster in self.l2_clusters:
            return "l2"
        if cluster in self.refs.block_clusters:
            return "refblock"
        hdr = self.header.hdr
        if hdr.nb_snapshots and cluster == hdr.snapshots_offset >> self.cb:
            return "snapshots"
        return None

    def claim(self, cluster: int, owner: str) -> None:
        """A cluster fresh from the allocator becomes ``owner``'s ("l2" or "data")."""
        holder = self.owner(cluster)
        if holder:
            self.mark_corrupt(f"allocator returned cluster {cluster}, which holds {holder}")
        if owner == "l2":
            self.l2_clusters.add(cluster)

    def check_write(self, item: MetaItem, offset: int, length: int) -> None:
        """Refuse to write ``item`` over anything but its own clusters."""
        expect = EXPECTED_OWNER[item.kind]
        for c in range(offset >> self.cb, (offset + max(length, 1) - 1 >> self.cb) + 1):
            owner = self.owner(c)
            if owner != expect:
                self.mark_corrupt(f"refusing to write {item.name} over {owner or 'unowned'} cluster {c}")

    def mark_corrupt(self, why: str) -> None:
        """Corruption marks the image and makes it read-only (docs/design.md, "Validation and damage").

        Raises CorruptImage.
        """
        self.corrupted(why)
        raise CorruptImage(why)

    def corrupted(self, why: str) -> None:
        """Mark the image corrupt and read-only, without raising.

        The image layer calls this for a CorruptImage raised anywhere in the
        core (refcount.py's underflow, a double allocation) at the one place
        it drives the core (image.Qcow2Image._core). An image that is read-only
        already keeps its reason and its header: one opened read-only must not
        be written, one marked already needs nothing more.
        """
        if not self.writable:
            return
        self.read_only_reason = f"corruption detected: {why}"
        hdr = self.header.hdr
        if hdr.version >= 3:
            self.header.update(incompatible=hdr.incompatible | fmt.INCOMPAT_CORRUPT)
