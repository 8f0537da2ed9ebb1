"""Backing chains through a real mount (issue 22): qemu-img builds the chain, the mount serves it.

For each chain:

1. qemu-img and qemu-io build it (the base filled with patterns, or converted
   compressed from random bytes; the overlay with a few writes and zero ranges);
2. the mount reads the overlay's whole file and it equals ``qemu-img convert
   -O raw`` of the chain;
3. random writes through the mount (partial ones copy on write from the base),
   mirrored into a model; read back; unmount;
4. ``qemu-img check`` of the overlay is clean, ``qemu-img compare`` with the
   model is equal, and every base file is byte for byte what it was.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random

import pytest

from conftest import make_random_raw, qemu_img, qemu_io, sha256
from crashwrites import (BLOCK, WRITER, acked_blocks, kill_mid_workload,
                         leaks_at_most_and_nothing_acknowledged_lost)
from interop import check_clean, compare, fill_commands, random_writes, read_hash, to_raw

pytestmark = pytest.mark.both_planes

KiB, MiB = 1 << 10, 1 << 20


def _qcow2(path, size: int, backing: str | None = None, fmt: str = "qcow2", extra=()):
    args = ["create", "-q", "-f", "qcow2", *extra]
    if backing is not None:
        args += ["-b", backing, "-F", fmt]
    qemu_img(*args, path, str(size))


def _fill(img, size: int, seed: int, fmt: str = "qcow2", n: int = 14) -> None:
    qemu_io(img, *fill_commands(random.Random(seed), size, n), fmt=fmt)


def chain_qcow2_on_qcow2(d, seed):
    _qcow2(d / "base.qcow2", 32 * MiB)
    _fill(d / "base.qcow2", 32 * MiB, seed)
    _qcow2(d / "vm.qcow2", 32 * MiB, "base.qcow2")
    _fill(d / "vm.qcow2", 32 * MiB, seed + 100, n=5)
    return ["base.qcow2"]


def chain_qcow2_on_raw(d, seed):
    make_random_raw(d / "base.raw", 16 * MiB, seed)
    _qcow2(d / "vm.qcow2", 16 * MiB, "base.raw", "raw")
    _fill(d / "vm.qcow2", 16 * MiB, seed + 100, n=5)
    return ["base.raw"]


def chain_depth_3(d, seed):
    make_random_raw(d / "root.raw", 16 * MiB, seed)
    _qcow2(d / "mid.qcow2", 16 * MiB, "root.raw", "raw", ["-o", "cluster_size=4k"])
    _fill(d / "mid.qcow2", 16 * MiB, seed + 50, n=8)
    _qcow2(d / "vm.qcow2", 16 * MiB, "mid.qcow2")
    _fill(d / "vm.qcow2", 16 * MiB, seed + 100, n=5)
    return ["root.raw", "mid.qcow2"]


def chain_short_base(d, seed):
    _qcow2(d / "base.qcow2", 8 * MiB)
    _fill(d / "base.qcow2", 8 * MiB, seed)
    _qcow2(d / "vm.qcow2", 24 * MiB, "base.qcow2")  # past 8 MiB: zeros, not the base
    return ["base.qcow2"]


def chain_compressed_base(d, seed):
    src = make_random_raw(d.parent / "src.raw", 16 * MiB, seed)
    qemu_img("convert", "-c", "-O", "qcow2", src, d / "base.qcow2")
    src.unlink()
    _qcow2(d / "vm.qcow2", 16 * MiB, "base.qcow2")
    return ["base.qcow2"]


def chain_zero_masks_base(d, seed):
    make_random_raw(d / "base.raw", 16 * MiB, seed)
    _qcow2(d / "vm.qcow2", 16 * MiB, "base.raw", "raw")
    qemu_io(d / "vm.qcow2", "write -z 0 1M", "write -z 5M 192k", "write -z -u 8M 1M")  # -u: unmap
    return ["base.raw"]


CHAINS = {f.__name__.removeprefix("chain_").replace("_", "-"): f for f in
          (chain_qcow2_on_qcow2, chain_qcow2_on_raw, chain_depth_3, chain_short_base,
           chain_compressed_base, chain_zero_masks_base)}


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_chain_reads_as_qemu_and_takes_writes(workdir, mounted, chain):
    d = workdir / "images"
    d.mkdir()
    seed = sorted(CHAINS).index(chain) + 1
    bases = CHAINS[chain](d, seed)
    before = {b: sha256(d / b) for b in bases}
    model = workdir / "model.raw"
    want = to_raw(d / "vm.qcow2", model)
    m = mounted(d)
    assert read_hash(m / "vm.raw") == (want, os.path.getsize(model))
    random_writes(m / "vm.raw", model, 4 * KiB, seed, count=120)
    assert read_hash(m / "vm.raw")[0] == sha256(model)
    m.umount()
    check_clean(d / "vm.qcow2")
    compare(d / "vm.qcow2", model)
    assert {b: sha256(d / b) for b in bases} == before, "a base file changed"


def test_a_base_is_not_written_while_an_overlay_above_it_is_open(workdir, mounted):
    d = workdir / "images"
    d.mkdir()
    chain_depth_3(d, 9)
    m = mounted(d)
    with open(m / "vm.raw", "rb"):
        for base in ("root.raw", "mid.raw"):
            with pytest.raises(OSError) as info:
                os.open(m / base, os.O_RDWR)
            assert info.value.errno == errno.EBUSY
        with open(m / "root.raw", "rb") as f:  # reading it is fine
            assert f.read(4096) == (d / "root.raw").read_bytes()[:4096]
        users = os.getxattr(m / "mid.raw", "user.cachefs.backing_users").decode()
        assert "vm.qcow2" in users
    with open(m / "root.raw", "r+b") as f:  # no overlay open: an ordinary image again
        with pytest.raises(OSError) as info:
            os.open(m / "vm.raw", os.O_RDONLY)  # but the overlay waits while its base is written
        assert info.value.errno == errno.EBUSY
        f.write(b"x")


@pytest.mark.parametrize("mode", ["writeback", "none"])
def test_sigkill_during_copy_on_write_from_the_base(mode, workdir, mounted):
    """SIGKILL the daemon while 4 KiB writes copy on write from the base, round after round: every
    fsync-acknowledged write is there, leaks at most, and every block no write touched still
    reads the base's bytes (an interrupted copy never exposes a half-copied cluster)."""
    d = workdir / "images"
    d.mkdir()
    make_random_raw(d / "base.raw", 64 * MiB, 5)
    _qcow2(d / "vm.qcow2", 64 * MiB, "base.raw", "raw")
    script = workdir / "writer.py"
    script.write_text(WRITER % {"blocks": 64 * MiB // BLOCK})
    base = (d / "base.raw").read_bytes()
    expect, touched = {}, set()
    for rnd in range(3):
        m = mounted(d, "--cache", mode)
        log = workdir / f"writer{rnd}.log"
        kill_mid_workload(m, script, 300 + rnd, mode, log, acked_at_least=6 + 4 * rnd)
        acked, maybe = acked_blocks(log.read_text(), 300 + rnd, len(base) // BLOCK)
        for block in maybe:
            expect.pop(block, None)
        expect.update({b: c for b, c in acked.items() if b not in maybe})
        touched |= set(acked) | maybe
        leaks_at_most_and_nothing_acknowledged_lost(d / "vm.qcow2", workdir, expect, rnd)
        view = workdir / "view.raw"
        qemu_img("convert", "-O", "raw", d / "vm.qcow2", view)
        data = view.read_bytes()
        bad = [b for b in range(len(base) // BLOCK) if b not in touched
               and data[b * BLOCK:(b + 1) * BLOCK] != base[b * BLOCK:(b + 1) * BLOCK]]
        assert bad == [], f"round {rnd}: {len(bad)} untouched blocks do not read the base, e.g. {bad[:8]}"
    assert sha256(d / "base.raw") == hashlib.sha256(base).hexdigest()
