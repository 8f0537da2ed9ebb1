"""The final client is a guest (mission): a Linux guest under QEMU whose disk
is a cachefs file writes data, and a fresh boot on a fresh mount verifies it.

examples/boot-guest.sh does the work and is the runnable example: Debian's
cloud kernel and a busybox initramfs under TCG, QEMU's cache=none (O_DIRECT
through the mount) and cache=writeback, `qemu-img check` between the boots.
The guest checks sha256 sums of the files it wrote before the remount, so a
lost or misplaced write anywhere in the stack fails the test. With TRIM
(qcow2, data plane on), a boot in between deletes half the files and runs
fstrim under QEMU's discard=unmap: the image's actual-size must drop, the
image stay check-clean, and the remaining files verify (issue 12).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("fmt,plane", [("qcow2", "on"), ("qcow2", "off"), ("raw", "on"), ("raw", "c")])
def test_guest_writes_survive_remount_in_both_cache_modes(workdir, fmt, plane):
    """qcow2 with the data plane on (forwarded to pyfuse3 in stage 1) and off; a raw disk whose
    reads and writes the kernel does itself (passthrough, where the kernel has it: QEMU's opens
    under auto all qualify), or ("c": --passthrough off) the data plane serves in C. qcow2 with the
    data plane on also trims."""
    trim = (fmt, plane) == ("qcow2", "on")  # issue 12: discard=unmap and fstrim, one more boot per mode
    opts = {"c": "--dataplane on --passthrough off", "on": f"--dataplane on --passthrough {'on' if fmt == 'raw' else 'off'}"
            }.get(plane, f"--dataplane {plane}")
    env = dict(os.environ, CACHEFS=str(Path(sys.executable).parent / "cachefs"), FORMAT=fmt,
               MOUNT_OPTS=opts, **({"TRIM": "1"} if trim else {}))
    r = subprocess.run(["bash", "examples/boot-guest.sh", str(workdir / "guest")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert out.count("cachefs-guest: write done") == 2, out
    assert out.count("cachefs-guest: verify OK") == 2, out
    assert out.count("qemu-img check: clean") == (4 if trim else 2), out
    if trim:  # the guest's TRIM freed host space: actual-size drops by most of the 12 MiB deleted
        assert out.count("cachefs-guest: trim done") == 2, out
        sizes = [[int(w.split("=")[1]) for w in line.split()[2:]] for line in out.splitlines()
                 if line.startswith("fstrim: actual-size")]
        assert len(sizes) == 2 and all(after < before - (8 << 20) for before, after in sizes), out
    passed = [int(w.split("=")[1]) for line in out.splitlines() if "passthrough:" in line
              for w in line.split() if w.startswith("opens=")]
    if fmt == "raw" and passed:  # the kernel did the guest's disk I/O: both boots' opens passed through
        assert plane == "on" and len(passed) == 2 and min(passed) >= 1, out
    elif fmt == "raw":  # the guest's disk I/O was served in C, not forwarded
        fast = [int(w.split("=")[1]) for line in out.splitlines() if "data plane:" in line
                for w in line.split() if w.startswith("fast_writes=")]
        assert len(fast) == 2 and min(fast) >= 10, out


def test_two_guests_boot_from_overlays_of_one_base(workdir):
    """Issue 22: the disk the first boot wrote becomes the shared base of two qcow2 overlays, and
    two guests at once verify every file through them; the overlays stay check-clean, the base's
    bytes unchanged, and `cachefs stats` names both overlays as the base's users."""
    env = dict(os.environ, CACHEFS=str(Path(sys.executable).parent / "cachefs"), FORMAT="qcow2",
               MOUNT_OPTS="--dataplane on", OVERLAY="1", CACHES="none")
    r = subprocess.run(["bash", "examples/boot-guest.sh", str(workdir / "guest")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "ov1: cachefs-guest: verify OK" in out and "ov2: cachefs-guest: verify OK" in out, out
    assert "qemu-img check ov1: clean" in out and "qemu-img check ov2: clean" in out, out
    assert "base: unchanged" in out, out
    assert "backing file of: ov1.qcow2, ov2.qcow2" in out, out
