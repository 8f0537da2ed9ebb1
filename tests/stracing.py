"""The daemon's I/O seen by the kernel: its descriptors' open flags and its syscalls under strace
(plain helper module).

- :func:`fd_flags`, :func:`io_fds`, :func:`kind`: the open flags
  (/proc/PID/fdinfo) of a process's descriptors on one file, its read-write
  ones, and whether they are O_DIRECT and O_DSYNC.
- :class:`Strace`: ``strace -f -C -p PID`` over the sync (:data:`SYNC_CALLS`)
  and write (:data:`WRITE_CALLS`) calls, counted per descriptor.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

O_DIRECT = os.O_DIRECT  # 0o40000 on x86_64
O_DSYNC = os.O_DSYNC    # 0o10000; O_SYNC is O_DSYNC plus __O_SYNC


SYNC_CALLS = ("fdatasync", "fsync", "sync_file_range", "syncfs", "sync")


WRITE_CALLS = ("pwrite64", "pwritev", "pwritev2")


def fd_flags(pid: int, target: Path) -> dict[int, int]:
    """fd -> open flags (fdinfo, octal) of every descriptor of process ``pid`` on file ``target``."""
    out = {}
    target = os.path.realpath(target)
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != target:
                continue
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                flags = next(line for line in f if line.startswith("flags:"))
        except (OSError, StopIteration):
            continue  # closed meanwhile
        out[int(name)] = int(flags.split()[1], 8)
    return out


def io_fds(pid: int, target: Path) -> dict[int, int]:
    """The daemon's read-write I/O descriptors on ``target`` (the lock descriptor is O_RDONLY)."""
    return {fd: fl for fd, fl in fd_flags(pid, target).items() if fl & os.O_ACCMODE == os.O_RDWR}


def kind(flags: int) -> tuple[bool, bool]:
    """(O_DIRECT set, O_DSYNC set) of an fdinfo flags word."""
    return bool(flags & O_DIRECT), bool(flags & O_DSYNC)


class Strace:
    """``strace -f -C -p PID`` over sync and write calls: per-fd counts plus strace's own summary.

    -f follows the worker threads trio starts on demand after we attached;
    -C gives both the per-call lines (which carry the fd, so calls can be
    charged to one image) and the -c summary table.
    """

    CALLS = SYNC_CALLS + WRITE_CALLS
    LINE = re.compile(r"^\d+\s+(\w+)\((\d+)")

    def __init__(self, pid: int, out: Path):
        self.pid, self.out = pid, out
        self.proc: subprocess.Popen | None = None
        self.by_fd: dict[str, Counter] = {}
        self.summary: Counter = Counter()

    def __enter__(self) -> Strace:
        self.proc = subprocess.Popen(
            ["strace", "-f", "-C", "-qq", "-e", "trace=" + ",".join(self.CALLS), "-p", str(self.pid),
             "-o", str(self.out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            self._wait_attached()
        except BaseException:
            self._kill()
            raise
        return self

    def _wait_attached(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, f"strace exited early: {self.proc.stderr.read()}"
            tracers = set()
            for task in os.listdir(f"/proc/{self.pid}/task"):
                try:
                    with open(f"/proc/{self.pid}/task/{task}/status") as f:
                        tracers.add(next(int(line.split()[1]) for line in f if line.startswith("TracerPid:")))
                except (OSError, StopIteration):
                    continue
            if tracers == {self.proc.pid}:
                return
            assert time.monotonic() < deadline, f"strace never attached to every thread of {self.pid}"
            time.sleep(0.02)

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self._kill()
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # detach and write the summary
        self._finish()

    def wait_tracee_exit(self, timeout: float = 60) -> None:
        """For a traced daemon that is going away (unmount): strace ends by itself when it exits."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            pytest.fail(f"strace still running {timeout}s after the daemon was told to exit")

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def _finish(self) -> None:
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._kill()
            pytest.fail("strace did not stop on SIGINT")
        err = self.proc.stderr.read()
        # After SIGINT strace detaches, writes its summary and dies of the signal it got.
        assert rc in (0, -signal.SIGINT), f"strace exited {rc}: {err}"
        self.parse(self.out.read_text())

    def parse(self, text: str) -> None:
        in_summary = False
        for line in text.splitlines():
            if line.startswith("% time"):
                in_summary = True
                continue
            if in_summary:
                tok = line.split()
                if len(tok) >= 5 and tok[-1] in self.CALLS:
                    self.summary[tok[-1]] += int(tok[3])  # % time, seconds, usecs/call, calls, [errors,] syscall
                continue
            m = self.LINE.match(line)
            if m:  # "<unfinished ...>" lines match once, "<... resumed>" lines not at all
                self.by_fd.setdefault(m.group(2), Counter())[m.group(1)] += 1

    def count(self, calls, fds) -> int:
        """How many of these calls were made on these descriptors."""
        return sum(self.by_fd.get(str(fd), Counter())[c] for fd in fds for c in calls)

    def total(self, calls) -> int:
        """The per-line count of these calls, checked against strace's -c summary."""
        lines = sum(c[name] for c in self.by_fd.values() for name in calls)
        assert lines == sum(self.summary[name] for name in calls), (self.by_fd, self.summary)
        return lines
