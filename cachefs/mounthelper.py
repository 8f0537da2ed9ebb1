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
leaves ``nofail`` and ``_netdev`` in (mountopts.py accepts those).

mount(8) exits with its helper's status, so the helper speaks mount(8)'s
exit codes: 1 for a wrong invocation or option, 32 for a mount that failed.
"""

from __future__ import annotations

import getopt
import os
import sys

from cachefs.errors import CachefsError

PROG = "mount.fuse.cachefs"
USAGE = f"usage: {PROG} IMAGE_DIR MOUNTPOINT [-o OPTIONS] [-sfnv]"
FSTYPES = ("fuse.cachefs", "cachefs")
# mount(8)'s exit codes (mount(8), EXIT STATUS).
EX_USAGE, EX_FAIL = 1, 32


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except (CachefsError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EX_USAGE


def _main(argv: list[str]) -> int:
    from cachefs.daemon import run_mount
    from cachefs.mountcmd import mount_config
    from cachefs.mountopts import parse_options

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
    for path, what in ((image_dir, "image directory"), (mountpoint, "mountpoint")):
        if not os.path.isdir(path):
            raise CachefsError(f"{path}: the {what} is not a directory")
    opts = parse_options([v for k, v in switches if k == "-o"], sloppy="-s" in given)
    cfg = mount_config(image_dir, mountpoint, opts)
    if "-v" in given:
        _explain(cfg, opts.ignored)
    if "-f" in given:  # mount -f: everything but the mount itself
        return 0
    return EX_FAIL if run_mount(cfg) else 0


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
