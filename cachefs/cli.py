"""The cachefs command line. Nothing imports this module.

User errors are one line on stderr and a non-zero exit; tracebacks are for bugs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys

import click

from cachefs.errors import CachefsError
from cachefs.policy import MODES

log = logging.getLogger("cachefs")

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTPB]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 20G, 512M, 65536)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class CliGroup(click.Group):
    """Turn our errors into one line on stderr (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (CachefsError, OSError) as exc:
            click.echo(f"cachefs: {exc}", err=True)
            sys.exit(1)


@click.group(cls=CliGroup)
@click.version_option(package_name="cachefs")
def main():
    """Serve qcow2 and raw guest disk images as plain raw files over FUSE."""


# ------------------------------------------------------------------ create

@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("size")
@click.option("--format", "fmt_", type=click.Choice(["qcow2", "raw"]), default="qcow2", show_default=True)
@click.option("--cluster-size", default="64K", show_default=True, help="qcow2 cluster size, 512 to 2M")
@click.option("--refcount-bits", type=click.Choice(["1", "2", "4", "8", "16", "32", "64"]), default="16",
              show_default=True)
def create(image, size, fmt_, cluster_size, refcount_bits):
    """Create IMAGE of SIZE bytes (qcow2 v3, readable by qemu-img)."""
    from cachefs.qcow2.create import new_image
    nbytes = parse_size(size)
    if fmt_ == "raw":
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.ftruncate(fd, nbytes)
        os.close(fd)
    else:
        cs = parse_size(cluster_size)
        if cs & (cs - 1):
            raise click.BadParameter("cluster size must be a power of two", param_hint="--cluster-size")
        try:
            pieces = new_image(nbytes, cluster_bits=cs.bit_length() - 1,
                               refcount_order=int(refcount_bits).bit_length() - 1)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for off, data in pieces:
                os.pwrite(fd, data, off)
            os.fsync(fd)
        finally:
            os.close(fd)
    click.echo(f"Formatting '{image}', fmt={fmt_} size={nbytes}")


# ------------------------------------------------------------------ info

def _open_locked(path: str, writable: bool):
    from cachefs.locking import ImageLock
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        return fd, ImageLock.acquire(fd, path, writable)
    except BaseException:
        os.close(fd)
        raise


def _engine_sync(fd: int, writable: bool = False):
    from cachefs.qcow2.engine import open_engine
    from cachefs.qcow2.plan import run_sync
    return run_sync(open_engine(os.fstat(fd).st_size, writable=writable), lambda o, n: os.pread(fd, n, o))


@main.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def info(image, as_json):
    """Show an image's format, sizes and features."""
    from cachefs.image import image_format
    from cachefs.qcow2 import format as fmt
    kind = image_format(image)
    fd, lock = _open_locked(image, writable=False)
    try:
        st = os.fstat(fd)
        out = {"filename": image, "format": kind, "file_size": st.st_size, "allocated": st.st_blocks * 512}
        if kind == "raw":
            out["virtual_size"] = st.st_size
        else:
            hdr = _engine_sync(fd).current_header()
            out.update(virtual_size=hdr.size, version=hdr.version, cluster_size=hdr.cluster_size,
                       refcount_bits=hdr.refcount_bits, lazy_refcounts=hdr.lazy_refcounts,
                       compression_type="zstd" if hdr.compression_type == fmt.COMPRESSION_ZSTD else "zlib",
                       corrupt=hdr.corrupt, dirty=hdr.dirty, snapshots=hdr.nb_snapshots)
    finally:
        lock.release()
        os.close(fd)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"image: {image}\nfile format: {kind}\nvirtual size: {human(out['virtual_size'])} "
               f"({out['virtual_size']} bytes)\ndisk size: {human(out['allocated'])}")
    for key in ("cluster_size", "version", "refcount_bits", "compression_type", "lazy_refcounts",
                "corrupt", "snapshots"):
        if key in out:
            click.echo(f"{key.replace('_', ' ')}: {out[key]}")


# ------------------------------------------------------------------ check

@main.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--repair", type=click.Choice(["leaks", "all"]), default=None)
@click.option("--json", "as_json", is_flag=True)
def check(image, repair, as_json):
    """Check an image's consistency: exit 0 clean, 2 corrupt, 3 leaks only (qemu-img's codes)."""
    from cachefs.checkcmd import run_check
    sys.exit(run_check(image, repair=repair, as_json=as_json))


# ------------------------------------------------------------------ cache

@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.argument("mode", required=False, type=click.Choice(list(MODES)))
def cache(file, mode):
    """Show or change the cache mode of one mounted image, live.

    The image is flushed, then its backing file is reopened with the new
    mode's flags. Without MODE, prints the current one.
    """
    key = "user.cachefs.cache"
    try:
        current = os.getxattr(file, key).decode()
    except OSError:
        raise CachefsError(f"{file} is not an image of a cachefs mount") from None
    if mode is None:
        click.echo(current)
        return
    try:
        os.setxattr(file, key, mode.encode())
    except OSError as exc:
        why = _xattr_or_none(file, "user.cachefs.cache_error") or os.strerror(exc.errno)
        raise CachefsError(f"{os.path.basename(file)}: cache mode stays {current}: {why}") from None
    click.echo(f"{os.path.basename(file)}: cache mode {current} -> {os.getxattr(file, key).decode()}")


def _xattr_or_none(path: str, name: str) -> str | None:
    try:
        return os.getxattr(path, name).decode()
    except OSError:
        return None


# ------------------------------------------------------------------ stats

MODE_STAT_KEYS = ("guest_writes", "guest_flushes", "flushes_ignored", "fdatasyncs", "direct_bytes",
                  "bounce_requests", "peak_in_flight")
STAT_KEYS = ("format", "cache", "virtual_size", "allocated", "stats.guest_writes", "stats.guest_flushes",
             "stats.backend_fdatasyncs", "stats.metadata_writes")


@main.command()
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def stats(mountpoint, as_json):
    """Per-image counters of a running mount (the same as its user.cachefs.* xattrs)."""
    prefix = "user.cachefs."
    images = {}
    for name in sorted(os.listdir(mountpoint)):
        path = os.path.join(mountpoint, name)
        images[name] = {a[len(prefix):]: os.getxattr(path, a).decode()
                        for a in os.listxattr(path) if a.startswith(prefix)}
    skipped = json.loads(os.getxattr(mountpoint, prefix + "skipped") or b"{}")
    if as_json:
        click.echo(json.dumps({"images": images, "skipped": skipped}, indent=2))
        return
    click.echo(f"{'image':<20} " + " ".join(f"{k.split('.')[-1]:>18}" for k in STAT_KEYS))
    for name, x in images.items():
        click.echo(f"{name:<20} " + " ".join(f"{x.get(k, '-'):>18}" for k in STAT_KEYS))
        for mode in MODES:
            if f"stats.{mode}.guest_flushes" in x:
                per = " ".join(f"{k}={x.get(f'stats.{mode}.{k}', '-')}" for k in MODE_STAT_KEYS)
                click.echo(f"{'':<20}   {mode}: {per}")
    for name, why in skipped.items():
        click.echo(f"{name:<20} not served: {why}")


from cachefs.mountcmd import mount, umount  # noqa: E402  (the mount lifecycle lives there)

main.add_command(mount)
main.add_command(umount)

if __name__ == "__main__":
    main()
