#!/usr/bin/env python3
"""Issue 4's benchmark: allocating writes with flushes, cachefs vs qemu-storage-daemon, one run.

For each job and each of writeback and none, on a fresh 1 GiB qcow2 each time:

- host: the same fio job on a plain file (the limit; not qcow2, so no metadata);
- qsd: qemu-storage-daemon exporting the qcow2 over FUSE (the peer), with
  cache.direct matching the mode; its fdatasync+fsync calls are counted in a
  second, traced pass (strace slows qsd, so that pass gives no IOPS);
- cachefs: `cachefs mount --cache MODE`; IOPS from fio, fdatasyncs and guest
  flushes from its own counters (tests/test_metaqueue_mount.py proves they
  equal strace's count).

Jobs (docs/design.md, "One fdatasync per guest flush"; issue 4):
  alloc-flush16   4000 random 4k writes over 1 GiB, fdatasync every 16
  alloc-flush1    the same, fdatasync after every write
  alloc-flush128  the same, fdatasync every 128
  seq1M-flush64M  1 GiB of 1M sequential writes, fdatasync every 64 MiB

Usage: bench/metaqueue.py [WORKDIR]   (default /var/tmp/cachefs-metaqueue)
Writes WORKDIR/results.md; docs/benchmark-history.md quotes it (make bench-metaqueue).
Environment: JOBS, MODES (space-separated subsets), CACHEFS (the CLI command).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = Path(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/cachefs-metaqueue").resolve()
SIZE = "1024M"
JOBS = {
    "alloc-flush16": ["--rw=randwrite", "--bs=4k", "--number_ios=4000", "--fdatasync=16"],
    "alloc-flush1": ["--rw=randwrite", "--bs=4k", "--number_ios=4000", "--fdatasync=1"],
    "alloc-flush128": ["--rw=randwrite", "--bs=4k", "--number_ios=4000", "--fdatasync=128"],
    "seq1M-flush64M": ["--rw=write", "--bs=1M", "--fdatasync=64"],
}
JOBS = {k: v for k, v in JOBS.items() if k in os.environ.get("JOBS", " ".join(JOBS)).split()}
MODES = os.environ.get("MODES", "writeback none").split()
CACHEFS = shlex.split(os.environ.get(
    "CACHEFS", f"env PYTHONPATH={REPO} {REPO / '.venv/bin/python'} -m cachefs.cli"))


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, **kw)


def mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def wait_mount(path: Path) -> None:
    for _ in range(200):
        if mounted(path):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing mounted at {path}")


def fio(job: str, path: Path, direct: bool) -> dict:
    out = subprocess.run(["fio", f"--name={job}", f"--filename={path}", "--ioengine=psync", f"--size={SIZE}",
                          f"--direct={int(direct)}", "--output-format=json", *JOBS[job]],
                         check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    w = j["write"]
    return {"iops": w["iops"], "mbps": w["bw_bytes"] / 1e6, "writes": w["total_ios"],
            "flushes": j.get("sync", {}).get("total_ios", 0) or _flushes(job, w["total_ios"])}


def _flushes(job: str, writes: int) -> int:
    every = int(next(a for a in JOBS[job] if a.startswith("--fdatasync=")).split("=")[1])
    return writes // every


def fresh_qcow2(path: Path) -> None:
    path.unlink(missing_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", path, SIZE)


def qsd(job: str, mode: str, traced: bool) -> dict:
    d = WORK / "qsd"
    d.mkdir(parents=True, exist_ok=True)
    img, exp = d / "t.qcow2", d / "exp.raw"
    fresh_qcow2(img)
    exp.touch()
    direct = mode == "none"
    cmd = ["qemu-storage-daemon",
           "--blockdev", f"driver=file,filename={img},node-name=f0,cache.direct={'on' if direct else 'off'},"
                         f"aio={'native' if direct else 'threads'}",
           "--blockdev", "driver=qcow2,file=f0,node-name=n0",
           "--export", f"type=fuse,id=e,node-name=n0,mountpoint={exp},writable=on"]
    trace = d / "strace.txt"
    if traced:
        cmd = ["strace", "-f", "-qq", "-c", "-e", "trace=fdatasync,fsync", "-o", str(trace)] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_mount(exp)
        res = fio(job, exp, direct)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        if mounted(exp):
            subprocess.run(["fusermount3", "-uz", str(exp)])
    if traced:
        syncs = sum(int(line.split()[3]) for line in trace.read_text().splitlines()
                    if line.split() and line.split()[-1] in ("fdatasync", "fsync"))
        res["syncs"] = syncs
    res["check"] = subprocess.run(["qemu-img", "check", "-q", str(img)]).returncode
    return res


def cachefs(job: str, mode: str) -> dict:
    imgs, mnt = WORK / "cachefs" / "imgs", WORK / "cachefs" / "mnt"
    imgs.mkdir(parents=True, exist_ok=True)
    mnt.mkdir(parents=True, exist_ok=True)
    img = imgs / "t.qcow2"
    fresh_qcow2(img)
    run(*CACHEFS, "mount", imgs, mnt, "--cache", mode, "--log", WORK / "cachefs.log")
    f = mnt / "t.raw"
    try:
        res = fio(job, f, mode == "none")
        stat = lambda k: int(os.getxattr(f, f"user.cachefs.stats.{k}"))  # noqa: E731
        res.update(syncs=stat("backend_fdatasyncs"), guest_flushes=stat("guest_flushes"))
    finally:
        subprocess.run([*CACHEFS, "umount", str(mnt)], capture_output=True)
    res["check"] = subprocess.run(["qemu-img", "check", "-q", str(img)]).returncode
    return res


def host(job: str, mode: str) -> dict:
    f = WORK / "host.raw"
    f.unlink(missing_ok=True)
    run("truncate", "-s", SIZE, f)
    return fio(job, f, mode == "none")


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.time()
    for job in JOBS:
        for mode in MODES:
            h = host(job, mode)
            q = qsd(job, mode, traced=False)
            c = cachefs(job, mode)
            qt = qsd(job, mode, traced=True)
            rows.append((job, mode, h, q, qt, c))
            print(f"{job:15} {mode:9} host {h['iops']:8.0f}  qsd {q['iops']:8.0f} ({qt['syncs'] / qt['flushes']:.2f} "
                  f"syncs/flush)  cachefs {c['iops']:8.0f} ({c['syncs'] / c['guest_flushes']:.2f})", flush=True)
    lines = [
        "## Metadata queue: fdatasyncs per guest flush (issue 4)", "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; kernel {platform.release()}; "
        f"{os.cpu_count()} CPUs; work dir {WORK}",
        f"- cachefs {run('git', '-C', REPO, 'rev-parse', '--short', 'HEAD').stdout.strip()}; "
        f"{run('qemu-storage-daemon', '--version').stdout.splitlines()[0]}; {run('fio', '--version').stdout.strip()}",
        f"- command: `bench/metaqueue.py {WORK}` (wall time {time.time() - t0:.0f} s)", "",
        "| job | mode | host IOPS | qsd IOPS | cachefs IOPS | cachefs/qsd | qsd fdatasyncs/flush | "
        "cachefs fdatasyncs/flush | images check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for job, mode, h, q, qt, c in rows:
        unit = "MB/s" if job.startswith("seq") else "IOPS"
        key = "mbps" if unit == "MB/s" else "iops"
        lines.append(
            f"| {job} | {mode} | {h[key]:.0f} {unit} | {q[key]:.0f} | {c[key]:.0f} | {c[key] / q[key]:.2f} | "
            f"{qt['syncs'] / qt['flushes']:.2f} ({qt['syncs']}/{qt['flushes']}) | "
            f"{c['syncs'] / c['guest_flushes']:.2f} ({c['syncs']}/{c['guest_flushes']}) | "
            f"qsd {q['check']}, cachefs {c['check']} |")
    lines += ["", "qsd's sync count comes from a second, traced pass of the same job on a fresh image. "
              "cachefs's guest flushes include the flush at close; its count is its own counters. "
              "images check: qemu-img check exit codes after unmount (0 = clean)."]
    (WORK / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("metaqueue.py: needs root (FUSE, strace)")
    for tool in ("fio", "qemu-img", "qemu-storage-daemon", "strace"):
        if not shutil.which(tool):
            sys.exit(f"metaqueue.py: missing {tool}")
    main()
