"""Cache modes seen from outside the daemon, against real mounts (docs/cache-modes.md).

Nothing here trusts the daemon's word alone. Each promise is checked where
the kernel can see it:

- the open flags of the daemon's I/O descriptors (/proc/PID/fdinfo):
  O_DIRECT for none/directsync, O_DSYNC for writethrough/directsync;
- the sync and write syscalls the daemon really makes, counted with
  ``strace -f -p`` while a guest writes and flushes through the mount;
- what is in the backing file after guest flushes (a byte copy read with
  qemu-img) and after a clean unmount;
- what a cached and a direct handle of one file see of each other's writes.

The daemon's own counters (``user.cachefs.stats.*``) are cross-checked
against those observations, not used instead of them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import cachefs, is_mounted, qemu_img, run
from guestio import BLOCK, O_DIRECT, pread_block, pwrite_block
from mounting import C_SERVES, stat_of, xattr
from stracing import O_DSYNC, SYNC_CALLS, WRITE_CALLS, Strace, fd_flags, io_fds, kind

CONCRETE = ("writeback", "writethrough", "none", "directsync", "unsafe")
DIRECT = {"none", "directsync"}
WRITE_THROUGH = {"writethrough", "directsync"}
WRITES, EVERY = 64, 8  # the flush workload: 64 block writes, a guest fdatasync after every 8th
FLUSHES = WRITES // EVERY


# ---------------------------------------------------------------- images and mounts


@pytest.fixture
def images(workdir) -> Path:
    """A fresh qcow2 (vm.qcow2, served as vm.raw) and a raw image (disk.img), 64 MiB each."""
    d = workdir / "images"
    d.mkdir()
    make_images(d)
    return d


def make_images(d: Path, size: str = "64M") -> None:
    cachefs("create", d / "vm.qcow2", size)
    cachefs("create", "--format", "raw", d / "disk.img", size)


def backing(images: Path, name: str) -> Path:
    """The backing file of guest-visible ``name``."""
    return images / "vm.qcow2" if name == "vm.raw" else images / name


def invalidations(mnt) -> int:
    return int(xattr(mnt, "invalidations"))


# ---------------------------------------------------------------- the daemon's descriptors


def holders(prefix: Path) -> list[str]:
    """Descriptors of any process on a file under ``prefix`` (to prove nothing was left running)."""
    prefix = os.path.realpath(prefix) + "/"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith(prefix):
                    found.append(f"pid {pid} fd {fd} -> {link}")
        except OSError:
            continue
    return found


def cached_pages(fd: int, offset: int = 0, length: int = 0) -> int:
    """Pages of this open file's range in the host page cache (length 0: to the end).

    cachestat(2) (Linux 6.5) needs no mmap, which a direct_io file may refuse.

    Measured on a descriptor the test already holds: opening a cachefs file
    anew drops its cached pages (keep_cache=False), so a fresh open would
    always see none.
    """
    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                                   "nr_recently_evicted")]
    libc = ctypes.CDLL(None, use_errno=True)
    rng, st = Range(offset, length), Stat()
    if libc.syscall(451, ctypes.c_int(fd), ctypes.byref(rng), ctypes.byref(st), ctypes.c_uint(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cachestat: {os.strerror(err)}")
    return st.nr_cache


# ---------------------------------------------------------------- guest I/O


def flush_workload(path: Path, direct: bool, seed: int) -> dict[int, bytes]:
    """WRITES block writes at distinct offsets (each in its own qcow2 cluster), fdatasync after every EVERY-th.

    Returns offset -> data written.
    """
    rng = random.Random(seed)
    written = {}
    fd = os.open(path, os.O_RDWR | (O_DIRECT if direct else 0))
    try:
        for i in range(WRITES):
            off = i * (1 << 20) + rng.randrange(16) * BLOCK
            data = rng.randbytes(BLOCK)
            pwrite_block(fd, data, off)
            written[off] = data
            if i % EVERY == EVERY - 1:
                os.fdatasync(fd)
    finally:
        os.close(fd)
    return written


def guest_view(image: Path, out: Path) -> Path:
    """The guest-visible bytes of a backing file, as QEMU reads them (raw files as they are)."""
    if image.suffix != ".qcow2":
        return image
    qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", image, out)
    return out


def missing(view: Path, written: dict[int, bytes]) -> list[int]:
    """Offsets whose written data is not in ``view``."""
    with open(view, "rb") as f:
        return [off for off, data in written.items() if os.pread(f.fileno(), len(data), off) != data]


# ---------------------------------------------------------------- 1 + 2: flags and syncs per mode


NAMES = ("vm.raw", "disk.img")  # the qcow2 image and the raw one


@pytest.mark.parametrize("plane", ["on", "off"])
@pytest.mark.parametrize("mode", CONCRETE)
def test_mode_flags_and_syncs_seen_from_outside(mode, plane, mounted, images, workdir):
    """Each concrete mode: the daemon's descriptor flags, the syncs it makes, what a flush leaves in the file.

    With the data plane on, the raw image's reads and writes are served in C on io_uring (issue 11),
    which strace does not see: for it the writes are counted by the data plane instead. Its syncs
    are Python's either way, and strace counts them.
    """
    # The daemon's descriptors, syscalls and counters are the point: kernel passthrough of the raw
    # image would do its reads and writes where neither strace nor the counters see them.
    m = mounted(images, "--cache", mode, "--dataplane", plane, *C_SERVES)
    io = one_io_descriptor_per_image(m, images, mode)

    # The workload, with every sync and write syscall of the daemon counted.
    written = {}
    with Strace(m.pid, workdir / f"strace-{mode}.txt") as st:
        for seed, name in enumerate(NAMES):
            written[name] = flush_workload(m / name, direct=mode in DIRECT, seed=seed)
    fds = io_descriptors_after_the_workload(m, images, mode, io)
    seen = {name: st.count(SYNC_CALLS, list(fds[name])) for name in NAMES}
    # C's fdatasyncs (guest flushes served in C, dp_cflush.c) are io_uring ops strace cannot see: C counts them.
    syncs = {name: seen[name] + stat_of(m / name, "fast_fdatasyncs") for name in NAMES}
    print(f"\n{mode}: fdatasync+fsync per image during 64 writes / {FLUSHES} guest flushes: {syncs}; "
          f"fd flags: { {n: oct(fd_flags(m.pid, backing(images, n))[io[n]]) for n in NAMES} }")
    assert st.total(SYNC_CALLS) == sum(seen.values()), f"syncs on descriptors other than the images': {st.by_fd}"

    page_cache_only_in_buffered_modes(m, images, mode, written)
    for name in NAMES:
        writes_and_syncs_as_the_mode_promises(st, m / name, name, mode, plane, fds[name], io[name], syncs[name])
        counters_agree_with_strace(m / name, mode, syncs[name])
    flushed_writes_are_in_the_file(m, images, workdir, mode, written)
    clean_unmount_keeps_everything(m, images, workdir, mode, io, written)


def one_io_descriptor_per_image(m, images: Path, mode: str) -> dict[str, int]:
    """One lock fd (read-only) and exactly one I/O fd per image, with the mode's flags: name -> that fd."""
    want = (mode in DIRECT, mode in WRITE_THROUGH)
    io = {}
    for name in NAMES:
        flags = fd_flags(m.pid, backing(images, name))
        rw = io_fds(m.pid, backing(images, name))
        assert len(rw) == 1, f"{mode}: {name} should have one I/O descriptor: {flags}"
        assert len(flags) == 2, f"{mode}: {name}: expected lock + I/O descriptor: {flags}"
        (fd, fl), = rw.items()
        assert kind(fl) == want, f"{mode}: {name} I/O fd {fd} flags {fl:o}: (O_DIRECT, O_DSYNC) should be {want}"
        io[name] = fd
        assert xattr(m / name, "cache") == mode
        assert xattr(m / name, "stats.descriptors") == mode
    return io


def io_descriptors_after_the_workload(m, images: Path, mode: str, io: dict[str, int]) -> dict[str, dict[int, int]]:
    """A write-through mode's qcow2 image has a second I/O descriptor once it allocated: the batch
    twin (backends.BackendSet.batch), same O_DIRECT-ness, no O_DSYNC. Nothing else appears."""
    want = (mode in DIRECT, mode in WRITE_THROUGH)
    fds = {name: io_fds(m.pid, backing(images, name)) for name in NAMES}
    for name in NAMES:
        twins = {fd: fl for fd, fl in fds[name].items() if fd != io[name]}
        allowed = {(want[0], False)} if mode in WRITE_THROUGH and name == "vm.raw" else set()
        assert {kind(fl) for fl in twins.values()} <= allowed and len(twins) <= 1, (mode, name, fds[name])
    return fds


def page_cache_only_in_buffered_modes(m, images: Path, mode: str, written: dict[str, dict[int, bytes]]) -> None:
    """No page cache anywhere in the direct modes (docs/cache-modes.md: "no page cache holds the guest's
    data anywhere on the host"): not the cachefs file's (its handles are direct_io, so every read
    reaches the daemon), not the backing file's (O_DIRECT). The buffered modes cache both."""
    for name in NAMES:
        fd = os.open(m / name, os.O_RDONLY)
        try:
            r0 = stat_of(m / name, "guest_reads")
            for off, data in written[name].items():
                assert os.pread(fd, BLOCK, off) == data
            r1 = stat_of(m / name, "guest_reads")
            for off, data in written[name].items():
                assert os.pread(fd, BLOCK, off) == data
            r2 = stat_of(m / name, "guest_reads")
            fuse_pages = sum(cached_pages(fd, off, BLOCK) for off in written[name])
        finally:
            os.close(fd)
        if mode in DIRECT:
            assert (r1 - r0, r2 - r1, fuse_pages) == (WRITES, WRITES, 0), f"{mode}: {name} was page-cached"
        else:
            assert r1 > r0 and r2 == r1, f"{mode}: {name}: re-reads reached the daemon ({r0}, {r1}, {r2})"
            assert fuse_pages >= WRITES, f"{mode}: {name}: only {fuse_pages} pages cached"
    raw_fd = os.open(backing(images, "disk.img"), os.O_RDONLY)
    try:
        host_pages = sum(cached_pages(raw_fd, off, BLOCK) for off in written["disk.img"])
    finally:
        os.close(raw_fd)
    assert (host_pages == 0) if mode in DIRECT else (host_pages >= WRITES), f"{mode}: {host_pages} pages"


def writes_and_syncs_as_the_mode_promises(st: Strace, p: Path, name: str, mode: str, plane: str,
                                          fds: dict[int, int], io_fd: int, n: int) -> None:
    """``n``: the image's syncs strace saw during the workload."""
    # strace saw the data go out through that very descriptor: it really was traced,
    # and every write to a writethrough image went through the O_DSYNC fd.
    if plane == "on" and name == "disk.img":  # io_uring, on that descriptor (dataplane/plane.py)
        assert stat_of(p, "fast_writes") == WRITES, xattr(p, "stats.forwarded")
    elif plane == "on" and mode not in WRITE_THROUGH:  # qcow2: C allocates too (issue 14), once lent clusters
        assert st.count(WRITE_CALLS, list(fds)) + stat_of(p, "fast_writes") >= WRITES, st.by_fd
        assert stat_of(p, "fast_allocations") >= WRITES // 2, xattr(p, "stats.forwarded")
    else:
        assert st.count(WRITE_CALLS, list(fds)) >= WRITES, (name, st.by_fd)
    assert st.count(("fsync", "sync_file_range", "syncfs", "sync"), list(fds)) == 0, st.by_fd
    if mode == "unsafe" or mode in WRITE_THROUGH and name == "disk.img":
        # unsafe: flushes ignored. Raw writethrough/directsync: O_DSYNC made each write durable.
        assert n == 0, f"{mode}: {name}: {n} syncs during the run"
    elif mode in WRITE_THROUGH:
        # qcow2 writethrough/directsync: each write allocates here, and one fdatasync makes the
        # data and its metadata durable (docs/cache-modes.md, "One sync per write"); the first
        # write, with no reservation yet and a new L2 table, takes two more (DESIGN.md section 3).
        dsync_writes = st.count(WRITE_CALLS, [io_fd])
        assert n + dsync_writes <= WRITES + 2, f"{mode}: qcow2: {n} fdatasyncs, {dsync_writes} O_DSYNC writes"
    elif name == "disk.img":
        assert n == FLUSHES, f"{mode}: raw image: {n} fdatasyncs for {FLUSHES} guest flushes"
    else:
        assert FLUSHES <= n <= 3 * FLUSHES, f"{mode}: qcow2: {n} fdatasyncs for {FLUSHES} guest flushes"


def counters_agree_with_strace(p: Path, mode: str, n: int) -> None:
    """The daemon's counters of the served file ``p`` agree with the ``n`` syncs strace saw."""
    assert stat_of(p, f"{mode}.guest_writes") == WRITES
    assert stat_of(p, f"{mode}.guest_flushes") == FLUSHES  # the close after a flush adds none
    assert stat_of(p, f"{mode}.flushes_ignored") == (FLUSHES if mode == "unsafe" else 0)
    assert stat_of(p, f"{mode}.fdatasyncs") == n
    assert stat_of(p, "backend_fdatasyncs") == n
    direct_bytes = stat_of(p, f"{mode}.direct_bytes")
    assert (direct_bytes >= WRITES * BLOCK) if mode in DIRECT else (direct_bytes == 0), direct_bytes


def flushed_writes_are_in_the_file(m, images: Path, workdir: Path, mode: str,
                                   written: dict[str, dict[int, bytes]]) -> None:
    """What the guest flushes left in the backing file, read by QEMU from a byte copy
    (the copy is what a daemon crash right now would leave behind)."""
    snap = workdir / "snapshot.qcow2"
    shutil.copyfile(backing(images, "vm.raw"), snap)
    lost = missing(guest_view(snap, workdir / "snapshot.raw"), written["vm.raw"])
    if mode == "unsafe":
        # Eight flushes and still no mapping on disk: the metadata stayed queued.
        assert lost, "unsafe: the guest flushes wrote the qcow2 metadata out"
        assert stat_of(m / "vm.raw", "queue_depth") > 0
    else:
        assert not lost, f"{mode}: after the last guest flush {len(lost)} blocks are not in the image file"
        # Leaks at most: clusters reserved ahead for the next flush (refcount.py).
        rc = qemu_img("check", "-U", snap, check=False).returncode
        assert rc in (0, 3), rc
    assert not missing(backing(images, "disk.img"), written["disk.img"])


def clean_unmount_keeps_everything(m, images: Path, workdir: Path, mode: str, io: dict[str, int],
                                   written: dict[str, dict[int, bytes]]) -> None:
    """A clean unmount writes and syncs everything, whatever the mode (unsafe included)."""
    with Strace(m.pid, workdir / f"strace-umount-{mode}.txt") as st:
        m.umount()
        st.wait_tracee_exit()
    at_umount = {name: st.count(SYNC_CALLS, [io[name]]) for name in NAMES}
    print(f"{mode}: fdatasyncs at unmount: {at_umount}")
    if mode == "unsafe":
        assert all(at_umount.values()), f"unsafe: unmount did not sync every image: {at_umount}"
    qemu_img("check", backing(images, "vm.raw"))
    for name in NAMES:
        view = guest_view(backing(images, name), workdir / f"final-{name}")
        assert not missing(view, written[name]), f"{mode}: {name}: data lost across the unmount"


# ---------------------------------------------------------------- 3: a filesystem without O_DIRECT


@pytest.fixture
def ramfs(workdir) -> Path:
    """An empty ramfs (it refuses O_DIRECT; tmpfs accepts it since Linux 6.6)."""
    d = workdir / "ramfs"
    d.mkdir()
    run("mount", "-t", "ramfs", "ramfs", d)
    try:
        yield d
    finally:
        if subprocess.run(["umount", d], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", d], capture_output=True)
            pytest.fail(f"ramfs {d} still busy at teardown: {holders(d)}")


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


@pytest.mark.parametrize("mode", sorted(DIRECT))
def test_direct_mode_refused_on_ramfs_at_mount(mode, ramfs, workdir):
    make_images(ramfs, "16M")
    mnt = workdir / "mnt"
    mnt.mkdir()
    try:
        r = cachefs("mount", ramfs, mnt, "--cache", mode, "--log", workdir / "refused.log", check=False)
        mounted_now = is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert line.startswith("cachefs: ") and "ramfs" in line and "O_DIRECT" in line, line
    assert not mounted_now, "a refused mount left something mounted"
    assert holders(ramfs) == [], "the refused daemon is still holding the images"
    log = (workdir / "refused.log").read_text()
    assert "ramfs" in log and "Traceback" not in log, log  # a user error, not a crash


def test_auto_direct_open_on_ramfs_fails_like_the_filesystem_would(ramfs, mounted):
    """QEMU and dd probe O_DIRECT by opening with it: the refusal must come at open, as EINVAL."""
    make_images(ramfs, "16M")
    m = mounted(ramfs, "--cache", "auto")
    f = m / "vm.raw"
    with pytest.raises(OSError) as info:
        os.open(f, os.O_RDWR | os.O_DIRECT)
    assert info.value.errno == errno.EINVAL
    with open(f, "r+b") as g:  # a plain open gets writeback and works
        g.write(b"P" * 4096)
        g.flush()
        os.fsync(g.fileno())
        g.seek(0)
        assert g.read(4096) == b"P" * 4096


def test_switch_to_none_refused_on_ramfs(ramfs, mounted, workdir):
    make_images(ramfs, "16M")
    m = mounted(ramfs)  # writeback works on ramfs
    f = m / "vm.raw"
    with open(f, "r+b") as g:
        g.write(b"A" * 8192)
    before = io_fds(m.pid, ramfs / "vm.qcow2")

    r = cachefs("cache", f, "none", check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert line.startswith("cachefs: vm.raw: cache mode stays writeback: "), line
    assert "ramfs" in line and "O_DIRECT" in line, line
    assert r.stdout == ""
    # setfattr itself is refused too (EINVAL), and the reason stays readable.
    with pytest.raises(OSError):
        os.setxattr(f, "user.cachefs.cache", b"directsync")
    assert "ramfs" in xattr(f, "cache_error")

    # Nothing changed: mode, descriptor flags, data; and the image keeps working.
    assert cachefs("cache", f).stdout.strip() == "writeback"
    after = io_fds(m.pid, ramfs / "vm.qcow2")
    assert [kind(fl) for fl in after.values()] == [(False, False)], after
    assert [kind(fl) for fl in before.values()] == [(False, False)], before
    with open(f, "r+b") as g:
        assert g.read(8192) == b"A" * 8192
        g.seek(1 << 20)
        g.write(b"B" * 4096)
        os.fsync(g.fileno())
    m.umount()
    qemu_img("check", ramfs / "vm.qcow2")
    view = guest_view(ramfs / "vm.qcow2", workdir / "ram-view.raw")
    assert not missing(view, {0: b"A" * 8192, 1 << 20: b"B" * 4096})


# ---------------------------------------------------------------- 4: live switch writeback -> none


class GuestWrites:
    """What the guest wrote: each write's region, and every byte as it should read back."""

    def __init__(self, size: int) -> None:
        self.expect = bytearray(size)
        self.regions: list[tuple[int, int]] = []

    def wrote(self, off: int, data: bytes) -> None:
        self.expect[off:off + len(data)] = data
        self.regions.append((off, len(data)))

    def read_back(self, fd: int) -> None:
        for off, n in self.regions:
            assert os.pread(fd, n, off) == self.expect[off:off + n]


def test_live_switch_writeback_to_none(mounted, images, workdir):
    m = mounted(images)
    img = backing(images, "vm.raw")
    f = m / "vm.raw"
    rng = random.Random(4)
    guest = GuestWrites((8 << 20) + (1 << 16))  # the guest's first 8 MiB and a bit

    # Buffered writes, some unaligned, no flush; one handle stays open across the switch.
    # Nothing may fork meanwhile: a child's exec closes its copy of `old`, and for FUSE that close
    # is a guest flush of its own (so strace starts first, and the switch is a setxattr from here,
    # which is what setfattr and `cachefs cache` do).
    st = Strace(m.pid, workdir / "strace-switch.txt")
    old = None
    try:
        with st:
            old = os.open(f, os.O_RDWR)
            wb_fd = buffered_writes_then_switch_to_none(m, f, img, old, rng, guest)
        the_switch_flushed_and_reopened_direct(st, m, f, img, wb_fd)

        # Everything written before the switch reads back, through the old handle and a new one.
        fresh = os.open(f, os.O_RDONLY)
        try:
            guest.read_back(old)
            guest.read_back(fresh)
        finally:
            os.close(fresh)
        new_writes_are_served_in_mode_none(f, old, rng, guest)
    finally:
        if old is not None:
            os.close(old)

    with open(f, "rb") as g:
        assert g.read(len(guest.expect)) == guest.expect
    m.umount()
    qemu_img("check", img)
    with open(guest_view(img, workdir / "switched.raw"), "rb") as g:
        assert g.read(len(guest.expect)) == guest.expect


def buffered_writes_then_switch_to_none(m, f: Path, img: Path, old: int, rng: random.Random,
                                        guest: GuestWrites) -> int:
    """24 buffered writes through ``old``, read back (priming its page cache), then the switch
    to none: returns writeback's I/O descriptor."""
    for i in range(24):
        off = rng.randrange(0, 8 << 20)
        data = rng.randbytes(rng.choice((BLOCK, 512, 100, 3 * BLOCK + 7)))
        os.pwrite(old, data, off)
        guest.wrote(off, data)
    guest.read_back(old)  # prime the page cache of the old handle
    (wb_fd, fl), = io_fds(m.pid, img).items()
    assert kind(fl) == (False, False)
    assert stat_of(f, "writeback.fdatasyncs") == 0
    os.setxattr(f, "user.cachefs.cache", b"none")
    return wb_fd


def the_switch_flushed_and_reopened_direct(st: Strace, m, f: Path, img: Path, wb_fd: int) -> None:
    """The switch flushed the buffered writes through the old descriptor, then reopened O_DIRECT;
    no buffered I/O fd is left."""
    assert st.count(("fdatasync",), [wb_fd]) >= 1, st.by_fd
    assert stat_of(f, "writeback.fdatasyncs") >= 1
    after = io_fds(m.pid, img)
    assert [kind(fl) for fl in after.values()] == [(True, False)], {k: oct(v) for k, v in after.items()}
    assert xattr(f, "cache") == "none"
    assert run("getfattr", "--only-values", "-n", "user.cachefs.cache", f).stdout == "none"
    assert cachefs("cache", f).stdout.strip() == "none"
    assert xattr(f, "stats.descriptors") == "none"


def new_writes_are_served_in_mode_none(f: Path, old: int, rng: random.Random, guest: GuestWrites) -> None:
    """New writes work: through the old handle (now served in mode none) and an O_DIRECT one."""
    w0, wb0 = stat_of(f, "none.guest_writes"), stat_of(f, "writeback.guest_writes")
    for i in range(8):
        off = rng.randrange(0, 8 << 20)
        data = rng.randbytes(rng.choice((BLOCK, 100)))
        os.pwrite(old, data, off)
        guest.wrote(off, data)
    d = os.open(f, os.O_RDWR | O_DIRECT)
    try:
        for i in range(8):
            off = rng.randrange(0, (8 << 20) // BLOCK) * BLOCK
            data = rng.randbytes(BLOCK)
            pwrite_block(d, data, off)
            guest.wrote(off, data)
        os.fsync(d)
    finally:
        os.close(d)
    # (the kernel may split an unaligned write of a cached handle in two FUSE requests)
    assert 16 <= stat_of(f, "none.guest_writes") - w0 <= 24
    assert stat_of(f, "writeback.guest_writes") == wb0, "a request after the switch was served as writeback"
    assert stat_of(f, "none.direct_bytes") > 0


# ---------------------------------------------------------------- 5: coherence of cached and direct handles


def guest_reads(f) -> int:
    return stat_of(f, "guest_reads")


def check_coherent(f, cached: int, direct: int, rng: random.Random, rounds: int = 6) -> int:
    """Rounds of write-one-way, read-the-other between a cached and a direct handle; returns direct writes."""
    nblocks = (16 << 20) // BLOCK
    for _ in range(rounds):
        # The cached handle really caches: a second read of a block is not seen by the daemon.
        off = rng.randrange(nblocks) * BLOCK
        old = os.pread(cached, BLOCK, off)
        r0 = guest_reads(f)
        assert os.pread(cached, BLOCK, off) == old
        assert guest_reads(f) == r0, "the cached handle did not cache"
        # Direct write, cached read: the stale page must be gone.
        new = rng.randbytes(BLOCK)
        pwrite_block(direct, new, off)
        assert os.pread(cached, BLOCK, off) == new, "cached handle reads stale data after a direct write"
        assert pread_block(direct, off) == new

        # Cached write, direct read.
        off = rng.randrange(nblocks) * BLOCK
        pread_block(direct, off)
        os.pread(cached, BLOCK, off)
        new = rng.randbytes(BLOCK)
        assert os.pwrite(cached, new, off) == BLOCK
        r0 = guest_reads(f)
        assert pread_block(direct, off) == new, "direct handle misses a cached handle's write"
        assert guest_reads(f) > r0, "the direct handle's read did not reach the daemon"
        assert os.pread(cached, BLOCK, off) == new
    return rounds


def test_coherence_auto_direct_and_cached_handles(mounted, images):
    # The daemon's invalidation of cached pages is the point; under passthrough no handle of the raw
    # image has a FUSE page cache (test_passthrough_mount.py covers a direct and a buffered open there).
    m = mounted(images, "--cache", "auto", *C_SERVES)
    for seed, name in enumerate(("vm.raw", "disk.img")):
        f = m / name
        inv0 = invalidations(m)
        direct = os.open(f, os.O_RDWR | O_DIRECT)
        cached = os.open(f, os.O_RDWR)
        try:
            w = check_coherent(f, cached, direct, random.Random(seed))
        finally:
            os.close(cached)
            os.close(direct)
        assert stat_of(f, "none.guest_writes") == w
        assert stat_of(f, "writeback.guest_writes") == w
        # One invalidation per direct write while a cached handle was open.
        assert invalidations(m) - inv0 >= w, (invalidations(m), inv0)


def test_coherence_across_live_switch(mounted, images):
    m = mounted(images)
    f = m / "vm.raw"
    rng = random.Random(7)
    a = os.open(f, os.O_RDWR)             # cached before and after the switch
    b = os.open(f, os.O_RDWR | O_DIRECT)  # under writeback: an O_DIRECT opener, not direct_io
    c = None
    try:
        # Before the switch: the kernel's own O_DIRECT path keeps these coherent.
        check_coherent(f, a, b, rng, rounds=2)
        inv0 = invalidations(m)
        off = 5 * BLOCK
        os.pread(a, BLOCK, off)  # cached under the old mode...
        assert cachefs("cache", f, "none").stdout == "vm.raw: cache mode writeback -> none\n"
        c = os.open(f, os.O_RDWR)  # ...opened under none: direct_io although the opener asked for nothing
        r0 = guest_reads(f)
        pread_block(c, off)
        os.pread(c, BLOCK, off)
        assert guest_reads(f) - r0 == 2, "a handle opened under none is not direct_io"
        new = rng.randbytes(BLOCK)
        pwrite_block(c, new, off)
        assert os.pread(a, BLOCK, off) == new
        w = check_coherent(f, a, c, rng)
        assert invalidations(m) - inv0 >= w + 1, "writes through the direct_io handle invalidated nothing"
        # The old O_DIRECT handle sees all of it, and every request after the switch was served as none.
        for off2 in range(0, 16 << 20, 1 << 20):
            assert pread_block(b, off2) == os.pread(a, BLOCK, off2)
        assert stat_of(f, "writeback.guest_writes") == 4
        assert stat_of(f, "none.guest_writes") == 1 + 2 * w
    finally:
        for fd in (a, b, c):
            if fd is not None:
                os.close(fd)


# ---------------------------------------------------------------- 6: auto picks the mode per open


AUTO_OPENS = (  # opener's extra flags -> concrete mode
    (0, "writeback"),
    (O_DSYNC, "writethrough"),
    (os.O_SYNC, "writethrough"),
    (O_DIRECT, "none"),
    (O_DIRECT | O_DSYNC, "directsync"),
)


def test_auto_picks_mode_per_open(mounted, images):
    m = mounted(images, "--cache", "auto", *C_SERVES)  # the per-mode counters of the daemon's I/O
    for name in ("vm.raw", "disk.img"):
        f = m / name
        img = backing(images, name)
        assert xattr(f, "cache") == "auto"
        assert xattr(f, "stats.descriptors") == "writeback"  # auto's default, for image-level work
        written = {}
        for i, (extra, mode) in enumerate(AUTO_OPENS):
            before = {mo: stat_of(f, f"{mo}.guest_writes") for mo in CONCRETE}
            fd = os.open(f, os.O_RDWR | extra)
            try:
                data = bytes([0x41 + i]) * BLOCK
                pwrite_block(fd, data, i * (1 << 20))
                written[i * (1 << 20)] = data
            finally:
                os.close(fd)
            delta = {mo: stat_of(f, f"{mo}.guest_writes") - before[mo] for mo in CONCRETE}
            assert delta == {mo: int(mo == mode) for mo in CONCRETE}, f"open flags {extra:o}: {delta}"
        assert xattr(f, "stats.descriptors") == "directsync,none,writeback,writethrough"
        # One I/O descriptor per concrete mode, each with its mode's flags; a qcow2 image's
        # write-through modes also have their batch twins, without O_DSYNC (BackendSet.batch).
        flags = sorted(kind(fl) for fl in io_fds(m.pid, img).values())
        twins = [(False, False), (True, False)] if name == "vm.raw" else []
        assert flags == sorted([(False, False), (False, True), (True, False), (True, True)] + twins), flags
        # Raw: writes through O_DSYNC descriptors needed no fdatasync, even for the kernel's per-write
        # fsync. qcow2: each write allocated, and one fdatasync covered its data and metadata (the
        # first allocation of a mode, before any reservation, takes a round more).
        assert stat_of(f, "writethrough.guest_flushes") >= 2
        for wt in ("writethrough", "directsync"):
            limit = 2 * stat_of(f, f"{wt}.guest_writes") if name == "vm.raw" else 0
            assert stat_of(f, f"{wt}.fdatasyncs") <= limit, (name, wt, stat_of(f, f"{wt}.fdatasyncs"))
        assert stat_of(f, "writeback.fdatasyncs") >= 1  # its close flushed
        fd = os.open(f, os.O_RDONLY)
        try:
            for off, data in written.items():
                assert os.pread(fd, BLOCK, off) == data
        finally:
            os.close(fd)
