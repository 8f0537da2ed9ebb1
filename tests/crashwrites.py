"""A writer that crashes with the daemon: 4 KiB writes and discards with an fdatasync every 16,
logged, and what a SIGKILL of the daemon must leave (test_metaqueue_mount.py, test_backing_mount.py).
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

from conftest import qemu_img
from mounting import kill_daemon

BLOCK = 4096

# Writes of 4 KiB blocks, and every 8th step a discard (fallocate PUNCH_HOLE, issue 12) of 1 to 40
# blocks, whole clusters and partial ones; with --dataplane off fallocate is EOPNOTSUPP: writes only.
WRITER = r"""
import ctypes, os, random, sys
path, seed, direct, log = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
import mmap
rng = random.Random(seed)
fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
buf = mmap.mmap(-1, 4096)
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate64.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
discards = True
with open(log, "w", buffering=1) as out:
    for i in range(100000):
        block = rng.randrange(%(blocks)d - 64)
        if discards and i %% 8 == 5:
            count = rng.choice([1, 16, 16, 40])
            if libc.fallocate64(fd, 3, block * 4096, count * 4096) == 0:  # PUNCH_HOLE | KEEP_SIZE
                out.write(f"d {i} {block} {count}\n")
            else:
                discards = False
        else:
            data = random.Random(seed * 1000003 + i).randbytes(4096)
            buf[:] = data
            os.pwrite(fd, buf, block * 4096)
            out.write(f"w {i} {block}\n")
        if i %% 16 == 15:
            os.fdatasync(fd)
            out.write(f"acked {i}\n")
"""


def acked_blocks(log_text: str, seed: int, nblocks: int) -> tuple[dict[int, bytes], set[int]]:
    """Block -> the content the last acknowledged write or discard (zeros) left there (acked = before
    a completed fdatasync), and the blocks an unacknowledged one touched: logged after the last
    acknowledgement, or in flight at the kill (never logged, so found by replaying the seed)."""
    ops, acked_upto = [], -1
    for line in log_text.splitlines():
        parts = line.split()
        if parts[0] == "w" and len(parts) == 3:
            ops.append((int(parts[1]), int(parts[2]), 1))
        elif parts[0] == "d" and len(parts) == 4:
            ops.append((int(parts[1]), int(parts[2]), -int(parts[3])))
        elif parts[0] == "acked" and len(parts) == 2:
            acked_upto = int(parts[1])
    out, maybe = {}, set()
    for i, block, n in ops:
        if n > 0:
            content = {block: random.Random(seed * 1000003 + i).randbytes(BLOCK)}
        else:
            content = {b: bytes(BLOCK) for b in range(block, block - n)}
        if i <= acked_upto:
            out.update(content)
        else:
            maybe.update(content)
    return out, maybe | in_flight_blocks(log_text, seed, nblocks)


def in_flight_blocks(log_text: str, seed: int, nblocks: int) -> set[int]:
    """The blocks the writer's next two steps after its last logged one touch: the kill lands
    while one is in its pwrite or fallocate, before its log line (a failed discard logs nothing,
    hence two). And the span of the discard that failed: a discard refused because the daemon died
    under it may still have been carried out (C had handed it to the kernel), and in passthrough
    the writer goes on writing, and logging, after it (the kernel needs no daemon for its writes).
    Found by replaying the writer's draws from the same seed."""
    lines = log_text.splitlines()
    last = max((int(x.split()[1]) for x in lines if x[:2] in ("w ", "d ")), default=-1)
    logged_discards = {int(x.split()[1]) for x in lines if x.startswith("d ")}
    rng, discards, out = random.Random(seed), True, set()
    for i in range(last + 3):
        block = rng.randrange(nblocks - 64)
        span = [block]
        if discards and i % 8 == 5:
            span = range(block, block + rng.choice([1, 16, 16, 40]))
            if i <= last and i not in logged_discards:
                discards = False  # the writer stops discarding after a refused one
                out.update(span)
        if i > last:
            out.update(span)
    return out


def kill_mid_workload(m, script: Path, seed: int, mode: str, log: Path, acked_at_least: int) -> None:
    """The writer on the mount until it logged ``acked_at_least`` acknowledgements, then SIGKILL
    the daemon."""
    writer = subprocess.Popen([os.sys.executable, script, m / "vm.raw", str(seed),
                               "1" if mode == "none" else "0", log])
    try:
        deadline = time.monotonic() + 30
        while not log.exists() or log.read_text().count("acked") < acked_at_least:
            assert writer.poll() is None and time.monotonic() < deadline, "writer did not get going"
            time.sleep(0.02)
        kill_daemon(m)
    finally:
        writer.kill()
        writer.wait()


def leaks_at_most_and_nothing_acknowledged_lost(image: Path, workdir: Path, expect: dict[int, bytes],
                                                rnd: int) -> int:
    """qemu-img check finds leaks at most, and every block in ``expect`` reads back; returns
    qemu-img check's exit status."""
    r = qemu_img("check", image, check=False)
    assert r.returncode in (0, 3), f"round {rnd}: qemu-img check after a crash: exit {r.returncode}\n{r.stdout}"
    view = workdir / "view.raw"
    qemu_img("convert", "-O", "raw", image, view)
    with open(view, "rb") as v:
        lost = [b for b, d in expect.items() if os.pread(v.fileno(), BLOCK, b * BLOCK) != d]
    assert lost == [], f"round {rnd}: {len(lost)} fsync-acknowledged blocks lost"
    view.unlink()
    return r.returncode
