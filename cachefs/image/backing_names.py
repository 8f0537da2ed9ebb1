"""Resolving a qcow2 backing file name safely (issue 22; docs/design.md, "Backing file names").

A backing file name is the most dangerous field in qcow2: whoever wrote the
overlay's header chooses which file the opener reads. QEMU follows paths,
``json:`` specifications and protocols (``nbd:``, ``http:``, ``ssh:``), and
CVE-2024-4467 was exactly that: ``qemu-img info`` on a crafted image read host
files. cachefs serves the guest-visible contents of the base, so following a
hostile name would hand any host file to whoever opens the overlay.

So this module owns one rule: a name is followed only to a regular file
inside an allowed directory (the image directory, each ``--backing-dir``),
decided on real paths with ``lstat`` and never by opening the target (a FIFO
would block the mount, a device node's open has side effects), in the
format the base's own name gives. Every refusal is one
:class:`~cachefs.errors.UnsafeBackingName` line naming the overlay.

- :func:`resolve_backing`: a name (as recorded) to a :class:`BackingFile`.
- :class:`ChainWalk`: loops (by ``st_dev``/``st_ino``) and depth along a chain.
- :func:`open_checked`: the open that cannot be raced onto another file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Sequence

import attrs

from cachefs.errors import UnsafeBackingName
from cachefs.image.formats import format_by_name

__all__ = ["BackingFile", "UnsafeBackingName", "MAX_CHAIN_DEPTH", "resolve_backing", "ChainWalk",
           "open_checked"]

#: Backing files below the top image a chain may have. QEMU sets no limit
#: (libvirt stops at 200). Each layer costs cachefs descriptors, QEMU lock
#: bytes, an L1 table and table caches, and a read of a cluster no layer
#: allocated walks every layer. Snapshot tools add one layer per external
#: snapshot and are expected to commit or rebase them; a chain deeper than
#: 16 is a forgotten merge or a crafted image whose purpose is to make one
#: open cost thousands. Raise it here if a real deployment needs more.
MAX_CHAIN_DEPTH = 16

#: The formats a backing file may be served in (formats.FORMAT_BY_SUFFIX's values).
BACKING_FORMATS = ("qcow2", "raw")

#: How much of a hostile name a message shows: qcow2 allows 1023 bytes, a log line need not.
_SHOWN = 160


@attrs.frozen
class BackingFile:
    """A backing file name that passed every rule: the file to open and how to read it."""
    #: Absolute, every symlink resolved (os.path.realpath), inside an allowed directory.
    path: str
    #: "qcow2" or "raw": the recorded backing format, which agrees with ``path``'s name.
    format: str
    #: The name as recorded in the overlay (messages; qemu-img's backing-filename).
    name: str
    #: The overlay whose header names this file (its path, for messages).
    overlay: str = attrs.field(default="", kw_only=True)
    #: The identity lstat saw when resolving. Invariant: open_checked opens only this file;
    #: None (a value built by hand, not by resolve_backing) is refused by open_checked and ChainWalk.
    st_dev: int | None = attrs.field(default=None, kw_only=True)
    st_ino: int | None = attrs.field(default=None, kw_only=True)


def _shown(name: str) -> str:
    """A hostile name quoted on one line: repr escapes NUL, newline and every control character."""
    text = repr(name)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _file_name(path: str) -> str:
    """The overlay as messages name it: its file name, escaped if it could break the line."""
    base = os.path.basename(path) or path
    return base if base.isprintable() else repr(base)


def _refuse(overlay: str, name: str, why: str) -> UnsafeBackingName:
    return UnsafeBackingName(f"{_file_name(overlay)}: backing file {_shown(name)} refused: {why}")


def _check_text(name: str) -> str | None:
    """Why the name itself is refused, before any file system call; None if it may be a path."""
    if not name:
        return "the name is empty"
    if any(not ch.isprintable() for ch in name if ch.isascii()):
        # NUL would cut the name short in C, a newline forges log lines; no image needs either.
        return "the name contains a control character (NUL, newline, ...)"
    if name.startswith("json:"):
        return "json: specifications are not followed"
    # QEMU's path_has_protocol(): a ':' before the first '/' makes the part before it a
    # protocol (nbd:, http:, file:, ...), even in "a:b.qcow2". cachefs reads local files only.
    head, colon, rest = name.partition(":")
    if colon and "/" not in head:
        # "a:b.qcow2" may well be a file: say how to record it so that QEMU agrees.
        hint = "" if rest.startswith("/") else f"; a file of that name is recorded as {_shown('./' + name)}"
        return (f"protocol {head + ':'!r} is not followed "
                f"(QEMU reads a ':' before the first '/' as a protocol{hint})")
    return None


def _inside(path: str, dirs: Sequence[str]) -> bool:
    """Whether a real path lies in one of the (real) directories: by components, so /srv/img2
    is not inside /srv/img."""
    return any(os.path.commonpath([path, d]) == d for d in dirs)


def _real_target(overlay_path: str, name: str, allowed: list[str]) -> str:
    """The real path the name leads to, inside an allowed directory, without opening anything.

    Relative names resolve against the overlay's directory as QEMU's path_combine() does.
    Containment is checked first on the lenient realpath, so a name pointing outside is refused
    the same way whether its target exists or not (the message leaks nothing about the host).
    realpath only lstats and readlinks: no open(2) on any component."""
    joined = os.path.join(os.path.dirname(os.path.abspath(overlay_path)), name)
    real = os.path.realpath(joined)
    if not _inside(real, allowed):
        # The resolved path is not shown: the line may reach clients (user.cachefs.last_failure),
        # and where a host symlink leads is none of theirs.
        raise _refuse(overlay_path, name, "it resolves outside the image directory and every --backing-dir")
    try:
        strict = os.path.realpath(joined, strict=True)
    except OSError as e:
        why = "does not exist" if e.errno == errno.ENOENT else f"cannot be resolved ({os.strerror(e.errno)})"
        raise _refuse(overlay_path, name, f"the backing file {why}") from None
    if strict != real:  # a component changed between the two walks: refuse rather than guess
        raise _refuse(overlay_path, name, "its path changed while it was being resolved")
    return real


def _regular_identity(overlay_path: str, name: str, real: str) -> os.stat_result:
    """lstat, never open: a FIFO's open blocks and a device's open reaches its driver."""
    try:
        st = os.lstat(real)
    except FileNotFoundError:
        raise _refuse(overlay_path, name, "the backing file does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a device node"
                if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode) else "a FIFO"
                if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        raise _refuse(overlay_path, name, f"it is {kind}, not a regular file")
    return st


def _backing_format(overlay_path: str, name: str, real: str, recorded: str | None) -> str:
    """The format to read the base in: the recorded one, which must be what the base's real name says.

    The real path's name, not the recorded one: it is the name the catalog serves that file
    under, so the chain reads it as a client opening it would. Otherwise a symlink
    base.qcow2 -> guest.raw would read a raw disk as qcow2, and a guest that wrote a qcow2
    header into its disk would choose the next backing name (the probing hazard, formats.py).
    With no recorded format the name's is used; the content is never probed."""
    by_name = format_by_name(os.path.basename(real))
    if by_name is None:
        raise _refuse(overlay_path, name, f"{os.path.basename(real)!r} has no .qcow2, .raw or .img suffix"
                      " to give its format")
    if recorded is not None and recorded not in BACKING_FORMATS:
        raise _refuse(overlay_path, name, f"backing format {_shown(recorded)} is not qcow2 or raw")
    if recorded is not None and recorded != by_name:
        raise _refuse(overlay_path, name, f"recorded as {recorded} but its name "
                      f"{os.path.basename(real)!r} makes it {by_name}")
    return by_name


def resolve_backing(overlay_path: str, name: str, recorded_format: str | None, *,
                    allowed_dirs: Sequence[str]) -> BackingFile:
    """The backing file ``name`` (as the overlay at ``overlay_path`` records it) leads to, or
    UnsafeBackingName: see the module's docstring and docs/design.md for the rules.

    ``recorded_format``: the backing format header extension's value, None without one.
    ``allowed_dirs``: the image directory and every ``--backing-dir``. Nothing is opened."""
    why = _check_text(name)
    if why is not None:
        raise _refuse(overlay_path, name, why)
    allowed = [os.path.realpath(d) for d in allowed_dirs]
    real = _real_target(overlay_path, name, allowed)
    st = _regular_identity(overlay_path, name, real)
    kind = _backing_format(overlay_path, name, real, recorded_format)
    return BackingFile(real, kind, name, overlay=overlay_path, st_dev=st.st_dev, st_ino=st.st_ino)


@attrs.define
class ChainWalk:
    """One chain's walk from its top image down: refuses a file met twice and a chain deeper than
    ``limit`` backing files.

    Files are compared by (st_dev, st_ino), not by name: a loop through a symlink, a hard link
    or a bind mount is still the same file. The top is stat'ed (following links) because it is
    the file being served, whatever name it was reached by."""
    top_path: str
    limit: int = attrs.field(default=MAX_CHAIN_DEPTH, kw_only=True)
    #: Invariant: _seen holds the identity of the top and of every file entered, _paths their
    #: paths in chain order (_paths[-1] is the overlay of the next enter()).
    _seen: set[tuple[int, int]] = attrs.field(init=False, factory=set)
    _paths: list[str] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        st = os.stat(self.top_path)
        self._seen.add((st.st_dev, st.st_ino))
        self._paths.append(self.top_path)

    @property
    def depth(self) -> int:
        """Backing files entered so far (the top is depth 0)."""
        return len(self._paths) - 1

    def enter(self, backing: BackingFile) -> None:
        """Record the next layer down, or raise UnsafeBackingName for a loop or too deep a chain."""
        overlay = backing.overlay or self._paths[-1]
        if backing.st_dev is None or backing.st_ino is None:
            raise _refuse(overlay, backing.name, "it was not resolved (no file identity)")
        if (backing.st_dev, backing.st_ino) in self._seen:
            chain = " -> ".join(_file_name(p) for p in [*self._paths, backing.path])
            raise _refuse(overlay, backing.name, f"it is already in the chain (a loop: {chain})")
        if self.depth + 1 > self.limit:
            raise _refuse(overlay, backing.name, f"the chain would be deeper than {self.limit} backing files")
        self._seen.add((backing.st_dev, backing.st_ino))
        self._paths.append(backing.path)


def _check_same(backing: BackingFile, fd: int, proc_path: bool) -> None:
    """The descriptor is the regular file resolve_backing lstat'ed; with ``proc_path``, also reached
    by that very path (the kernel's /proc/self/fd link: an intermediate directory swapped for a
    symlink after resolving would show here)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (backing.st_dev, backing.st_ino):
        raise _refuse(backing.overlay, backing.name, "the file changed after it was resolved")
    if proc_path and os.readlink(f"/proc/self/fd/{fd}") != backing.path:
        raise _refuse(backing.overlay, backing.name, "its path changed after it was resolved")


def open_checked(backing: BackingFile, flags: int) -> int:
    """Open a resolved backing file; the descriptor is the very file resolve_backing checked.

    ``flags``: access mode and status flags (O_RDONLY, O_DIRECT, ...); never O_CREAT or O_TRUNC.
    The path is first opened O_PATH|O_NOFOLLOW: that open touches no driver and never blocks,
    even if the file was swapped for a FIFO or a device meanwhile. Only once fstat and the
    kernel's own path say it is the same regular file is it opened for I/O, through
    /proc/self/fd (which reopens that inode, not the path) with O_NONBLOCK, cleared after."""
    if flags & (os.O_CREAT | os.O_TRUNC | os.O_PATH):
        raise ValueError("open_checked opens an existing backing file: no O_CREAT, O_TRUNC or O_PATH")
    if backing.st_dev is None or backing.st_ino is None:
        raise _refuse(backing.overlay, backing.name, "it was not resolved (no file identity)")
    try:
        handle = os.open(backing.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _refuse(backing.overlay, backing.name, "the backing file no longer exists") from None
    try:
        _check_same(backing, handle, proc_path=True)
        fd = os.open(f"/proc/self/fd/{handle}", (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC | os.O_NONBLOCK)
    finally:
        os.close(handle)
    try:
        _check_same(backing, fd, proc_path=False)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd
