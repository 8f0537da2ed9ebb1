#!/usr/bin/env python3
"""Issue 5's side-by-side benchmark (`make bench`): the same fio jobs on every target.

Targets (TARGETS, default all five):
  host              a raw file on the work dir's filesystem (the limit)
  qsd               qemu-storage-daemon exporting a fresh qcow2 over FUSE (the peer)
  cachefs-threads   `cachefs mount --aio threads` of a fresh qcow2
  cachefs-native    `cachefs mount --aio native`   (O_DIRECT modes only)
  cachefs-io_uring  `cachefs mount --aio io_uring`
Every qcow2 is 1 TiB virtual (IMG_SIZE) and fresh for every run; jobs run over its first
REGION (default 1G), one over the whole image. Within a round every job runs on every
target back to back (the order of the targets rotates from round to round); each cell
of the report is the median over ROUNDS rounds. A daemon that refuses a mount (e.g.
native in a buffered mode) is skipped for that job with its one-line reason.

Per job and target: MB/s and IOPS (fio JSON), daemon CPU seconds per GiB moved
(/proc/PID/stat utime+stime), daemon peak RSS (VmHWM, reset through clear_refs), host
page cache of the backing file after the job (fincore), and for the flush jobs backend
fdatasyncs per guest flush: cachefs's own counters in the timed run, and a separate,
untimed pass under `strace -f -c -e trace=fdatasync,fsync -p PID` (count pass).

Usage: bench/sidebyside.py                       run, then write docs/benchmarks.md
       bench/sidebyside.py --report-only R.json  only regenerate the report from R.json
Environment (defaults): RUNTIME=8 ROUNDS=2 REGION=1G IMG_SIZE=1T WORK=/var/tmp/cachefs-bench
  ENGINES="threads native io_uring"  TARGETS="host qsd cachefs"  (cachefs = every engine;
  cachefs-ENGINE names one)  JOBS=name,name,... (default all; see --list)  COUNT=1 (0: no
  count pass)  DOCS=REPO/docs  CACHEFS (the CLI command; default: the venv's python on a
  copy of cachefs/ taken at the start).
Needs root, fio, qemu-img, qemu-storage-daemon, strace, fincore, fusermount3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import sidebyside_report  # noqa: E402

# ------------------------------------------------------------------ settings


def env(name: str, default: str) -> str:
    return os.environ.get(name) or default


RUNTIME = int(env("RUNTIME", "8"))
ROUNDS = int(env("ROUNDS", "2"))
REGION = env("REGION", "1G")
IMG_SIZE = env("IMG_SIZE", "1T")
WORK = Path(env("WORK", "/var/tmp/cachefs-bench")).resolve()
ENGINES = env("ENGINES", "threads native io_uring").replace(",", " ").split()
COUNT = env("COUNT", "1") != "0"
DOCS = Path(env("DOCS", str(REPO / "docs")))
SETTLE = 1.0                      # seconds of `sync` + sleep before every timed run
FIO_DEADLINE = RUNTIME * 3 + 120  # a fio run still going after this is a hang

# ------------------------------------------------------------------ jobs (data)

# Cache mode -> (qsd cache.direct, aio, cache.no-flush, fio sync=dsync on host and qsd).
# qsd has no writethrough export: O_DSYNC opens emulate it (bench/cache_modes.sh).
MODE_OPTS = {
    "writeback": ("off", "threads", "off", False),
    "writethrough": ("off", "threads", "off", True),
    "none": ("on", "native", "off", False),
    "directsync": ("on", "native", "off", True),
    "unsafe": ("off", "threads", "on", False),
}
DIRECT_MODES = ("none", "directsync")


@dataclass(frozen=True)
class Job:
    name: str
    group: str            # the report's table: the job's family
    title: str
    fio: tuple[str, ...]  # fio's job options, minus filename, size, direct and runtime
    mode: str = "none"    # the cache mode: cachefs --cache, qsd's options, fio --direct
    prefill: bool = False  # write the region first (a read of unallocated qcow2 is free)
    whole: bool = False   # over the whole image (IMG_SIZE) instead of REGION
    flush_every: int = 0  # > 0: a flush job (fdatasync every N writes); syncs are counted

    @property
    def direct(self) -> bool:
        return self.mode in DIRECT_MODES

    @property
    def reads(self) -> bool:
        return any(a in ("--rw=read", "--rw=randread") for a in self.fio)


def _aio(rw: str, bs: str, qd: int) -> tuple[str, ...]:
    return (f"--rw={rw}", f"--bs={bs}", "--ioengine=libaio", f"--iodepth={qd}")


def _flush(every: int) -> tuple[str, ...]:
    return ("--rw=randwrite", "--bs=4k", "--ioengine=psync", "--iodepth=1", f"--fdatasync={every}")


JOBS: tuple[Job, ...] = (
    # throughput, O_DIRECT (cachefs --cache none, qsd cache.direct=on,aio=native)
    Job("seq1m-read", "throughput", "1M sequential read, QD4", _aio("read", "1M", 4), prefill=True),
    Job("seq1m-write", "throughput", "1M sequential write, QD4", _aio("write", "1M", 4)),
    Job("randread4k-qd1", "throughput", "4k random read, QD1", _aio("randread", "4k", 1), prefill=True),
    Job("randread4k-qd32", "throughput", "4k random read, QD32", _aio("randread", "4k", 32), prefill=True),
    Job("randwrite4k-qd1", "throughput", "4k random write, QD1", _aio("randwrite", "4k", 1)),
    Job("randwrite4k-qd32", "throughput", "4k random write, QD32", _aio("randwrite", "4k", 32)),
    # seed 004: Linux AIO vs the thread pool, iozone -I at 16k/64k/256k (sequential, QD1)
    *(Job(f"seq{bs}-{rw}", "seed004", f"{bs} sequential {rw}, O_DIRECT, QD1 (seed 004)",
          _aio(rw, bs, 1), prefill=rw == "read")
      for bs in ("16k", "64k", "256k") for rw in ("read", "write")),
    # allocating writes with flushes on a fresh image (issue 4's alloc-flush16)
    Job("alloc-flush16", "flush", "4k random write, fdatasync every 16, fresh image, writeback",
        _flush(16), mode="writeback", flush_every=16),
    # seed 001: one flush-heavy job per cache mode (bench/cache_modes.sh)
    *(Job(f"cache-{m}", "cache-mode", f"4k random write, fdatasync every 8, cache={m}",
          _flush(8), mode=m, flush_every=8)
      for m in ("writeback", "writethrough", "none", "directsync", "unsafe")),
    # bounded memory: random writes over the whole 1 TiB image
    Job("randwrite4k-qd32-1t", "memory", "4k random write, QD32, over the whole image",
        _aio("randwrite", "4k", 32), whole=True),
)

# ------------------------------------------------------------------ small helpers


class Skip(Exception):
    """The target cannot run this job (a daemon refused the mount); the reason is one line."""


def log(msg: str) -> None:
    print(msg, flush=True)


def sh(*args, check: bool = True, timeout: float | None = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True,
                          timeout=timeout)


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def wait_mount(path: Path, proc: subprocess.Popen | None = None, timeout: float = 30) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if mounted(path):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def unmount_lazy(path: Path) -> None:
    if mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
    if mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


def alive(pid: int | None) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, TypeError):
        return False


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def peak_rss_kib(pid: int) -> int | None:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def page_cache_bytes(path: Path) -> int | None:
    r = sh("fincore", "--bytes", "--noheadings", "--output", "RES", path, check=False)
    return int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout.split() else None


def image_check(img: Path) -> str:
    if not img.exists():
        return "-"
    r = sh("qemu-img", "check", "-q", img, check=False, timeout=300)
    return "clean" if r.returncode == 0 else f"qemu-img check rc={r.returncode}: {last_line(r.stdout + r.stderr)}"


def settle() -> None:
    os.sync()
    time.sleep(SETTLE)


# ------------------------------------------------------------------ targets


class Target:
    """One kind of target: setup(job) serves a fresh file at .path, teardown() stops it."""

    name = "?"
    path: Path
    backing_file: Path
    pid: int | None = None
    kind = "?"

    def __init__(self) -> None:
        self.commands: list[str] = []  # what setup ran, for the report

    def fio_extra(self, job: Job) -> list[str]:
        """Options this target adds to the job (O_DSYNC emulation of a mode)."""
        return ["--sync=dsync"] if MODE_OPTS[job.mode][3] else []

    def setup(self, job: Job) -> None:
        raise NotImplementedError

    def teardown(self) -> str:
        """Stop serving; returns "" or a note about an unclean stop."""
        raise NotImplementedError

    def check(self) -> str:
        return "-"

    def stats(self) -> dict[str, str]:
        return {}

    def _run(self, *args, **kw) -> subprocess.CompletedProcess:
        self.commands.append(shlex.join(str(a) for a in args))
        return sh(*args, **kw)


def size_of(job: Job) -> str:
    return IMG_SIZE if job.whole else REGION


class HostTarget(Target):
    name, kind = "host", "host"

    def __init__(self) -> None:
        super().__init__()
        self.path = self.backing_file = WORK / "host.raw"

    def setup(self, job: Job) -> None:
        self.path.unlink(missing_ok=True)
        self._run("truncate", "-s", IMG_SIZE, self.path)  # fresh and sparse, like the images

    def teardown(self) -> str:
        self.path.unlink(missing_ok=True)
        return ""


class QsdTarget(Target):
    name, kind = "qsd", "qsd"

    def __init__(self) -> None:
        super().__init__()
        d = WORK / "qsd"
        d.mkdir(parents=True, exist_ok=True)
        self.backing_file, self.path = d / "t.qcow2", d / "exp.raw"
        self.proc: subprocess.Popen | None = None

    def command(self, job: Job) -> list[str]:
        direct, aio, noflush, _ = MODE_OPTS[job.mode]
        cache = f"cache.direct={direct},cache.no-flush={noflush}"
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,filename={self.backing_file},node-name=f0,{cache},aio={aio}",
                "--blockdev", f"driver=qcow2,file=f0,node-name=n0,{cache}",
                "--export", f"type=fuse,id=e,node-name=n0,mountpoint={self.path},writable=on"]

    def setup(self, job: Job) -> None:
        if mounted(self.path):
            raise RuntimeError(f"{self.path} is still mounted")
        self.backing_file.unlink(missing_ok=True)
        self._run("qemu-img", "create", "-q", "-f", "qcow2", self.backing_file, IMG_SIZE)
        self.path.touch()
        cmd = self.command(job)
        self.commands.append(shlex.join(cmd))
        logf = open(WORK / "out" / "qsd.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        if not wait_mount(self.path, self.proc):
            self.teardown()
            raise Skip(f"qemu-storage-daemon did not start: {last_line((WORK / 'out' / 'qsd.log').read_text())}")
        self.pid = self.proc.pid

    def teardown(self) -> str:
        note = ""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    note = "qsd did not exit on SIGTERM; killed"
                    self.proc.kill()
                    self.proc.wait(timeout=30)
            self.proc = None
        self.pid = None
        unmount_lazy(self.path)
        return note

    def check(self) -> str:
        return image_check(self.backing_file)


class CachefsTarget(Target):
    kind = "cachefs"

    def __init__(self, engine: str, cli: list[str]) -> None:
        super().__init__()
        self.engine, self.cli = engine, cli
        self.name = f"cachefs-{engine}"
        d = WORK / self.name
        self.imgs, self.mnt = d / "imgs", d / "mnt"
        self.imgs.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.backing_file, self.path = self.imgs / "t.qcow2", self.mnt / "t.raw"
        self.refused: dict[str, str] = {}  # cache mode -> the daemon's reason

    def fio_extra(self, job: Job) -> list[str]:
        return []  # the mode gives the semantics; no O_DSYNC emulation

    def setup(self, job: Job) -> None:
        if job.mode in self.refused:
            raise Skip(self.refused[job.mode])
        if mounted(self.mnt):
            raise RuntimeError(f"{self.mnt} is still mounted")
        for f in self.imgs.iterdir():
            f.unlink()
        self._run("qemu-img", "create", "-q", "-f", "qcow2", self.backing_file, IMG_SIZE)
        cmd = [*self.cli, "mount", str(self.imgs), str(self.mnt), "--cache", job.mode,
               "--aio", self.engine, "--log", str(WORK / "out" / f"{self.name}.log")]
        self.commands.append(shlex.join(cmd))
        rc, reason = self._mount(cmd)
        if rc != 0 or not wait_mount(self.mnt, timeout=10):
            self.teardown()
            if rc != 2:
                raise RuntimeError(f"mount failed: {reason or f'exit status {rc}'}")
            self.refused[job.mode] = reason  # a usage error: refused for good in this mode
            raise Skip(reason)
        pid = self._pid()
        if pid is None:
            self.teardown()
            raise RuntimeError("mounted, but user.cachefs.pid does not answer")
        self.pid = pid

    def _mount(self, cmd: list[str], timeout: float = 120) -> tuple[int, str]:
        """Runs `cachefs mount`; notes the daemon it forks in .pid (so a hung one can be killed)."""
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + timeout
        while True:
            self.pid = self.pid or _first_child(proc.pid)
            try:
                out, err = proc.communicate(timeout=0.05)
                return proc.returncode, last_line(err) or last_line(out)
            except subprocess.TimeoutExpired:
                if time.monotonic() > end:
                    proc.kill()
                    proc.communicate()
                    return -9, f"`cachefs mount` did not return within {timeout:.0f} s"

    def _pid(self) -> int | None:
        """The daemon's PID (user.cachefs.pid), read in a child so a hung mount cannot hang us."""
        try:
            r = sh("getfattr", "--only-values", "-n", "user.cachefs.pid", self.mnt, check=False, timeout=10)
            return int(r.stdout)
        except (subprocess.TimeoutExpired, ValueError):
            return None

    def stats(self) -> dict[str, str]:
        """`cachefs stats --json` for our one image (the same as its user.cachefs.* xattrs)."""
        r = sh(*self.cli, "stats", self.mnt, "--json", check=False, timeout=60)
        if r.returncode != 0:
            return {}
        return next(iter(json.loads(r.stdout)["images"].values()), {})

    def teardown(self) -> str:
        note = ""
        if mounted(self.mnt):
            try:
                r = subprocess.run([*self.cli, "umount", str(self.mnt), "--timeout", "150"],
                                   capture_output=True, text=True, timeout=200)
                if r.returncode != 0:
                    note = f"umount failed: {last_line(r.stderr)}"
            except subprocess.TimeoutExpired:
                note = "umount hung for 200 s"
        if alive(self.pid) or mounted(self.mnt):
            note = note or "daemon still running after umount; killed"
            if alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
                time.sleep(0.5)
            unmount_lazy(self.mnt)
        self.pid = None
        return note

    def check(self) -> str:
        return image_check(self.backing_file)


def _first_child(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def make_targets(names: list[str], cli: list[str]) -> list[Target]:
    out: list[Target] = []
    for n in names:
        if n == "host":
            out.append(HostTarget())
        elif n == "qsd":
            out.append(QsdTarget())
        elif n == "cachefs":
            out += [CachefsTarget(e, cli) for e in ENGINES]
        elif n.startswith("cachefs-"):
            out.append(CachefsTarget(n.split("-", 1)[1], cli))
        else:
            sys.exit(f"sidebyside.py: unknown target {n!r} (host, qsd, cachefs, cachefs-ENGINE)")
    return out


# ------------------------------------------------------------------ fio


def fio_command(job: Job, target: Target) -> list[str]:
    return ["fio", f"--name={job.name}", f"--filename={target.path}", *job.fio, f"--size={size_of(job)}",
            f"--direct={int(job.direct)}", "--time_based", f"--runtime={RUNTIME}",
            *target.fio_extra(job), "--output-format=json"]


def prefill_command(job: Job, target: Target) -> list[str]:
    return ["fio", "--name=prefill", f"--filename={target.path}", "--rw=write", "--bs=1M",
            "--ioengine=libaio", "--iodepth=8", f"--size={size_of(job)}", f"--direct={int(job.direct)}",
            "--output-format=json"]


def run_fio(cmd: list[str], target: Target) -> dict:
    """Runs fio; returns its one job's JSON. A hang kills the server first, then fio."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=FIO_DEADLINE)
    except subprocess.TimeoutExpired:
        if alive(target.pid):
            os.kill(target.pid, signal.SIGKILL)
        time.sleep(1)
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"HANG: fio still running after {FIO_DEADLINE}s (server killed)")
    if proc.returncode != 0 or "{" not in out:
        raise RuntimeError(f"fio failed (rc={proc.returncode}): {last_line(err) or last_line(out)}")
    job = json.loads(out[out.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio error {job['error']}: {last_line(err)}")
    return job


def fio_numbers(j: dict) -> dict:
    r, w = j["read"], j["write"]
    return {"mbps": (r["bw_bytes"] + w["bw_bytes"]) / 1e6, "iops": r["iops"] + w["iops"],
            "bytes": r["io_bytes"] + w["io_bytes"], "ios": r["total_ios"] + w["total_ios"],
            "writes": w["total_ios"], "lat_us": _mean_lat_us(j)}


def _mean_lat_us(j: dict) -> float | None:
    ios = [(d["clat_ns"]["mean"], d["total_ios"]) for d in (j["read"], j["write"]) if d["total_ios"]]
    n = sum(c for _, c in ios)
    return sum(m * c for m, c in ios) / n / 1000 if n else None


# ------------------------------------------------------------------ one run


@dataclass
class Run:
    round: str
    job: str
    target: str
    status: str = "ok"
    mbps: float | None = None
    iops: float | None = None
    bytes: int | None = None
    ios: int | None = None
    writes: int | None = None
    lat_us: float | None = None
    cpu_s: float | None = None
    cpu_s_per_gib: float | None = None
    peak_rss_kib: int | None = None
    page_cache_bytes: int | None = None
    guest_flushes: int | None = None
    backend_fdatasyncs: int | None = None  # cachefs: its counters; count pass: strace
    strace_syncs: int | None = None
    aio: str | None = None
    check: str = "-"
    note: str = ""
    load1: float = 0.0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _stat_delta(before: dict, after: dict, key: str) -> int | None:
    try:
        return int(after[f"stats.{key}"]) - int(before.get(f"stats.{key}", 0))
    except (KeyError, ValueError):
        return None


def run_one(job: Job, target: Target, rnd: str, traced: bool = False) -> Run:
    """Fresh image, daemon up, prefill, one timed fio run with the daemon's numbers, teardown."""
    run = Run(rnd, job.name, target.name, load1=os.getloadavg()[0])
    t0 = time.monotonic()
    tracer = None
    try:
        target.setup(job)
        if job.prefill:
            run_fio(prefill_command(job, target), target)
        before = target.stats() if job.flush_every else {}
        settle()
        pid = target.pid
        if traced:
            tracer = start_strace(pid, WORK / "out" / f"{rnd}.{job.name}.{target.name}.strace")
        if pid:
            reset_peak_rss(pid)
            cpu0 = cpu_seconds(pid)
        j = run_fio(fio_command(job, target), target)
        if pid:
            run.cpu_s = cpu_seconds(pid) - cpu0
            run.peak_rss_kib = peak_rss_kib(pid)
        for k, v in fio_numbers(j).items():
            setattr(run, k, v)
        if pid and run.bytes:
            run.cpu_s_per_gib = run.cpu_s / (run.bytes / 2**30)
        if tracer is not None:
            run.strace_syncs = stop_strace(tracer)
            tracer = None
        if job.flush_every:
            run.guest_flushes = run.writes // job.flush_every
            after = target.stats()
            if after:
                run.guest_flushes = _stat_delta(before, after, "guest_flushes")
                run.backend_fdatasyncs = _stat_delta(before, after, "backend_fdatasyncs")
                run.aio = after.get("stats.aio")
        elif isinstance(target, CachefsTarget) and rnd == "1":
            run.aio = target.stats().get("stats.aio")
        run.page_cache_bytes = page_cache_bytes(target.backing_file)
    except Skip as exc:
        run.status = f"skipped: {exc}"
    except Exception as exc:  # noqa: BLE001 - one failed run is a row, not the end of the benchmark
        run.status = f"failed: {exc}"
    finally:
        if tracer is not None:
            stop_strace(tracer)
        run.note = target.teardown()
        run.check = "-" if run.status.startswith("skipped") else target.check()
        target.backing_file.unlink(missing_ok=True)
        run.seconds = time.monotonic() - t0
    return run


# ------------------------------------------------------------------ strace (count pass)


def start_strace(pid: int, out: Path) -> subprocess.Popen:
    cmd = ["strace", "-f", "-qq", "-c", "-e", "trace=fdatasync,fsync", "-p", str(pid), "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.out = out  # type: ignore[attr-defined]
    end = time.monotonic() + 10
    while time.monotonic() < end and _tracer(pid) == 0:  # attached to the main thread
        time.sleep(0.05)
    time.sleep(0.3)  # and to its other threads
    return proc


def _tracer(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("TracerPid:"))


def stop_strace(proc: subprocess.Popen) -> int | None:
    """Detach (SIGINT makes strace print its -c summary); returns fdatasync+fsync calls."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        text = proc.out.read_text()  # type: ignore[attr-defined]
    except OSError:
        return None
    n = 0
    for line in text.splitlines():
        p = line.split()
        if p and p[-1] in ("fdatasync", "fsync") and len(p) >= 5 and p[3].isdigit():
            n += int(p[3])
    return n


# ------------------------------------------------------------------ the run


def cachefs_cli() -> list[str]:
    """The CLI on a copy of cachefs/ taken now, so edits during the run cannot mix versions."""
    if "CACHEFS" in os.environ:
        return shlex.split(os.environ["CACHEFS"])
    src = WORK / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO / "cachefs", src / "cachefs", ignore=shutil.ignore_patterns("__pycache__"))
    # -P: `python -m` would otherwise put the working directory (the repo, under make) first on sys.path
    return ["env", f"PYTHONPATH={src}", str(REPO / ".venv" / "bin" / "python"), "-P", "-m", "cachefs.cli"]


def source_id() -> str:
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
    sid = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("diff", "--name-only", "HEAD", "--", "cachefs").split()
    untracked = git("ls-files", "--others", "--exclude-standard", "--", "cachefs").split()
    if dirty:
        sid += f" + uncommitted changes to {' '.join(dirty)}"
    if untracked:
        sid += f" + untracked {' '.join(untracked)}"
    return sid


def machine() -> dict:
    def out(*a):
        r = subprocess.run(a, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else "?"
    cpu = next((ln.split(":", 1)[1].strip() for ln in out("lscpu").splitlines()
                if ln.startswith("Model name")), "?")
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "os": _os_name(),
            "filesystem": " ".join(out("findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(WORK)).split()),
            "fio": out("fio", "--version"),
            "qemu": out("qemu-storage-daemon", "--version").splitlines()[0] if shutil.which("qemu-storage-daemon") else "?"}


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            return next(ln.split("=", 1)[1].strip().strip('"') for ln in f if ln.startswith("PRETTY_NAME="))
    except (OSError, StopIteration):
        return "?"


SETTINGS = ("RUNTIME", "ROUNDS", "REGION", "IMG_SIZE", "ENGINES", "TARGETS", "JOBS", "COUNT", "WORK")


def make_command() -> str:
    """This run as a `make bench` command line: the settings that were given."""
    given = [f"{k}={shlex.quote(os.environ[k])}" for k in SETTINGS if os.environ.get(k)]
    return " ".join(["make bench", *given])


def select_jobs() -> list[Job]:
    want = os.environ.get("JOBS", "").replace(",", " ").split()
    if not want:
        return list(JOBS)
    unknown = set(want) - {j.name for j in JOBS}
    if unknown:
        sys.exit(f"sidebyside.py: unknown job(s) {' '.join(sorted(unknown))}; see --list")
    return [j for j in JOBS if j.name in want]


def print_run(i: int, n: int, t0: float, run: Run) -> None:
    mins, secs = divmod(int(time.monotonic() - t0), 60)
    head = f"[{i}/{n} {mins}m{secs:02d}s] r{run.round} {run.job:20} {run.target:17}"
    if run.status != "ok":
        log(f"{head} {run.status}")
        return
    parts = [f"{run.mbps:8.1f} MB/s {run.iops:8.0f} IOPS"]
    if run.cpu_s_per_gib is not None:
        parts.append(f"cpu {run.cpu_s_per_gib:6.2f} s/GiB rss {run.peak_rss_kib / 1024:6.1f} MiB")
    if run.backend_fdatasyncs is not None or run.strace_syncs is not None:
        syncs = run.strace_syncs if run.strace_syncs is not None else run.backend_fdatasyncs
        parts.append(f"syncs {syncs}/{run.guest_flushes} flushes")
    if run.check not in ("-", "clean"):
        parts.append(run.check)
    log(f"{head} {'  '.join(parts)}")


def main_run() -> None:
    if os.geteuid() != 0:
        sys.exit("sidebyside.py: needs root (FUSE mounts, strace, /proc/PID/clear_refs)")
    for tool in ("fio", "qemu-img", "qemu-storage-daemon", "strace", "fincore", "fusermount3"):
        if not shutil.which(tool):
            sys.exit(f"sidebyside.py: missing {tool}")
    (WORK / "out").mkdir(parents=True, exist_ok=True)
    for f in (WORK / "out").iterdir():
        f.unlink()
    jobs = select_jobs()
    cli = cachefs_cli()
    targets = make_targets(env("TARGETS", "host qsd cachefs").replace(",", " ").split(), cli)
    flush_jobs = [j for j in jobs if j.flush_every] if COUNT else []
    counted = [t for t in targets if t.kind != "host"]
    n = ROUNDS * len(jobs) * len(targets) + len(flush_jobs) * len(counted)
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": source_id(),
            "machine": machine(), "work": str(WORK), "load_start": os.getloadavg(),
            "settings": {"RUNTIME": RUNTIME, "ROUNDS": ROUNDS, "REGION": REGION, "IMG_SIZE": IMG_SIZE,
                         "ENGINES": " ".join(ENGINES), "TARGETS": " ".join(t.name for t in targets),
                         "JOBS": ",".join(j.name for j in jobs), "COUNT": int(COUNT)},
            "cachefs_cli": shlex.join(cli), "command": make_command()}
    log(f"side-by-side benchmark: {len(jobs)} jobs x {len(targets)} targets x {ROUNDS} rounds"
        f" + {len(flush_jobs) * len(counted)} counted runs = {n} runs, about "
        f"{n * (RUNTIME + 5) / 60:.0f} min; work dir {WORK}")
    log(f"cachefs: {meta['source']}")
    runs: list[Run] = []
    commands: dict[str, dict[str, list[str]]] = {}
    t0 = time.monotonic()
    i = 0
    try:
        for r in range(1, ROUNDS + 1):
            order = targets[(r - 1) % len(targets):] + targets[:(r - 1) % len(targets)]
            for job in jobs:
                for t in order:
                    t.commands.clear()
                    runs.append(run_one(job, t, str(r)))
                    if r == 1:
                        commands.setdefault(job.name, {})[t.name] = t.commands + [
                            shlex.join(prefill_command(job, t))] * job.prefill + [shlex.join(fio_command(job, t))]
                    i += 1
                    print_run(i, n, t0, runs[-1])
        for job in flush_jobs:
            for t in counted:
                runs.append(run_one(job, t, "C", traced=True))
                i += 1
                print_run(i, n, t0, runs[-1])
    except KeyboardInterrupt:
        log("interrupted: stopping every target; the report covers the runs done so far")
        meta["interrupted"] = True
    finally:
        for t in targets:
            try:
                t.teardown()
            except Exception as exc:  # noqa: BLE001 - stop every other target anyway
                log(f"{t.name}: teardown failed: {exc}")
    meta["wall_seconds"] = round(time.monotonic() - t0)
    meta["load_end"] = os.getloadavg()
    meta["skipped"] = {t.name: t.refused for t in targets if getattr(t, "refused", None)}
    results = {"meta": meta, "jobs": [dict(asdict(j), direct=j.direct, reads=j.reads) for j in jobs],
               "targets": [t.name for t in targets], "commands": commands,
               "strace_command": "strace -f -qq -c -e trace=fdatasync,fsync -p PID -o FILE",
               "runs": [asdict(x) for x in runs]}
    out = WORK / "results.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    DOCS.mkdir(parents=True, exist_ok=True)
    shutil.copy(out, DOCS / "bench-results.json")
    log(f"results: {out} (copy: {DOCS / 'bench-results.json'})")
    sidebyside_report.write(results, DOCS)
    log(f"report: {DOCS / 'benchmarks.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report-only", metavar="RESULTS_JSON", help="only write the report from saved results")
    ap.add_argument("--list", action="store_true", help="list the jobs")
    a = ap.parse_args()
    if a.list:
        for j in JOBS:
            log(f"{j.name:22} {j.group:11} {j.title}")
        return
    if a.report_only:
        sidebyside_report.write(json.loads(Path(a.report_only).read_text()), DOCS)
        log(f"report: {DOCS / 'benchmarks.md'}")
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    signal.signal(signal.SIGTERM, _interrupt)  # a TERM cleans up like Ctrl-C
    main_run()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
