"""Tell umount(8) to unmount a cachefs mount through umount.fuse.cachefs (issue 20, defect 8).

umount(8) (util-linux 2.38) runs ``/sbin/umount.fuse.cachefs`` for a
``fuse.cachefs`` mount only when it reads the type from mountinfo: for an
absolute path (fstab's, systemd's) it skips mountinfo, asks statfs(2), gets
plain ``fuse`` and unmounts by itself, returning before the daemon has
flushed and closed its images (libmount, lookup_umount_fs_by_statfs). It does
read mountinfo when libmount's own table of userspace mount options,
/run/mount/utab, has an entry for the target, and an entry saying
``helper=fuse.cachefs`` sends every unmount of it to
``/sbin/umount.<helper>`` (umount(8), EXTERNAL HELPERS; udisks's
``uhelper=`` works the same way).

So the daemon adds that entry once it has mounted, and removes it once it has
let go of the mount (umount(8) also removes it after a helper's success).
Both go through libmount's own API (``mnt_update_table``, which takes its
lock). Where there is no libmount or no utab to write (not root), umount(8)
works as before, without waiting; `cachefs umount` always waits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re

from cachefs.mountinfo import MOUNTINFO, parse_mountinfo

log = logging.getLogger("cachefs.fuse.utab")

HELPER_OPTION = b"helper=fuse.cachefs"
UTAB = "/run/mount/utab"  # libmount's (read here only to find stale entries; written through libmount)


def _libmount():
    name = ctypes.util.find_library("mount") or "libmount.so.1"
    lib = ctypes.CDLL(name, use_errno=True)
    for fn in ("mnt_new_update", "mnt_new_fs"):
        getattr(lib, fn).restype = ctypes.c_void_p
    for fn in ("mnt_fs_set_source", "mnt_fs_set_target", "mnt_fs_set_root", "mnt_fs_set_options"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.mnt_update_set_fs.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_void_p]
    lib.mnt_update_table.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.mnt_free_update.argtypes = [ctypes.c_void_p]
    lib.mnt_unref_fs.argtypes = [ctypes.c_void_p]
    return lib


def _update(target: str, source: str | None) -> bool:
    """Add the entry for ``target`` (with ``source``), or remove the last one for it (source None)."""
    try:
        lib = _libmount()
    except OSError as exc:
        log.debug("no libmount (%s): umount(8) will not wait for the final flush", exc)
        return False
    upd, fs = lib.mnt_new_update(), None
    try:
        if source is None:
            rc = lib.mnt_update_set_fs(upd, 0, target.encode(), None)
        else:
            fs = lib.mnt_new_fs()
            lib.mnt_fs_set_source(fs, source.encode())
            lib.mnt_fs_set_target(fs, target.encode())
            lib.mnt_fs_set_root(fs, b"/")
            lib.mnt_fs_set_options(fs, HELPER_OPTION)
            rc = lib.mnt_update_set_fs(upd, 0, None, fs)
        if rc == 0:
            rc = lib.mnt_update_table(upd, None)
        if rc < 0:
            log.debug("utab %s %s: error %d", "add" if source else "remove", target, rc)
        return rc == 0
    finally:
        if fs is not None:
            lib.mnt_unref_fs(fs)
        lib.mnt_free_update(upd)


def register(source: str, target: str) -> bool:
    """After mounting: umount(8) of ``target`` is to go through umount.fuse.cachefs.

    Stale entries go first: this target's, and those a killed daemon left
    where no cachefs is mounted any more.
    """
    for stale in [target, *stale_targets()]:
        unregister(stale)
    return _update(target, source)


def stale_targets(utab: str = UTAB, mountinfo: str = MOUNTINFO) -> list[str]:
    """Targets of our entries with no cachefs mount there (one per entry: an entry is removed at a time)."""
    try:
        with open(utab) as f:
            lines = f.read().splitlines()
        with open(mountinfo) as f:
            live = {m.path for m in parse_mountinfo(f.read()) if m.fstype == "fuse.cachefs"}
    except (OSError, ValueError, IndexError):
        return []
    out = []
    for line in lines:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields.get("TARGET", ""))
        if HELPER_OPTION.decode() in fields.get("OPTS", "").split(",") and target and target not in live:
            out.append(target)
    return out


def unregister(target: str) -> None:
    """After the mount is gone: the entry would otherwise send the next mount there to our helper."""
    _update(target, None)
