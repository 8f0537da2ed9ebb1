"""A passthrough FUSE filesystem that logs every change to its files, in order: dm-log-writes for files.

There is no device-mapper in CI (no dm-log-writes), so a test that needs to
know what reached the disk, and when it was made durable, mounts this under
the image directory::

    python tests/recordfs.py SOURCE_DIR MOUNTPOINT LOGFILE

It is tests/faultyfs.py (the same passthrough; its fault rules stay usable
and disarmed) plus a log. Before mounting, it copies every regular file of
SOURCE_DIR to ``LOGFILE.base/`` (the initial bytes a replay starts from).
Then it appends one record per completed request that changes a file:

- WRITE: offset and the bytes written (only what pwrite reported written).
  Flag DURABLE when the handle was opened O_DSYNC or O_SYNC: the real file is
  opened the same way, so the write was on stable storage when it returned.
- TRUNCATE: a setattr that changed the size.
- SYNC: an FSYNC (fsync or fdatasync; flag DATASYNC), appended only after the
  real fsync returned. It covers the records before ``covers``, the position
  when the FSYNC started: fsync is per inode, so it covers every write to that
  file completed before then, through any handle. The real fsync runs in a
  thread, so requests that complete meanwhile land between ``covers`` and the
  SYNC record: raced, so not covered.
- NAME: the first record of each file gives its path (relative to the root).

Not logged, because they never arrive: FALLOCATE (pyfuse3 registers no
handler; libfuse answers ENOSYS and the kernel switches the opcode off, so
fallocate(2) on these files fails with EOPNOTSUPP; cachefs then keeps freed
clusters' space instead of punching it, which only changes the host
allocation) and writes to mmap'ed pages (handles are direct_io; nothing here
uses mmap). Reads are passed through, not logged.

A record's position is its index in the log (NAME records count). Control
xattrs on the root, besides faultyfs's:

- ``getxattr(ROOT, "user.record.position")``: the number of records so far,
  as ASCII. A client reads it after a request returns to learn that the
  request completed before that position ("acknowledged by position X").
- ``getxattr(ROOT, "user.record.state")``: JSON counts (position, writes,
  durable_writes, truncates, syncs, bytes).
- ``setxattr(ROOT, "user.record.flush", b"")``: flush the log to its file.

Log format (little-endian): the magic ``MAGIC``, then records, each a
``HEADER`` (kind u8, flags u8, file u16, length u32, arg u64) and ``length``
bytes of payload (WRITE: the data, arg = offset; NAME: the path; TRUNCATE:
arg = size; SYNC: arg = covers). :func:`read_log` parses it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import NamedTuple

import pyfuse3
import trio

from faultyfs import FaultyFS, run

MAGIC = b"RECFS\x00\x01\n"
HEADER = struct.Struct("<BBHIQ")
WRITE, TRUNCATE, SYNC, NAME = 1, 2, 3, 4
DURABLE, DATASYNC = 1, 2  # flags
POSITION = b"user.record.position"
STATE = b"user.record.state"
FLUSH = b"user.record.flush"


class Record(NamedTuple):
    pos: int
    kind: int
    flags: int
    file: str
    arg: int            # WRITE: offset; TRUNCATE: size; SYNC: covers
    data: bytes = b""   # WRITE only


class RecordFS(FaultyFS):
    def __init__(self, source: str, log_path: str) -> None:
        super().__init__(source)
        self.log = open(log_path, "wb", buffering=1 << 20)
        self.log.write(MAGIC)
        self.pos = 0
        self.file_ids: dict[str, int] = {}
        self.durable_fhs: set[int] = set()
        self.totals = dict.fromkeys(("writes", "durable_writes", "truncates", "syncs", "bytes"), 0)

    def _append(self, kind: int, flags: int, name: str, arg: int, payload: bytes = b"") -> None:
        fid = self.file_ids.get(name)
        if fid is None:
            fid = self.file_ids[name] = len(self.file_ids)
            self._append(NAME, 0, name, 0, os.fsencode(name))
        self.log.write(HEADER.pack(kind, flags, fid, len(payload), arg))
        self.log.write(payload)
        self.pos += 1

    def _file_info(self, fd, path, flags):
        info = super()._file_info(fd, path, flags)
        if flags & os.O_DSYNC:  # O_SYNC includes the O_DSYNC bit
            self.durable_fhs.add(info.fh)
        return info

    async def release(self, fh):
        self.durable_fhs.discard(fh)
        await super().release(fh)

    async def write(self, fh, off, buf):
        n = await super().write(fh, off, buf)
        durable = fh in self.durable_fhs
        self._append(WRITE, DURABLE if durable else 0, self.files[fh][1], off, bytes(buf[:n]))
        self.totals["writes"] += 1
        self.totals["durable_writes"] += durable
        self.totals["bytes"] += n
        return n

    async def setattr(self, inode, attr, fields, fh, ctx):
        out = await super().setattr(inode, attr, fields, fh, ctx)
        if fields.update_size:
            root = self.paths[pyfuse3.ROOT_INODE]
            self._append(TRUNCATE, 0, os.path.relpath(self._path(inode), root), attr.st_size)
            self.totals["truncates"] += 1
        return out

    async def fsync(self, fh, datasync):
        # Covers what completed before it started; the real fsync runs in a thread, so writes
        # that complete meanwhile are logged before the SYNC but are not covered by it.
        covers = self.pos
        fd, name = self.files[fh]
        if self.rules:
            await super().fsync(fh, datasync)  # faultyfs's rules (failures, slow syncs) apply
        else:
            self.counters["fsyncs"] += 1
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
        self._append(SYNC, DATASYNC if datasync else 0, name, covers)
        self.totals["syncs"] += 1

    async def getxattr(self, inode, name, ctx):
        if inode == pyfuse3.ROOT_INODE and name == POSITION:
            return str(self.pos).encode()
        if inode == pyfuse3.ROOT_INODE and name == STATE:
            return json.dumps({"position": self.pos, **self.totals}).encode()
        return await super().getxattr(inode, name, ctx)

    async def setxattr(self, inode, name, value, ctx):
        if inode == pyfuse3.ROOT_INODE and name == FLUSH:
            self.log.flush()
            return
        await super().setxattr(inode, name, value, ctx)


def base_dir(log_path) -> Path:
    """Where the initial bytes of the source files are kept."""
    return Path(f"{log_path}.base")


def copy_base(source: str, log_path: str) -> None:
    """Every regular file of ``source``, as it is before the mount, under base_dir(log_path)."""
    dest = base_dir(log_path)
    shutil.rmtree(dest, ignore_errors=True)
    for root, _, names in os.walk(source):
        for name in names:
            src = os.path.join(root, name)
            if os.path.isfile(src) and not os.path.islink(src):
                out = dest / os.path.relpath(src, source)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out)


def read_log(log_path) -> list[Record]:
    """The records of a log, NAME records included (as kind NAME, so positions stay indexes)."""
    data = memoryview(Path(log_path).read_bytes())
    if bytes(data[:len(MAGIC)]) != MAGIC:
        raise ValueError(f"{log_path}: not a recordfs log")
    names: dict[int, str] = {}
    out: list[Record] = []
    at = len(MAGIC)
    while at < len(data):
        kind, flags, fid, length, arg = HEADER.unpack_from(data, at)
        at += HEADER.size
        payload = bytes(data[at:at + length])
        at += length
        if kind == NAME:
            names[fid] = os.fsdecode(payload)
        out.append(Record(len(out), kind, flags, names[fid], arg, payload if kind == WRITE else b""))
    return out


def main() -> None:
    source, mountpoint, log_path = sys.argv[1:4]
    copy_base(source, log_path)
    fs = RecordFS(source, log_path)
    try:
        run(fs, mountpoint, "recordfs")
    finally:
        fs.log.close()


if __name__ == "__main__":
    main()
