"""The qcow2 core against a bytearray model (docs/design.md, "The core does no I/O").

A hypothesis state machine drives MemImage (the production image layer,
engine and metadata queue over an in-memory file) with writes of every shape,
reads, growth and flushes, and keeps a plain bytearray of what the guest
should see. After every flush the image
bytes must pass our checker with no corruption and no leak (every pending free
has been applied by then), and a fresh open of those bytes must read back the
model. At the end of each run the image also goes through the real
``qemu-img check`` and ``qemu-img compare`` against the model.

A second test does the same for images made by ``qemu-img create`` itself, in
every variant the design promises to write (v2/v3, 512 B..2 MiB clusters,
1..64-bit refcounts, preallocation=metadata, lazy refcounts).
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cachefs.qcow2.check import check_image
from cachefs.qcow2.plan import run_sync
from memimage import MemImage

MiB = 1 << 20
MAX_SIZE = 17 * MiB


def check_clean(buf: bytes, where: str, reserved=()) -> None:
    """No corruption; the only leaks are clusters reserved ahead (refcount.py).

    (Reserved clusters past EOF are not even counted as leaks: like qemu-img,
    the checker looks at the clusters the file holds.)
    """
    result = run_sync(check_image(len(buf)), lambda off, n: buf[off:off + n])
    assert not result.corruptions, f"{where}: {result.corruptions[:5]}"
    assert set(result.leaks) <= set(reserved), f"{where}: leaked clusters {result.leaks[:10]}"
    assert not result.errors, f"{where}: {result.errors} check errors"


def qemu_verdict(image: bytes, model: bytes) -> None:
    """qemu-img check exits 0 and qemu-img compare finds the guest view equal to the model."""
    with tempfile.TemporaryDirectory() as d:
        img, raw = os.path.join(d, "img.qcow2"), os.path.join(d, "model.raw")
        with open(img, "wb") as f:
            f.write(image)
        with open(raw, "wb") as f:
            f.write(model)
        p = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        p = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr


# Table-cache capacities to run with. Small ones (4, 64) evict tables mid-plan
# and make the queue write out early (test_evicted_l2_table_keeps_its_update).
CACHE_TABLES = [4, 64, 1 << 16]


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class CoreModel(RuleBasedStateMachine):
    """MemImage vs bytearray. Offsets are drawn wide and reduced modulo the current size."""

    @initialize(cluster_bits=st.sampled_from([9, 12, 16]), refcount_order=st.sampled_from([0, 4, 6]),
                mib=st.integers(1, 16), cache_tables=st.sampled_from(CACHE_TABLES))
    def create(self, cluster_bits, refcount_order, mib, cache_tables):
        self.cs = 1 << cluster_bits
        self.img = MemImage.create(mib * MiB, cluster_bits=cluster_bits, refcount_order=refcount_order,
                                   cache_bytes=cache_tables << cluster_bits)
        self.model = bytearray(mib * MiB)
        self.flushes = 0

    def _write(self, off: int, data: bytes) -> None:
        off = min(off, len(self.model) - len(data))
        self.img.write(off, data)
        self.model[off:off + len(data)] = data

    @rule(at=st.integers(0, 1 << 40), clusters=st.integers(1, 3), seed=st.integers(0, 255))
    def write_aligned(self, at, clusters, seed):
        n = min(clusters * self.cs, len(self.model))
        off = at % (len(self.model) // self.cs) * self.cs
        self._write(off, pattern(seed, n))

    @rule(at=st.integers(0, 1 << 40), length=st.one_of(st.integers(1, 600), st.integers(1, 70_000)),
          seed=st.integers(0, 255))
    def write_unaligned(self, at, length, seed):
        self._write(at % len(self.model), pattern(seed, length))

    @rule(at=st.integers(0, 1 << 40), clusters=st.integers(1, 2))
    def write_zero_clusters(self, at, clusters):
        off = at % (len(self.model) // self.cs) * self.cs
        self._write(off, bytes(min(clusters * self.cs, len(self.model))))

    @rule(at=st.integers(0, 1 << 40), length=st.integers(1, 200_000))
    def read(self, at, length):
        off = at % len(self.model)
        want = bytes(self.model[off:off + length])
        assert self.img.read(off, length) == want

    @precondition(lambda self: len(self.model) < MAX_SIZE - MiB)
    @rule(grow=st.sampled_from([512, 4096, 65536, MiB]), extra_sectors=st.integers(0, 3))
    def resize(self, grow, extra_sectors):
        new = len(self.model) + grow + 512 * extra_sectors
        self.img.resize(new)
        self.model.extend(bytes(new - len(self.model)))

    @rule(reopen=st.booleans())
    def flush(self, reopen):
        self.img.flush()
        self.flushes += 1
        assert not self.img.engine.queue.dirty
        check_clean(bytes(self.img.buf), f"after flush {self.flushes}", self.img.engine.refs.reservation)
        if reopen:
            # Everything acknowledged by the flush is on "disk": a fresh open sees it.
            fresh = MemImage(bytearray(self.img.buf), writable=False)
            assert fresh.engine.size == len(self.model)
            assert fresh.read(0, len(self.model)) == bytes(self.model)

    @invariant()
    def sizes_agree(self):
        if hasattr(self, "img"):
            assert self.img.engine.size == len(self.model)

    def teardown(self):
        if not hasattr(self, "img"):
            return
        self.img.close()  # gives the reservation back: a clean close leaves no leaks
        check_clean(bytes(self.img.buf), "at teardown")
        qemu_verdict(bytes(self.img.buf), bytes(self.model))  # includes the full compare, fast


CoreModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("CACHEFS_MODEL_EXAMPLES", "100")), stateful_step_count=40,
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestCoreModel = CoreModel.TestCase


def test_evicted_l2_table_keeps_its_update():
    cs = 512
    img = MemImage.create(MiB, cluster_bits=9, cache_bytes=4 * cs)  # TableCache capacity 4
    img.write(0, b"x")             # L2 table T0 (guest 0..32 KiB) and one data cluster
    img.flush()                    # T0 and the refcount block are clean now
    for t in (1, 2, 3):            # three new dirty L2 tables (+ the dirty refcount block): T0 is evicted
        img.write(t * 32 * 1024, b"y")
    # Two new clusters under T0. Loading T0 overfills the cache, which evicts
    # T0 itself (the only clean table); so does the refcount block's put after
    # the first allocation. The second cluster's lookup reloads T0 as a new object.
    img.write(10 * cs - 1, b"AB")
    assert img.read(10 * cs - 1, 2) == b"AB"  # once b"\x00B": the first cluster's L2 update was lost
    img.close()
    check_clean(bytes(img.buf), "after flush")  # once, the first new cluster leaked


# ---------------------------------------------------------------- images made by qemu-img

QEMU_VARIANTS = [
    "compat=0.10",
    "compat=0.10,cluster_size=512",
    "compat=0.10,cluster_size=2M,preallocation=metadata",
    "compat=0.10,cluster_size=4k,preallocation=metadata",
    "cluster_size=512,refcount_bits=1",
    "cluster_size=512,refcount_bits=64,preallocation=metadata",
    "cluster_size=1k,refcount_bits=2",
    "cluster_size=4k,refcount_bits=4,preallocation=metadata",
    "cluster_size=16k,refcount_bits=8",
    "refcount_bits=16",
    "refcount_bits=32,preallocation=metadata",
    "refcount_bits=64",
    "cluster_size=2M,refcount_bits=1",
    "cluster_size=2M,preallocation=metadata",
    "lazy_refcounts=on",
    "lazy_refcounts=on,cluster_size=4k,preallocation=metadata",
]


@pytest.mark.parametrize("opts", QEMU_VARIANTS)
def test_qemu_created_images_take_random_writes(tmp_path, opts):
    size = 6 * MiB
    path = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), str(size)], check=True)
    img = MemImage(bytearray(path.read_bytes()))
    cs = img.engine.cs
    model = bytearray(size)
    rnd = random.Random(opts)
    for step in range(120):
        kind = rnd.random()
        if kind < 0.45:  # partial writes: into preallocated zero clusters they must zero the rest
            n = rnd.randrange(1, 3 * cs if cs < 65536 else 100_000)
            off = rnd.randrange(0, size - n)
            data = pattern(step, n)
        elif kind < 0.75:
            n = cs * rnd.randrange(1, 3)
            off = rnd.randrange(0, max(1, size // cs - 2)) * cs
            data = pattern(step, n)
        else:
            n = cs
            off = rnd.randrange(0, size // cs) * cs
            data = bytes(n)
        n = min(n, size - off)
        img.write(off, data[:n])
        model[off:off + n] = data[:n]
        if step % 20 == 19:  # seldom: encoding a 2 MiB block of 1-bit refcounts takes ~1 s today
            img.flush()
            off = rnd.randrange(0, size - 4096)
            assert img.read(off, 4096) == bytes(model[off:off + 4096])
    img.close()
    assert img.read(0, size) == bytes(model)
    check_clean(bytes(img.buf), opts)
    qemu_verdict(bytes(img.buf), bytes(model))


@pytest.mark.parametrize("opts", ["compression_type=zlib", "compression_type=zstd,cluster_size=4k",
                                  "compression_type=zlib,cluster_size=512,refcount_bits=4"])
def test_compressed_images_take_random_writes(tmp_path, opts):
    """Images from `qemu-img convert -c`: partial writes copy-on-write out of compressed clusters."""
    size = 3 * MiB
    raw, path = tmp_path / "src.raw", tmp_path / "img.qcow2"
    model = bytearray(size)
    for i, off in enumerate(range(0, size, 96 * 1024)):
        model[off:off + 40_000] = bytes([i + 1]) * 20_000 + pattern(i, 20_000)
    raw.write_bytes(model)
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, str(raw), str(path)],
                   check=True)
    before = path.read_bytes()
    assert run_sync(check_image(len(before)), lambda off, n: before[off:off + n]).compressed_clusters > 0
    img = MemImage(bytearray(before))
    rnd = random.Random(opts)
    for step in range(80):
        n = rnd.choice([1, 700, img.engine.cs, 5000, 70_000])
        off = rnd.randrange(0, size - n)
        data = pattern(1000 + step, n) if step % 5 else bytes(n)
        img.write(off, data)
        model[off:off + n] = data
        if step % 10 == 9:
            img.close()
            check_clean(bytes(img.buf), f"{opts} step {step}")
    img.close()
    assert img.read(0, size) == bytes(model)
    check_clean(bytes(img.buf), opts)
    qemu_verdict(bytes(img.buf), bytes(model))


@pytest.mark.parametrize("seed", range(1, 7))
def test_reservation_growing_the_refcount_table_keeps_one_block_per_cluster(seed):
    """Regressions: reserving a run that needs a new refcount block placed past the end, whose
    counting grows the refcount table, put a second block on that same cluster (the flush never
    converged), or let the nested run forget the outer one (a block inside handed-out clusters)."""
    rng = random.Random(seed)
    size, cs = 16 * MiB, 512
    img = MemImage.create(size, cluster_bits=9)
    model = bytearray(size)
    for i in range(200):
        kind = rng.random()
        if kind < 0.15:
            n = rng.randint(1, 600)
            off, data = rng.randrange(0, size // cs - n + 1) * cs, bytes(n * cs)
        elif kind < 0.4:
            length = min(rng.randint(1, 600) * cs, 300 * 1024)
            off, data = rng.randrange(0, (size - length) // cs + 1) * cs, rng.randbytes(length)
        else:
            length = rng.randint(1, 3000)
            off, data = rng.randrange(0, size - length), rng.randbytes(length)
        img.write(off, data)
        model[off:off + len(data)] = data
        if i % 10 == 9:
            img.flush()
            check_clean(bytes(img.buf), f"after write {i}", img.engine.refs.reservation)
    img.close()
    check_clean(bytes(img.buf), "after close")
    assert img.read(0, size) == bytes(model)
