"""Regenerate the seed corpus and the templates: ``python -m fuzz.make_corpus`` (needs qemu-img, qemu-io).

Small valid images (512 B to 4 KiB clusters, a few KiB each) in every shape
the parsers must handle: v2 and v3, data, zero and discarded clusters,
compressed clusters (deflate and zstd), refcount widths 1 and 64, lazy
refcounts with the dirty bit, preallocated metadata, an internal snapshot, a
persistent bitmap, a backing file, an external data file, and images cachefs
itself wrote (compress-on-write). Each goes to fuzz/corpus/{header,check,engine}/;
a few are the "tables" target's templates (fuzz/templates/), whose seeds are
the templates' own tables (fuzz_tables.seed). Files named crash-* in the corpus
are inputs that once crashed a target: this script leaves them alone.
"""

from __future__ import annotations

import pathlib
import struct
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
TEMPLATES = HERE / "templates"
WHOLE_IMAGE_TARGETS = ("header", "check", "engine")
TEXT = b"".join(b"cachefs fuzz seed %d\n" % i for i in range(800))  # compressible, ~16 KiB

# name -> (qemu-img create options, virtual size, qemu-io commands, is a tables template)
QEMU_IMAGES = {
    "v3-c512": ("cluster_size=512", "256K",
                ["write -P 0x11 0 1k", "write -z 4k 1k", "write -P 0x22 100k 600", "discard 0 512"], True),
    "v2-c512": ("cluster_size=512,compat=0.10", "128K", ["write -P 0x33 0 2k", "write -P 0x44 70k 512"], True),
    "v3-c4k": ("cluster_size=4k", "1M", ["write -P 0x55 0 6k", "write -z 64k 4k"], False),
    "refcount1-c512": ("cluster_size=512,refcount_bits=1", "128K", ["write -P 0x77 512 3k"], True),
    "refcount64-c512": ("cluster_size=512,refcount_bits=64", "128K", ["write -P 0x78 0 2k"], False),
    "lazy-dirty-c512": ("cluster_size=512,lazy_refcounts=on", "128K", ["write -P 0x79 1k 2k"], False),
    "prealloc-c512": ("cluster_size=512,preallocation=metadata", "8K", ["write -P 0x7a 0 1k"], False),
}


def sh(*args) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def qemu_image(d: pathlib.Path, name: str, opts: str, size: str, cmds: list[str]) -> pathlib.Path:
    path = d / f"{name}.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, size)
    if cmds:
        sh("qemu-io", "-f", "qcow2", *[a for c in cmds for a in ("-c", c)], path)
    if name == "lazy-dirty-c512":  # as a crash under lazy refcounts leaves it (spec "dirty bit")
        data = bytearray(path.read_bytes())
        struct.pack_into(">Q", data, 72, struct.unpack_from(">Q", data, 72)[0] | 1)
        path.write_bytes(data)
    return path


def special_images(d: pathlib.Path) -> dict[str, tuple[pathlib.Path, bool]]:
    """Images needing more than create + qemu-io."""
    raw = d / "text.raw"
    raw.write_bytes(TEXT)
    out = {}
    for name, opts in (("compressed-zlib-c512", "cluster_size=512"),
                       ("compressed-zstd-c1k", "cluster_size=1k,compression_type=zstd")):
        path = d / f"{name}.qcow2"
        sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw, path)
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 2k 1k", path)  # mixed: plain data among compressed
        out[name] = (path, name.endswith("c512"))
    snap = qemu_image(d, "snapshot-bitmap-c512", "cluster_size=512", "64K", ["write -P 0x21 0 2k"])
    sh("qemu-img", "snapshot", "-c", "s1", snap)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x23 512 512", snap)  # COW away from the snapshot
    sh("qemu-img", "bitmap", "--add", snap, "bm0")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x24 8k 1k", snap)   # dirties the bitmap
    out["snapshot-bitmap-c512"] = (snap, True)
    base = qemu_image(d, "base", "cluster_size=512", "64K", ["write -P 0x31 0 1k"])
    overlay = d / "backing-c512.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", base.name, "-F", "qcow2",
       overlay)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x32 4k 1k", overlay)
    out["backing-c512"] = (overlay, False)
    ext = d / "datafile-c512.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size=512,data_file={d / 'ext.raw'}", ext, "64K")
    out["datafile-c512"] = (ext, False)
    return out


def cachefs_images() -> dict[str, bytes]:
    """Images cachefs wrote itself (its own create, plain and compress-on-write)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from memimage import MemImage

    out = {}
    for name, compress in (("cachefs-c2k", None), ("cachefs-zlib-c2k", "zlib"), ("cachefs-zstd-c2k", "zstd")):
        m = MemImage.create(64 << 10, cluster_bits=11, compress=compress)  # smaller: a refblock past 1 MiB
        m.write(0, TEXT[:6000])
        m.write(16384, bytes(2048) + b"\x42" * 3000)
        m.flush()
        m.close()
        out[name] = bytes(m.buf)
    return out


def main() -> None:
    for t in WHOLE_IMAGE_TARGETS + ("tables",):
        (CORPUS / t).mkdir(parents=True, exist_ok=True)
        for old in (CORPUS / t).glob("seed-*"):
            old.unlink()
    TEMPLATES.mkdir(exist_ok=True)
    for old in TEMPLATES.glob("*.qcow2"):
        old.unlink()
    images: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp)
        for name, (opts, size, cmds, template) in QEMU_IMAGES.items():
            path = qemu_image(d, name, opts, size, cmds)
            images[name] = path.read_bytes()
            if template:
                (TEMPLATES / f"{name}.qcow2").write_bytes(images[name])
        for name, (path, template) in special_images(d).items():
            images[name] = path.read_bytes()
            if template:
                (TEMPLATES / f"{name}.qcow2").write_bytes(images[name])
    images.update(cachefs_images())
    for name, data in images.items():
        for t in WHOLE_IMAGE_TARGETS:
            (CORPUS / t / f"seed-{name}").write_bytes(data)
    from fuzz import fuzz_tables
    fuzz_tables.templates.cache_clear()
    for i, path in enumerate(sorted(TEMPLATES.glob("*.qcow2"))):
        (CORPUS / "tables" / f"seed-{path.stem}").write_bytes(fuzz_tables.seed(i))
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"{len(images)} images, {total} bytes under {HERE}")


if __name__ == "__main__":
    main()
