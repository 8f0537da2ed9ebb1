"""Kernel passthrough (issue 24): which opens the kernel serves itself, and what that costs.

With FUSE passthrough (Linux 6.9+, taken at INIT by dp_passthrough.c) an OPEN reply may name a
*backing file*; the kernel then reads and writes that file itself, and the handle's READs and
WRITEs never reach /dev/fuse. FLUSH, FSYNC, FALLOCATE, LSEEK, GETATTR and SETATTR still do.
What the kernel's rules (fs/fuse/iomode.c, passthrough.c, 6.18) leave us to decide:

- **The opener's flags are the backing file's flags.** Each passthrough open reopens the backing
  file's path with the flags the *client* opened the FUSE file with; the descriptor given to
  FUSE_DEV_IOC_BACKING_OPEN names the file and nothing else. So a cache mode's promise can only be
  kept where the opener's flags keep it already: ``direct`` modes (none, directsync) promise no host
  page cache, so only O_DIRECT opens pass through; ``write_through`` modes (writethrough,
  directsync) promise a write is durable when it returns, so only O_DSYNC (or O_SYNC) opens that
  write pass through (read-only ones always may). Under ``auto`` the mode comes from those very
  flags, so every open of a raw image qualifies. :func:`why_not` is that rule, in one place.
- **One backing file per inode.** A second one is refused (EBUSY), so the inode's handles share
  one backing id (:class:`_Backing`), closed when its last passthrough handle is released (the
  kernel has let go of the inode's before it sends that RELEASE: fuse_file_put).
- **All or none of an inode's opens.** While any open of the inode passes through, the kernel fails
  an open without FOPEN_PASSTHROUGH (EIO); and a passthrough open fails while a page-cache (not
  direct_io) handle is open. So an open that must not pass through, on an inode whose other opens
  do, is :data:`SERVED`: FOPEN_PASSTHROUGH with FOPEN_DIRECT_IO, whose reads and writes the kernel
  still sends to the daemon (the data plane serves them as before; only mmap uses the backing
  file); and no open passes through while a page-cache handle is open.
- **Durability.** Writes through a passthrough handle pass neither ModeBackend.pwrite nor C's
  counters, so nothing says the image owes an fdatasync. Each FLUSH, FSYNC and RELEASE of a
  writable passthrough handle therefore counts one more "write the daemon did not see"
  (:meth:`Passthrough.owed`, added to the image's fast_writes hook), so the flush that follows
  syncs the file: fdatasync of any descriptor of the file covers writes made through another.
- **Live mode switches.** An open handle's passthrough cannot be taken back, and its backing file
  keeps the flags it was opened with. A switch to a mode that a passthrough handle's flags do not
  keep (writeback -> writethrough with a writer that did not open O_DSYNC) is refused with EBUSY
  and a reason (:meth:`Passthrough.switch_conflict`); while a switch or resize runs, new opens do
  not pass through (they would be judged by the mode being replaced).

What is lost for those handles: per-request counters (guest_reads/guest_writes, bytes, C's fast_*
counters, per-mode direct_bytes) do not count passthrough I/O; a write past a raw disk's end is not
refused when made: the kernel grows the file, and the writer's next FLUSH or FSYNC cuts it back and
fails with ENOSPC (fuse/operations.py, ``_settle_passthrough_growth``); an O_DIRECT request the host
file's alignment refuses fails with EINVAL instead of being served by a bounce buffer.
"""

from __future__ import annotations

import logging
import os

import attrs

log = logging.getLogger("cachefs.dataplane.plane")

#: What an open got. THROUGH: the kernel serves its reads and writes. SERVED: FOPEN_PASSTHROUGH for the
#: kernel's rule, FOPEN_DIRECT_IO so the daemon serves them. None: an ordinary open.
THROUGH = "through"
SERVED = "served"


def why_not(handle, mode=None) -> str | None:
    """Why this open must not pass through, or None. ``mode``: judge it under another mode (a switch)."""
    image = handle.image
    mode = handle.mode if mode is None else mode.for_open(handle.flags)  # the open's concrete mode
    flags = handle.flags
    if image.format != "raw":
        return f"a {image.format} image: its clusters are mapped by the daemon"
    if getattr(handle, "created", False):
        return "created through the mount: its writes grow the image in the daemon"
    if mode.direct and not flags & os.O_DIRECT:
        return f"cache={mode.name} promises no host page cache, and this open is not O_DIRECT"
    if mode.write_through and flags & os.O_ACCMODE != os.O_RDONLY and not flags & os.O_DSYNC:
        return f"cache={mode.name} makes each write durable before it returns, and this open is not O_DSYNC"
    return None


@attrs.define
class _Backing:
    """An inode's one backing id, and the handles that pass through with it."""
    id: int
    fhs: set[int] = attrs.Factory(set)


@attrs.define
class Passthrough:
    """The mount's passthrough state: per inode its backing id, per handle what its open got."""

    plane: object  # dataplane.plane.DataPlane
    backings: dict[int, _Backing] = attrs.Factory(dict)
    kinds: dict[int, str] = attrs.Factory(dict)      # fh -> THROUGH or SERVED
    writable: set[int] = attrs.Factory(set)          # fhs of THROUGH handles open for writing
    opens: dict[int, int] = attrs.Factory(dict)      # inode -> THROUGH opens so far (stats)
    _owed: dict[int, int] = attrs.Factory(dict)      # inode -> flushes owed to unseen writes
    refused: dict[int, str] = attrs.Factory(dict)    # inode -> why its last open did not pass through
    turned_off: set[int] = attrs.Factory(set)        # inodes whose admin asked for served I/O (counted)

    def turn(self, inode: int, on: bool) -> None:
        """``setfattr -n user.cachefs.passthrough -v on|off`` on an image: whether its *next* opens may
        pass through. Off serves them in the daemon, where every request is counted; a handle already
        passing through keeps doing so until closed (the kernel cannot take it back)."""
        (self.turned_off.discard if on else self.turned_off.add)(inode)
        self.refused.pop(inode, None)

    def decide(self, fh: int, handle, *, cached_open: bool, paused: bool) -> tuple[str | None, int]:
        """What this open gets, and the backing id its reply names (dataplane/handles.py marks the
        handle in C with it before the reply is relayed). ``cached_open``: a page-cache handle of the
        inode is open; ``paused``: a switch or resize is under way."""
        if not self.plane.passthrough:
            return None, 0
        inode = handle.inode
        why = "a cache-mode switch or resize is under way" if paused else why_not(handle)
        if inode in self.turned_off:
            why = "turned off for this image (user.cachefs.passthrough): the daemon serves and counts its I/O"
        backing = self.backings.get(inode)
        if backing is None:
            if why is None and cached_open:
                why = "a page-cache handle of the image is open (the kernel refuses passthrough beside it)"
            if why is None:
                try:
                    backing = self.backings[inode] = _Backing(self.plane.backing_open(handle.image.backends.fd))
                except OSError as exc:
                    why = str(exc)
            if why is not None:
                self.refused[inode] = why
                log.debug("fh %d of inode %d: no passthrough: %s", fh, inode, why)
                return None, 0
        kind = SERVED if why is not None else THROUGH
        backing.fhs.add(fh)
        self.kinds[fh] = kind
        if kind == THROUGH:
            self.refused.pop(inode, None)  # the image's last open passed through
            self.opens[inode] = self.opens.get(inode, 0) + 1
            if handle.flags & os.O_ACCMODE != os.O_RDONLY:
                self.writable.add(fh)
        else:
            self.refused[inode] = why
        log.debug("fh %d of inode %d: passthrough (%s)%s", fh, inode, kind, f": {why}" if why else "")
        return kind, backing.id

    def wrote(self, fh: int, inode: int) -> bool:
        """A FLUSH or FSYNC of ``fh``: True if it may have written unseen (the image owes a sync)."""
        if fh not in self.writable:
            return False
        self._owed[inode] = self._owed.get(inode, 0) + 1
        return True

    def owed(self, inode: int) -> int:
        """Grows whenever a passthrough writer may have written since: part of the image's fast_writes."""
        return self._owed.get(inode, 0)

    def released(self, fh: int, inode: int) -> None:
        self.wrote(fh, inode)  # the unmount's flush covers what it wrote since its last FLUSH
        self.writable.discard(fh)
        if self.kinds.pop(fh, None) is None:
            return
        backing = self.backings.get(inode)
        if backing is None:
            return
        backing.fhs.discard(fh)
        if not backing.fhs:  # the kernel dropped the inode's backing file before this RELEASE
            del self.backings[inode]
            self.plane.backing_close(backing.id)

    def through(self, inode: int, handles) -> list:
        """The open THROUGH handles of ``inode`` among ``handles`` ((fh, handle) pairs)."""
        return [h for fh, h in handles if h.inode == inode and self.kinds.get(fh) == THROUGH]

    def switch_conflict(self, inode: int, mode, handles) -> str | None:
        """Why switching ``inode`` to ``mode`` would break a passthrough handle's promise, or None."""
        bad = [why for h in self.through(inode, handles) if (why := why_not(h, mode)) is not None]
        if not bad:
            return None
        return (f"{len(bad)} handle(s) open in passthrough cannot keep cache={mode.name}'s promise "
                f"({bad[0]}); close them first, or mount with --passthrough off")

    def info(self, inode: int, handles) -> str:
        """The image's ``passthrough`` xattr: how many handles pass through now, or why the last did not."""
        if not self.plane.passthrough:
            return self.plane.passthrough_state()
        n = len(self.through(inode, handles))
        if inode in self.turned_off:
            return "off: turned off for this image" + (f" ({n} handle(s) still in passthrough until closed)" if n else "")
        why = self.refused.get(inode)
        if n or not why:
            return f"on ({n} handle(s) open in passthrough)"
        return f"off for its last open: {why}"

    def stats(self, inode: int, handles) -> dict:
        now = self.through(inode, handles)
        return {"passthrough_handles": len(now), "passthrough_opens": self.opens.get(inode, 0),
                "passthrough_served_handles": sum(1 for fh, h in handles
                                                  if h.inode == inode and self.kinds.get(fh) == SERVED)}
