"""A seeded writer on a served file while snapshots are taken, and what each snapshot must hold
(plain helper module: tests/test_snapshot_mount.py).

The writer writes 4 KiB blocks, each one's content fixed by (seed, step), logging ``w STEP BLOCK``
after its pwrite returned and ``acked STEP`` after each fdatasync. A snapshot taken between log
positions ``before`` (read just before the snapshot was asked for) and ``after`` (just after it
returned) holds, for every block, the content of one write to it: not older than the last one
logged before ``before`` (it had completed: the snapshot point is after it), not newer than the
last one logged before ``after`` plus the one step in flight then (it had not started).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

BLOCK = 4096

WRITER = r"""
import mmap, os, random, sys
path, seed, blocks, log, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
rng = random.Random(seed)
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
with open(log, "w", buffering=1) as out:
    for i in range(10**7):
        if os.path.exists(stop):
            break
        block = rng.randrange(blocks)
        buf[:] = random.Random(seed * 1000003 + i).randbytes(4096)
        os.pwrite(fd, buf, block * 4096)
        out.write(f"w {i} {block}\n")
        if i % 16 == 15:
            os.fdatasync(fd)
            out.write(f"acked {i}\n")
"""


def content(seed: int, step: int) -> bytes:
    return random.Random(seed * 1000003 + step).randbytes(BLOCK)


def start_writer(target: Path, workdir: Path, seed: int, blocks: int):
    """The writer process, its log and the file whose creation stops it."""
    script, log, stop = workdir / "snapwriter.py", workdir / f"snapwriter{seed}.log", workdir / f"stop{seed}"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, script, target, str(seed), str(blocks), log, stop])
    deadline = time.monotonic() + 30
    while not log.exists() or len(logged_writes(log)) < 64:  # going: the first snapshot lands mid-run
        assert proc.poll() is None and time.monotonic() < deadline, "the writer did not get going"
        time.sleep(0.01)
    return proc, log, stop


def logged_writes(log: Path) -> list[tuple[int, int]]:
    """(step, block) of every write logged so far, complete lines only."""
    out = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["w"] and len(parts) == 3:
            out.append((int(parts[1]), int(parts[2])))
    return out


def block_of(seed: int, blocks: int, step: int) -> int:
    """The block the writer's ``step`` writes (replayed from its seed)."""
    rng = random.Random(seed)
    for _ in range(step):
        rng.randrange(blocks)
    return rng.randrange(blocks)


def allowed(writes: list[tuple[int, int]], before: int, after: int, seed: int, blocks: int,
            initial) -> dict[int, list[bytes]]:
    """Block -> the contents a snapshot taken between log positions ``before`` and ``after``
    (counts of logged writes) may show there; ``initial(block)`` is what it held before the writer.
    The step after the last logged one may have been in flight at ``after``: it may show too."""
    seen = writes[:after]
    nxt = seen[-1][0] + 1 if seen else 0
    steps_of: dict[int, list[int]] = {}
    for step, block in [*seen, (nxt, block_of(seed, blocks, nxt))]:
        steps_of.setdefault(block, []).append(step)
    done = seen[before - 1][0] if before else -1  # the last write completed before the snapshot began
    out = {}
    for block, steps in steps_of.items():
        floor = max((s for s in steps if s <= done), default=None)
        options = [content(seed, s) for s in steps if floor is None or s >= floor]
        out[block] = options if floor is not None else [initial(block), *options]
    return out


def check_snapshot(snapshot_file, allowed_contents: dict[int, list[bytes]], seed: int) -> None:
    """Every block the writer touched shows a content allowed at the snapshot's point."""
    bad = []
    with open(snapshot_file, "rb") as f:
        for block, options in allowed_contents.items():
            if os.pread(f.fileno(), BLOCK, block * BLOCK) not in options:
                bad.append(block)
    assert not bad, f"seed {seed}: {len(bad)} blocks of {snapshot_file} hold no write allowed at its point: {bad[:8]}"
