"""Power cuts of the real daemon (issue 19): cachefs over a recording layer, crash states from its log.

tests/test_powercut*.py cut an image running over a recorded *memory* file.
Here the real ``cachefs mount`` (data plane on, C allocating) serves a fresh
qcow2 from an image directory that is tests/recordfs.py, a FUSE passthrough
that logs every write, truncate and fsync reaching the image file, in order
(dm-log-writes for files). Then, in one mount per cache mode (and one whose
mode is switched live all the time):

- fio writes with ``verify=crc32c`` and ``fdatasync=16`` in one region (its
  own check of the live image), allocating writes with ``fsync=4`` in a second
  region while another fio job punches holes there (``ioengine=falloc``:
  discards, so clusters are freed and allocated again), and
- :class:`powercut.GuestWriter`, four threads writing, discarding and
  flushing in a third region, each request timestamped against the log.

In none, recordfs also holds the writes to the image's first MiB (its tables)
and every fsync a little (faultyfs's slow rules), so backend writes complete
out of order and more of them race with the syncs.

After a clean unmount the log is replayed into crash states: around each
completed sync, where promises start and at random points, what the syncs
covered plus a seeded random subset of the rest (powercut.CrashLog; in every
other state the uncovered writes land page by page, as page-cache writeback
can leave them). In every state our checker finds leaks at most
(``qemu-img check`` too, one state in ``QEMU_EVERY``), and every write the
mode promised reads back, sector by sector: in writeback and none, the
writes completed before a flush started that completed before the cut; in
writethrough (and directsync), every write completed before the cut. Two
states per mode are also opened by the daemon itself (its repair of a dirty
image, its reads, then a clean unmount that leaves no leak). Two sabotaged
replays (syncs ignored; a synced write left out) must fail the checks.

``POWERCUT_DAEMON_STATES=N`` (crash states per mode, 150 by default),
``POWERCUT_SEED=S``, ``POWERCUT_DAEMON_MODES=writeback,none,...``,
``POWERCUT_DAEMON_CLUSTER=512`` and ``POWERCUT_DAEMON_SLOW=RULES`` check
more (``make soak-daemon``). A failure names the seed, the mode and the
state (the log position, the uncovered records kept) and keeps the state's
file and the log in the test's directory. The workload itself is concurrent,
so a seed fixes the guest's choices and the states' subsets, not the
interleaving.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import qemu_img
from lowerfs import LowerMount
from powercut import CrashLog, GuestWriter, Judge, choose_cuts, first_promised
from recordfs import STATE, WRITE, base_dir, read_log

MiB, SECTOR = 1 << 20, 512
CS = int(os.environ.get("POWERCUT_DAEMON_CLUSTER", "65536"))
SIZE = 32 * MiB
VERIFY, CHURN, GUEST = (0, 8 * MiB), (8 * MiB, 16 * MiB), (16 * MiB, 24 * MiB)
STATES = int(os.environ.get("POWERCUT_DAEMON_STATES", "150"))
SEED = os.environ.get("POWERCUT_SEED", "19")
# "switching": mounted writeback, the image's mode switched live every 50 ms through every mode
# that honours flushes (so the flushes' promises hold throughout). directsync costs a CI run
# another 15 s; make soak-daemon adds it.
# "snapshots": mounted none, snapshots created and deleted every 50 ms (issue 23).
MODES = os.environ.get("POWERCUT_DAEMON_MODES", "writeback,none,writethrough,switching,snapshots").split(",")
WRITE_THROUGH = ("writethrough", "directsync")
MOUNT_MODE = {"switching": "writeback", "snapshots": "none"}
QEMU_EVERY = 25  # one state in this many is also judged by qemu-img check
# faultyfs rules armed on recordfs before the mount: in none (unless POWERCUT_DAEMON_SLOW says
# otherwise, for every mode; "{}" for none), writes to the image's first MiB (its tables, the first
# data) complete 2 ms late, after later writes elsewhere, and every fsync waits 2 ms before it
# starts, while writes that are not covered complete.
SLOW = {"none": '{"slow_write": [[0, 1048576, 0.002]], "slow_fsync": [0.002, 1000000000]}'}
if "POWERCUT_DAEMON_SLOW" in os.environ:
    SLOW = dict.fromkeys(MODES, os.environ["POWERCUT_DAEMON_SLOW"])


class Recorder(LowerMount):
    """One recordfs mount: SOURCE served at ``path``, logging to ``log``."""

    def __init__(self, source: Path, path: Path, log: Path) -> None:
        super().__init__("recordfs.py", source, path, log.with_suffix(".stderr"), log)
        self.log = log

    def state(self) -> dict:
        import json
        return json.loads(os.getxattr(self.path, STATE))


@pytest.fixture
def recorder(workdir):
    """``recorder() -> Recorder``: workdir/src served at workdir/lower (ask for it before
    ``mounted``, so that cachefs is unmounted first)."""
    started: list[Recorder] = []

    def start() -> Recorder:
        lower = workdir / "lower"
        lower.mkdir()
        started.append(Recorder(workdir / "src", lower, workdir / "record.log"))
        return started[-1]

    (workdir / "src").mkdir()
    yield start
    errors = [err for r in started if "Traceback" in (err := r.stop())]
    assert not errors, f"recordfs logged a traceback:\n{errors[0]}"


FIO_JOBS = """
[global]
filename={file}
randrepeat=0
[verify]
ioengine=libaio
direct=1
rw=randwrite
bssplit=4k/80:16k/15:64k/5
offset={verify[0]}
size={verify_size}
iodepth=16
verify=crc32c
verify_fatal=1
do_verify=1
verify_state_save=0
fdatasync=16
[churn]
ioengine=libaio
direct=1
rw=randwrite
bssplit=64k/70:4k/30
offset={churn[0]}
size={churn_size}
loops=2
iodepth=4
fsync=4
[discard]
ioengine=falloc
rw=randtrim
bs=64k
offset={churn[0]}
size={churn_size}
loops=2
thinktime=1000
"""


def start_fio(served: Path, workdir: Path, cache: str) -> subprocess.Popen:
    # Write-through makes every 4 KiB write a device sync (recordfs opens the real file O_DSYNC):
    # 8 MiB of them would take 7 s.
    verify_size = (3 if cache in (*WRITE_THROUGH, "switching") else 8) * MiB
    job = workdir / "powercut.fio"
    job.write_text(FIO_JOBS.format(file=served, verify=VERIFY, verify_size=verify_size,
                                   churn=CHURN, churn_size=CHURN[1] - CHURN[0]))
    return subprocess.Popen(["fio", job], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir)


def finish_fio(fio: subprocess.Popen) -> str:
    out, _ = fio.communicate(timeout=120)
    assert fio.returncode == 0 and out.count("err= 0") == 3, out[-3000:]  # verify_fatal: a mismatch is an error
    return out


def stat(f: Path, key: str) -> int:
    return int(os.getxattr(f, f"user.cachefs.stats.{key}"))


class ModeSwitcher(threading.Thread):
    """Switches a served file's cache mode every 50 ms until stopped."""

    CYCLE = ("none", "writethrough", "directsync", "writeback")

    def __init__(self, served: Path) -> None:
        super().__init__()
        self.served, self.stopping, self.switches, self.error = served, threading.Event(), 0, None
        self.longest = 0.0  # seconds, the slowest switch (it waits for the image's running I/O)

    def run(self) -> None:
        try:
            while not self.stopping.wait(0.05):
                t = time.monotonic()
                self.switch()
                self.longest = max(self.longest, time.monotonic() - t)
                self.switches += 1
        except OSError as exc:  # asserted by the test's thread
            self.error = exc

    def switch(self) -> None:
        os.setxattr(self.served, "user.cachefs.cache", self.CYCLE[self.switches % len(self.CYCLE)].encode())


class SnapshotTaker(ModeSwitcher):
    """Issue 23: every 50 ms a snapshot created, and every other time the one before deleted:
    each a new metadata generation written while fio and the guest writer run (the crash states
    then cut inside generations too, and the checker walks every snapshot's tables)."""

    def switch(self) -> None:
        n = self.switches
        os.setxattr(self.served, "user.cachefs.snapshot.create", f"s{n}".encode())
        if n % 2:
            os.setxattr(self.served, "user.cachefs.snapshot.delete", f"s{n - 1}".encode())


def run_workload(m, rec: Recorder, workdir: Path, cache: str):
    """fio and the guest writer at once (and the mode switches); returns the guest's ops and the
    image's counters."""
    served = m / "vm.raw"
    fio = start_fio(served, workdir, cache)
    switcher = {"switching": ModeSwitcher, "snapshots": SnapshotTaker}.get(cache, lambda _: None)(served)
    try:
        if switcher:
            switcher.start()
        ops = GuestWriter(served, rec.path, GUEST, threads=4, ops_each=90, seed=f"{SEED}-{cache}",
                          cluster=max(CS, 4096)).run()
        out = finish_fio(fio)
    except BaseException:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
        raise
    finally:
        if switcher:
            switcher.stopping.set()
            switcher.join()
    if switcher:
        print(f"{cache}: {switcher.switches} switches, the slowest {switcher.longest:.2f} s")
        assert switcher.error is None and switcher.switches >= 3, (switcher.error, switcher.switches)
    counters = {k: stat(served, k) for k in ("fast_allocations", "fast_allocations_adopted", "fast_writes",
                                             "guest_flushes", "backend_fdatasyncs", "discards", "fast_cows",
                                             "fast_flushes", "fast_flush_writes")}
    print(f"{cache}: fio {out.count('err= 0')} jobs verified clean; {counters}; recordfs {rec.state()}")
    return ops, counters


def check_cuts(log: CrashLog, judge: Judge, rng: random.Random, cache: str,
               workdir: Path) -> tuple[list[str], int, int]:
    """Judge the chosen crash states: (failures, states, promised writes checked in all)."""
    failures, promises = [], 0
    # The snapshots workload needs more: C's copies on write must be written data first, and 150
    # states did not catch that ordering removed, 800 did (issue 23's mutation run).
    cuts = choose_cuts(log, rng, max(STATES, 600) if cache == "snapshots" else STATES, judge.promise_starts())
    for n, cut in enumerate(cuts):
        buf, st = log.state(cut, rng, tear=4096 if n % 2 else 0)  # every other state tears writes into pages
        qemu = workdir / "state.qcow2" if n % QEMU_EVERY == 0 else None
        v = judge(buf, cut, qemu)
        promises += v.promised
        if v.failures():
            keep = workdir / f"failed-{cache}-cut{cut}.qcow2"
            keep.write_bytes(buf)
            failures.append(f"POWERCUT_SEED={SEED} cache={cache} cluster={CS} slow={SLOW.get(cache)}: "
                            f"{st.describe()}: {v.failures()} "
                            f"(state kept as {keep}, log {workdir / 'record.log'})")
    return failures, len(cuts), promises


def remount_keeps_promises(log: CrashLog, judge: Judge, cut: int, rng: random.Random, cache: str,
                           mounted, workdir: Path) -> None:
    """The real daemon opens a crash state (repairing what the cut left) and serves every promised
    write; after its clean unmount the image is check-clean, leaks repaired."""
    buf, st = log.state(cut, rng, tear=4096)
    images = workdir / f"cut{cut}"
    images.mkdir()
    (images / "vm.qcow2").write_bytes(buf)
    m = mounted(images, "--cache", MOUNT_MODE.get(cache, cache), "--dataplane", "on")
    lo, hi = GUEST
    with open(m / "vm.raw", "rb") as f:
        data = os.pread(f.fileno(), hi - lo, lo)
    m.umount()
    _, lost = judge.lost(data, cut)
    where = f"POWERCUT_SEED={SEED} cache={cache}: remounted {st.describe()}"
    assert not lost, f"{where}: {len(lost)} sectors lost a promised write, first at {lost[0] * SECTOR:#x}"
    r = qemu_img("check", images / "vm.qcow2", check=False)
    assert r.returncode == 0, f"{where}: qemu-img check exit {r.returncode} after a clean unmount\n{r.stdout}"


def sabotage_is_caught(log: CrashLog, judge: Judge, rng: random.Random) -> None:
    """The checks can fail: a replay that ignores the syncs (and O_DSYNC), or that leaves out the
    records holding one synced write, must be judged wrong."""
    cuts = [c for c in choose_cuts(log, rng, 60) if c > log.end // 3][:30]
    caught = any(judge(log.state(c, rng, ignore_syncs=True)[0], c).failures() for c in cuts)
    assert caught, "replaying without the syncs passed every check: the checks see nothing"
    ops = judge.ops
    i, cut = synced_write_alone(ops, judge.write_through)
    head = ops[i].data[:SECTOR]
    omit = frozenset(r.pos for r in log.records if r.kind == WRITE and r.pos < cut and head in r.data)
    assert omit, f"no record holds the data of guest write {i}"
    buf, st = log.state(cut, rng, omit=omit)
    v = judge(buf, cut)
    # Lost, or (a write that grew the file) mapped past the end: either way judged wrong.
    assert v.corruptions or ops[i].offset // SECTOR in v.lost, f"leaving out a synced write went unnoticed: {st.describe()}"


def synced_write_alone(ops, write_through: bool) -> tuple[int, int]:
    """A promised write of random data that no later op overwrites, and the first cut promising it."""
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if op.kind != "write" or not any(op.data[:SECTOR]):
            continue
        end = op.offset + len(op.data)
        if any(o.kind == "write" and o.offset < end and op.offset < o.offset + len(o.data) for o in ops[i + 1:]):
            continue
        cut = first_promised(ops, i, write_through)
        if cut is not None:
            return i, cut
    pytest.fail("no promised write of random data stands alone: nothing to sabotage")


@pytest.mark.parametrize("cache", MODES)
def test_power_cuts_of_the_daemon_keep_each_modes_promise(cache, recorder, mounted, workdir):
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", workdir / "src" / "vm.qcow2", str(SIZE))
    rec = recorder()
    if SLOW.get(cache):
        os.setxattr(rec.path, "user.faulty.arm", SLOW[cache].encode())
    m = mounted(rec.path, "--cache", MOUNT_MODE.get(cache, cache), "--dataplane", "on")
    t0 = time.monotonic()
    ops, counters = run_workload(m, rec, workdir, cache)
    t1 = time.monotonic()
    assert counters["fast_writes"] > 0 and counters["discards"] > 0, counters
    assert counters["fast_allocations_adopted"] > 0, counters  # C allocated: the test is not vacuous
    if cache == "snapshots":  # C copied shared clusters on write (dp_cow.c): their crash states are judged too
        assert counters["fast_cows"] > 0, counters
    if cache in ("writeback", "none"):  # C served guest flushes (dp_cflush.c): their crash states are judged too
        assert counters["fast_flushes"] > 0, counters
    if cache == "writethrough":  # C made its allocating writes durable itself (dp_cflush_write)
        assert counters["fast_flush_writes"] > 0, counters
    m.umount()
    rec.stop()
    records = read_log(rec.log)
    base = (base_dir(rec.log) / "vm.qcow2").read_bytes()
    log = CrashLog(records, base, "vm.qcow2")
    final, _ = log.state(log.end, random.Random(0), keep=1.0)
    assert final == (workdir / "src" / "vm.qcow2").read_bytes(), "the log does not replay to the image"
    assert qemu_img("check", workdir / "src" / "vm.qcow2", check=False).returncode == 0

    judge = Judge(ops, cache in WRITE_THROUGH, GUEST)
    rng = random.Random(f"{SEED}-{cache}-states")
    t2 = time.monotonic()
    failures, states, promises = check_cuts(log, judge, rng, cache, workdir)
    print(f"{cache}: {states} crash states from {log.end} records ({len(log.syncs)} syncs), {promises} promised "
          f"writes checked; workload {t1 - t0:.1f} s, unmount {t2 - t1:.1f} s, states {time.monotonic() - t2:.1f} s")
    assert not failures, f"{len(failures)} of {states} crash states break a promise:\n" + "\n".join(failures[:10])
    assert promises > 0
    for cut in (log.end // 2, log.end - 1):  # the daemon itself repairs and serves two crash states
        remount_keeps_promises(log, judge, cut, rng, cache, mounted, workdir)
    sabotage_is_caught(log, judge, rng)


def test_a_flush_in_c_without_its_fdatasync_is_caught(recorder, mounted, workdir, monkeypatch):
    """Sabotage (issue 24): C answers its guest flushes without the fdatasync
    (CACHEFS_CFLUSH_TESTHOOK=skip-sync); some crash state must lose a promised write."""
    monkeypatch.setenv("CACHEFS_CFLUSH_TESTHOOK", "skip-sync")
    cache = "writeback"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", workdir / "src" / "vm.qcow2", str(SIZE))
    rec = recorder()
    m = mounted(rec.path, "--cache", cache, "--dataplane", "on")
    ops, counters = run_workload(m, rec, workdir, cache)
    assert counters["fast_flushes"] > 0, counters
    m.umount()
    rec.stop()
    log = CrashLog(read_log(rec.log), (base_dir(rec.log) / "vm.qcow2").read_bytes(), "vm.qcow2")
    judge = Judge(ops, False, GUEST)
    rng = random.Random(f"{SEED}-sabotage-states")
    cuts = choose_cuts(log, rng, STATES, judge.promise_starts())
    caught = [c for n, c in enumerate(cuts) if judge(log.state(c, rng, tear=4096 if n % 2 else 0)[0], c).failures()]
    print(f"skip-sync: {len(caught)} of {len(cuts)} crash states caught it")
    assert caught, f"POWERCUT_SEED={SEED}: flushes in C without their fdatasync passed {len(cuts)} crash states"
