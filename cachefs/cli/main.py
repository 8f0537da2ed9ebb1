"""The cachefs command line. Nothing imports this module.

User errors are one line on stderr and a non-zero exit; tracebacks are for bugs.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import signal
import sys

import click

from cachefs.cli.backing_option import BACKING_DIR_OPTION
from cachefs.errors import CachefsError
from cachefs.policy import MODES

log = logging.getLogger("cachefs")

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTPB]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 20G, 512M, 65536)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


class CliGroup(click.Group):
    """Every user error is one line on stderr, usage errors included; tracebacks are for bugs.

    The commands in other modules are imported when named (or for --help): every `cachefs` run
    would otherwise import them all, the mount's and the chains' (about 0.1 s each time)."""

    LAZY = {"mount": "cachefs.cli.mount", "umount": "cachefs.cli.mount", "commit": "cachefs.cli.commit",
            "rebase": "cachefs.cli.rebase", "snapshot": "cachefs.cli.snapshot"}

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx, name):
        if name in self.LAZY and name not in self.commands:
            self.add_command(getattr(importlib.import_module(self.LAZY[name]), name))
        return super().get_command(ctx, name)

    def make_context(self, info_name, args, parent=None, **extra):
        with _user_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _user_errors():
            rv = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
            return rv


@contextlib.contextmanager
def _user_errors():
    try:
        yield
    except BrokenPipeError:
        _quiet_broken_pipe()
    except click.ClickException as exc:
        # click's usage block is four lines; the one that matters is the message.
        ctx = getattr(exc, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else "cachefs: "
        usage = isinstance(exc, click.UsageError) and not isinstance(exc, click.BadParameter)
        hint = f" (see '{ctx.command_path} -h')" if usage and ctx is not None else ""
        _fail(where + exc.format_message() + hint, exc.exit_code)
    except (CachefsError, OSError) as exc:
        _fail(f"cachefs: {_describe(exc)}", 1)


def _describe(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _fail(message: str, code: int):
    click.echo(message.replace("\n", " "), err=True)
    sys.exit(code)


def _quiet_broken_pipe():
    """The reader went away (`cachefs info IMG | head -1`): stop without a word, as cat and ls do.

    stdout goes to /dev/null so the interpreter's last flush finds nothing to
    complain about; the status is what a shell reports for a tool that
    SIGPIPE ended (`yes | head -1`): 128 + SIGPIPE.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(128 + signal.SIGPIPE)


@click.group(cls=CliGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(None, "-V", "--version", package_name="cachefs")
def main():
    """Serve qcow2 and raw guest disk images as plain raw files over FUSE."""


# ------------------------------------------------------------------ create


#: qemu-img create -o keys for qcow2 that cachefs honours, and their defaults (qemu-img's).
CREATE_OPTIONS = {"cluster_size": "64k", "refcount_bits": "16", "lazy_refcounts": "off"}
ON_OFF = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def parse_create_options(groups, aliases: dict[str, str | None]) -> dict[str, str]:
    """``-o k=v,k=v`` (repeatable, as qemu-img takes it) merged with the long-option aliases."""
    given = {k: v for k, v in aliases.items() if v is not None}
    opts = {}
    for item in (i for group in groups for i in group.split(",") if i):
        key, sep, value = item.partition("=")
        if key not in CREATE_OPTIONS:
            raise click.BadParameter(f"unknown option {key!r} (cachefs knows {', '.join(CREATE_OPTIONS)})",
                                     param_hint="-o")
        opts[key] = value if sep else "on"  # QemuOpts: a bare key is key=on
    clash = sorted(given.keys() & opts.keys())
    if clash:
        raise click.BadParameter(f"{clash[0]} given both as -o and as --{clash[0].replace('_', '-')}",
                                 param_hint="-o")
    return {**given, **opts}


def qcow2_layout(opts: dict[str, str]) -> dict:
    """new_image()'s keyword arguments from the -o options."""
    opts = {**CREATE_OPTIONS, **opts}
    cs = parse_size(opts["cluster_size"])
    if cs <= 0 or cs & (cs - 1):
        raise click.BadParameter("cluster_size must be a power of two (512 to 2M)", param_hint="-o")
    bits = opts["refcount_bits"]
    if not bits.isdigit() or int(bits) & (int(bits) - 1) or not 1 <= int(bits) <= 64:
        raise click.BadParameter("refcount_bits must be 1, 2, 4, 8, 16, 32 or 64", param_hint="-o")
    lazy = ON_OFF.get(opts["lazy_refcounts"].lower())
    if lazy is None:
        raise click.BadParameter("lazy_refcounts must be on or off", param_hint="-o")
    return {"cluster_bits": cs.bit_length() - 1, "refcount_order": int(bits).bit_length() - 1,
            "lazy_refcounts": lazy}


def create_format(image: str, given: str | None) -> str:
    """-f, else the name's format; a format the name contradicts is refused, as a mount would serve the name's."""
    from cachefs.image.formats import format_by_name
    named = format_by_name(image)
    kind = given or named or "qcow2"
    if named is None:  # issue 20 defect 11: no mount would serve it
        stem = os.path.basename(image)
        names = f"{stem}.qcow2" if kind == "qcow2" else f"{stem}.raw or {stem}.img"
        raise CachefsError(f"{image}: a mount serves only images named *.qcow2, *.raw or *.img (the name "
                           f"decides the format); name it {names}")
    if kind != named:
        raise CachefsError(f"{image} would be served as {named} (cachefs goes by the name); "
                           f"name it *.{kind} or pass -f {named}")
    return kind


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("size", required=False)
@click.option("-f", "--format", "fmt_", type=click.Choice(["qcow2", "raw"]), default=None,
              help="Image format (default: what the name says; qcow2 if it says nothing).")
@click.option("-o", "options", multiple=True, metavar="KEY=VALUE[,...]",
              help="qcow2 options as qemu-img takes them: cluster_size (64k), refcount_bits (16), "
                   "lazy_refcounts (off).")
@click.option("--cluster-size", default=None, help="Same as -o cluster_size=.")
@click.option("--refcount-bits", default=None, help="Same as -o refcount_bits=.")
@click.option("--compress", type=click.Choice(["zlib", "zstd"]), default=None,
              help="Compress-on-write: whole-cluster writes are stored compressed (a backup target).")
@click.option("-b", "--backing", "backing", default=None, metavar="BASE",
              help="An overlay of BASE (recorded as given: a relative name is relative to IMAGE's directory).")
@click.option("-F", "--backing-format", "backing_fmt", type=click.Choice(["qcow2", "raw"]), default=None,
              help="BASE's format (required with -b, as qemu-img 7.2 requires it).")
@BACKING_DIR_OPTION
def create(image, size, fmt_, options, cluster_size, refcount_bits, compress, backing, backing_fmt, backing_dir):
    """Create IMAGE of SIZE bytes (qcow2 v3, readable by qemu-img).

    With -b BASE -F FMT, an overlay of BASE; SIZE defaults to BASE's. BASE must pass the rule a
    mount follows backing names by (IMAGE's directory or a --backing-dir, a regular file, FMT
    agreeing with its name), so no mount refuses what create records.
    """
    from cachefs.cli.chain import base_for_create
    from cachefs.qcow2.create import new_image
    kind = create_format(image, fmt_)
    base_size = base_for_create(image, kind, backing, backing_fmt, backing_dir)
    if size is None and base_size is None:
        raise click.UsageError("missing argument SIZE (only an overlay, -b, takes its base's size)")
    nbytes = parse_size(size) if size is not None else base_size
    opts = parse_create_options(options, {"cluster_size": cluster_size, "refcount_bits": refcount_bits})
    if kind == "raw":
        if opts:
            raise click.BadParameter(f"raw images take no options ({', '.join(opts)})", param_hint="-o")
        if compress:
            raise click.BadParameter("only qcow2 images can be compressed", param_hint="--compress")
        pieces = []
    else:
        try:
            pieces = new_image(nbytes, **qcow2_layout(opts), compress=compress,
                               backing_name=backing, backing_format=backing_fmt)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="-o" if backing is None else "-b") from None
    _write_new(image, pieces, nbytes if kind == "raw" else None)
    click.echo(f"Formatting '{image}', fmt={kind} size={nbytes}" + (f" compress={compress}" if compress else "")
               + (f" backing_file={backing} backing_fmt={backing_fmt}" if backing is not None else ""))


def _write_new(path: str, pieces, truncate_to: int | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for off, data in pieces:
            os.pwrite(fd, data, off)
        if truncate_to is not None:
            os.ftruncate(fd, truncate_to)
        os.fsync(fd)
        # Leave none of it in the host page cache: a mount in none/directsync
        # promises that nothing of the image is there (seed 003).
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ info

FORMAT_OPTION = click.option(
    "-f", "--format", "given", type=click.Choice(["qcow2", "raw", "probe"]), default=None,
    help="The image's format (default: what the name says: *.qcow2, *.raw, *.img); "
         "probe: look at the content.")
FORCE_SHARE_OPTION = click.option(
    "-U", "--force-share", is_flag=True,
    help="Take no lock, so it works while a mount or QEMU holds the image (which may be changing it).")


@main.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@FORMAT_OPTION
@click.option("--output", type=click.Choice(["human", "json"]), default="human", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Same as --output=json.")
@click.option("--backing-chain", is_flag=True,
              help="Every image of the chain, top first (bases opened only by the rule a mount follows).")
@BACKING_DIR_OPTION
@FORCE_SHARE_OPTION
def info(image, given, output, as_json, backing_chain, backing_dir, force_share):
    """Show an image's format, sizes, snapshots, bitmaps and features (qemu-img info's keys and layout).

    An overlay's backing file is shown from its header; without --backing-chain nothing it
    names is opened (its actual path is shown only if the name passes the rule a mount follows,
    which stats but never opens). On a file of a cachefs mount, also the image behind it, its
    format and its cache mode.
    """
    from cachefs.cli.info import (chain_human_lines, chain_info, human_lines, image_info, inspected,
                                  require_format, resolve_format)
    from cachefs.cli.chain import allowed_dirs
    require_format(image, given)
    if backing_chain:
        out = chain_info(image, given, backing_dirs=backing_dir, force_share=force_share)
        lines = chain_human_lines(out)
    else:
        with inspected(image, writable=False, force_share=force_share) as fd:
            out = image_info(image, fd, resolve_format(image, fd, given),
                             backing_dirs=allowed_dirs(image, backing_dir))
        lines = human_lines(out)
    if as_json or output == "json":
        click.echo(json.dumps(out, indent=4))
        return
    for line in lines:
        click.echo(line)


# ------------------------------------------------------------------ map

@main.command("map")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@FORMAT_OPTION
@click.option("--output", type=click.Choice(["human", "json"]), default="human", show_default=True)
@BACKING_DIR_OPTION
@FORCE_SHARE_OPTION
def map_(image, given, output, backing_dir, force_share):
    """Show which parts of IMAGE, or of a mounted file, hold data (qemu-img map's output).

    On a file of a cachefs mount it asks the mount (SEEK_DATA/SEEK_HOLE), as
    `qemu-img map -f raw` does; on an image file it reads the mapping itself, down an
    overlay's backing chain (each extent's depth, as qemu-img's), opening each base only by
    the rule a mount follows backing names (IMAGE's directory and each --backing-dir).
    """
    from cachefs.cli.map import human_lines, json_text, map_entries
    entries = map_entries(image, given, force_share, backing_dir)
    if output == "json":
        click.echo(json_text(entries))
        return
    for line in human_lines(entries, image):
        click.echo(line)


# ------------------------------------------------------------------ check

@main.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@FORMAT_OPTION
@click.option("-r", "--repair", type=click.Choice(["leaks", "all"]), default=None)
@click.option("--output", type=click.Choice(["human", "json"]), default="human", show_default=True,
              help="json: qemu-img check's keys.")
@click.option("--json", "as_json", is_flag=True, help="Same as --output=json.")
@FORCE_SHARE_OPTION
def check(image, given, repair, output, as_json, force_share):
    """Check an image's consistency: exit 0 clean, 2 corrupt, 3 leaks only (qemu-img's codes).

    With -U on an image a cachefs mount serves, the clusters that mount holds in reserve
    are reported apart, not as leaks.
    """
    from cachefs.cli.check import run_check
    if force_share and repair:
        raise click.BadParameter("a repair writes, so it needs the lock: drop -U", param_hint="-U")
    sys.exit(run_check(image, given=given, repair=repair, as_json=as_json or output == "json",
                       force_share=force_share))


# ------------------------------------------------------------------ cache

@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.argument("mode", required=False, type=click.Choice(list(MODES)))
def cache(file, mode):
    """Show or change the cache mode of one mounted image, live.

    The image is flushed, then its backing file is reopened with the new
    mode's flags. Without MODE, prints the current one.
    """
    _show_or_set(file, "cache", mode, "cache mode")


# ------------------------------------------------------------------ compress

@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.argument("algorithm", required=False, type=click.Choice(["zlib", "zstd", "off"]))
def compress(file, algorithm):
    """Show or change whether one mounted image is compress-on-write, live.

    Whole-cluster writes are then stored compressed (qcow2 only). The setting
    is kept in the image. Without ALGORITHM, prints the current one.
    """
    _show_or_set(file, "compress", algorithm, "compress")


def _show_or_set(file: str, name: str, value: str | None, what: str) -> None:
    """Print ``user.cachefs.NAME`` of a served file, or set it and print the change. A refusal is one
    line with the daemon's reason (``user.cachefs.NAME_error``), never a traceback."""
    key = f"user.cachefs.{name}"
    try:
        current = os.getxattr(file, key).decode()
    except OSError:
        raise CachefsError(f"{file} is not an image of a cachefs mount") from None
    if value is None:
        click.echo(current)
        return
    try:
        os.setxattr(file, key, value.encode())
    except OSError as exc:
        why = _xattr_or_none(file, f"{key}_error") or os.strerror(exc.errno)
        raise CachefsError(f"{os.path.basename(file)}: {what} stays {current}: {why}") from None
    click.echo(f"{os.path.basename(file)}: {what} {current} -> {os.getxattr(file, key).decode()}")


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
#: What the data plane served in C, and what it forwarded to pyfuse3 (docs/design.md "Two planes").
#: fallocate through the mount (PUNCH_HOLE, ZERO_RANGE) and the host space given back (docs/design.md).
DISCARD_STAT_KEYS = ("discards", "bytes_discarded", "write_zeroes", "bytes_punched")
FAST_STAT_KEYS = ("fast_reads", "fast_writes", "fast_bytes_read", "fast_bytes_written", "forwarded", "fast_errors")
#: Allocation in the data plane (qcow2 images; dataplane/lending.py), shown when the image has them.
FAST_ALLOC_KEYS = ("fast_allocations", "fast_lent_clusters", "fast_refills", "fast_parked_syncs")


@main.command()
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Numbers as numbers, true/false as booleans.")
def stats(mountpoint, as_json):
    """Per-image counters of a running mount (the same as its user.cachefs.* xattrs)."""
    prefix = "user.cachefs."
    skipped = _xattr_or_none(mountpoint, prefix + "skipped")
    if skipped is None:
        raise CachefsError(f"{mountpoint} is not a cachefs mount")
    images = {}
    for name in sorted(os.listdir(mountpoint)):
        path = os.path.join(mountpoint, name)
        images[name] = {a[len(prefix):]: os.getxattr(path, a).decode()
                        for a in os.listxattr(path) if a.startswith(prefix)}
    skipped = json.loads(skipped or "{}")
    read_only = _xattr_or_none(mountpoint, prefix + "read_only")  # the whole mount, and why
    transport = _xattr_or_none(mountpoint, prefix + "transport")  # uring or dev, and why (dataplane/transport.py)
    init = _xattr_or_none(mountpoint, prefix + "init")  # what INIT negotiated (dp_uring.c)
    # Requests the daemon answered with an error, and the last one's reason (cachefs/fuse/failures.py).
    failed = int(_xattr_or_none(mountpoint, prefix + "failed_requests") or 0)
    last_failure = _xattr_or_none(mountpoint, prefix + "last_failure")
    if as_json:
        typed = {name: {k: xattr_value(v) for k, v in x.items()} for name, x in images.items()}
        click.echo(json.dumps({"images": typed, "skipped": skipped, "read_only": read_only,
                               "failed_requests": failed, "last_failure": last_failure, "transport": transport,
                               "init": json.loads(init) if init else None}, indent=2))
        return
    if read_only:
        click.echo(f"read-only mount: {read_only}")
    if transport:
        click.echo(f"transport: {transport}")
    if init:
        i = json.loads(init)
        click.echo(f"init: max_write={i['max_write']} max_pages={i['max_pages']} "
                   f"max_background={i['max_background']} async_dio={i['async_dio']}")
    click.echo(f"{'image':<20} " + " ".join(f"{k.split('.')[-1]:>18}" for k in STAT_KEYS))
    for name, x in images.items():
        click.echo(f"{name:<20} " + " ".join(f"{x.get(k, '-'):>18}" for k in STAT_KEYS))
        if "read_only_reason" in x:
            click.echo(f"{'':<20}   read-only: {x['read_only_reason']}")
        if "backing_file" in x:
            click.echo(f"{'':<20}   backing file: {x['backing_file']} ({x.get('backing_format', '?')})")
        if "backing_users" in x:
            click.echo(f"{'':<20}   backing file of: {', '.join(json.loads(x['backing_users']))}")
        for mode in MODES:
            if f"stats.{mode}.guest_flushes" in x:
                per = " ".join(f"{k}={x.get(f'stats.{mode}.{k}', '-')}" for k in MODE_STAT_KEYS)
                click.echo(f"{'':<20}   {mode}: {per}")
        if "stats.fast_reads" in x:
            keys = FAST_STAT_KEYS + tuple(k for k in FAST_ALLOC_KEYS if f"stats.{k}" in x)
            click.echo(f"{'':<20}   data plane: " + " ".join(f"{k}={x[f'stats.{k}']}" for k in keys))
        if x.get("stats.passthrough_opens", "0") != "0":  # kernel passthrough (issue 24): uncounted I/O
            click.echo(f"{'':<20}   passthrough: opens={x['stats.passthrough_opens']} "
                       f"handles={x.get('stats.passthrough_handles', '0')}")
        if any(x.get(f"stats.{k}", "0") != "0" for k in DISCARD_STAT_KEYS):
            click.echo(f"{'':<20}   discard: " + " ".join(f"{k}={x[f'stats.{k}']}" for k in DISCARD_STAT_KEYS))
    for name, why in skipped.items():
        click.echo(f"{name:<20} not served: {why}")
    if last_failure:
        click.echo(f"last failed request ({failed} in all): {last_failure}")


def xattr_value(text: str):
    """An xattr's string as the JSON value it spells (xattrs are all strings): 42, 0.5, true, {...}.

    Anything else (a mode name, a path, "writeback:threads") stays a string.
    NaN and Infinity are refused: they are not JSON.
    """
    try:
        value = json.loads(text, parse_constant=_not_json)
    except ValueError:
        return text
    return text if isinstance(value, str) else value


def _not_json(name: str):
    raise ValueError(name)
