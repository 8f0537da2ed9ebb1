#!/usr/bin/env python3
"""The side-by-side benchmark (`make bench`, issues 5 and 11): the same fio jobs on every target.

Targets (TARGETS, default "host probe qsd qsd11 cachefs-dp cachefs-dpoff cachefs-dp-raw"):
  host                  a fresh sparse raw file on the work dir's filesystem (the limit)
  probe                 the FUSE ceiling probe (../shared/bench/fuse-ceiling/probe.c, built into
                        WORK/probe, never into the repo) serving that same raw file; O_DIRECT jobs only
  qsd                   qemu-storage-daemon exporting a fresh qcow2 over FUSE (the peer)
  qsd11                 qemu-storage-daemon 11.x (multi-threaded FUSE export, 2 iothreads) from
                        ../shared/bench/qsd11.sh's chroot (`make bench` runs its setup); skipped without it
  cachefs-dp-ENGINE     `cachefs mount --aio ENGINE --dataplane on` of a fresh qcow2 (the default
                        mount); `cachefs-dp` is one per ENGINES (native: O_DIRECT modes only)
  cachefs-dpoff-ENGINE  the same with `--dataplane off`; `cachefs-dpoff` is one per DPOFF_ENGINES
  cachefs-dp-raw        data plane on, serving a fresh sparse raw image (the first of ENGINES;
                        cachefs-dp-raw-ENGINE names one); O_DIRECT jobs only
  cachefs               all the cachefs targets above
Every image is IMG_SIZE virtual and fresh for every run; jobs run over its first REGION, one
over the whole image. Within a round every job runs on every target back to back (the order of
the targets rotates from round to round); each cell of the report is the median over ROUNDS
rounds. A daemon that refuses a mount (e.g. native in a buffered mode) is skipped for that job
with its one-line reason; a job a target does not serve (buffered on probe and raw) is not run.

Per job and target: MB/s and IOPS (fio JSON), daemon CPU seconds per GiB and per I/O
(/proc/PID/stat utime+stime), daemon peak RSS (VmHWM, reset through clear_refs), host page cache
of the backing file after the job (mincore, as fincore; of a raw file, over the job's span), the
data plane's share (its fast_reads+fast_writes and forwarded counters over the timed run), and for
the flush jobs backend fdatasyncs per guest flush: cachefs's own counters in the timed run, and a
separate, untimed pass under `strace -f -c -e trace=fdatasync,fsync -p PID` (count pass; qsd and
the qcow2 cachefs targets).
The report (bench/sidebyside_report.py) has issue 11's target table as ratios from the run.

Usage: bench/sidebyside.py                       run, then write DOCS/benchmarks.md
       bench/sidebyside.py --report-only R.json  only regenerate the report from R.json
       bench/sidebyside.py --list                the jobs
Environment (defaults):
  RUNTIME=8        seconds per timed fio run      ROUNDS=2     rounds (the median is reported)
  REGION=1G        the jobs' span of the image    IMG_SIZE=1T  virtual size of every image
  TARGETS=...      as above (names or groups, space or comma separated)
  ENGINES="io_uring native"   cachefs-dp's engines  DPOFF_ENGINES=io_uring  cachefs-dpoff's
  JOBS=name,...    default all (see --list)       COUNT=1      0: no strace count pass
  WORK=/var/tmp/cachefs-bench  scratch dir (images, mounts, the probe binary, logs in WORK/out)
  DOCS=REPO/docs   where benchmarks.md, bench-*.png, bench-results.json go
  PROBE_DIR=REPO/../shared/bench/fuse-ceiling   probe.c's directory
  CACHEFS          the CLI command (default: the venv's python on a copy of cachefs/ taken at the start)
A quick check that everything runs (a few minutes; writes to a scratch DOCS):
  make bench RUNTIME=3 ROUNDS=1 REGION=256M JOBS=randread4k-qd32,overwrite4k-qd32 DOCS=/var/tmp/benchsmoke
Needs root, fio, qemu-img, qemu-storage-daemon, strace, getfattr, fusermount3, gcc + liburing-dev (probe).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sidebyside_report  # noqa: E402
from sidebyside_jobs import (COUNT, DOCS, IMG_SIZE, JOBS, REGION, REPO, ROUNDS, RUNTIME, WORK,  # noqa: E402
                             Job, Run, log, prefill_command, fio_command, run_one)
from sidebyside_targets import (DEFAULT_TARGETS, DPOFF_ENGINES, ENGINES, Target,  # noqa: E402
                                make_targets)

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


SETTINGS = ("RUNTIME", "ROUNDS", "REGION", "IMG_SIZE", "TARGETS", "ENGINES", "DPOFF_ENGINES", "JOBS", "COUNT",
            "WORK")


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
    head = f"[{i}/{n} {mins}m{secs:02d}s] r{run.round} {run.job:20} {run.target:22}"
    if run.status != "ok":
        log(f"{head} {run.status}")
        return
    parts = [f"{run.mbps:8.1f} MB/s {run.iops:8.0f} IOPS"]
    if run.cpu_s_per_gib is not None:
        parts.append(f"cpu {run.cpu_s_per_gib:6.2f} s/GiB rss {run.peak_rss_kib / 1024:6.1f} MiB")
    if run.fast_ios is not None and run.ios:
        parts.append(f"C {100 * run.fast_ios / run.ios:3.0f}% fwd {run.forwarded}")
    if run.backend_fdatasyncs is not None or run.strace_syncs is not None:
        syncs = run.strace_syncs if run.strace_syncs is not None else run.backend_fdatasyncs
        parts.append(f"syncs {syncs}/{run.guest_flushes} flushes")
    if run.check not in ("-", "clean"):
        parts.append(run.check)
    log(f"{head} {'  '.join(parts)}")


def preflight() -> None:
    if os.geteuid() != 0:
        sys.exit("sidebyside.py: needs root (FUSE mounts, strace, /proc/PID/clear_refs)")
    for tool in ("fio", "qemu-img", "qemu-storage-daemon", "strace", "fusermount3", "getfattr"):
        if not shutil.which(tool):
            sys.exit(f"sidebyside.py: missing {tool}")
    (WORK / "out").mkdir(parents=True, exist_ok=True)
    for f in (WORK / "out").iterdir():
        f.unlink()
    (WORK / "probe").mkdir(parents=True, exist_ok=True)
    (WORK / "probe" / "probe").unlink(missing_ok=True)  # rebuilt from the current probe.c


class Plan:
    """What one run does: the timed rounds, then the count pass."""

    def __init__(self, jobs: list[Job], targets: list[Target]) -> None:
        self.jobs, self.targets = jobs, targets
        self.flush_jobs = [j for j in jobs if j.flush_every] if COUNT else []
        # the count pass counts the peer's and cachefs's syncs on qcow2 images
        self.counted = [t for t in targets if t.kind in ("qsd", "cachefs") and t.image == "qcow2"]
        self.not_run = {t.name: {j.name: why for j in jobs if (why := t.serves(j))} for t in targets}
        timed = sum(1 for j in jobs for t in targets if not t.serves(j)) * ROUNDS
        self.n = timed + sum(1 for j in self.flush_jobs for t in self.counted if not t.serves(j))

    def order(self, rnd: int) -> list[Target]:
        k = (rnd - 1) % len(self.targets)
        return self.targets[k:] + self.targets[:k]


def meta_of(plan: Plan, cli: list[str]) -> dict:
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": source_id(),
            "machine": machine(), "work": str(WORK), "load_start": os.getloadavg(),
            "settings": {"RUNTIME": RUNTIME, "ROUNDS": ROUNDS, "REGION": REGION, "IMG_SIZE": IMG_SIZE,
                         "ENGINES": " ".join(ENGINES), "DPOFF_ENGINES": " ".join(DPOFF_ENGINES),
                         "TARGETS": " ".join(t.name for t in plan.targets),
                         "JOBS": ",".join(j.name for j in plan.jobs), "COUNT": int(COUNT)},
            "cachefs_cli": shlex.join(cli), "command": make_command()}


def run_all(plan: Plan, meta: dict) -> tuple[list[Run], dict]:
    """Every timed round, then the count pass; an interrupt ends early, and every target is stopped."""
    runs: list[Run] = []
    commands: dict[str, dict[str, list[str]]] = {}
    t0 = time.monotonic()

    def one(job: Job, t: Target, rnd: str, traced: bool = False) -> None:
        t.commands.clear()
        runs.append(run_one(job, t, rnd, traced))
        if rnd == "1":
            commands.setdefault(job.name, {})[t.name] = t.commands + [
                shlex.join(prefill_command(job, t))] * job.prefill + [shlex.join(fio_command(job, t))]
        print_run(len(runs), plan.n, t0, runs[-1])

    try:
        for r in range(1, ROUNDS + 1):
            for job in plan.jobs:
                for t in plan.order(r):
                    if not t.serves(job):
                        one(job, t, str(r))
        for job in plan.flush_jobs:
            for t in plan.counted:
                if not t.serves(job):
                    one(job, t, "C", traced=True)
    except KeyboardInterrupt:
        log("interrupted: stopping every target; the report covers the runs done so far")
        meta["interrupted"] = True
    finally:
        for t in plan.targets:
            try:
                t.teardown()
            except Exception as exc:  # noqa: BLE001 - stop every other target anyway
                log(f"{t.name}: teardown failed: {exc}")
    meta["wall_seconds"] = round(time.monotonic() - t0)
    return runs, commands


def main_run() -> None:
    preflight()
    jobs = select_jobs()
    cli = cachefs_cli()
    plan = Plan(jobs, make_targets(os.environ.get("TARGETS", DEFAULT_TARGETS).replace(",", " ").split(), cli))
    meta = meta_of(plan, cli)
    log(f"side-by-side benchmark: {len(jobs)} jobs x {len(plan.targets)} targets x {ROUNDS} rounds"
        f" (+ count pass), {plan.n} runs, about {plan.n * (RUNTIME + 5) / 60:.0f} min; work dir {WORK}")
    log(f"targets: {' '.join(t.name for t in plan.targets)}")
    log(f"cachefs: {meta['source']}")
    runs, commands = run_all(plan, meta)
    meta["load_end"] = os.getloadavg()
    meta["skipped"] = {t.name: t.refused for t in plan.targets if getattr(t, "refused", None)}
    meta["not_run"] = {t: per_job for t, per_job in plan.not_run.items() if per_job}
    results = {"meta": meta, "jobs": [dict(asdict(j), direct=j.direct, reads=j.reads) for j in jobs],
               "targets": [t.name for t in plan.targets], "target_info": {t.name: t.info() for t in plan.targets},
               "commands": commands, "strace_command": "strace -f -qq -c -e trace=fdatasync,fsync -p PID -o FILE",
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
            log(f"{j.name:22} {j.group:11} {'O_DIRECT' if j.direct else 'buffered':8} {j.title}")
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
