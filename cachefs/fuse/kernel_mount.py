"""Mounting the FUSE filesystem ourselves, for the data plane (docs/design.md "Two planes").

With the data plane on, the daemon owns ``/dev/fuse`` instead of libfuse: the C
thread reads it, and libfuse is handed one end of a socketpair as
``/dev/fd/M``, on which libfuse 3.14 mounts nothing (``fuse_session_mount`` ->
``fuse_mnt_parse_fuse_fd``) and, later, unmounts nothing
(``fuse_session_unmount`` only acts on a mount it made). So this module does
both halves libfuse would have done:

- ``mount``: as root, open ``/dev/fuse`` and mount(2) it with
  ``fd=N,rootmode=40000,user_id=U,group_id=G`` and the kernel's own options
  (what libfuse's ``mount.c`` passes), source = fsname, type ``fuse.cachefs``,
  ``MS_NOSUID|MS_NODEV`` as libfuse does. Without root, fusermount3 mounts and
  hands the descriptor back over ``_FUSE_COMMFD`` (its protocol, as libfuse's
  ``fuse_mount_fusermount`` uses it).
- ``detach``: what ``fuse_kern_unmount`` does at a SIGINT: if the kernel has
  not ended the connection already (POLLERR on the descriptor), close the
  descriptor and detach the mount (MNT_DETACH, so open files do not keep it).

Nothing here stats the mount point: the daemon's own mount would wait for an
answer only its request loop can give (as in cachefs/mountinfo.py).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import subprocess

from cachefs.errors import CachefsError

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MNT_DETACH = 2

#: Options the kernel's FUSE mount takes itself (fs/fuse/inode.c); the rest are libfuse's.
KERNEL_OPTIONS = ("allow_other", "default_permissions")


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def mount(mountpoint: str, *, fsname: str, options: set[str]) -> int:
    """Mount FUSE at ``mountpoint``; the ``/dev/fuse`` descriptor (non-blocking, close-on-exec).

    ``options`` are libfuse-style (``allow_other``, ``default_permissions``,
    ``ro``, ``noexec``; ``fsname=``/``subtype=`` are given here instead). Raises
    CachefsError in one line.
    """
    wanted = sorted(o for o in options if o in KERNEL_OPTIONS)
    read_only = "ro" in options
    if os.geteuid() != 0:
        fd = _fusermount(mountpoint, fsname, wanted + (["noexec"] if "noexec" in options else []), read_only)
        os.set_blocking(fd, False)
        return fd
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    data = ",".join([f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}", *wanted])
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0) | (MS_NOEXEC if "noexec" in options else 0)
    libc = _libc()
    if libc.mount(os.fsencode(fsname), os.fsencode(mountpoint), b"fuse.cachefs", flags, data.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise CachefsError(f"mount {mountpoint}: {os.strerror(err)}")
    return fd


def _fusermount(mountpoint: str, fsname: str, wanted: list[str], read_only: bool) -> int:
    """fusermount3 mounts for a user and sends the descriptor back (SCM_RIGHTS on _FUSE_COMMFD)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    opts = ",".join(["ro" if read_only else "rw", "nosuid", "nodev", f"fsname={fsname}", "subtype=cachefs", *wanted])
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        r = subprocess.run(["fusermount3", "-o", opts, "--", mountpoint], env=env, pass_fds=(theirs.fileno(),),
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise CachefsError(f"fusermount3 {mountpoint}: {r.stderr.strip() or f'exit {r.returncode}'}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise CachefsError(f"fusermount3 {mountpoint}: no descriptor came back")
    os.set_inheritable(fds[0], False)
    return fds[0]


def connection_ended(fd: int) -> bool:
    """The kernel has ended the connection (unmounted, or aborted through fusectl)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))


def detach(mountpoint: str, fd: int) -> None:
    """Close ``fd`` and detach the mount, unless the kernel ended it already (as fuse_kern_unmount).

    A mount ended from outside may already have another mount on top of the
    same path: checking the descriptor first keeps us from detaching that one.
    """
    ended = connection_ended(fd)
    os.close(fd)
    if ended:
        return
    if os.geteuid() != 0:
        subprocess.run(["fusermount3", "-u", "-z", "--", mountpoint], capture_output=True)
        return
    if _libc().umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount2 {mountpoint}: {os.strerror(err)}")


def unmount_path(mnt: str, *, lazy: bool) -> None:
    """umount2(2) as root; fusermount3 for a user. EBUSY while a file is open, unless lazy."""
    if os.geteuid() == 0:
        if _libc().umount2(os.fsencode(mnt), MNT_DETACH if lazy else 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return
    r = subprocess.run(["fusermount3", "-uz" if lazy else "-u", mnt], capture_output=True, text=True)
    if r.returncode != 0:
        busy = "busy" in r.stderr
        raise OSError(errno.EBUSY if busy else errno.EPERM, r.stderr.strip() or "fusermount3 failed")
