"""`cachefs mount` and `cachefs umount`: the mount lifecycle seen from the command line.

cli.py registers these commands on its group; the daemon itself is daemon.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import click

from cachefs.errors import CachefsError
from cachefs.mountopts import (AIO_ENGINES, CREATE_FORMATS, MountOptionError, MountOptions, check_engine, merge,
                               parse_options)
from cachefs.policy import MODES


# ------------------------------------------------------------------ mount

@click.command()
@click.argument("image_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--cache", "cache_mode", default=None, type=click.Choice(list(MODES)),
              help="Cache mode of every image (default writeback; see docs/cache-modes.md).")
@click.option("--aio", default=None, type=click.Choice(list(AIO_ENGINES)),
              help="I/O engine: a thread pool (the default), Linux AIO on an eventfd (O_DIRECT modes only), "
                   "or io_uring on an eventfd (every mode).")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground and log to stderr.")
@click.option("--allow-other", is_flag=True, help="Let other users open the files (FUSE allow_other; "
                                                  "implies default_permissions).")
@click.option("-o", "options", multiple=True, metavar="OPT[,OPT...]",
              help="Mount options, as in fstab: cache=, aio=, ro, rw, allow_other, default_permissions, "
                   "uid=, gid=, umask=, log=, pid_file=, create_format=, debug. A value given both as a "
                   "flag and with -o must agree.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), default=None,
              help="Log file (default: /run/cachefs/MOUNTPOINT.log, or stderr with --foreground).")
@click.option("--pid-file", type=click.Path(dir_okay=False), default=None,
              help="Write the daemon's process ID here while it serves.")
@click.option("--create-format", type=click.Choice(list(CREATE_FORMATS)), default=None,
              help="What creating NAME.raw through the mount makes (default qcow2).")
@click.option("--debug", is_flag=True)
def mount(image_dir, mountpoint, cache_mode, aio, foreground, allow_other, options, log_file, pid_file,
          create_format, debug):
    """Serve every image in IMAGE_DIR at MOUNTPOINT (NAME.qcow2 appears as NAME.raw).

    Returns once the mount is live.
    """
    from cachefs.daemon import run_mount
    flags = MountOptions(cache=cache_mode, aio=aio, allow_other=allow_other, log=log_file, pid_file=pid_file,
                         create_format=create_format, debug=debug)
    try:
        cfg = mount_config(image_dir, mountpoint, merge(flags, parse_options(options)), foreground=foreground)
    except MountOptionError as exc:  # a usage error: exit 2 as click's own, but in one line
        click.echo(f"cachefs: {exc}", err=True)
        sys.exit(2)
    sys.exit(run_mount(cfg))


def mount_config(image_dir: str, mountpoint: str, opts: MountOptions, *, foreground: bool = False):
    """The daemon's MountConfig for these options; refuses what cannot work before anything starts.

    Shared by `cachefs mount` and mount.fuse.cachefs (cachefs/mounthelper.py).
    """
    from cachefs.daemon import MountConfig, discover_images
    given = {"cache_mode": opts.cache, "aio": opts.aio, "create_format": opts.create_format,
             "uid": opts.uid, "gid": opts.gid, "umask": opts.umask,
             # The daemon's working directory is not the caller's: make paths absolute here.
             "log_file": opts.log and os.path.abspath(opts.log),
             "pid_file": opts.pid_file and os.path.abspath(opts.pid_file)}
    cfg = MountConfig(
        image_dir=os.path.abspath(image_dir), mountpoint=os.path.realpath(mountpoint),
        read_only=opts.read_only, allow_other=opts.allow_other, default_permissions=opts.kernel_checks_modes,
        foreground=foreground, debug=opts.debug, **{k: v for k, v in given.items() if v is not None},
    )
    check_engine(cfg.cache_mode, cfg.aio)
    discover_images(cfg.image_dir)  # refuse name clashes before anything starts
    return cfg


@click.command()
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for the final flush.")
def umount(mountpoint, timeout):
    """Flush every image and unmount; returns when all images are closed."""
    mnt = os.path.abspath(mountpoint)
    try:
        pid = int(os.getxattr(mnt, "user.cachefs.pid"))
    except OSError:
        pid = None
    if pid is None:
        subprocess.run(["fusermount3", "-u", mnt], check=True)
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and _is_running(pid):
        if time.monotonic() > deadline:
            raise CachefsError(f"daemon {pid} did not finish within {timeout:.0f}s; it is still flushing")
        time.sleep(0.05)
    if _mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _mounted(mnt: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == mnt for line in f)
