"""Helpers for tests on a live mount: the daemon's xattrs and stats, a crashed daemon, QEMU's locks
(plain helper module).

- :data:`needs_dataplane`: skip a test where the C data plane is unavailable.
- :func:`image_stats`, :func:`stat_of`, :func:`xattr`: what the daemon reports
  of an image (``cachefs stats``) or a mount (``user.cachefs.*`` xattrs).
- :func:`kill_daemon`: SIGKILL the daemon (a crash) and drop the dead mount.
- :func:`wait_held_by`: until a QEMU process holds its write lock on an image.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from cachefs.dataplane import plane as dataplane
from conftest import is_mounted


needs_dataplane = pytest.mark.skipif(dataplane.why_unavailable() is not None,
                                     reason=str(dataplane.why_unavailable()))


@pytest.fixture
def plane():
    """A bare DataPlane, no mount (its C driven through the test hooks); closed after. A module
    that imports it serves its tests this, not conftest's ``plane`` (a both_planes parameter)."""
    try:
        p = dataplane.DataPlane()
    except dataplane.DataPlaneUnavailable as exc:
        pytest.skip(str(exc))
    yield p
    p.close()

#: Mount arguments for a test whose point is the data plane's own service of a raw image, or its
#: counters (fast_*, forwarded, guest_reads/writes, peak_active): kernel passthrough (issue 24, on by
#: default) would serve that I/O without the daemon and count none of it.
C_SERVES = ("--passthrough", "off")


def image_stats(m, name="disk.raw") -> dict:
    return {k.removeprefix("stats."): v for k, v in m.stats()["images"][name].items()}


def xattr(path, key: str) -> str:
    return os.getxattr(path, "user.cachefs." + key).decode()


def stat_of(path, key: str) -> int:
    """An integer counter ``user.cachefs.stats.KEY``; 0 when the daemon has none yet (mode never used)."""
    try:
        return int(xattr(path, "stats." + key))
    except OSError:
        return 0


def kill_daemon(m) -> None:
    """SIGKILL the mount's daemon (a crash: no flush, no unmount) and drop the dead mount."""
    os.kill(m.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{m.pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    subprocess.run(["fusermount3", "-uz", str(m.path)], capture_output=True)
    assert not is_mounted(m.path)


def wait_held_by(proc, img, timeout=10.0):
    """Poll /proc/locks until proc holds QEMU's "write" permission byte on img.

    Probing with `qemu-img info` instead races: a read-only open that lands
    while qemu-io starts blocks qemu-io's own write lock (CI stop 7).
    """
    ino = img.stat().st_ino
    # QEMU file-posix: permission bytes start at 100; BLK_PERM_WRITE is bit 1,
    # so byte 101. The kernel merges adjacent bytes into one range.
    pattern = re.compile(rf"OFDLCK\s+ADVISORY\s+\w+\s+-1\s+\S+:{ino}\s+(\d+)\s+(\d+)$")

    def holds_write_byte(line):
        m = pattern.search(line.strip())
        return m is not None and int(m[1]) <= 101 <= int(m[2])

    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/locks") as f:
            if any(holds_write_byte(line) for line in f):
                return
        assert proc.poll() is None, f"qemu-io exited early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "qemu-io never took its locks"
        time.sleep(0.05)
