"""The jobs of bench/sidebyside.py, its settings, and how one fio run is made and measured.

The settings are environment variables (documented in sidebyside.py's docstring); the
targets that serve the file are in sidebyside_targets.py.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ------------------------------------------------------------------ settings


def env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def words(name: str, default: str) -> list[str]:
    return env(name, default).replace(",", " ").split()


RUNTIME = int(env("RUNTIME", "8"))
ROUNDS = int(env("ROUNDS", "2"))
REGION = env("REGION", "1G")
IMG_SIZE = env("IMG_SIZE", "1T")
WORK = Path(env("WORK", "/var/tmp/cachefs-bench")).resolve()
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


def _sync_writers(n: int) -> tuple[str, ...]:
    """4k random writes from n threads, each write synchronous (one fio job in the JSON: group_reporting)."""
    return ("--rw=randwrite", "--bs=4k", "--ioengine=psync", "--iodepth=1",
            *((f"--numjobs={n}", "--group_reporting") if n > 1 else ()))


JOBS: tuple[Job, ...] = (
    # throughput, O_DIRECT (cachefs --cache none, qsd cache.direct=on,aio=native)
    Job("seq1m-read", "throughput", "1M sequential read, QD4", _aio("read", "1M", 4), prefill=True),
    Job("seq1m-write", "throughput", "1M sequential write, QD4", _aio("write", "1M", 4)),
    Job("randread4k-qd1", "throughput", "4k random read, QD1", _aio("randread", "4k", 1), prefill=True),
    Job("randread4k-qd32", "throughput", "4k random read, QD32", _aio("randread", "4k", 32), prefill=True),
    Job("randwrite4k-qd1", "throughput", "4k random write, QD1, fresh image (allocating)",
        _aio("randwrite", "4k", 1)),
    Job("randwrite4k-qd32", "throughput", "4k random write, QD32, fresh image (allocating)",
        _aio("randwrite", "4k", 32)),
    # issue 11: overwrites of allocated clusters (what the data plane serves in C)
    Job("overwrite4k-qd1", "throughput", "4k random overwrite, QD1, prefilled image",
        _aio("randwrite", "4k", 1), prefill=True),
    Job("overwrite4k-qd32", "throughput", "4k random overwrite, QD32, prefilled image",
        _aio("randwrite", "4k", 32), prefill=True),
    # seed 004: Linux AIO vs the thread pool, iozone -I at 16k/64k/256k (sequential, QD1)
    *(Job(f"seq{bs}-{rw}", "seed004", f"{bs} sequential {rw}, O_DIRECT, QD1 (seed 004)",
          _aio(rw, bs, 1), prefill=rw == "read")
      for bs in ("16k", "64k", "256k") for rw in ("read", "write")),
    # allocating writes with flushes on a fresh image (issue 4's alloc-flush16)
    Job("alloc-flush16", "flush", "4k random write, fdatasync every 16, fresh image, writeback",
        _flush(16), mode="writeback", flush_every=16),
    # issue 14: a flush after every allocating write
    Job("alloc-flush1", "flush", "4k random write, fdatasync after every write, fresh image, writeback",
        _flush(1), mode="writeback", flush_every=1),
    # issue 14: allocating writes in the write-through modes, against qsd's writethrough (MODE_OPTS:
    # cachefs --cache MODE; qsd the mode's cache.direct, and fio --sync=dsync, an O_DSYNC open of its
    # export). Synchronous writes (psync), QD32 as 32 writers: the kernel turns an O_DSYNC write on a
    # FUSE file into a FUSE_FSYNC after it only when the write completes in the call (buffered, or
    # O_DIRECT from psync). An O_DIRECT write from libaio or io_uring completes asynchronously and gets
    # none (Linux 6.18: qsd made 2 fdatasyncs in 1886 libaio writes, 2072 in 1107 psync ones), so
    # there qsd's directsync would not be write-through at all.
    *(Job(f"{tag}-randwrite4k-qd{qd}", "write-through",
          f"4k random write, {'QD1' if qd == 1 else f'QD{qd} ({qd} psync writers)'}, fresh image (allocating), "
          f"{m}, {'O_DIRECT' if m == 'directsync' else 'buffered'}",
          _sync_writers(qd), mode=m)
      for tag, m in (("wt", "writethrough"), ("ds", "directsync")) for qd in (1, 32)),
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


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
MAP_FAILED = ctypes.c_void_p(-1).value


def page_cache_bytes(path: Path, span: int | None = None) -> int | None:
    """Bytes of the file in the page cache (mincore(2), as fincore does), over its first span bytes
    only if given: a sparse 1 TiB raw file takes fincore 13 s, its job's region milliseconds."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        n, total, chunk = size if span is None else min(size, span), 0, 1 << 30
        for off in range(0, n, chunk):
            length = min(chunk, n - off)
            addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, off)
            if addr in (None, MAP_FAILED):
                return None
            try:
                vec = ctypes.create_string_buffer((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
                if _libc.mincore(addr, length, vec) != 0:
                    return None
                total += len(vec.raw) - vec.raw.count(0)
            finally:
                _libc.munmap(addr, length)
        return total * mmap.PAGESIZE
    finally:
        os.close(fd)


def image_check(img: Path) -> str:
    if not img.exists():
        return "-"
    r = sh("qemu-img", "check", "-q", img, check=False, timeout=300)
    return "clean" if r.returncode == 0 else f"qemu-img check rc={r.returncode}: {last_line(r.stdout + r.stderr)}"


def settle() -> None:
    os.sync()
    time.sleep(SETTLE)


def size_of(job: Job) -> str:
    return IMG_SIZE if job.whole else REGION


def size_bytes(text: str) -> int:
    """fio's and qemu-img's sizes: 512, 64k, 256M, 1G, 1T (powers of 1024)."""
    units = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    return int(t[:-1]) * 1024 ** units[t[-1]] if t and t[-1] in units else int(t)


# ------------------------------------------------------------------ fio


def fio_command(job: Job, target) -> list[str]:
    return ["fio", f"--name={job.name}", f"--filename={target.path}", *job.fio, f"--size={size_of(job)}",
            f"--direct={int(job.direct)}", "--time_based", f"--runtime={RUNTIME}",
            *target.fio_extra(job), "--output-format=json"]


def prefill_command(job: Job, target) -> list[str]:
    return ["fio", "--name=prefill", f"--filename={target.path}", "--rw=write", "--bs=1M",
            "--ioengine=libaio", "--iodepth=8", f"--size={size_of(job)}", f"--direct={int(job.direct)}",
            "--output-format=json"]


def run_fio(cmd: list[str], target) -> dict:
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
    except BaseException:  # interrupted: no fio of ours outlives the run
        proc.kill()
        proc.communicate()
        raise
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
    fast_ios: int | None = None   # data plane: reads + writes it served in C in the timed run
    forwarded: int | None = None  # data plane: requests it forwarded to pyfuse3 in the timed run
    aio: str | None = None
    check: str = "-"
    note: str = ""
    load1: float = 0.0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _stat_delta(before: dict, after: dict, *keys: str) -> int | None:
    try:
        return sum(int(after[f"stats.{k}"]) - int(before.get(f"stats.{k}", 0)) for k in keys)
    except (KeyError, ValueError, TypeError):
        return None


def run_one(job: Job, target, rnd: str, traced: bool = False) -> Run:
    """Fresh image, daemon up, prefill, one timed fio run with the daemon's numbers, teardown."""
    run = Run(rnd, job.name, target.name, load1=os.getloadavg()[0])
    t0 = time.monotonic()
    tracer = None
    try:
        target.setup(job)
        if job.prefill:
            run_fio(prefill_command(job, target), target)
        want_stats = job.flush_every or target.dataplane == "on" or (target.kind == "cachefs" and rnd == "1")
        before = target.stats() if want_stats else {}
        settle()
        if traced:
            tracer = start_strace(target.pid, WORK / "out" / f"{rnd}.{job.name}.{target.name}.strace")
        timed_fio(job, target, run)
        if tracer is not None:
            run.strace_syncs = stop_strace(tracer)
            tracer = None
        if want_stats:
            daemon_counters(job, run, before, target.stats())
        run.page_cache_bytes = page_cache_bytes(target.backing_file, target.cache_span(job))
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


def timed_fio(job: Job, target, run: Run) -> None:
    """The timed fio run, with the daemon's CPU time and peak RSS over it."""
    pid = target.pid
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


def daemon_counters(job: Job, run: Run, before: dict, after: dict) -> None:
    """cachefs's own counters over the timed run: syncs per flush, the data plane's share."""
    if job.flush_every:
        run.guest_flushes = run.writes // job.flush_every
    if not after:
        return
    if job.flush_every:
        run.guest_flushes = _stat_delta(before, after, "guest_flushes")
        run.backend_fdatasyncs = _stat_delta(before, after, "backend_fdatasyncs")
    if "stats.fast_reads" in after:
        run.fast_ios = _stat_delta(before, after, "fast_reads", "fast_writes")
        run.forwarded = _stat_delta(before, after, "forwarded")
    run.aio = after.get("stats.aio")


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
