"""Lock image files the way QEMU's file-posix driver does.

QEMU (since 2.10) does not use whole-file locks.  Its ``file`` protocol
driver (``block/file-posix.c``) describes a node's block-layer permissions
with shared (``F_RDLCK``) Linux OFD byte-range locks on single bytes of the
image file itself (``raw_apply_lock_bytes``)::

    RAW_LOCK_PERM_BASE   = 100   byte 100+i: "I hold permission bit i"
    RAW_LOCK_SHARED_BASE = 200   byte 200+i: "nobody else may take bit i"

with the bits of ``include/block/block-common.h``::

    i  bit   permission
    0  0x01  BLK_PERM_CONSISTENT_READ  ("consistent read")
    1  0x02  BLK_PERM_WRITE            ("write")
    2  0x04  BLK_PERM_WRITE_UNCHANGED  ("write unchanged")
    3  0x08  BLK_PERM_RESIZE           ("resize")
    4  0x10  (removed BLK_PERM_GRAPH_MOD; QEMU <= 6.1 may still lock 104/204)

All locks are read locks, so any number of processes can hold the same byte.
A conflict is detected by *testing* (``F_OFD_GETLK`` with ``F_WRLCK``,
``raw_check_lock_bytes``): a process that wants permission ``i`` fails if
anybody else holds byte ``200+i``, and a process that does not share
permission ``i`` fails if anybody else holds byte ``100+i``.  QEMU first
takes its own bytes and only then tests the others' (``RAW_PL_PREPARE`` in
``raw_handle_perm_lock``), so two processes racing to open the same image
cannot both miss each other; we do the same, and drop our bytes again if the
test fails.

cachefs interprets the image's metadata itself, so it behaves like a qcow2
format node on top of a ``file`` node.  Observed in ``/proc/locks`` with
QEMU 7.2 (``qemu-io``, ``qemu-storage-daemon``) on a qcow2 image:

* read-write: holds 100, 101, 103 (consistent read, write, resize) and
  unshares 201, 203 (write, resize) -- it shares only consistent read and
  write unchanged (``bdrv_default_perms_for_storage`` strips WRITE and
  RESIZE from the shared set of a metadata child);
* read-only: holds 100 and still unshares 201, 203.

That is exactly what :class:`ImageLock` takes (for raw images too, like a VM
whose disk device does not set ``share-rw``).  Consequences:

* while cachefs serves an image read-write, ``qemu-img info`` and any
  ``qemu-io`` fail with ``Failed to get shared "write" lock`` (they unshare
  write and find our byte 101) and a QEMU writer fails with
  ``Failed to get "write" lock`` (it finds our byte 201);
* while cachefs serves it read-only, ``qemu-img info`` and ``qemu-io -r``
  work, writers fail;
* cachefs refuses an image that a QEMU process (or another cachefs) holds in
  a conflicting way: raises :class:`cachefs.errors.ImageLocked`.

OFD locks belong to the open file description, not to the process: they
are shared by ``dup``-ed and inherited fds, vanish when the last of those is
closed, and a second ``open()`` of the same file in the same process
conflicts with them like any other process would.  Linux only (OFD locks,
Linux >= 3.15, 64-bit ``struct flock``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from cachefs.errors import CachefsError, ImageLocked

__all__ = ["ImageLock"]

RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200

PERM_CONSISTENT_READ = 0x01
PERM_WRITE = 0x02
PERM_WRITE_UNCHANGED = 0x04
PERM_RESIZE = 0x08
PERM_GRAPH_MOD_LEGACY = 0x10  # removed in QEMU 6.2; older QEMUs lock it

_ALL_BITS = 5  # bits 0..4, including the legacy GRAPH_MOD byte

_PERM_NAMES = {
    PERM_CONSISTENT_READ: "consistent read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write unchanged",
    PERM_RESIZE: "resize",
    PERM_GRAPH_MOD_LEGACY: "change children",
}

# What a qcow2 node opened by QEMU locks on its file (see module docstring).
# Shared = everything not in *_UNSHARED; the legacy GRAPH_MOD bit is shared.
WRITER_PERM = PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE
READER_PERM = PERM_CONSISTENT_READ
UNSHARED = PERM_WRITE | PERM_RESIZE

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid, padded to the alignment of long (32 bytes).
_FLOCK = struct.Struct("@hhlli0l")


def _bits(mask: int):
    return [1 << i for i in range(_ALL_BITS) if mask & (1 << i)]


def _offset(base: int, bit: int) -> int:
    return base + bit.bit_length() - 1


def _fcntl_lock(fd: int, cmd: int, l_type: int, offset: int) -> int:
    """One OFD lock call on the single byte at *offset*; returns the l_type
    fcntl reports back (for F_OFD_GETLK: F_UNLCK if nobody else holds it)."""
    arg = _FLOCK.pack(l_type, os.SEEK_SET, offset, 1, 0)  # l_pid must be 0
    res = fcntl.fcntl(fd, cmd, arg)
    return _FLOCK.unpack(res)[0]


class ImageLock:
    """QEMU-compatible lock bytes held on one open file description."""

    def __init__(self, fd: int, path: str, writable: bool, held: list[int]):
        self.fd = fd
        self.path = path
        self.writable = writable
        self._held = held  # byte offsets we locked

    @classmethod
    def acquire(cls, fd: int, path: str, writable: bool) -> "ImageLock":
        """Take the bytes a QEMU qcow2 reader/writer takes on *fd*.

        *fd* must be open for reading (``O_RDONLY`` or ``O_RDWR``) and must
        stay open while the lock is needed; *path* is only used in messages.
        Raises :class:`ImageLocked` if another open file description (another
        process, or another ``open()`` in this one) holds conflicting bytes.
        """
        perm = WRITER_PERM if writable else READER_PERM
        wanted = [_offset(RAW_LOCK_PERM_BASE, b) for b in _bits(perm)]
        wanted += [_offset(RAW_LOCK_SHARED_BASE, b) for b in _bits(UNSHARED)]
        self = cls(fd, path, writable, [])
        off = None
        try:
            # Lock first, then test, like raw_handle_perm_lock(RAW_PL_PREPARE).
            for off in wanted:
                _fcntl_lock(fd, F_OFD_SETLK, fcntl.F_RDLCK, off)
                self._held.append(off)
            off = None
            conflict = self._conflict(perm)
        except OSError as e:
            self.release()
            if off is not None and e.errno in (errno.EAGAIN, errno.EACCES):
                # Only possible if someone holds a *write* lock on the byte,
                # which QEMU never does; still, it is somebody else's lock.
                raise ImageLocked(
                    f"{path}: in use by another process "
                    f"(lock on byte {off} refused)"
                ) from None
            raise CachefsError(
                f"{path}: cannot take QEMU-compatible OFD locks: "
                f"{os.strerror(e.errno)}"
            ) from None
        if conflict is not None:
            self.release()
            raise ImageLocked(f"{path}: in use: {conflict}")
        return self

    def _others_hold(self, offset: int) -> bool:
        # Testing with F_WRLCK reports any lock held through another open
        # file description (ours never conflict with ourselves), as in
        # qemu_lock_fd_test(fd, off, 1, true).
        return _fcntl_lock(self.fd, F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK

    def _conflict(self, perm: int) -> str | None:
        """None, or a description of the first conflict, in the order of
        raw_check_lock_bytes: others' unshared bytes for the permissions we
        take, then others' permission bytes for what we do not share."""
        for bit in _bits(perm):
            if self._others_hold(_offset(RAW_LOCK_SHARED_BASE, bit)):
                return self._describe(bit, unshared=True)
        for bit in _bits(UNSHARED):
            if self._others_hold(_offset(RAW_LOCK_PERM_BASE, bit)):
                return self._describe(bit, unshared=False)
        return None

    def _describe(self, bit: int, unshared: bool) -> str:
        # Say what the other side is doing, and who it is; a writer is the common case.
        writer = _offset(RAW_LOCK_PERM_BASE, PERM_WRITE)
        if self._others_hold(writer):
            return f"{holder_of(self.fd, writer)} holds a write lock"
        name = _PERM_NAMES[bit]
        who = holder_of(self.fd, _offset(RAW_LOCK_SHARED_BASE if unshared else RAW_LOCK_PERM_BASE, bit))
        if unshared and bit == PERM_WRITE:
            return f"{who} has it open and does not allow writers"
        if unshared:
            return f'{who} has it open and does not share "{name}"'
        return f'{who} holds a "{name}" lock'

    def release(self) -> None:
        """Drop our bytes (idempotent).  Closing every fd of the open file
        description also drops them; the fd itself is left open."""
        held, self._held = self._held, []
        for off in held:
            try:
                _fcntl_lock(self.fd, F_OFD_SETLK, fcntl.F_UNLCK, off)
            except OSError as e:
                if e.errno != errno.EBADF:  # fd already closed: locks gone
                    raise

    @property
    def held(self) -> bool:
        return bool(self._held)

    def __enter__(self) -> "ImageLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        return f"<ImageLock {self.path!r} {mode} bytes={self._held}>"


# --- who holds it ------------------------------------------------------------
#
# /proc/locks shows -1 as the pid of an OFD lock, but /proc/PID/fdinfo/N lists the locks of that
# open file description ("lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:2146951 100 101"). Only the
# fdinfo files are read: a stat of /proc/PID/fd/N could wait on a FUSE mount (ours, even).

def holder_of(fd: int, offset: int, proc: str = "/proc") -> str:
    """Who holds a lock on byte ``offset`` of ``fd``'s file, in words: "qemu-system-x86 (pid 812)",
    "another cachefs (pid 77: cachefs mount /srv/images /mnt/disks)"; else "another process"."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = [pid for pid in _pids(proc) if _holds(f"{proc}/{pid}", key, offset, fd if pid == os.getpid() else -1)]
    if not pids:
        return "another process (QEMU, or another cachefs)"
    return " and ".join(_process(pid, proc) for pid in pids[:2])


def _pids(proc: str) -> list[int]:
    try:
        return [int(p) for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return []


def _holds(pdir: str, key: str, offset: int, skip_fd: int) -> bool:
    try:
        fds = [n for n in os.listdir(f"{pdir}/fdinfo") if n != str(skip_fd)]
    except OSError:  # exited, or not ours to look at
        return False
    for n in fds:
        try:
            with open(f"{pdir}/fdinfo/{n}") as f:
                text = f.read()
        except OSError:
            continue
        if key in text and any(_covers(line.split(), key, offset) for line in text.splitlines()
                               if line.startswith("lock:") and "->" not in line):
            return True
    return False


def _covers(fields: list[str], key: str, offset: int) -> bool:
    """One ``lock:`` line of fdinfo: N: TYPE ADVISORY MODE PID MAJ:MIN:INO START END."""
    try:
        at = fields.index(key)
        start, end = fields[at + 1], fields[at + 2]
        return int(start) <= offset and (end == "EOF" or offset <= int(end))
    except (ValueError, IndexError):
        return False


def _process(pid: int, proc: str) -> str:
    """A holder in words; a cachefs with its command line, so the admin sees which mount it is."""
    if pid == os.getpid():
        return f"this cachefs (pid {pid}), through another open file (the same image under another name?)"
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
        with open(f"{proc}/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return f"pid {pid} (exited)"
    if any("cachefs" in os.path.basename(a) for a in argv[:3]):
        if os.path.basename(argv[0]).startswith("python"):  # python [-m] .../cachefs mount ...
            argv = argv[2:] if argv[1:2] == ["-m"] else argv[1:]
        line = " ".join([os.path.basename(argv[0]), *argv[1:]])
        return f"another cachefs (pid {pid}: {line[:120]}{'...' if len(line) > 120 else ''})"
    return f"{os.path.basename(argv[0]) if argv else comm} (pid {pid})"  # comm is cut at 15 characters
