"""A writer process on a served file that reports every acknowledged block, and the check that
they all survived (plain helper module).

:func:`start_writer` runs 16 threads of O_DIRECT 4 KiB writes, each block
tagged with its number; every acknowledged block number is collected as the
writer prints it. :func:`wait_acked` waits until enough are in (so a stop
lands mid-run), and :func:`acked_blocks_are_there` reads them back from the
image after whatever the test did to the daemon.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

BLOCK = 4096


WRITER = r"""
import mmap, os, sys, threading
path, nblocks, nthreads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
lock = threading.Lock()
def run(t):
    buf = mmap.mmap(-1, 4096)
    for i in range(t, nblocks, nthreads):
        buf[:] = (i.to_bytes(8, "little") + b"acked!!!") * 256
        try:
            os.pwrite(fd, buf, i * 4096)
        except OSError:
            return
        with lock:
            print(i, flush=True)  # acknowledged
ts = [threading.Thread(target=run, args=(t,)) for t in range(nthreads)]
for t in ts: t.start()
for t in ts: t.join()
"""


def acked_blocks_are_there(image: Path, acked: list[int]) -> None:
    with open(image, "rb") as f:
        lost = [i for i in acked
                if os.pread(f.fileno(), BLOCK, i * BLOCK) != (i.to_bytes(8, "little") + b"acked!!!") * 256]
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. blocks {lost[:10]}"


def wait_acked(acked: list[int], count: int = 1000, timeout: float = 30.0) -> None:
    """Until the writer has ``count`` acknowledgements: a stop sent then lands mid-run, however
    fast the machine (a fixed second let a quiet one finish all 60000 first)."""
    deadline = time.monotonic() + timeout
    while len(acked) < count:
        assert time.monotonic() < deadline, f"the writer did not get going: {len(acked)} acknowledged"
        time.sleep(0.01)


def start_writer(f, nblocks: int):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(f), str(nblocks), "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked: list[int] = []
    reader = threading.Thread(target=lambda: acked.extend(int(line) for line in proc.stdout))
    reader.start()
    return proc, acked, reader
