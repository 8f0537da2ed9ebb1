"""fio through a mount: verified random and sequential I/O on a qcow2 image, then qemu-img check.

fio's crc32c verification writes a checksummed header into every block and
reads everything back, so a lost, misplaced or torn write fails the job.
The throughput lines are printed (run pytest with -s to see them); they are
not asserted: this is a correctness test, benchmarks live in bench/.
"""

from __future__ import annotations

import pytest

from conftest import qemu_img
from fiojobs import fio
from interop import check_clean

pytestmark = pytest.mark.both_planes  # issue 11: with the data plane on and off

# fio is installed by `make test`; a missing fio must fail, not skip.

MiB = 1 << 20


def test_fio_randwrite_4k_verify(mounted, image):
    m = mounted(image)
    fio(m / "vm.raw", "--rw=randwrite", "--bs=4k", "--size=64M", "--number_ios=4000", "--do_verify=1")
    stats = m.stats()["images"]["vm.raw"]
    assert int(stats["stats.guest_writes"]) >= 4000
    m.umount()
    check_clean(image / "vm.qcow2")

    # The same job (fio's default randrepeat) verifies what the first mount wrote.
    # (fio opens a write job's file O_RDWR even with --verify_only, so not -o ro.)
    m = mounted(image)
    fio(m / "vm.raw", "--rw=randwrite", "--bs=4k", "--size=64M", "--number_ios=4000", "--verify_only")
    m.umount()
    check_clean(image / "vm.qcow2")


def test_fio_seqwrite_1m_verify(mounted, image):
    m = mounted(image)
    fio(m / "vm.raw", "--rw=write", "--bs=1M", "--size=128M", "--do_verify=1")
    m.umount()
    check_clean(image / "vm.qcow2")


def test_fio_direct_randrw_with_fsync(mounted, image):
    """O_DIRECT, mixed reads and unaligned-to-cluster 4k writes, an fsync every 16 writes."""
    m = mounted(image)
    fio(m / "vm.raw", "--rw=randwrite", "--bs=4k", "--size=32M", "--offset=100M", "--number_ios=2000",
        "--direct=1", "--fsync=16", "--do_verify=1")
    stats = m.stats()["images"]["vm.raw"]
    assert int(stats["stats.guest_flushes"]) >= 2000 // 16
    m.umount()
    check_clean(image / "vm.qcow2")


def test_fio_overwrite_then_verify(mounted, image):
    """Sequential fill, then random 16k overwrites of the filled (now allocated) range, verified."""
    m = mounted(image)
    fio(m / "vm.raw", "--rw=write", "--bs=1M", "--size=32M", "--do_verify=0")
    fio(m / "vm.raw", "--rw=randwrite", "--bs=16k", "--size=32M", "--number_ios=1000", "--do_verify=1")
    m.umount()
    check_clean(image / "vm.qcow2")


def test_fio_concurrent_jobs_verify(mounted, image):
    """Four writers on disjoint 32 MiB ranges, allocating concurrently, each verified."""
    m = mounted(image)
    fio(m / "vm.raw", "--rw=randwrite", "--bs=4k", "--size=32M", "--numjobs=4", "--offset_increment=32M",
        "--number_ios=1500", "--do_verify=1", "--group_reporting")
    m.umount()
    check_clean(image / "vm.qcow2")


# Issue 5: the same verified fio runs under every submitter. Each submitter is
# asked for by name and the stats must show it serving the image, so a silent
# fall back to the thread pool fails the test. native (Linux AIO) serves
# O_DIRECT modes only; threads and io_uring serve every mode.
SUBMITTER_MODES = [("threads", "none"), ("native", "none"), ("io_uring", "none"),
                ("threads", "writeback"), ("io_uring", "writeback")]


@pytest.mark.parametrize("submitter,mode", SUBMITTER_MODES, ids=[f"{e}-{m}" for e, m in SUBMITTER_MODES])
def test_fio_verify_under_each_submitter(mounted, image, submitter, mode):
    m = mounted(image, "--aio", submitter, "--cache", mode)
    # QD16 libaio O_DIRECT keeps many requests in flight through the submitter at once.
    fio(m / "vm.raw", "--rw=randwrite", "--bs=4k", "--size=32M", "--number_ios=3000", "--ioengine=libaio",
        "--iodepth=16", "--direct=1", "--fsync=32", "--do_verify=1")
    fio(m / "vm.raw", "--rw=write", "--bs=1M", "--size=48M", "--offset=64M", "--ioengine=libaio",
        "--iodepth=4", "--direct=1", "--do_verify=1")
    stats = m.stats()["images"]["vm.raw"]
    assert stats["stats.aio"] == f"{mode}:{submitter}", stats["stats.aio"]
    m.umount()
    check_clean(image / "vm.qcow2")
    # What the submitter wrote is what QEMU reads: convert with qemu-img and verify the flat file.
    converted = image / "flat.raw"
    qemu_img("convert", "-O", "raw", image / "vm.qcow2", converted)
    fio(converted, "--rw=write", "--bs=1M", "--size=48M", "--offset=64M", "--verify_only")
