"""`cachefs mount` and `cachefs umount`: the mount lifecycle seen from the command line.

cli/main.py registers these commands on its group; the daemon itself is fuse/daemon.py.
"""

from __future__ import annotations

import errno
import os
import sys
import time

import click

from cachefs.cli import preflight
from cachefs.fuse import utab
from cachefs.errors import CachefsError
from cachefs.fuse.kernel_mount import unmount_path
from cachefs.mountinfo import busy_detail, mount_at
from cachefs.cli.options import (CREATE_FORMATS, DATAPLANE, PASSTHROUGH, SUBMITTERS, TRANSPORT, VALUES, MountOptionError, MountOptions,
                               check_submitter, merge, parse_options)
from cachefs.policy import MODES

# ------------------------------------------------------------------ mount

@click.command()
@click.argument("image_dir", type=click.Path())  # checked by mount_config (cachefs/cli/preflight.py)
@click.argument("mountpoint", type=click.Path())
@click.option("--cache", "cache_mode", default=None, type=click.Choice(list(MODES)),
              help="Cache mode of every image (default writeback; see docs/cache-modes.md).")
@click.option("--aio", default=None, type=click.Choice(list(SUBMITTERS)),
              help="I/O submitter: a thread pool (the default), Linux AIO on an eventfd (O_DIRECT modes only), "
                   "or io_uring on an eventfd (every mode).")
@click.option("--dataplane", default=None, type=click.Choice(list(DATAPLANE)),
              help="on (the default when the native module has it, built with liburing): a C thread on io_uring "
                   "serves the reads and writes of raw and qcow2 images, allocating writes included, and takes "
                   "fallocate (discard, write-zeroes), SEEK_DATA/SEEK_HOLE and fsync; off: everything goes "
                   "through pyfuse3, slower, and fallocate and SEEK_DATA/SEEK_HOLE are not served.")
@click.option("--passthrough", default=None, type=click.Choice(list(PASSTHROUGH)),
              help="on (the default, where the kernel offers it: Linux 6.9+, CONFIG_FUSE_PASSTHROUGH): the kernel "
                   "reads and writes a raw image's file itself for opens whose flags keep the cache mode's promise "
                   "(O_DIRECT for none/directsync, O_DSYNC for writing in writethrough/directsync); those reads "
                   "and writes are not counted in guest_reads/guest_writes, and a write past the disk's end fails "
                   "at the writer's next fsync or close (ENOSPC) instead of at once; off: the data plane serves them.")
@click.option("--transport", default=None, type=click.Choice(list(TRANSPORT)),
              help="How the data plane takes requests: uring (FUSE over io_uring, Linux 6.14+; as root it sets "
                   "/sys/module/fuse/parameters/enable_uring to Y), dev (/dev/fuse), or auto (the default: the ring "
                   "when the kernel offers it, else /dev/fuse, saying in the log how to turn it on).")
@click.option("--l2-cache-size", "l2_cache_size", default=None, metavar="SIZE",
              help="Memory for each qcow2 image's L2 tables and refcount blocks, as QEMU's l2-cache-size "
                   "(default 32M); the data plane publishes the mappings of cached tables only.")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground and log to stderr.")
@click.option("--allow-other", is_flag=True, help="Let other users open the files (FUSE allow_other; "
                                                  "implies default_permissions).")
@click.option("-o", "options", multiple=True, metavar="OPT[,OPT...]",
              help="Mount options, as in fstab: cache=, aio=, dataplane=, passthrough=, transport=, ro, rw, allow_other, default_permissions, "
                   "uid=, gid=, umask=, log=, pid_file=, create_format=, l2_cache_size=, debug, growable (a write past a "
                   "disk's end grows it instead of ENOSPC), drop_bitmaps (serve images with persistent bitmaps "
                   "writable, deleting the bitmaps). A value given both as a flag and with -o must agree.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), default=None,
              help="Log file (default: /run/cachefs/MOUNTPOINT.log, or stderr with --foreground).")
@click.option("--pid-file", type=click.Path(dir_okay=False), default=None,
              help="Write the daemon's process ID here while it serves.")
@click.option("--create-format", type=click.Choice(list(CREATE_FORMATS)), default=None,
              help="What creating NAME.raw through the mount makes (default qcow2).")
@click.option("--debug", is_flag=True, help="Log at debug level too: more detail in the log (see --log), "
                                            "for a bug report.")
@click.option("--backing-dir", "backing_dirs", multiple=True, type=click.Path(file_okay=False), metavar="DIR",
              help="A directory where backing files of overlays may be, besides IMAGE_DIR (repeatable; "
                   "also -o backing_dir=DIR). A backing file named anywhere else is refused.")
def mount(image_dir, mountpoint, cache_mode, aio, dataplane, passthrough, transport, l2_cache_size, foreground, allow_other, options,
          log_file, pid_file, create_format, debug, backing_dirs):
    """Serve every image in IMAGE_DIR at MOUNTPOINT (NAME.qcow2 appears as NAME.raw).

    Returns once the mount is live.
    """
    from cachefs.fuse.daemon import run_mount
    try:
        size = None if l2_cache_size is None else VALUES["l2_cache_size"](l2_cache_size)
    except ValueError as exc:
        click.echo(f"cachefs: --l2-cache-size {l2_cache_size}: {exc}", err=True)
        sys.exit(2)
    flags = MountOptions(cache=cache_mode, aio=aio, allow_other=allow_other, log=log_file, pid_file=pid_file,
                         create_format=create_format, dataplane=dataplane, passthrough=passthrough, transport=transport, l2_cache_size=size, debug=debug,
                         backing_dirs=tuple(backing_dirs))
    try:
        cfg = mount_config(image_dir, mountpoint, merge(flags, parse_options(options)), foreground=foreground)
    except MountOptionError as exc:  # a usage error: exit 2 as click's own, but in one line
        click.echo(f"cachefs: {exc}", err=True)
        sys.exit(2)
    sys.exit(run_mount(cfg))


def mount_config(image_dir: str, mountpoint: str, opts: MountOptions, *, foreground: bool = False):
    """The daemon's MountConfig for these options; refuses what cannot work before anything starts.

    Shared by `cachefs mount` and mount.fuse.cachefs (cachefs/cli/mount_helper.py).
    """
    from cachefs.fuse.daemon import MountConfig, discover_images
    real_dir = preflight.directory(image_dir, "image directory")
    preflight.refuse_self_mount(real_dir, preflight.directory(mountpoint, "mountpoint"))
    if opts.pid_file:
        preflight.check_pid_file(os.path.abspath(opts.pid_file))
    why_read_only = None if opts.read_only else preflight.read_only_reason(real_dir)
    given = {"cache_mode": opts.cache, "aio": opts.aio, "create_format": opts.create_format,
             "dataplane": opts.dataplane, "passthrough": opts.passthrough, "transport": opts.transport,
             "l2_cache_size": opts.l2_cache_size,
             "uid": opts.uid, "gid": opts.gid, "umask": opts.umask,
             # The daemon's working directory is not the caller's: make paths absolute here.
             "log_file": opts.log and os.path.abspath(opts.log),
             "pid_file": opts.pid_file and os.path.abspath(opts.pid_file)}
    cfg = MountConfig(
        image_dir=os.path.abspath(image_dir), mountpoint=os.path.realpath(mountpoint),
        read_only=opts.read_only or why_read_only is not None, read_only_why=why_read_only,
        allow_other=opts.allow_other, default_permissions=opts.kernel_checks_modes,
        foreground=foreground, debug=opts.debug, growable=opts.growable, drop_bitmaps=opts.drop_bitmaps,
        noexec=opts.noexec,
        backing_dirs=tuple(preflight.directory(d, "backing directory") for d in opts.backing_dirs),
        **{k: v for k, v in given.items() if v is not None},
    )
    check_submitter(cfg.cache_mode, cfg.aio)
    discover_images(cfg.image_dir)  # refuse name clashes before anything starts
    return cfg


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--lazy", "-l", is_flag=True,
              help="Detach even while files are open (umount -l): the daemon serves them until their last "
                   "close, then flushes and exits.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for the final flush.")
def umount(mountpoint, lazy, timeout):
    """Flush every image and unmount, as umount(8) does: refused while a file in it is open.

    Returns when the daemon has closed every image.
    """
    sys.exit(unmount(mountpoint, lazy=lazy, timeout=timeout))


def unmount(path: str, *, lazy: bool, timeout: float, prog: str = "cachefs", lazy_flag: str = "--lazy") -> int:
    """`cachefs umount`, and umount.fuse.cachefs (what umount(8) runs): 0 once the daemon has exited.

    A busy mount is refused as umount(8) refuses it: one line, and 32 (its
    "mount failure"). Every other failure is a CachefsError, in one line.
    """
    mnt = resolve(path)
    m = mount_at(mnt)
    if m is None:
        raise CachefsError(f"{mnt}: not mounted")
    if m.fstype != "fuse.cachefs":
        raise CachefsError(f"{mnt}: not a cachefs mount ({m.fstype} of {m.source}); use umount(8)")
    pid = _daemon_pid(mnt)
    if lazy:
        unmount_path(mnt, lazy=True)
        click.echo(f"{mnt}: detached; the daemon{f' (pid {pid})' if pid else ''} flushes and exits "
                   f"after the last open file is closed", err=True)
        return 0
    flush_error = _flush(mnt) if pid is not None else None
    try:
        unmount_path(mnt, lazy=False)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise CachefsError(f"umount {mnt}: {exc.strerror}") from None
        click.echo(f"{prog}: umount {mnt}: target is busy{busy_detail(mnt)}; "
                   f"close them first, or use {lazy_flag}", err=True)
        return 32  # umount(8)'s "mount failure"
    utab.unregister(mnt)  # the daemon does too, as it exits; a dead mount's entry is left to us
    if pid is not None:
        _wait_gone(pid, timeout)
    if flush_error:
        raise CachefsError(f"unmounted {mnt}, but the flush before it failed: {flush_error}")
    return 0


def resolve(path: str) -> str:
    """Absolute, symlinks resolved, without stat'ing the mount itself (a dead one answers ENOTCONN)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _daemon_pid(mnt: str) -> int | None:
    try:
        return int(os.getxattr(mnt, "user.cachefs.pid"))
    except (OSError, ValueError):
        return None  # the daemon is gone: only the dead mount is left to remove


def _flush(mnt: str) -> str | None:
    """Ask the daemon to flush every image while still mounted, so a failure reaches the admin."""
    try:
        os.setxattr(mnt, "user.cachefs.flush", b"1")
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return None  # a read-only mount has nothing to flush, and the kernel says so before we hear it
        log_hint = _xattr(mnt, "user.cachefs.log")
        return f"{exc.strerror}" + (f" (see {log_hint})" if log_hint else "")
    return None


def _xattr(path: str, name: str) -> str | None:
    try:
        return os.getxattr(path, name).decode()
    except OSError:
        return None


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _is_running(pid):
        if time.monotonic() > deadline:
            raise CachefsError(f"daemon {pid} did not finish within {timeout:.0f}s; it is still flushing")
        time.sleep(0.05)


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
