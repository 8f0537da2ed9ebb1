"""Backing chains as the commands open them (issue 22): by the name rule, never by a plain open.

`create -b`, `info --backing-chain`, `map`, `rebase` and `commit` follow a
backing file name exactly as a mount does (image/backing_names.py;
docs/design.md, "Backing file names: the security rule"): the name must lead
to a regular file inside the allowed directories, which for a command are
the top image's directory and every ``--backing-dir`` given to it (a mount's
are its image directory and its ``--backing-dir``). Each base is resolved
with ``resolve_backing`` (lstat and realpath: nothing is opened), entered in
a ``ChainWalk`` (loops, depth), and only then opened with ``open_checked``, so
a hostile name (``/etc/shadow``, a FIFO, ``json:``, a loop) is one line and
nothing it names is read. So `create` never records a name a mount would
refuse, and `info`/`map` never read what a mount would not.

Each layer is locked as QEMU locks a backing file (shared read, no writer)
unless ``-U``. ``Layer.filename`` is the name QEMU would show for it: the top
as given, a base as QEMU's path_combine() of its overlay's filename and the
recorded name (``full-backing-filename``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import attrs
import click

from cachefs.cli.backing_option import BACKING_DIR_OPTION  # noqa: F401  (commit.py, rebase.py take it from here)
from cachefs.errors import CachefsError, ImageLocked
from cachefs.image.backing_names import BackingFile, ChainWalk, open_checked, resolve_backing
from cachefs.image.formats import image_format
from cachefs.image.locking import ImageLock
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.plan import run_sync




@attrs.define
class Layer:
    """One open image of a chain (depth 0 is the top)."""

    #: As QEMU names it (info's "filename", map's File column).
    filename: str
    #: The file opened: the top as given, a base by its real path (what the name rule resolved).
    path: str
    fd: int
    format: str
    #: The qcow2 engine (read-only, tables validated); None for raw.
    engine: object | None
    lock: ImageLock | None

    @property
    def backing(self) -> fmt.BackingName | None:
        return None if self.engine is None else self.engine.backing

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size if self.engine is None else self.engine.size


def allowed_dirs(top: str, backing_dirs: Sequence[str]) -> list[str]:
    """Where a command follows backing names: the top image's directory and each --backing-dir."""
    return [os.path.dirname(os.path.abspath(top)), *backing_dirs]


def qemu_filename(overlay: str, name: str) -> str:
    """QEMU's path_combine(): a relative name is taken relative to the overlay's name as given."""
    if os.path.isabs(name):
        return name
    head = os.path.dirname(overlay)
    return os.path.join(head, name) if head else name


def full_backing_filename(overlay: str, backing: fmt.BackingName, dirs: Sequence[str]) -> str | None:
    """``full-backing-filename`` when the name passes the rule (stat'ed, never opened), else None."""
    try:
        resolve_backing(overlay, backing.name, backing.format, allowed_dirs=dirs)
    except CachefsError:
        return None
    return qemu_filename(overlay, backing.name)


def read_engine(fd: int):
    """The qcow2 engine on ``fd``, read-only: the header and top-level tables validated."""
    from cachefs.qcow2.engine import open_engine
    return run_sync(open_engine(os.fstat(fd).st_size, writable=False), lambda o, n: os.pread(fd, n, o))


def _lock(fd: int, path: str, force_share: bool) -> ImageLock | None:
    if force_share:
        return None
    try:
        return ImageLock.acquire(fd, path, False)
    except ImageLocked as exc:
        raise ImageLocked(f"{exc}; -U (--force-share) reads it anyway, without a lock") from None


def _layer(filename: str, path: str, fd: int, kind: str, force_share: bool) -> Layer:
    """A layer on an open descriptor (closed by the caller); CachefsError names the file."""
    lock = _lock(fd, path, force_share)
    try:
        kind = image_format(path, os.pread(fd, 4, 0), given=kind)
        engine = read_engine(fd) if kind == "qcow2" else None
    except CachefsError as exc:
        if lock is not None:
            lock.release()
        text = str(exc)
        raise type(exc)(text if text.startswith(path) else f"{path}: {text}") from None
    return Layer(filename, path, fd, kind, engine, lock)


def open_base(overlay: Layer, dirs: Sequence[str], walk: ChainWalk, *,
              force_share: bool = False, flags: int = os.O_RDONLY) -> tuple[Layer, BackingFile]:
    """The layer below ``overlay``, by the name rule; the caller closes it (close_layer)."""
    backing = overlay.backing
    bf = resolve_backing(overlay.path, backing.name, backing.format, allowed_dirs=dirs)
    walk.enter(bf)
    fd = open_checked(bf, flags)
    try:
        return _layer(qemu_filename(overlay.filename, backing.name), bf.path, fd, bf.format, force_share), bf
    except BaseException:
        os.close(fd)
        raise


def close_layer(layer: Layer) -> None:
    if layer.lock is not None:
        layer.lock.release()
    os.close(layer.fd)


def open_top(path: str, kind: str, *, force_share: bool) -> Layer:
    """The image the user named (a plain open: it is the user's own argument)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _layer(path, path, fd, kind, force_share)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def open_chain(top: str, kind: str, *, backing_dirs: Sequence[str] = (),
               force_share: bool = False) -> Iterator[list[Layer]]:
    """Every layer of ``top``'s chain, top first, each opened by the rule; closed on exit."""
    dirs = allowed_dirs(top, backing_dirs)
    walk = ChainWalk(top)
    layers = [open_top(top, kind, force_share=force_share)]
    try:
        while layers[-1].backing is not None:
            layers.append(open_base(layers[-1], dirs, walk, force_share=force_share)[0])
        yield layers
    finally:
        for layer in reversed(layers):
            close_layer(layer)


def check_new_chain(overlay: str, name: str, kind: str, backing_dirs: Sequence[str], *,
                    overlay_exists: bool) -> int:
    """A base about to be recorded in ``overlay`` (`create -b`, `rebase -u -b`): it and every base
    below it must pass the rule a mount applies (loops and depth included, the overlay counted
    when it exists), and open as the format given. Returns its virtual size (qcow2: the header's;
    raw: the file's). Everything opened is closed again."""
    dirs = allowed_dirs(overlay, backing_dirs)
    bf = resolve_backing(overlay, name, kind, allowed_dirs=dirs)
    walk = ChainWalk(overlay if overlay_exists else bf.path)
    if overlay_exists:
        walk.enter(bf)
    fd = open_checked(bf, os.O_RDONLY)
    try:
        layers = [_layer(qemu_filename(overlay, name), bf.path, fd, bf.format, force_share=False)]
    except BaseException:
        os.close(fd)
        raise
    try:
        while layers[-1].backing is not None:
            layers.append(open_base(layers[-1], dirs, walk)[0])
        return layers[0].size
    finally:
        for layer in reversed(layers):
            close_layer(layer)


def base_for_create(image: str, kind: str, name: str | None, name_fmt: str | None,
                    backing_dirs: Sequence[str]) -> int | None:
    """`create -b NAME -F FMT`: NAME checked as a mount would follow it; its virtual size (None: no -b)."""
    if name is None:
        if name_fmt is not None:
            raise click.BadParameter("a backing format needs a backing file (-b)", param_hint="-F")
        return None
    if kind != "qcow2":
        raise click.BadParameter("only a qcow2 image has a backing file", param_hint="-b")
    if name_fmt is None:  # qemu-img 7.2: "Backing file specified without backing format"
        raise click.BadParameter("a backing file needs its format: -F qcow2 or -F raw (as qemu-img requires)",
                                 param_hint="-F")
    return check_new_chain(image, name, name_fmt, backing_dirs, overlay_exists=False)
