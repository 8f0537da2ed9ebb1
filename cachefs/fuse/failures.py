"""A failed request in one line: the operation, the image (its name in the mount and its file), the
guest range, and why (issue 20, defect 9).

fuse/operations.py's handlers log through here whatever they answer with an error other than a plain FUSEError
(ENOENT of a lookup is an answer, not a failure): "read of vm.raw (/srv/images/vm.qcow2) at guest
offset 0, 4096 bytes: EIO: damaged image metadata for this range". The mount keeps a count and
the last such line, which the root's ``user.cachefs.failed_requests`` and
``user.cachefs.last_failure`` (and so `cachefs stats`) show: a name the mount cannot hold, a
shrink, a damaged range reach the admin who did not read the log.
"""

from __future__ import annotations

import errno
import os
import time

import attrs

#: Handlers whose first argument is a file handle, and those whose first is an inode.
_BY_HANDLE = ("read", "write", "flush", "fsync", "release")
_BY_INODE = ("open", "getattr", "setattr", "getxattr", "setxattr", "listxattr")
#: Handlers whose second argument is a name in the mount's directory.
_BY_NAME = ("create", "mknod", "unlink", "lookup")


@attrs.define
class Failures:
    """How many requests failed, and the last one's line (with the time it failed)."""
    count: int = 0
    last: str | None = None

    def record(self, line: str) -> None:
        self.count += 1
        self.last = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"

    def root_info(self) -> dict[str, str]:
        return {"failed_requests": str(self.count), **({"last_failure": self.last} if self.last else {})}


def errno_of(exc: BaseException) -> int:
    """The errno a client gets for an exception (STYLE.md habit 4): an OSError's own, a
    CachefsError's class errno, else EIO. Both answerers use it: fuse/operations.py (through
    libfuse) and fuse/direct_requests.py (the requests C hands to Python)."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return getattr(exc, "errno", None) or errno.EIO


def reason(exc: BaseException) -> str:
    """``EPERM: why``: the errno's name and the message, without Python's ``[Errno 1]``."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else getattr(exc, "errno", None) or errno.EIO
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {text}"
    return f"{errno.errorcode.get(code, str(code))}: {text}"


def describe(ops, name: str, args: tuple) -> str:
    """What the request was, in words: "write of vm.raw (/srv/images/vm.qcow2) at guest offset N, M bytes"."""
    try:
        if name in _BY_HANDLE:
            return _by_handle(ops, name, args)
        if name in _BY_INODE:
            return _by_inode(ops, name, args)
        if name in _BY_NAME:
            return f"{name} of {os.fsdecode(args[1])}"
        if name == "rename":
            return f"rename of {os.fsdecode(args[1])} to {os.fsdecode(args[3])}"
    except (IndexError, AttributeError, TypeError):
        pass
    return name


def _by_handle(ops, name: str, args: tuple) -> str:
    h = ops.handles.get(args[0])
    what = f"{name} of {image_named(h.entry) if h else f'handle {args[0]} (closed)'}"
    if name == "read":
        return f"{what} at guest offset {args[1]}, {args[2]} bytes"
    if name == "write":
        return f"{what} at guest offset {args[1]}, {len(args[2])} bytes"
    return what


def _by_inode(ops, name: str, args: tuple) -> str:
    inode = args[0]
    e = ops.catalog.entry(inode)
    target = "the mount's root" if inode == 1 else image_named(e) if e else f"inode {inode} (gone)"
    if name == "setattr" and args[2].update_size:
        return f"truncate of {target} to {args[1].st_size} bytes"
    if name in ("getxattr", "setxattr"):
        return f"{name} {os.fsdecode(args[1])} of {target}"
    return f"{name} of {target}"


def image_named(entry) -> str:
    """``vm.raw (/srv/images/vm.qcow2)``: its name in the mount and the file behind it."""
    if entry.visible is None:
        return f"{entry.image.path} (removed, still open)"
    return f"{entry.visible} ({entry.image.path})"
