"""SEEK_DATA/SEEK_HOLE on an overlay through the mount treat the backing chain's data as data and
its holes as holes, as `qemu-img map` of the chain does (issue 22): a hole in the base under an
unallocated overlay cluster is a hole, a zero cluster in the overlay over base data is a hole, the
overlay's own data is data. lseek reaches the daemon through the data plane (--dataplane on)."""

from __future__ import annotations

import errno
import json
import os

from conftest import qemu_img, qemu_io

KiB, MiB = 1 << 10, 1 << 20


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(pairs):
        if out and out[-1][1] >= a:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        elif b > a:
            out.append((a, b))
    return out


def _seek_runs(path, size: int) -> list[tuple[int, int]]:
    """The data ranges lseek reports, walked SEEK_DATA/SEEK_HOLE from 0."""
    fd, pos, out = os.open(path, os.O_RDONLY), 0, []
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)
    return _runs(out)


def _map_runs(image) -> list[tuple[int, int]]:
    entries = json.loads(qemu_img("map", "--output=json", image).stdout)
    return _runs([(e["start"], e["start"] + e["length"]) for e in entries if e["data"]])


def test_seek_follows_the_chain_as_qemu_img_map(workdir, mounted):
    d = workdir / "images"
    d.mkdir()
    base = d / "base.raw"
    with open(base, "wb") as f:  # sparse: data at 1 MiB, 3 MiB and the last 256 KiB; holes between
        f.truncate(8 * MiB)
        for off, n in ((1 * MiB, 192 * KiB), (3 * MiB, 64 * KiB), (8 * MiB - 256 * KiB, 256 * KiB)):
            os.pwrite(f.fileno(), b"b" * n, off)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", d / "vm.qcow2", "12M")
    qemu_io(d / "vm.qcow2", "write -P 0x61 5M 128k",   # the overlay's own data over a base hole
            "write -z 3M 64k",                        # a zero cluster over base data: a hole
            "write -P 0x62 10M 64k")                  # past the base's end
    want = _map_runs(d / "vm.qcow2")
    m = mounted(d, "--dataplane", "on")
    got = _seek_runs(m / "vm.raw", 12 * MiB)
    assert got == want, f"lseek: {got}\nqemu-img map: {want}"
    assert (1 * MiB, 1 * MiB + 192 * KiB) in got and not any(a <= 3 * MiB < b for a, b in got)
