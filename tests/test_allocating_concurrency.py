"""Allocating writes run their data I/O without the image's write lock (issue 14).

Many writers land in the same new clusters at once: partial writes to one
fresh cluster from several requests. The first to plan allocates it and
claims the guest cluster (allocations.InFlight); the others wait for its
commit, then write in place. Checked in-process over a slow memory backend
(the lock really is let go: allocating data writes overlap) and through a
mount with fio --verify at QD32, data plane on and off.
"""

from __future__ import annotations

import random
import subprocess

import pytest
import trio

import interleaving

from cachefs.backend import MemoryBackend
from cachefs.image.backends import BackendSet
from cachefs.policy import WRITEBACK, WRITETHROUGH
from cachefs.qcow2.check import check_image
from cachefs.qcow2.engine import open_engine
from cachefs.qcow2.plan import run_async, run_sync
from cachefs.image.qcow2image import Qcow2Image
from conftest import cachefs, qemu_img
from recorded import ModeView, fresh_qcow2

CS = 65536
BLOCK = 4096


class SlowView(ModeView):
    """A descriptor whose writes take a while, counting how many overlap."""

    def __init__(self, inner, mode, stats):
        super().__init__(inner, mode)
        self.stats = stats

    async def pwrite(self, offset, data):
        self.stats["now"] += 1
        self.stats["peak"] = max(self.stats["peak"], self.stats["now"])
        try:
            await trio.sleep(0.001)
            await super().pwrite(offset, data)
        finally:
            self.stats["now"] -= 1


@pytest.mark.parametrize("mode", [WRITEBACK, WRITETHROUGH], ids=lambda m: m.name)
@pytest.mark.parametrize("seed", interleaving.seeds())
def test_writers_in_the_same_new_clusters(mode, seed):
    interleaving.run(writers_in_the_same_new_clusters, mode, seed, seed=seed, virtual_time=True)


async def writers_in_the_same_new_clusters(mode, seed: int) -> None:
    size = 4 << 20
    buf = bytearray(fresh_qcow2(size))
    stats = {"now": 0, "peak": 0}
    store = MemoryBackend(buf)
    backends = BackendSet(lambda m: SlowView(store, m, stats))
    be = backends.get(mode)
    engine = await run_async(open_engine(len(buf), writable=True), be.pread)
    img = Qcow2Image("mem.qcow2", backends, None, True, engine, mode)
    rng = random.Random(seed)
    blocks = list(range(16 * CS // BLOCK))  # 16 clusters, 16 blocks each, every block once
    rng.shuffle(blocks)
    want = bytearray(size)

    async def writer(chunk):
        for b in chunk:
            data = rng.randbytes(BLOCK)
            want[b * BLOCK:(b + 1) * BLOCK] = data
            await img.write(b * BLOCK, data, mode)

    async with trio.open_nursery() as nursery:
        for i in range(32):
            nursery.start_soon(writer, blocks[i::32])
    assert len(img.allocating) == 0
    got = bytearray()
    for off in range(0, size, CS):
        got += bytes(await img.read(off, CS, mode))
    assert got == want
    assert img.engine.counters.allocations <= 16 + 1  # one per cluster (and an L2 table): none twice
    assert stats["peak"] > 1, "allocating writes never overlapped: the lock was held across the data I/O"
    await img.close()
    result = run_sync(check_image(len(buf)), lambda o, n: bytes(buf[o:o + n]))
    assert result.exit_code() == 0, (result.corruptions, result.leaks[:10])


@pytest.mark.parametrize("plane", ["on", "off"])
@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_fio_verify_qd32_on_a_fresh_image(cache, plane, mounted, workdir):
    images = workdir / "images"
    images.mkdir()
    cachefs("create", images / "vm.qcow2", "64M")
    m = mounted(images, "--cache", cache, "--dataplane", plane)
    # 4 MiB of 64 KiB clusters, 4 KiB random writes at QD32: up to 16 requests in one new
    # cluster at once. fio's random map writes each block once, then reads every one back.
    r = subprocess.run(["fio", "--name=alloc", f"--filename={m / 'vm.raw'}", "--rw=randwrite", "--bs=4k",
                        "--size=4M", "--ioengine=libaio", "--iodepth=32", "--direct=1", "--verify=crc32c",
                        "--do_verify=1", "--verify_fatal=1", "--randrepeat=0", "--verify_state_save=0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify" not in r.stderr.lower(), r.stderr
    m.umount()
    qemu_img("check", images / "vm.qcow2")
