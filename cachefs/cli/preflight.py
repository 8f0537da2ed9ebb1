"""What `cachefs mount` and mount.fuse.cachefs check before anything is mounted (issue 20).

Everything that can fail is tried here, in the caller's process, so that a
mistake is one line on stderr and never a mount left behind:

- each directory exists and is one; a dead FUSE mount (ENOTCONN: its daemon
  is gone) is named as such, with the command that clears it;
- the image directory is neither the mountpoint nor inside it (the mount
  would hide the images it serves, and the daemon would wait on itself);
- the pid file can be created where it was asked for;
- an image directory on a read-only filesystem gives a read-only mount, and
  the reason, which the daemon says once and shows in ``stats``.
"""

from __future__ import annotations

import errno
import os
import stat

from cachefs.errors import CachefsError
from cachefs.mountinfo import mount_at


#: What a mount whose daemon is gone answers (directory() says which when).
DEAD = (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED)


def directory(path: str, what: str) -> str:
    """``path`` resolved (symlinks too), once it is known to be a directory that answers."""
    absolute = os.path.abspath(path)
    try:
        st = os.stat(absolute)
        os.statvfs(absolute)  # always asks a FUSE daemon (stat may answer from cached attributes)
    except OSError as exc:
        # ECONNABORTED while the kernel ends the connection; ECANCELED just after the daemon died
        # over FUSE over io_uring, before the kernel's teardown of its ring aborts the connection
        # (fs/fuse/dev_uring.c: a request queued on a stopped queue ends -ECANCELED).
        if exc.errno in DEAD:
            raise CachefsError(dead_mount_message(absolute)) from None
        raise CachefsError(f"{absolute}: the {what} {_missing(exc)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CachefsError(f"{absolute}: the {what} is not a directory")
    return os.path.realpath(absolute)


def _missing(exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "does not exist"
    return f"cannot be used: {exc.strerror}"


def dead_mount_message(path: str) -> str:
    """A mount whose daemon is gone answers ENOTCONN: say whose it was and how to clear it."""
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    m = mount_at(real)
    if m is not None and m.fstype == "fuse.cachefs":
        return (f"{real}: a dead cachefs mount (of {m.source}; its daemon is gone); clear it with "
                f"`cachefs umount {real}` or `fusermount3 -u {real}`")
    kind = f"{m.fstype} mount of {m.source}" if m is not None else "mount"
    return f"{real}: a dead {kind} (Transport endpoint is not connected); clear it with `fusermount3 -u {real}`"


def refuse_self_mount(image_dir: str, mountpoint: str) -> None:
    """The image directory (resolved) may not be the mountpoint or lie inside it; the reverse is fine."""
    if image_dir == mountpoint:
        raise CachefsError(f"{image_dir}: the image directory cannot be its own mountpoint: the mount would "
                           f"hide the images it serves; mount it elsewhere (a mountpoint inside it works)")
    if image_dir.startswith(mountpoint.rstrip("/") + "/"):
        raise CachefsError(f"{image_dir}: the image directory is inside the mountpoint {mountpoint}: the mount "
                           f"would hide the images it serves; mount it elsewhere (a mountpoint inside it works)")


def check_pid_file(path: str) -> None:
    """Create and remove a file next to the pid file, as the daemon will: any reason it cannot, in one line."""
    probe = f"{path}.tmp{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise CachefsError(f"cannot write the pid file {path}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def read_only_reason(image_dir: str) -> str | None:
    """Why every image of ``image_dir`` can only be served read-only, or None if they may be written."""
    try:
        if os.statvfs(image_dir).f_flag & os.ST_RDONLY:
            return (f"{image_dir} is on a read-only filesystem: serving every image read-only "
                    f"(mount with -o ro to say so)")
    except OSError:
        return None
    return None
