"""mount.fuse.cachefs: what mount(8) runs for `mount -t fuse.cachefs` and fstab lines of that type.

util-linux's mount(8) (2.38, seen with strace) looks for
``/sbin/mount.fuse.cachefs`` first and otherwise falls back to
``/sbin/mount.fuse`` (mount.fuse3). The fallback is no good to us: it runs
``cachefs SRC MNT -o OPTS`` from PATH, which is not a cachefs command, and
adds ``dev,suid`` to the options. So the package installs this helper and
the Makefile links it into /sbin. mount(8) calls it as

    mount.fuse.cachefs SRC MNT [-sfnv] [-N NAMESPACE] [-o OPTIONS] [-t fuse.cachefs]

with SRC made absolute and OPTIONS starting with ``rw`` or ``ro``; it has
already removed ``defaults``, ``noauto``, ``x-*`` and ``comment=``, and
leaves ``nofail`` and ``_netdev`` in (cli/options.py accepts those).

mount(8) exits with its helper's status, so the helper speaks mount(8)'s
exit codes: 1 for a wrong invocation or option, 32 for a mount that failed.

The same program is umount.fuse.cachefs (the Makefile links it into /sbin
under that name too): umount(8) looks for ``/sbin/umount.fuse.cachefs``
before it unmounts a ``fuse.cachefs`` mount itself (strace of util-linux
2.38), and calls it as ``umount.fuse.cachefs MNT [-flnrv] [-N NS] [-t
fuse.cachefs]``. The kernel's unmount of a FUSE mount (not fuseblk) returns
before the daemon has flushed and closed its images, so a `qemu-img check`
on the next line would find them locked; the helper does what `cachefs
umount` does: flush, unmount (refused while busy, exit 32), and return once
the daemon has exited.
"""

from __future__ import annotations

import ctypes
import getopt
import os
import sys

from cachefs.errors import CachefsError

PROG = "mount.fuse.cachefs"
USAGE = f"usage: {PROG} IMAGE_DIR MOUNTPOINT [-o OPTIONS] [-sfnv]"
FSTYPES = ("fuse.cachefs", "cachefs")
# mount(8)'s exit codes (mount(8), EXIT STATUS).
EX_USAGE, EX_FAIL = 1, 32
UPROG = "umount.fuse.cachefs"
UUSAGE = f"usage: {UPROG} MOUNTPOINT [-flnrv] [-t fuse.cachefs]"
#: How long umount waits for the daemon's final flush (the systemd unit's TimeoutStopSec).
FLUSH_WAIT = 900.0
MNT_FORCE, MNT_DETACH = 1, 2  # <sys/mount.h>


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.path.basename(sys.argv[0]).startswith("umount."):
        return umount_main(argv)
    try:
        return _main(argv)
    except (CachefsError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EX_USAGE


def _main(argv: list[str]) -> int:
    from cachefs.fuse.daemon import run_mount
    from cachefs.cli.mount import mount_config
    from cachefs.cli.options import parse_options

    # gnu_getopt: mount(8) puts the options after SRC and MNT.
    try:
        switches, args = getopt.gnu_getopt(argv, "sfnvN:o:t:")
    except getopt.GetoptError as exc:
        raise CachefsError(f"{exc}; {USAGE}") from None
    if len(args) != 2:
        raise CachefsError(USAGE)
    given = dict(switches)
    _refuse_foreign(given)
    image_dir, mountpoint = args[0].removeprefix("cachefs#"), args[1]
    opts = parse_options([v for k, v in switches if k == "-o"], sloppy="-s" in given)
    cfg = mount_config(image_dir, mountpoint, opts)
    if "-v" in given:
        _explain(cfg, opts.ignored)
    if "-f" in given:  # mount -f: everything but the mount itself
        return 0
    return EX_FAIL if run_mount(cfg) else 0


def umount_main(argv: list[str]) -> int:
    """umount.fuse.cachefs MNT [-flnrv]: umount(8)'s exit codes (1 usage, 32 failed or busy)."""
    from cachefs.cli.mount import unmount
    try:
        switches, args = getopt.gnu_getopt(argv, "flnrvdiN:t:")
        if len(args) != 1:
            raise getopt.GetoptError("one mountpoint")
    except getopt.GetoptError as exc:
        print(f"{UPROG}: {exc}; {UUSAGE}", file=sys.stderr)
        return EX_USAGE
    given = dict(switches)
    try:
        _refuse_foreign(given)
        if _not_ours(args[0]):
            return _plain_umount(args[0], given)
        if "-f" in given:  # the kernel aborts the connection (a hung daemon): there is nothing to wait for
            return _plain_umount(args[0], given)
        return unmount(args[0], lazy="-l" in given, timeout=FLUSH_WAIT, prog=UPROG, lazy_flag="umount -l")
    except (CachefsError, OSError) as exc:
        print(f"{UPROG}: {exc}", file=sys.stderr)
        return EX_FAIL


def _not_ours(path: str) -> bool:
    """A stale utab entry (cachefs/fuse/utab.py) sent umount(8) here for a mount that is not cachefs's."""
    from cachefs.cli.mount import resolve
    from cachefs.mountinfo import mount_at
    m = mount_at(resolve(path))
    return m is not None and m.fstype != "fuse.cachefs"


def _plain_umount(path: str, given: dict[str, str]) -> int:
    """What umount(8) would have done itself: umount2(2) with -l/-f, and the stale utab entry dropped."""
    from cachefs.fuse import utab
    from cachefs.cli.mount import resolve
    target = resolve(path)
    flags = (MNT_FORCE if "-f" in given else 0) | (MNT_DETACH if "-l" in given else 0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(target), flags) != 0:
        raise CachefsError(f"{target}: {os.strerror(ctypes.get_errno())}")
    utab.unregister(target)
    return 0


def _refuse_foreign(given: dict[str, str]) -> None:
    if given.get("-t", FSTYPES[0]) not in FSTYPES:
        raise CachefsError(f"-t {given['-t']}: this helper mounts only fuse.cachefs")
    if "-N" in given:
        raise CachefsError("-N: mounting in another namespace is not supported")


def _explain(cfg, ignored: tuple[tuple[str, str], ...]) -> None:
    """mount -v: what will be served, and each option that changes nothing, with why."""
    print(f"{PROG}: serving {cfg.image_dir} at {cfg.mountpoint} (cache={cfg.cache_mode}, aio={cfg.aio}"
          f"{', ro' if cfg.read_only else ''}{', allow_other' if cfg.allow_other else ''})", file=sys.stderr)
    for opt, why in ignored:
        print(f"{PROG}: -o {opt}: no effect here: {why}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
