"""An internal snapshot as a read-only image: ``vm1@NAME.raw`` in the mount (issue 23).

A snapshot is another L1 table in the same file (spec "Snapshot table"). Its view is an
ordinary read-only :class:`Qcow2Image` whose engine starts from that L1 table and the
snapshot's virtual size, so reads, SEEK_DATA and the data plane's published mapping all work
as they do for any read-only image. Nothing a snapshot reaches changes while it exists: every
cluster it holds has refcount > 1 or belongs to it alone, and the live image copies on write
(spec "Host cluster management": COPIED is clear), so the view needs no coordination with the
writer beyond this: the snapshot is not deleted while its file is open (fuse/snapshot_files.py).

The view reads the file through its own read-only descriptor, with no lock of its own: the
live image's descriptor holds the image's lock (QEMU's OFD locks conflict between two open
file descriptions, even in one process). An overlay's view reads the backing chain through the
live image's backing, which the view never releases.
"""

from __future__ import annotations

import os

import attrs

from cachefs.image.backends import BackendSet, file_opener
from cachefs.image.qcow2image import Qcow2Image
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.engine import Engine
from cachefs.qcow2.plan import ReadRequest, run_async
from cachefs.qcow2.snapshots import SnapshotEntry

#: Table cache of one snapshot's file: it is read by backup tools, sequentially, once.
VIEW_CACHE = 4 << 20


class SnapshotView(Qcow2Image):
    """One snapshot of ``parent``, read-only."""

    def __init__(self, parent: Qcow2Image, snapshot: SnapshotEntry, backends: BackendSet, engine: Engine):
        super().__init__(parent.path, backends, None, False, engine, parent.mode)
        self.parent = parent
        self.snapshot = snapshot
        self.backing = parent.backing  # the live image's: shared, never released here

    @property
    def read_only_reason(self) -> str | None:
        return f"an internal snapshot ({self.snapshot.name}) is read-only"

    def info(self) -> dict:
        out = super().info()
        out.pop("reserved", None)
        out.update(snapshot=self.snapshot.name, snapshot_id=self.snapshot.id)
        return out

    async def close(self) -> None:
        self.backing = None  # the live image's, released with it
        self.backends.close()


async def open_view(parent: Qcow2Image, snapshot: SnapshotEntry) -> SnapshotView:
    """The read-only image of ``snapshot`` (its L1 table and size), on a descriptor of its own."""
    fd = os.open(f"/proc/self/fd/{parent.backends.lock_fd}", os.O_RDONLY | os.O_CLOEXEC)
    backends = BackendSet(file_opener(parent.path, False, via_fd=fd), fd)
    try:
        be = backends.get(parent.mode.default)
        hdr = attrs.evolve(parent.engine.current_header(), l1_table_offset=snapshot.l1_offset,
                           l1_size=snapshot.l1_size, size=snapshot.disk_size or parent.size)
        raw = await run_async(_read_l1(hdr), be.pread)
        engine = Engine(hdr, raw, list(parent.engine.refs.table), be.size(), writable=False, cache_bytes=VIEW_CACHE)
        return SnapshotView(parent, snapshot, backends, engine)
    except BaseException:
        backends.close()
        raise


def _read_l1(hdr: fmt.Header):
    buf = yield ReadRequest(hdr.l1_table_offset, hdr.l1_size * 8)
    return fmt.decode_table(bytes(buf).ljust(hdr.l1_size * 8, b"\0"))
