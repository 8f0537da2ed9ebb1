"""The kernel's side of our FUSE connection: how many requests it lets us have.

The FUSE kernel module sends at most ``max_background`` asynchronous
requests at once (default 12, fs/fuse/inode.c FUSE_DEFAULT_MAX_BACKGROUND);
O_DIRECT AIO reads and writes from a client like fio or QEMU are such
requests. So a QD32 client gets at most 12 in flight through the mount,
whatever pyfuse3's ``max_tasks`` and the submitter's depth allow (measured
here before this module: a peak of 7 requests in flight on the backend under
fio QD32). libfuse 3 does not take ``max_background`` as a mount option and
pyfuse3 does not expose ``fuse_conn_info``, so the limit is raised the way
an administrator would: through the fusectl filesystem
(Documentation/filesystems/fuse.rst, "Control filesystem"), as root.

Nothing here may touch the mountpoint itself: the daemon calls it before
its request loop runs, and a ``stat`` of the mount would wait for an answer
that only that loop can give.
"""

from __future__ import annotations

import os
import subprocess

from cachefs.mountinfo import MOUNTINFO, mount_at

FUSECTL = "/sys/fs/fuse/connections"


def connection_id(mountpoint: str, mountinfo: str = MOUNTINFO) -> int | None:
    """The fusectl directory name of the FUSE mount at ``mountpoint``: its
    superblock's kernel dev_t (major << 20 | minor), as fs/fuse/control.c names it."""
    # abspath, not realpath: it would stat the mount (see above).
    m = mount_at(os.path.abspath(mountpoint), mountinfo)
    if m is None or not m.fstype.startswith("fuse"):
        return None
    return (m.dev[0] << 20) | m.dev[1]


def _fusectl_mounted() -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == FUSECTL and line.split()[2] == "fusectl" for line in f)


def raise_queue_limit(mountpoint: str, max_background: int) -> str:
    """Let the kernel have ``max_background`` requests of this mount in flight.

    Returns what it did, for the log; raises OSError (with the reason) when
    it cannot: not root, no fusectl, no such connection.
    """
    if not _fusectl_mounted():
        r = subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(f"cannot mount fusectl on {FUSECTL}: {r.stderr.strip()}")
    conn = connection_id(mountpoint)
    if conn is None:
        raise OSError(f"no FUSE mount at {mountpoint} in /proc/self/mountinfo")
    base = os.path.join(FUSECTL, str(conn))
    # The kernel's own ratio: congestion at 3/4 of the background limit.
    for name, value in (("max_background", max_background), ("congestion_threshold", max_background * 3 // 4)):
        with open(os.path.join(base, name), "w") as f:
            f.write(f"{value}\n")
    return f"FUSE connection {conn}: max_background={max_background}"


def queue_limit(mountpoint: str) -> int | None:
    """The connection's current max_background (None if it cannot be read)."""
    try:
        conn = connection_id(mountpoint)
        with open(os.path.join(FUSECTL, str(conn), "max_background")) as f:
            return int(f.read())
    except (OSError, ValueError, TypeError):
        return None
