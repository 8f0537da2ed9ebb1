"""`cachefs info`: an image's format, sizes and features, in qemu-img's words.

The JSON has `qemu-img info --output=json`'s keys and value types, so a
script written for one reads the other; the human form has qemu-img's
layout. Both are built from one dict (``image_info``).

``inspected`` and ``resolve_format`` are how `info` and `check` open an
image: the format from the name or ``-f``, QEMU's lock unless ``-U``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence

from cachefs.errors import CachefsError, ImageLocked, UnsupportedImage
from cachefs.image.locking import ImageLock
from cachefs.qcow2 import bitmaps, snapshots
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.plan import run_sync


def require_format(path: str, given: str | None) -> None:
    """Refuse before opening anything when neither the name nor ``-f`` says the format."""
    from cachefs.image.formats import format_by_name
    if given is None and format_by_name(path) is None:
        raise UnsupportedImage(f"{path}: the name says no format (.qcow2, .raw or .img); "
                               f"pass -f qcow2, -f raw or -f probe")


def resolve_format(path: str, fd: int, given: str | None) -> str:
    """The format by name or ``-f`` (``-f probe`` reads the content); a qcow2 must carry its magic."""
    from cachefs.image.formats import image_format
    require_format(path, given)
    return image_format(path, os.pread(fd, 4, 0), given=given)


@contextlib.contextmanager
def inspected(path: str, *, writable: bool, force_share: bool):
    """An fd on ``path`` under QEMU's lock, or under none with ``force_share`` (qemu-img -U).

    Without the lock the image may change while it is read, so -U only ever
    reads. Errors from inside say which file they are about.
    """
    assert not (writable and force_share), "-U is read-only"
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        lock = None if force_share else _lock(fd, path, writable)
        try:
            yield fd
        finally:
            if lock is not None:
                lock.release()
    except CachefsError as exc:
        if str(exc).startswith(path):
            raise
        raise type(exc)(f"{path}: {exc}") from None
    finally:
        os.close(fd)


def _lock(fd: int, path: str, writable: bool) -> ImageLock:
    try:
        return ImageLock.acquire(fd, path, writable)
    except ImageLocked as exc:
        if writable:
            raise
        raise ImageLocked(f"{exc}; -U (--force-share) reads it anyway, without a lock") from None


def image_info(path: str, fd: int, kind: str, *, backing_dirs: Sequence[str] | None = None) -> dict:
    """qemu-img's ImageInfo for the image open at ``fd``, in its key order; a file served by a
    cachefs mount also gets a "cachefs" object naming the image behind it (served_info).

    An overlay's backing keys come from its header: nothing its name points at is opened.
    ``full-backing-filename`` is there only when the name passes the rule a mount follows
    (resolve_backing, inside ``backing_dirs``: by default the image's directory), which stats
    but never opens; otherwise it is left out, as qemu-img leaves it out when it "cannot
    determine" it (`cachefs info --backing-chain` says why)."""
    st = os.fstat(fd)
    if kind == "raw":
        out = {"virtual-size": st.st_size, "filename": path, "format": "raw",
               "actual-size": st.st_blocks * 512, "dirty-flag": False}
        served = served_info(path)
        return out if served is None else {**out, "cachefs": served}
    hdr = _header(fd)
    read = lambda offset, n: os.pread(fd, n, offset)  # noqa: E731
    snaps = run_sync(snapshots.read_table(hdr, st.st_size), read)
    found = run_sync(bitmaps.read_directory(hdr, st.st_size), read)
    out = {"snapshots": [snapshot_info(sn) for sn in snaps]} if snaps else {}
    out = {**out, "virtual-size": hdr.size, "filename": path, "cluster-size": hdr.cluster_size,
           "format": "qcow2", "actual-size": st.st_blocks * 512,
           "format-specific": {"type": "qcow2", "data": _qcow2_specific(hdr, found)}}
    return {**_backing_keys(path, hdr.backing, out, backing_dirs), "dirty-flag": hdr.dirty}


def _backing_keys(path: str, backing: fmt.BackingName | None, out: dict, dirs: Sequence[str] | None) -> dict:
    """qemu-img's backing keys around ``out``, where its JSON puts them (a hash table's order)."""
    if backing is None:
        return out
    from cachefs.cli.chain import allowed_dirs, full_backing_filename
    full = full_backing_filename(path, backing, allowed_dirs(path, ()) if dirs is None else dirs)
    head = {} if backing.format is None else {"backing-filename-format": backing.format}
    tail = {} if full is None else {"full-backing-filename": full}
    return {**head, **out, **tail, "backing-filename": backing.name}


def snapshot_info(sn: snapshots.Snapshot) -> dict:
    """qemu-img's SnapshotInfo, in its key order (icount only when recorded)."""
    out = {} if sn.icount is None else {"icount": sn.icount}
    return {**out, "vm-clock-nsec": sn.vm_clock_nsec % 10**9, "name": sn.name, "date-sec": sn.date_sec,
            "date-nsec": sn.date_nsec, "vm-clock-sec": sn.vm_clock_nsec // 10**9, "id": sn.id,
            "vm-state-size": sn.vm_state_size}


def served_info(path: str) -> dict | None:
    """For a file of a cachefs mount: the image behind it, its format, cache mode and whether it
    is writable (its user.cachefs.* xattrs); None for any other file."""
    def xattr(name: str) -> str | None:
        try:
            return os.getxattr(path, f"user.cachefs.{name}").decode()
        except OSError:
            return None
    image = xattr("path")
    if image is None:
        return None
    out = {"image": image, "format": xattr("format"), "cache": xattr("cache"), "writable": xattr("writable") == "true"}
    reason = xattr("read_only_reason")
    return out if reason is None else {**out, "read-only-reason": reason}


def _header(fd: int) -> fmt.Header:
    """The header as the engine validates it (tables and all): info refuses what a mount refuses."""
    from cachefs.qcow2.engine import open_engine
    engine = run_sync(open_engine(os.fstat(fd).st_size, writable=False), lambda o, n: os.pread(fd, n, o))
    return engine.current_header()


def _qcow2_specific(hdr: fmt.Header, found: list[bitmaps.Bitmap]) -> dict:
    """qcow2_get_specific_info(): v2 images report only compat and refcount bits (and the compression)."""
    data = {"compat": "0.10" if hdr.version == 2 else "1.1",
            "compression-type": "zstd" if hdr.compression_type == fmt.COMPRESSION_ZSTD else "zlib"}
    if hdr.version >= 3:
        data["lazy-refcounts"] = hdr.lazy_refcounts
    if found:  # only valid bitmaps: the autoclear bit set (bitmaps.count)
        data["bitmaps"] = [{"flags": b.flag_names, "name": b.name, "granularity": b.granularity} for b in found]
    data["refcount-bits"] = hdr.refcount_bits
    if hdr.version >= 3:
        data["corrupt"] = hdr.corrupt
        data["extended-l2"] = bool(hdr.incompatible & fmt.INCOMPAT_EXTL2)
    return data


def human_lines(info: dict) -> list[str]:
    """qemu-img info's human output (bdrv_image_info_dump) for the same dict."""
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {size_to_str(info['actual-size'])}"]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info["dirty-flag"]:
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        lines.append(_backing_line(info))
    if "backing-filename-format" in info:
        lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines += snapshot_lines(info["snapshots"])
    specific = info.get("format-specific")
    if specific:
        lines.append("Format specific information:")
        for key, v in specific["data"].items():
            lines += _dump(key.replace("-", " "), v, 1)
    if "cachefs" in info:
        lines.append("Served by cachefs:")
        for key, v in info["cachefs"].items():
            lines += _dump(key.replace("-", " "), v, 1)
    return lines


def _backing_line(info: dict) -> str:
    """bdrv_image_info_dump(): the actual path only where it differs from the name."""
    name, full = info["backing-filename"], info.get("full-backing-filename")
    if full is None:
        return f"backing file: {name} (cannot determine actual path)"
    return f"backing file: {name}" + (f" (actual path: {full})" if full != name else "")


def chain_info(image: str, kind: str, *, backing_dirs: Sequence[str], force_share: bool) -> list[dict]:
    """``info --backing-chain``: one ImageInfo per image, top first, every base opened by the
    name rule (cli/chain.py), so a hostile name is one line and nothing it names is read."""
    from cachefs.cli.chain import allowed_dirs, open_chain
    dirs = allowed_dirs(image, backing_dirs)
    with open_chain(image, kind, backing_dirs=backing_dirs, force_share=force_share) as layers:
        return [image_info(layer.filename, layer.fd, layer.format, backing_dirs=dirs) for layer in layers]


def chain_human_lines(infos: list[dict]) -> list[str]:
    """qemu-img info --backing-chain: each image's lines, a blank line between images."""
    out: list[str] = []
    for i, info in enumerate(infos):
        out += ([""] if i else []) + human_lines(info)
    return out


def snapshot_lines(infos: list[dict]) -> list[str]:
    """bdrv_snapshot_dump's table, as qemu-img info and qemu-img snapshot -l print it."""
    head = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"
    return ["Snapshot list:", head, *(snapshot_line(sn) for sn in infos)]


def snapshot_line(sn: dict) -> str:
    """bdrv_snapshot_dump(): the date in local time, the VM clock as H:MM:SS.mmm."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    secs = sn.get("vm-clock-sec", 0)
    clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{sn['vm-clock-nsec'] // 10**6:03d}"
    return (f"{sn['id']:<9} {sn['name']:<16} {size_to_str(sn['vm-state-size']):>8}{date:>20}{clock:>13}"
            f"{sn.get('icount', ''):>11}")


def _dump(key: str, v, indent: int) -> list[str]:
    """qemu's dump_qdict/dump_qlist: "key: value", or "key:" and the items one level deeper."""
    pad = " " * 4 * indent
    if isinstance(v, (dict, list)):
        items = v.items() if isinstance(v, dict) else ((f"[{i}]", item) for i, item in enumerate(v))
        return [f"{pad}{key}:"] + [line for k, item in items for line in _dump(k.replace("-", " "), item, indent + 1)]
    return [f"{pad}{key}: {str(v).lower() if isinstance(v, bool) else v}"]


def size_to_str(n: int) -> str:
    """QEMU's size_to_str(): three significant digits, and 1000 of a unit is already the next one."""
    _, exp = math.frexp(n / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)  # C's division: truncates toward zero (n == 0 gives exponent 0)
    unit = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")[i]
    return f"{n / (1 << (i * 10)):.3g} {unit}B"
