"""Mount options: the `-o` strings of `cachefs mount`, mount(8), fstab and systemd.

Every way of starting a mount ends in the same option text: `cachefs mount -o`,
`mount -t fuse.cachefs -o`, the fourth field of an fstab line (which
mount(8) hands to mount.fuse.cachefs, prefixed with `rw` or `ro`), and a
systemd unit's command line. This module turns that text into one frozen
`MountOptions` value, and does nothing else: no I/O but the user and group
name lookups of `uid=`/`gid=`, so a test can cover every option in
milliseconds.

Three kinds of option besides our own:

- options that mount(8), fstab and systemd use themselves and still hand to
  the helper (`nofail`, `_netdev`, `x-systemd.*`, ...) are accepted and
  have no effect; each says why in `IGNORED`;
- kernel flags that the mount has anyway (libfuse mounts `nodev,nosuid`;
  `relatime` is every mount's default) are accepted, because they are true;
- `noexec` (and `exec`) is passed on to the FUSE mount: mount(8) adds
  `noexec,nosuid,nodev` by itself for an fstab line with `user` or `users`
  (the helper never sees `user`), so refusing it would refuse every such line;
- other kernel flags the kernel *would* honour (`noatime`, `sync`, ...) are
  refused: the daemon does not pass them on to the FUSE mount, and a mount
  that silently ignores them is worse than one that refuses them.

Anything else is refused in one line naming the option. `mount -s`
(sloppy) drops unknown options instead, and says so.

Within the option text a later value wins (`rw,ro` is read-only; an fstab
option can be overridden with `mount -o`), as in mount(8). Between a
command-line flag and `-o`, the two must agree (`merge`): neither silently
beats the other.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable, Iterable

import attrs

from cachefs.errors import CachefsError
from cachefs.backend import SUBMITTERS
from cachefs.policy import MODES

CREATE_FORMATS = ("qcow2", "raw")
#: ``--dataplane``/``-o dataplane=``: the C data plane serves reads and writes (docs/design.md "Two planes").
DATAPLANE = ("on", "off")
#: ``--passthrough``/``-o passthrough=``: raw images' reads and writes done by the kernel itself (issue 24).
PASSTHROUGH = ("on", "off")
#: ``--transport``/``-o transport=``: FUSE over io_uring, /dev/fuse, or the ring where the kernel offers it
#: (dataplane/transport.py).
TRANSPORT = ("auto", "uring", "dev")


class MountOptionError(CachefsError):
    """An option cachefs refuses; the message is one line naming it."""


@attrs.frozen
class MountOptions:
    """What the options asked for. None: not given (the flag or the default decides)."""

    cache: str | None = None
    aio: str | None = None
    read_only: bool = False
    allow_other: bool = False
    default_permissions: bool = False
    uid: int | None = None
    gid: int | None = None
    umask: int | None = None
    log: str | None = None
    pid_file: str | None = None
    create_format: str | None = None
    dataplane: str | None = None
    passthrough: str | None = None
    transport: str | None = None
    l2_cache_size: int | None = None
    debug: bool = False
    # A write past a disk's end grows it (as a file), instead of ENOSPC (a block device's answer).
    growable: bool = False
    # Serve images with persistent bitmaps writable, deleting the bitmaps (cachefs does not maintain them).
    drop_bitmaps: bool = False
    # The kernel's noexec on the FUSE mount (mount(8) adds it for fstab's `user`).
    noexec: bool = False
    # Where backing files may be besides the image directory (--backing-dir, -o backing_dir=; repeatable).
    backing_dirs: tuple[str, ...] = ()
    # (option, why it has no effect), for `mount.fuse.cachefs -v`.
    ignored: tuple[tuple[str, str], ...] = ()

    @property
    def kernel_checks_modes(self) -> bool:
        """FUSE default_permissions: asked for, or implied by allow_other.

        Without it an allow_other mount lets every user open every image,
        whatever mode `stat` shows (the daemon does no access checks of its own).
        """
        return self.default_permissions or self.allow_other


# ------------------------------------------------------------------ the tables

#: Options that name a fact about this mount: option -> (field, value).
FLAGS: dict[str, tuple[str, bool]] = {
    "ro": ("read_only", True),
    "rw": ("read_only", False),
    "allow_other": ("allow_other", True),
    "default_permissions": ("default_permissions", True),
    "debug": ("debug", True),
    "growable": ("growable", True),
    "drop_bitmaps": ("drop_bitmaps", True),
    "noexec": ("noexec", True),
    "exec": ("noexec", False),
}

#: Accepted, and no effect on the daemon: option -> why.
IGNORED: dict[str, str] = {
    "defaults": "fstab's placeholder for the default options",
    "nofail": "read by mount -a and systemd (a missing mount does not fail the boot)",
    "_netdev": "read by mount -a and systemd (mount once the network is up)",
    "auto": "read by mount -a",
    "noauto": "read by mount -a and systemd",
    "user": "read by mount(8) (who may mount it; it implies noexec,nosuid,nodev, which it adds itself)",
    "users": "read by mount(8) (who may mount and unmount it; it implies noexec,nosuid,nodev)",
    "nouser": "read by mount(8) (only root mounts it)",
    "nodev": "a FUSE mount is nodev already (libfuse's default)",
    "nosuid": "a FUSE mount is nosuid already (libfuse's default)",
    "relatime": "the kernel's default for every mount",
}

#: The same, for whole families: prefix -> why.
IGNORED_PREFIXES: dict[str, str] = {
    "x-": "userspace options of systemd and util-linux (x-systemd.*, x-mount.*)",
    "comment=": "fstab's free text for other tools",
    "user=": "mount(8) records who mounted a user mount",
}

_NOT_PASSED_ON = "cachefs does not pass kernel mount flags on to FUSE, so the mount would not honour it"

#: Options with a meaning cachefs does not give them: option -> why not.
REFUSED: dict[str, str] = {
    "dev": "a cachefs mount is always nodev (libfuse's default); it serves only image files",
    "suid": "a cachefs mount is always nosuid (libfuse's default)",
    **{flag: _NOT_PASSED_ON for flag in ("noatime", "nodiratime", "strictatime", "lazytime", "sync", "dirsync")},
}


def _one_of(choices: Iterable[str]) -> Callable[[str], str]:
    names = tuple(choices)

    def convert(value: str) -> str:
        if value not in names:
            raise ValueError(f"choose one of {', '.join(names)}")
        return value
    return convert


def _id(lookup: Callable[[str], int], what: str) -> Callable[[str], int]:
    def convert(value: str) -> int:
        if value.isdigit():
            n = int(value)
            if n >= 0xFFFFFFFF:  # (uid_t)-1 means "unchanged" to chown(2)
                raise ValueError(f"{what} IDs are below 4294967295")
            return n
        try:
            return lookup(value)
        except KeyError:
            raise ValueError(f"no such {what}") from None
    return convert


def _umask(value: str) -> int:
    if not value or any(c not in "01234567" for c in value) or int(value, 8) > 0o777:
        raise ValueError("an octal mask from 0 to 777, as in umask(1)")
    return int(value, 8)


def _path(value: str) -> str:
    return value


def _bytes(value: str) -> int:
    """A size as QEMU writes its l2-cache-size: a number with an optional K, M or G suffix."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    num, unit = value.rstrip("kKmMgG"), value[len(value.rstrip("kKmMgG")):].lower()
    if not num.isdigit() or unit not in units or int(num) * units[unit] < 1:
        raise ValueError("a size in bytes, with an optional K, M or G suffix (e.g. 4M)")
    return int(num) * units[unit]


#: Options that carry a value: option (= field) -> converter raising ValueError(why).
VALUES: dict[str, Callable[[str], object]] = {
    "cache": _one_of(MODES),
    "aio": _one_of(SUBMITTERS),
    "create_format": _one_of(CREATE_FORMATS),
    "dataplane": _one_of(DATAPLANE),
    "passthrough": _one_of(PASSTHROUGH),
    "transport": _one_of(TRANSPORT),
    "l2_cache_size": _bytes,
    "uid": _id(lambda name: pwd.getpwnam(name).pw_uid, "user"),
    "gid": _id(lambda name: grp.getgrnam(name).gr_gid, "group"),
    "umask": _umask,
    "log": _path,
    "pid_file": _path,
}

KNOWN = ", ".join([*FLAGS, *(f"{v}=" for v in VALUES), "backing_dir="])


# ------------------------------------------------------------------ parsing

def split_options(texts: Iterable[str]) -> list[str]:
    """The single options of several `-o` strings, in order ("a,b", "c" -> a, b, c)."""
    return [opt for text in texts for opt in text.split(",") if opt]


def parse_options(texts: Iterable[str], *, sloppy: bool = False) -> MountOptions:
    """One MountOptions from `-o` strings; MountOptionError (one line, naming the option) on any refusal.

    sloppy (mount -s): an unknown option is dropped and listed in `ignored`
    instead of refused. A refused one (REFUSED) is still refused: its
    meaning is known, and not honouring it would be pretending.
    """
    fields: dict[str, object] = {}
    ignored: list[tuple[str, str]] = []
    for opt in split_options(texts):
        name, eq, value = opt.partition("=")
        if name in FLAGS and not eq:
            field, on = FLAGS[name]
            fields[field] = on
        elif name == "backing_dir":  # repeatable: each names one more directory
            fields["backing_dirs"] = (*fields.get("backing_dirs", ()), _value(name, eq, value, _path))
        elif name in VALUES:
            fields[name] = _value(name, eq, value)
        elif (why := _why_ignored(opt)) is not None:
            ignored.append((opt, why))
        elif name in FLAGS:
            raise MountOptionError(f"-o {opt}: {name} takes no value")
        elif opt in REFUSED:
            raise MountOptionError(f"-o {opt}: not supported: {REFUSED[opt]}")
        elif sloppy:
            ignored.append((opt, "unknown to cachefs; dropped because of -s"))
        else:
            raise MountOptionError(f"-o {opt}: unknown mount option (cachefs knows {KNOWN})")
    return MountOptions(**fields, ignored=tuple(ignored))


def _value(name: str, eq: str, value: str, parse: Callable[[str], object] | None = None) -> object:
    if not eq or not value:
        raise MountOptionError(f"-o {name}: needs a value ({name}=...)")
    try:
        return (parse or VALUES[name])(value)
    except ValueError as exc:
        raise MountOptionError(f"-o {name}={value}: {exc}") from None


def _why_ignored(opt: str) -> str | None:
    if opt in IGNORED:
        return IGNORED[opt]
    return next((why for prefix, why in IGNORED_PREFIXES.items() if opt.startswith(prefix)), None)


def merge(flags: MountOptions, given: MountOptions) -> MountOptions:
    """The command line's flags and its `-o` options as one value.

    A value given both ways must be the same: `--cache none -o cache=writeback`
    is refused rather than one of them silently winning. Switches (ro,
    allow_other, debug) are on if either way turns them on.
    """
    out: dict[str, object] = {}
    for f in attrs.fields(MountOptions):
        a, b = getattr(flags, f.name), getattr(given, f.name)
        if isinstance(a, tuple):  # ignored, backing_dirs: both ways count
            out[f.name] = a + b
        elif isinstance(a, bool):
            out[f.name] = a or b
        elif a is not None and b is not None and a != b:
            raise MountOptionError(f"--{f.name.replace('_', '-')} {a} and -o {f.name}={b} disagree; give one of them")
        else:
            out[f.name] = a if b is None else b
    return MountOptions(**out)


def check_submitter(cache: str, aio: str) -> None:
    """Refuse Linux AIO for a mode that never opens the image O_DIRECT.

    io_submit on a buffered file runs synchronously inside the call, so
    "native" would block the event loop instead of overlapping I/O.
    """
    if aio == "native" and not any(MODES[cache].for_open(flags).direct for flags in (0, os.O_DIRECT)):
        raise MountOptionError(f"--aio native needs O_DIRECT (cache none, directsync or auto); "
                               f"Linux AIO on a buffered file runs synchronously, so {cache} uses threads")
