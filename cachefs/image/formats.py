"""Which format an image file is served as: by its name, never by its content (unless asked)."""

from __future__ import annotations

from cachefs.errors import CorruptImage, UnsupportedImage
from cachefs.qcow2 import format as fmt


#: The format follows from the file's name alone. Probing the content would be
#: QEMU's format-probing hazard: a guest that writes a qcow2 header into its
#: raw disk would be served that header's image at the next mount (and, once
#: backing files exist, read any host file it names).
FORMAT_BY_SUFFIX = {".qcow2": "qcow2", ".raw": "raw", ".img": "raw"}


def format_by_name(path: str) -> str | None:
    """"qcow2" or "raw" from the suffix, or None when the name says neither."""
    return next((kind for suffix, kind in FORMAT_BY_SUFFIX.items() if path.endswith(suffix)), None)


def _magic(path: str, magic: bytes | None) -> bytes:
    if magic is not None:
        return magic
    with open(path, "rb") as f:
        return f.read(4)


def image_format(path: str, magic: bytes | None = None, *, given: str | None = None) -> str:
    """The format to serve ``path`` as: ``given`` ("qcow2", "raw"), else the one its name says.

    ``given="probe"`` looks at the content; only ``cachefs info``/``check -f
    probe`` ask for that, because the user did. A qcow2 must carry qcow2's
    magic, otherwise CorruptImage; a raw image is raw whatever bytes it holds.
    ``magic``: the file's first bytes, when the caller read them itself (a
    direct mode reads them O_DIRECT, so no guest data enters the page cache).
    """
    if given == "probe":
        return "qcow2" if _magic(path, magic)[:4] == fmt.MAGIC else "raw"
    kind = given or format_by_name(path)
    if kind is None:
        raise UnsupportedImage(f"{path}: the name says no format (.qcow2, .raw or .img)")
    if kind == "qcow2" and _magic(path, magic)[:4] != fmt.MAGIC:
        raise CorruptImage(f"{path}: not a qcow2 image (bad magic)")
    return kind
