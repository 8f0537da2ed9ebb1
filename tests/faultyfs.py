"""A passthrough FUSE filesystem for tests that fails reads or writes in byte ranges, once armed.

There is no device-mapper in CI (no dm-error, no dm-flakey), so a test that
needs a backing file to fail *from below* mounts this in between::

    python tests/faultyfs.py SOURCE_DIR MOUNTPOINT

It serves the files of SOURCE_DIR (and its subdirectories) as they are:
lookup, getattr, setattr (truncate, chmod, chown, utimes), readdir, open,
create, read, write, flush, fsync, release, statfs, unlink, rename, mkdir,
rmdir, all passed through to the real files (os.pread/os.pwrite). xattrs are
ENOTSUP, except the control ones on the root:

- ``setxattr(ROOT, "user.faulty.arm", JSON)``: ``{"read": [[lo, hi], ...],
  "write": [[lo, hi], ...], "fsync": true, "errno": 5, "file": "disk.qcow2"}``
  (all keys optional; errno defaults to EIO, no file means every file). From
  then on a READ or WRITE request whose byte range meets ``[lo, hi)`` fails
  with that errno, and touches nothing; with ``fsync``, so does every FSYNC.
  ``"slow_read": [[lo, hi, seconds]]`` (and ``"slow_write"``) instead holds
  such a READ (WRITE) that long before doing it, while other requests are
  served: a backend request still running when the layer above moves on.
  ``"slow_fsync": [seconds, count]`` holds the next ``count`` FSYNCs that long.
  Arming again replaces the rules.
- ``setxattr(ROOT, "user.faulty.disarm", b"")``: no failures any more.
- ``getxattr(ROOT, "user.faulty.state")``: JSON counters, ``reads``,
  ``writes``, ``failed_reads``, ``failed_writes``, ``opens``,
  ``direct_opens`` (opens that asked for O_DIRECT), ``fsyncs``, ``failed_fsyncs``.

Page cache: an O_DIRECT open is left to the kernel's FUSE direct I/O path
(fuse_direct_IO); any other open gets FOPEN_DIRECT_IO, so the kernel keeps
no pages of the lower files that could answer a read the armed range must
fail. Locks are left to the kernel (pyfuse3 has no lock handlers, so libfuse
does not ask for FUSE_POSIX_LOCKS and the kernel keeps POSIX and OFD locks
on the FUSE inode itself, as local ones).

It prints ``ready`` on stdout once mounted, and on SIGTERM or SIGINT
unmounts and exits. Single-threaded: every request is served in turn.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import sys

import pyfuse3
import trio

ARM = b"user.faulty.arm"
DISARM = b"user.faulty.disarm"
STATE = b"user.faulty.state"
TIMEOUT = 1.0  # entry and attribute timeout, seconds: every change passes the kernel anyway


class FaultyFS(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, source: str) -> None:
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: os.path.realpath(source)}
        self.inodes: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) of the real file -> ours
        self.next_inode = pyfuse3.ROOT_INODE + 1
        self.files: dict[int, tuple[int, str]] = {}  # fh -> (real fd, name relative to the root)
        self.rules: dict = {}
        self.counters = dict.fromkeys(("reads", "writes", "failed_reads", "failed_writes", "opens",
                                       "direct_opens", "fsyncs", "failed_fsyncs", "slow_reads",
                                       "slow_writes", "slow_fsyncs"), 0)

    # ------------------------------------------------------------ inodes and attributes

    def _path(self, inode: int) -> str:
        try:
            return self.paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _inode_of(self, path: str, st: os.stat_result) -> int:
        if path == self.paths[pyfuse3.ROOT_INODE]:
            return pyfuse3.ROOT_INODE
        key = (st.st_dev, st.st_ino)
        inode = self.inodes.get(key)
        if inode is None:
            inode = self.inodes[key] = self.next_inode
            self.next_inode += 1
        self.paths[inode] = path
        return inode

    def _attrs(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._inode_of(path, st)
        a.generation = 0
        a.entry_timeout = a.attr_timeout = TIMEOUT
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                      "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, field, getattr(st, field))
        return a

    async def lookup(self, parent_inode, name, ctx):
        return self._attrs(self._child(parent_inode, name))

    async def getattr(self, inode, ctx):
        return self._attrs(self._path(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        target = self.files[fh][0] if fh is not None and fh in self.files else path
        try:
            if fields.update_size:
                os.truncate(target, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return self._attrs(path)

    async def statfs(self, ctx):
        v = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                      "f_favail", "f_namemax"):
            setattr(out, field, getattr(v, field))
        return out

    # ------------------------------------------------------------ directories

    async def opendir(self, inode, ctx):
        self._path(inode)
        return inode

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        names = sorted(os.listdir(path))
        for i, name in enumerate(names[start_id:], start_id):
            try:
                attrs = self._attrs(os.path.join(path, name))
            except pyfuse3.FUSEError:
                continue  # gone meanwhile
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        self._os(os.mkdir, path, mode)
        return self._attrs(path)

    async def rmdir(self, parent_inode, name, ctx):
        self._os(os.rmdir, self._child(parent_inode, name))

    async def unlink(self, parent_inode, name, ctx):
        self._os(os.unlink, self._child(parent_inode, name))

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        self._os(os.rename, old, new)
        for inode, path in list(self.paths.items()):
            if path == old or path.startswith(old + "/"):
                self.paths[inode] = new + path[len(old):]

    @staticmethod
    def _os(fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    # ------------------------------------------------------------ files

    def _file_info(self, fd: int, path: str, flags: int) -> pyfuse3.FileInfo:
        self.counters["opens"] += 1
        direct = bool(flags & os.O_DIRECT)
        self.counters["direct_opens"] += direct
        fh = fd  # real descriptors are unique while open
        self.files[fh] = (fd, os.path.relpath(path, self.paths[pyfuse3.ROOT_INODE]))
        return pyfuse3.FileInfo(fh=fh, direct_io=not direct, keep_cache=False)

    @staticmethod
    def _real_flags(flags: int) -> int:
        # Requests arrive in Python buffers, never aligned: the real file is opened without O_DIRECT.
        return (flags & ~(os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_NOCTTY)) | os.O_CLOEXEC

    async def open(self, inode, flags, ctx):
        path = self._path(inode)
        fd = self._os(os.open, path, self._real_flags(flags))
        return self._file_info(fd, path, flags)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        fd = self._os(os.open, path, self._real_flags(flags) | os.O_CREAT | (flags & os.O_EXCL), mode)
        return self._file_info(fd, path, flags), self._attrs(path)

    def _fails(self, kind: str, fh: int, off: int, size: int) -> None:
        rules = self.rules
        if not rules or rules.get("file") not in (None, self.files[fh][1]):
            return
        for lo, hi in rules.get(kind, ()):
            if off < hi and lo < off + max(size, 1):
                self.counters[f"failed_{kind}s"] += 1
                raise pyfuse3.FUSEError(rules.get("errno", errno.EIO))

    async def _slow(self, kind: str, off: int, size: int) -> None:
        for lo, hi, seconds in self.rules.get(f"slow_{kind}", ()):
            if off < hi and lo < off + max(size, 1):
                self.counters[f"slow_{kind}s"] += 1
                await trio.sleep(seconds)

    async def read(self, fh, off, size):
        self.counters["reads"] += 1
        self._fails("read", fh, off, size)
        await self._slow("read", off, size)
        return self._os(os.pread, self.files[fh][0], size, off)

    async def write(self, fh, off, buf):
        self.counters["writes"] += 1
        self._fails("write", fh, off, len(buf))
        await self._slow("write", off, len(buf))
        return self._os(os.pwrite, self.files[fh][0], buf, off)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        self.counters["fsyncs"] += 1
        rules = self.rules
        slow = rules.get("slow_fsync")
        if slow and slow[1] > 0:
            slow[1] -= 1
            self.counters["slow_fsyncs"] += 1
            await trio.sleep(slow[0])
        if rules.get("fsync") and rules.get("file") in (None, self.files[fh][1]):
            self.counters["failed_fsyncs"] += 1
            raise pyfuse3.FUSEError(rules.get("errno", errno.EIO))
        self._os(os.fdatasync if datasync else os.fsync, self.files[fh][0])

    async def release(self, fh):
        fd, _ = self.files.pop(fh)
        os.close(fd)

    # ------------------------------------------------------------ xattrs: the control channel

    async def setxattr(self, inode, name, value, ctx):
        if inode == pyfuse3.ROOT_INODE and name == ARM:
            try:
                self.rules = json.loads(value) if value else {}
            except ValueError:
                raise pyfuse3.FUSEError(errno.EINVAL) from None
            return
        if inode == pyfuse3.ROOT_INODE and name == DISARM:
            self.rules = {}
            return
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def getxattr(self, inode, name, ctx):
        if inode == pyfuse3.ROOT_INODE and name == STATE:
            return json.dumps({**self.counters, "armed": self.rules}).encode()
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def listxattr(self, inode, ctx):
        return []

    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)


async def serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            print("ready", flush=True)
            async for _ in signals:
                pyfuse3.terminate()
                break


def run(fs: pyfuse3.Operations, mountpoint: str, name: str) -> None:
    """Mount ``fs`` (a FaultyFS or a subclass, tests/recordfs.py) and serve it until a signal."""
    pyfuse3.init(fs, mountpoint, set(pyfuse3.default_options) | {f"fsname={name}", f"subtype={name}"})
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)


def main() -> None:
    source, mountpoint = sys.argv[1:3]
    run(FaultyFS(source), mountpoint, "faultyfs")


if __name__ == "__main__":
    main()
