"""A backup while a guest runs (issue 23): a Linux guest under QEMU writes to its ext4 disk, a
cachefs file; `setfattr user.cachefs.snapshot.create` takes a snapshot while it writes, and
`cp --sparse=always` copies the snapshot's file vm@backup.raw while it goes on writing.

examples/backup-running-guest.sh does the work and is the runnable example (the kernel and busybox
initramfs of boot-guest.sh). The guest fsyncs six "before" files and prints their sha256, then
never stops writing until told: an O_DIRECT stream, new files, and, once the host says the
snapshot is taken, in-place overwrites of the very files the snapshot holds. The script exits 0
only if: the copy, after its journal is replayed (e2fsck -E journal_only: what a mount does, no
repair), is `e2fsck -fn` clean; every before file in it has the sum the guest printed; the live
disk changed them since; the live filesystem is clean; after unmount `qemu-img check` is clean,
`qemu-img snapshot -l` lists backup and `qemu-img convert -l` of it equals the copy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("plane", ["on", "off"])
def test_snapshot_copied_while_the_guest_writes_is_a_consistent_filesystem(workdir, plane):
    """Data plane on: the guest's writes and cp's reads of the snapshot are served in C (the
    snapshot's clusters published read-only, a write to them copied on write in Python); off:
    everything through pyfuse3."""
    env = dict(os.environ, CACHEFS=str(Path(sys.executable).parent / "cachefs"),
               MOUNT_OPTS=f"--dataplane {plane}")
    r = subprocess.run(["bash", "examples/backup-running-guest.sh", str(workdir / "backup")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "FAILED" not in out, out
    # The guest never paused: it was writing across the snapshot and the copy, and afterwards
    # overwrote before/ files the snapshot holds.
    served = re.search(r"guest writes served from just before the snapshot to just after the copy: (\d+)",
                       out)
    assert served and int(served.group(1)) > 0, out
    stopped = re.search(r"cachefs-guest: stopped: (\d+) after files written, (\d+) overwrites", out)
    assert stopped and int(stopped.group(2)) >= 1, out
    for line in ("ok: e2fsck -fn clean after the replay",
                 "ok: all 6 before/ files in the copy (debugfs cat), sha256 as synced",
                 "ok: the live disk, which the guest unmounted: e2fsck -fn clean",
                 "ok: qemu-img check: clean",
                 "ok: qemu-img snapshot -l lists backup",
                 "ok: the copy equals qemu-img convert -l snapshot.name=backup"):
        assert line in out, out
    assert "backup example: the snapshot taken and copied while the guest wrote" in out, out
