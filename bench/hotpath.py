"""Micro-benchmark of the image layer's hot path (issue 10): no FUSE, no disk.

Microseconds of CPU per guest request through ``Qcow2Image.read`` and
``Qcow2Image.write`` over a memory backend, on clusters that are already
allocated and whose L2 table is cached:

- a 4k read of allocated data (the cached-read path);
- a 4k write that overwrites an allocated, exclusively owned cluster (the
  in-place path: no allocation, no metadata).

This is what every FUSE read/write pays in cachefs's own Python, before and
after pyfuse3 (which costs about 50 us more per request, docs/design.md).
The memory backend yields once per call, as a real backend does.

    .venv/bin/python bench/hotpath.py [--ops 20000] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import trio

from cachefs.backend import MemoryBackend
from cachefs.image.backends import BackendSet
from cachefs.image.qcow2image import Qcow2Image
from cachefs.policy import WRITEBACK
from cachefs.qcow2.create import new_image
from cachefs.qcow2.engine import open_engine
from cachefs.qcow2.plan import run_async

REGION = 16 << 20  # allocated guest bytes the requests fall into (one L2 table covers 512 MiB)
BLOCK = 4096


def fresh_qcow2(size: int) -> bytearray:
    buf = bytearray()
    for off, data in new_image(size):
        if len(buf) < off + len(data):
            buf.extend(bytes(off + len(data) - len(buf)))
        buf[off:off + len(data)] = data
    return buf


async def open_memory_image(size: int) -> Qcow2Image:
    store = MemoryBackend(fresh_qcow2(size))
    backends = BackendSet(lambda mode: store)
    be = backends.get(WRITEBACK)
    engine = await run_async(open_engine(store.size(), writable=True), be.pread)
    return Qcow2Image("mem.qcow2", backends, None, True, engine, WRITEBACK)


async def prepare(img: Qcow2Image) -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB, not zeros (zeros would become zero clusters)
    for off in range(0, REGION, len(chunk)):
        await img.write(off, chunk)
    await img.flush()


async def timed(fn, offsets: list[int]) -> float:
    """CPU microseconds per call (process time: the scheduler's own work counts, sleeping does not)."""
    t0 = time.process_time()
    for off in offsets:
        await fn(off)
    return (time.process_time() - t0) / len(offsets) * 1e6


async def measure(ops: int, rounds: int) -> dict[str, float]:
    img = await open_memory_image(1 << 30)
    await prepare(img)
    rng = random.Random(1)
    payload = b"\xa5" * BLOCK
    results: dict[str, list[float]] = {"read_4k_us": [], "write_4k_inplace_us": []}

    async def read(off):
        await img.read(off, BLOCK)

    async def write(off):
        await img.write(off, payload)
    for _ in range(rounds):
        offsets = [rng.randrange(REGION // BLOCK) * BLOCK for _ in range(ops)]
        results["read_4k_us"].append(await timed(read, offsets))
        results["write_4k_inplace_us"].append(await timed(write, offsets))
    allocs = img.stats().get("allocations")
    await img.close()
    out = {k: round(statistics.median(v), 2) for k, v in results.items()}
    out["allocations_during_run"] = allocs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = trio.run(measure, args.ops, args.rounds)
    if args.json:
        print(json.dumps(out))
        return
    print(f"4k cached read:    {out['read_4k_us']:7.2f} us/request (median of {args.rounds} x {args.ops})")
    print(f"4k in-place write: {out['write_4k_inplace_us']:7.2f} us/request")


if __name__ == "__main__":
    main()
