"""The targets of bench/sidebyside.py: what serves the file each fio job runs on.

  host                 a fresh sparse raw file in the work dir (the limit)
  probe                ../shared/bench/fuse-ceiling's C FUSE server over that same raw file
                       (the FUSE ceiling; O_DIRECT jobs only)
  qsd                  qemu-storage-daemon exporting a fresh qcow2 over FUSE (the peer)
  qsd11                qemu-storage-daemon 11.x (multi-threaded FUSE export, QSD11_IOTHREADS iothreads,
                       2 by default) from ../shared/bench/qsd11.sh's chroot; skipped until its setup ran
  cachefs-dp-ENGINE    `cachefs mount --aio ENGINE` of a fresh qcow2, data plane on (the default)
  cachefs-dpoff-ENGINE the same with `--dataplane off` (pure pyfuse3)
  cachefs-dp-raw       cachefs, data plane on, serving a fresh sparse raw image (O_DIRECT jobs
                       only; engine: the first of ENGINES; cachefs-dp-raw-ENGINE names one)
  ...-dev              any cachefs-dp target with `--transport dev` (/dev/fuse); the others run with
                       `--transport uring` where the kernel has FUSE over io_uring (turning it on)
Every target's setup(job) serves a fresh file at .path; teardown() stops serving it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sidebyside_jobs import (IMG_SIZE, MODE_OPTS, REPO, WORK, Job, Skip, alive, env, image_check, last_line,
                             mounted, sh, size_bytes, size_of, unmount_lazy, wait_mount, words)

ENGINES = words("ENGINES", "io_uring native")     # cachefs-dp: one target per engine
DPOFF_ENGINES = words("DPOFF_ENGINES", "io_uring")  # cachefs-dpoff: one target per engine
PROBE_DIR = Path(env("PROBE_DIR", str(REPO.parent / "shared" / "bench" / "fuse-ceiling")))
DEFAULT_TARGETS = "host probe qsd qsd11 cachefs-dp cachefs-dpoff cachefs-dp-raw"
RAW_ONLY_DIRECT = "O_DIRECT jobs only on this target"
URING_SWITCH = Path("/sys/module/fuse/parameters/enable_uring")


class Target:
    """One kind of target: setup(job) serves a fresh file at .path, teardown() stops it."""

    name = "?"
    kind = "?"          # host, probe, qsd, cachefs
    image = "raw"       # the backing file's format
    dataplane: str | None = None  # cachefs: "on" or "off"
    engine: str | None = None
    path: Path
    backing_file: Path
    pid: int | None = None

    def __init__(self) -> None:
        self.commands: list[str] = []  # what setup ran, for the report

    def info(self) -> dict:
        return {"kind": self.kind, "image": self.image, "dataplane": self.dataplane, "engine": self.engine}

    def serves(self, job: Job) -> str:
        """"" if this target runs the job at all, else why not (the run is left out)."""
        return ""

    def cache_span(self, job: Job) -> int | None:
        """How much of the backing file its page cache is measured over: a raw file's job span
        (the rest is a hole no job touches), a qcow2's whole file (None)."""
        return size_bytes(size_of(job)) if self.image == "raw" else None

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


HOST_RAW = WORK / "host.raw"  # the host target's file; the probe serves the same file


class HostTarget(Target):
    name, kind = "host", "host"

    def __init__(self) -> None:
        super().__init__()
        self.path = self.backing_file = HOST_RAW

    def setup(self, job: Job) -> None:
        self.path.unlink(missing_ok=True)
        self._run("truncate", "-s", IMG_SIZE, self.path)  # fresh and sparse, like the images

    def teardown(self) -> str:
        self.path.unlink(missing_ok=True)
        return ""


class QsdTarget(Target):
    name, kind, image = "qsd", "qsd", "qcow2"

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


QSD11 = Path(env("QSD11", str(REPO.parent / "shared" / "bench" / "qsd11.sh")))
QSD11_IOTHREADS = env("QSD11_IOTHREADS", "2")


class Qsd11Target(QsdTarget):
    """qsd 11.x in its chroot (QSD11 export): the same fresh qcow2, cache.direct as the job's mode."""
    name = "qsd11"

    def __init__(self) -> None:
        Target.__init__(self)
        d = WORK / "qsd11"
        d.mkdir(parents=True, exist_ok=True)
        self.backing_file, self.path = d / "t.qcow2", d / "exp.raw"
        self.proc = None

    def setup(self, job: Job) -> None:
        root = Path(os.environ.get("QSD11_ROOT", "/var/tmp/qsd11-root"))
        if not (root / "usr/bin/qemu-storage-daemon").exists():
            raise Skip(f"qsd 11 is not set up: run {QSD11} setup")
        if mounted(self.path):
            raise RuntimeError(f"{self.path} is still mounted")
        self.backing_file.unlink(missing_ok=True)
        self._run("qemu-img", "create", "-q", "-f", "qcow2", self.backing_file, IMG_SIZE)
        self.path.touch()
        direct = MODE_OPTS[job.mode][0]
        r = self._run("bash", QSD11, "export", self.backing_file, self.path, QSD11_IOTHREADS, direct,
                      check=False, timeout=60)
        if r.returncode != 0 or not r.stdout.strip().isdigit():
            raise Skip(f"qsd 11 did not start: {last_line(r.stderr) or r.returncode}")
        self.pid = int(r.stdout.strip())

    def teardown(self) -> str:
        note = ""
        if alive(self.pid):  # an unmount alone leaves qsd 11 running (qsd11.sh)
            os.kill(self.pid, signal.SIGTERM)
            end = time.monotonic() + 60
            while alive(self.pid) and time.monotonic() < end:
                time.sleep(0.05)
            if alive(self.pid):
                note = "qsd 11 did not exit on SIGTERM; killed"
                os.kill(self.pid, signal.SIGKILL)
        self.pid = None
        unmount_lazy(self.path)
        return note


class ProbeTarget(Target):
    """The FUSE ceiling probe (PROBE_DIR/probe.c, built into the work dir) over the host's raw file."""

    name, kind = "probe", "probe"

    def __init__(self) -> None:
        super().__init__()
        self.mnt = WORK / "probe" / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.backing_file, self.path = HOST_RAW, self.mnt / "f"
        self.binary = WORK / "probe" / "probe"
        self.build_error = ""  # why the probe cannot be built, once known

    def serves(self, job: Job) -> str:
        return "" if job.direct else RAW_ONLY_DIRECT

    def build(self) -> None:
        """gcc probe.c into the work dir (never into the repo), once per run."""
        if self.build_error:
            raise RuntimeError(self.build_error)
        if self.binary.exists():
            return
        src = PROBE_DIR / "probe.c"
        cmd = ["gcc", "-O2", "-o", str(self.binary), str(src), "-luring"]
        r = subprocess.run(cmd, capture_output=True, text=True) if src.exists() and shutil.which("gcc") else None
        if r is None or r.returncode != 0:
            self.build_error = f"probe not built: {last_line(r.stderr) if r else f'{src} or gcc not found'}"
            raise RuntimeError(self.build_error)
        self.commands.append(shlex.join(cmd))

    def setup(self, job: Job) -> None:
        self.build()
        if mounted(self.mnt):
            raise RuntimeError(f"{self.mnt} is still mounted")
        self.backing_file.unlink(missing_ok=True)
        self._run("truncate", "-s", IMG_SIZE, self.backing_file)  # as the host target does
        argv = [str(self.binary), str(self.backing_file), str(self.mnt)]
        self.commands.append(shlex.join(argv))
        rc = self._start(argv)
        self.pid = _pid_of(argv)
        if rc != 0 or not wait_mount(self.mnt, timeout=10):
            self.teardown()
            why = last_line((WORK / "out" / "probe.log").read_text())
            raise RuntimeError(f"probe did not mount: {why or f'exit status {rc}'}")
        if self.pid is None or sh("stat", self.path, check=False, timeout=10).returncode != 0:
            self.teardown()
            raise RuntimeError("probe mounted, but its server is not answering")

    @staticmethod
    def _start(argv: list[str]) -> int | None:
        """Runs the probe: it mounts, forks its server and returns. The server holds none of our
        pipes (its output goes to WORK/out/probe.log), or waiting for the parent would wait for it."""
        with open(WORK / "out" / "probe.log", "a") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None

    def teardown(self) -> str:
        note = ""
        if mounted(self.mnt):
            r = subprocess.run(["umount", str(self.mnt)], capture_output=True, text=True)
            if r.returncode != 0:
                note = f"umount failed: {last_line(r.stderr)}; detached"
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        end = time.monotonic() + 10
        while alive(self.pid) and time.monotonic() < end:  # it exits on ENODEV after the umount
            time.sleep(0.05)
        if alive(self.pid):
            note = note or "probe still running after umount; killed"
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None
        return note


def _pid_of(argv: list[str]) -> int | None:
    """The process running exactly argv (the probe's server: its parent exits after the fork)."""
    want = ("\0".join(argv) + "\0").encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes() == want:
                    return int(d.name)
            except OSError:
                continue
    return None


class CachefsTarget(Target):
    """`cachefs mount` of a directory holding one fresh image (qcow2, or a sparse raw file)."""

    kind = "cachefs"

    def __init__(self, name: str, engine: str, dataplane: str, image: str, cli: list[str]) -> None:
        super().__init__()
        self.name, self.engine, self.dataplane, self.image, self.cli = name, engine, dataplane, image, cli
        d = WORK / self.name
        self.imgs, self.mnt = d / "imgs", d / "mnt"
        self.imgs.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.backing_file, self.path = self.imgs / f"t.{image}", self.mnt / "t.raw"
        self.refused: dict[str, str] = {}  # cache mode -> the daemon's reason
        self.mount_extra: list[str] = []

    def serves(self, job: Job) -> str:
        return RAW_ONLY_DIRECT if self.image == "raw" and not job.direct else ""

    def fio_extra(self, job: Job) -> list[str]:
        return []  # the mode gives the semantics; no O_DSYNC emulation

    def setup(self, job: Job) -> None:
        if job.mode in self.refused:
            raise Skip(self.refused[job.mode])
        if mounted(self.mnt):
            raise RuntimeError(f"{self.mnt} is still mounted")
        for f in self.imgs.iterdir():
            f.unlink()
        if self.image == "raw":
            self._run("truncate", "-s", IMG_SIZE, self.backing_file)
        else:
            self._run("qemu-img", "create", "-q", "-f", "qcow2", self.backing_file, IMG_SIZE)
        cmd = [*self.cli, "mount", str(self.imgs), str(self.mnt), *self.mount_extra, "--cache", job.mode,
               "--aio", self.engine,
               "--dataplane", self.dataplane, "--log", str(WORK / "out" / f"{self.name}.log")]
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
        return image_check(self.backing_file) if self.image == "qcow2" else "-"


def _first_child(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


CACHEFS_NAME = re.compile(r"cachefs-(dp|dpoff)(-raw)?(?:-(threads|native|io_uring))?(-dev)?")


def target_names(names: list[str]) -> list[str]:
    """TARGETS with the groups expanded: cachefs-dp (per ENGINES), cachefs-dpoff (per DPOFF_ENGINES),
    cachefs (both, and cachefs-dp-raw)."""
    out: list[str] = []
    for n in names:
        if n == "cachefs":
            out += target_names(["cachefs-dp", "cachefs-dpoff", "cachefs-dp-raw"])
        elif n in ("cachefs-dp", "cachefs-dpoff"):
            out += [f"{n}-{e}" for e in (ENGINES if n == "cachefs-dp" else DPOFF_ENGINES)]
        elif n in ("host", "probe", "qsd", "qsd11") or CACHEFS_NAME.fullmatch(n):
            out.append(n)
        else:
            sys.exit(f"sidebyside.py: unknown target {n!r} (host, probe, qsd, qsd11, cachefs, cachefs-dp, cachefs-dpoff,"
                     " cachefs-{dp,dpoff}[-raw][-ENGINE])")
    return list(dict.fromkeys(out))


def make_targets(names: list[str], cli: list[str]) -> list[Target]:
    out: list[Target] = []
    for n in target_names(names):
        if n in ("host", "probe", "qsd", "qsd11"):
            out.append({"host": HostTarget, "probe": ProbeTarget, "qsd": QsdTarget, "qsd11": Qsd11Target}[n]())
            continue
        dp, raw, engine, dev = CACHEFS_NAME.fullmatch(n).groups()
        t = CachefsTarget(n, engine or ENGINES[0], "on" if dp == "dp" else "off", "raw" if raw else "qcow2", cli)
        # -dev: /dev/fuse; the others take FUSE over io_uring where the kernel has it (as root,
        # `--transport uring` turns the module's enable_uring on: the mount logs it).
        t.mount_extra = ["--transport", "dev" if dev else "uring"] if dp == "dp" and URING_SWITCH.exists() else []
        out.append(t)
    return out
