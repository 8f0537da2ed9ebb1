"""What the kernel says about mounts: /proc/self/mountinfo, and who holds files under a mount.

One parser for mountinfo (proc(5)): the mount point and root fields escape
blanks, tabs, newlines and backslashes as three-digit octal (``\\040``), and
the filesystem type follows a lone ``-`` after the optional fields. Where
several mounts stack on one path, the last line is the one on top.

Nothing here touches the mount point itself (no stat, no realpath of it): a
caller may be the daemon, whose own mount would wait for an answer that only
its request loop can give.
"""

from __future__ import annotations

import os
import re

import attrs

MOUNTINFO = "/proc/self/mountinfo"


@attrs.frozen
class MountEntry:
    mount_id: int
    dev: tuple[int, int]   # (major, minor) of the superblock
    path: str              # where it is mounted
    fstype: str            # e.g. "fuse.cachefs", "ext4"
    source: str            # e.g. the image directory for cachefs


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_line(line: str) -> MountEntry:
    """One mountinfo line; ValueError or IndexError if it is not one."""
    fields = line.split(" ")
    sep = fields.index("-")
    major, minor = (int(x) for x in fields[2].split(":"))
    return MountEntry(int(fields[0]), (major, minor), _unescape(fields[4]),
                      fields[sep + 1], _unescape(fields[sep + 2]))


def parse_mountinfo(text: str) -> list[MountEntry]:
    return [parse_line(line) for line in text.splitlines()]


def mount_at(path: str, mountinfo: str = MOUNTINFO) -> MountEntry | None:
    """The mount on top at exactly ``path`` (absolute, as the caller resolved it), or None."""
    with open(mountinfo) as f:
        entries = parse_mountinfo(f.read())
    return next((e for e in reversed(entries) if e.path == path), None)


def filesystem_type(path: str | os.PathLike[str]) -> str:
    """The type (ext4, xfs, tmpfs, ...) of the filesystem holding ``path``.

    Matches mountinfo by device number first, then by the longest mount
    point that prefixes the resolved path. "unknown" if neither works. Only
    for messages (a refused O_DIRECT names the filesystem), so a line it
    cannot parse is skipped rather than raised.
    """
    real = os.path.realpath(path)
    probe = real if os.path.exists(real) else os.path.dirname(real)
    try:
        st = os.stat(probe)
        dev: tuple[int, int] | None = (os.major(st.st_dev), os.minor(st.st_dev))
    except OSError:
        dev = None
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return "unknown"
    best: tuple[int, int, str] | None = None  # (device matches, prefix length, type)
    for line in lines:
        try:
            m = parse_line(line)
        except (ValueError, IndexError):
            continue
        if not (probe + "/").startswith(m.path.rstrip("/") + "/"):
            continue
        key = (int(m.dev == dev), len(m.path), m.fstype)
        if best is None or key[:2] >= best[:2]:  # later lines are mounted on top
            best = key
    return best[2] if best else "unknown"


def holders(path: str, proc: str = "/proc") -> list[tuple[int, str]]:
    """(pid, command) of every process with a file, cwd, root or mapping under ``path``, as fuser -m finds them."""
    prefix = path.rstrip("/") + "/"
    found = []
    for pid in (int(p) for p in os.listdir(proc) if p.isdigit()):
        if pid != os.getpid() and _uses(f"{proc}/{pid}", path, prefix):
            found.append((pid, command_of(pid, proc)))
    return found


def _uses(pdir: str, path: str, prefix: str) -> bool:
    def under(target: str) -> bool:
        target = target.removesuffix(" (deleted)")
        return target == path or target.startswith(prefix)
    try:
        links = [os.path.join(pdir, "fd", fd) for fd in os.listdir(os.path.join(pdir, "fd"))]
        links += [os.path.join(pdir, "cwd"), os.path.join(pdir, "root")]
        if any(under(_readlink(link)) for link in links):
            return True
        with open(os.path.join(pdir, "maps")) as f:
            return any(under(line.split(None, 5)[-1].strip()) for line in f if "/" in line)
    except OSError:  # the process exited, or is not ours to look at
        return False


def _readlink(link: str) -> str:
    try:
        return os.readlink(link)
    except OSError:
        return ""


def command_of(pid: int, proc: str = "/proc") -> str:
    """A process's command name (comm), "exited" once it is gone."""
    try:
        with open(f"{proc}/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "exited"


def busy_detail(mnt: str) -> str:
    users = holders(mnt)
    if not users:
        return ""
    return " (in use by " + ", ".join(f"{comm} [{pid}]" for pid, comm in users[:8]) + \
        (f" and {len(users) - 8} more" if len(users) > 8 else "") + ")"
