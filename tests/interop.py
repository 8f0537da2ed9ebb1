"""What the interop tests share: qemu-io fills, qemu-img conversions and checks, and random
writes through a mount mirrored into a model raw file (test_mount_interop.py, test_backing_mount.py)."""

from __future__ import annotations

import hashlib
import os
import random

from conftest import qemu_img, sha256

KiB, MiB = 1 << 10, 1 << 20


def fill_commands(rng: random.Random, vsize: int, n: int = 14) -> list[str]:
    """qemu-io commands: pattern writes at scattered offsets, then zero ranges (some over data)."""
    cmds = []
    for _ in range(n):
        length = rng.choice([512, 4 * KiB, rng.randrange(1, 300 * KiB), 256 * KiB])
        off = rng.randrange(0, vsize - length)
        if rng.random() < 0.5:
            off &= ~511
        cmds.append(f"write -P {rng.randrange(1, 256):#04x} {off} {length}")
    for _ in range(4):
        length = rng.choice([64 * KiB, 128 * KiB, rng.randrange(512, 256 * KiB) & ~511])
        off = rng.randrange(0, vsize - length) & ~511
        cmds.append(f"write -z {off} {length}")
    return cmds


def to_raw(img, out) -> str:
    """``qemu-img convert -O raw``; returns the output's sha256."""
    qemu_img("convert", "-O", "raw", img, out)
    return sha256(out)


def read_hash(path, chunk: int = 1 * MiB) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(chunk):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def random_writes(fuse_path, model_path, cs: int, seed: int, count: int = 200) -> int:
    """pwrite `count` random extents to the FUSE file and the model; returns bytes written."""
    rng = random.Random(seed)
    size = os.path.getsize(model_path)
    total = 0
    fd = os.open(fuse_path, os.O_RDWR)
    mfd = os.open(model_path, os.O_RDWR)
    try:
        for i in range(count):
            kind = rng.random()
            if kind < 0.15:  # full zero clusters, cluster-aligned (zero detection = discard)
                nclusters = rng.randint(1, max(1, (300 * KiB) // cs))
                length = nclusters * cs
                off = rng.randrange(0, size // cs - nclusters + 1) * cs
                data = bytes(length)
            elif kind < 0.40:  # cluster-aligned data
                nclusters = rng.randint(1, max(1, (300 * KiB) // cs))
                length = min(nclusters * cs, 300 * KiB) if cs <= 300 * KiB else cs
                off = rng.randrange(0, (size - length) // cs + 1) * cs
                data = rng.randbytes(length)
            elif kind < 0.60:  # tiny, anywhere
                length = rng.randint(1, 600)
                off = rng.randrange(0, size - length)
                data = rng.randbytes(length)
            elif kind < 0.70:  # partly zero, unaligned
                length = rng.randint(1, 300 * KiB)
                off = rng.randrange(0, size - length)
                data = bytes(length // 2) + rng.randbytes(length - length // 2)
            else:  # unaligned, log-uniform 1 B .. 300 KiB
                length = max(1, int(2 ** rng.uniform(0, 18.2)))
                off = rng.randrange(0, size - length)
                data = rng.randbytes(length)
            # Cluster writes near previous ones make COW and in-place overwrites likely.
            assert os.pwrite(fd, data, off) == len(data)
            assert os.pwrite(mfd, data, off) == len(data)
            total += len(data)
            if i % 50 == 49:
                os.fsync(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.close(mfd)
    return total


def check_clean(img) -> None:
    r = qemu_img("check", img, check=False)
    assert r.returncode == 0, f"qemu-img check {img}: exit {r.returncode}\n{r.stdout}{r.stderr}"


def compare(img, model) -> None:
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, model, check=False)
    assert r.returncode == 0, f"qemu-img compare {img} {model}: exit {r.returncode}\n{r.stdout}{r.stderr}"
