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
from cachefs.policy import MODES


# ------------------------------------------------------------------ mount

@click.command()
@click.argument("image_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--cache", "cache_mode", default="writeback", show_default=True,
              type=click.Choice(list(MODES)), help="Cache mode of every image (see docs/cache-modes.md).")
@click.option("--aio", default="threads", show_default=True, type=click.Choice(["threads", "native", "io_uring"]),
              help="I/O engine: a thread pool, Linux AIO on an eventfd (O_DIRECT modes only), "
                   "or io_uring on an eventfd (every mode).")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground and log to stderr.")
@click.option("--allow-other", is_flag=True, help="Let other users open the files (FUSE allow_other).")
@click.option("-o", "options", multiple=True, help="Mount options; 'ro' serves every image read-only.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), default=None,
              help="Log file (default: /run/cachefs/MOUNTPOINT.log, or stderr with --foreground).")
@click.option("--debug", is_flag=True)
def mount(image_dir, mountpoint, cache_mode, aio, foreground, allow_other, options, log_file, debug):
    """Serve every image in IMAGE_DIR at MOUNTPOINT (NAME.qcow2 appears as NAME.raw).

    Returns once the mount is live.
    """
    from cachefs.daemon import MountConfig, discover_images, run_mount
    opts = {o for group in options for o in group.split(",") if o}
    cfg = MountConfig(
        image_dir=os.path.abspath(image_dir), mountpoint=os.path.realpath(mountpoint),
        cache_mode=cache_mode, aio=aio, read_only="ro" in opts, allow_other=allow_other,
        log_file=log_file, foreground=foreground, debug=debug,
    )
    if aio == "native" and not any(m.direct for m in (MODES[cache_mode].for_open(f) for f in (0, os.O_DIRECT))):
        raise click.BadParameter(f"--aio native needs O_DIRECT (--cache none, directsync or auto); "
                                 f"Linux AIO on a buffered file runs synchronously, so {cache_mode} uses threads",
                                 param_hint="--aio")
    discover_images(cfg.image_dir)  # refuse name clashes before anything starts
    sys.exit(run_mount(cfg))


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
