"""A compressed backup through a real mount (issue 13, seed 003): O_DIRECT without read-modify-write.

``dd oflag=direct`` copies a guest disk onto a compress-on-write image served
with ``--cache none``. Seen from outside the daemon:

- strace: every write the daemon makes to the image file is whole host
  clusters at a cluster-aligned offset (the fill cache writes each host
  cluster once; the metadata is written in whole clusters too), and it never
  reads the image while writing (no read-modify-write);
- fincore: none of the image file is in the host page cache;
- the data plane served no write itself (every write of a compress-on-write
  image is forwarded to the compressor);
- qemu-img check is clean and qemu-img compare matches the source; the live
  switch (``cachefs compress``) turns it off and refuses another algorithm.
"""

from __future__ import annotations

import os
import random
import re
import subprocess

import pytest

from conftest import cachefs, qemu_img, run
from stracing import Strace

CS = 1 << 16
CALL = re.compile(r"^\d+\s+(\w+)\((\d+), (.*)")


def io_calls(text: str):
    """(call, fd, bytes, offset) of each pread/pwrite line strace wrote (the first line of an unfinished one)."""
    for line in text.splitlines():
        m = CALL.match(line)
        if not m or m.group(1) not in ImageIO.CALLS or m.group(1) == "fdatasync":
            continue
        name, fd, rest = m.groups()
        if name.endswith(("v", "v2")):  # [{iov_base=..., iov_len=N}, ...], count, offset[, flags]
            n = sum(int(x) for x in re.findall(r"iov_len=(\d+)", rest))
            off = int(re.search(r"\], \d+, (\d+)", rest).group(1))
        else:
            n, off = map(int, re.search(r", (\d+), (\d+)(?:\)| <unfinished)", rest).groups())
        yield name, fd, n, off


def guest_disk(path, size: int) -> None:
    """Text-like clusters, random ones and zeros: a disk that compresses about 2:1."""
    rng = random.Random(7)
    words = [rng.randbytes(rng.randrange(2, 10)) for _ in range(300)]
    with open(path, "wb") as f:
        for _ in range(size // CS):
            kind = rng.random()
            f.write(b" ".join(rng.choice(words) for _ in range(CS // 5))[:CS] if kind < 0.7
                    else rng.randbytes(CS) if kind < 0.85 else bytes(CS))


def image_fds(pid: int, path) -> set[str]:
    target = os.path.realpath(path)
    return {fd for fd in os.listdir(f"/proc/{pid}/fd")
            if os.path.realpath(f"/proc/{pid}/fd/{fd}") == target}


class ImageIO(Strace):
    CALLS = ("pwrite64", "pwritev", "pwritev2", "pread64", "preadv", "fdatasync")


@pytest.mark.both_planes
def test_backup_with_o_direct_writes_whole_clusters_and_caches_nothing(workdir, mounted):
    images, src = workdir / "images", workdir / "guest.raw"
    images.mkdir()
    guest_disk(src, 48 << 20)
    cachefs("create", "--compress", "zlib", images / "backup.qcow2", "64M")
    m = mounted(images, "--cache", "none")
    target = m / "backup.raw"
    assert cachefs("compress", target).stdout.strip() == "zlib"
    with ImageIO(m.pid, workdir / "strace.out"):
        run("dd", f"if={src}", f"of={target}", "bs=64k", "count=384", "oflag=direct", "conv=notrunc,fsync",
            "status=none")
        run("dd", f"if={src}", f"of={target}", "bs=1M", "skip=24", "seek=24", "oflag=direct",
            "conv=notrunc,fsync", "status=none")
    text = (workdir / "strace.out").read_text()
    fds = image_fds(m.pid, images / "backup.qcow2")  # the O_DIRECT descriptor is opened with the file
    calls = [c for c in io_calls(text) if c[1] in fds]
    writes = [(n, off) for name, _, n, off in calls if name.startswith("pwrite")]
    assert len(writes) > 100, text[:2000]
    # Compressed data goes out in whole clusters (runs of normal clusters are one write); a changed
    # L2 table or refcount block in whole pages (meta.WRITE_UNIT): never anything O_DIRECT must
    # read around.
    bad = [(n, off) for n, off in writes if n % 4096 or off % 4096]
    assert not bad, f"unaligned writes to the image: {bad[:10]}"
    data = [(n, off) for n, off in writes if n >= CS]
    assert data and all(n % CS == 0 and off % CS == 0 for n, off in data), data[:10]
    reads = [c for c in calls if c[0].startswith("pread")]
    assert not reads, f"{len(reads)} reads of the image during a pure write (read-modify-write?)"
    res = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(images / "backup.qcow2")],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert res == "0", f"{res} bytes of the image in the page cache"
    stats = m.stats()["images"]["backup.raw"]
    assert stats.get("stats.fast_writes", 0) == 0
    assert stats["stats.compressed_clusters"] > 400 and stats["stats.compress_full_writes"] > 100
    # Live: another algorithm is refused in one line, off is taken.
    r = cachefs("compress", target, "zstd", check=False)
    assert r.returncode != 0 and "compression type is zlib" in r.stderr and "Traceback" not in r.stderr
    assert "compress zlib -> off" in cachefs("compress", target, "off").stdout
    m.umount()
    check = qemu_img("check", images / "backup.qcow2")
    assert "No errors were found" in check.stdout and "compressed clusters" in check.stdout
    qemu_img("compare", "-f", "qcow2", "-F", "raw", images / "backup.qcow2", src)
    ratio = (48 << 20) / os.path.getsize(images / "backup.qcow2")
    assert ratio > 1.5, ratio
