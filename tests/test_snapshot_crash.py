"""SIGKILL while snapshots are created and deleted under a writer (issue 23).

After each kill: ``qemu-img check`` finds leaks at most; every snapshot is wholly there (listed,
and its bytes are what its file served when the create returned) or wholly absent; every write
the writer had acknowledged with an fdatasync is in the live image. The next mount repairs the
dirty image and goes on from there.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from conftest import qemu_img, sha256
from crashwrites import WRITER, acked_blocks, kill_mid_workload, leaks_at_most_and_nothing_acknowledged_lost


BLOCK = 4096


class SnapshotLoop(threading.Thread):
    """Creates and deletes snapshots on a live file until the daemon dies; remembers what it saw."""

    def __init__(self, live, mnt, prefix: str):
        super().__init__(daemon=True)
        self.live, self.mnt, self.prefix = live, mnt, prefix
        self.served: dict[str, str] = {}   # created (the call returned): name -> its file's sha256
        self.maybe: set[str] = set()       # a create or delete the kill may have cut
        self.deleted: set[str] = set()

    def _op(self, op: str, name: str) -> bool:
        self.maybe.add(name)
        try:
            os.setxattr(self.live, "user.cachefs.snapshot." + op, name.encode())
        except OSError as exc:
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT), exc
            return False
        self.maybe.discard(name)
        return True

    def run(self) -> None:
        n = 0
        while True:
            name = f"{self.prefix}{n}"
            if not self._op("create", name):
                return
            try:
                self.served[name] = sha256(self.mnt / name.join(("vm@", ".raw")))
            except OSError:
                self.served.pop(name, None)
                self.maybe.add(name)
                return
            if n % 3 == 2:
                victim = f"{self.prefix}{n - 1}"
                if not self._op("delete", victim):
                    return
                self.deleted.add(victim)
                self.served.pop(victim)
            n += 1
            time.sleep(0.01)


def _listed(image) -> set[str]:
    out = qemu_img("snapshot", "-l", image).stdout.splitlines()
    return {line.split()[1] for line in out[2:] if line.split()}


@pytest.mark.parametrize("plane,mode_none_or_writeback", [("on", "none"), ("off", "writeback")], indirect=["plane"],
                         ids=["plane-on-none", "plane-off-writeback"])
def test_sigkill_during_snapshot_create_and_delete(mode_none_or_writeback, mounted, workdir):
    images = workdir / "images"
    images.mkdir()
    image = images / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    blocks = 64 * 1024 * 1024 // BLOCK
    script = workdir / "writer.py"
    script.write_text(WRITER % {"blocks": blocks})
    expect: dict[int, bytes] = {}
    kept: dict[str, str | None] = {}  # snapshots there: name -> what its file served (None: unknown)
    for rnd in range(2):
        m = mounted(images, "--cache", mode_none_or_writeback)
        loop = SnapshotLoop(m / "vm.raw", m.path, f"r{rnd}s")
        loop.start()
        log = workdir / f"writer{rnd}.log"
        kill_mid_workload(m, script, 200 + rnd, mode_none_or_writeback, log, acked_at_least=10)
        loop.join(timeout=30)
        acked, maybe = acked_blocks(log.read_text(), 200 + rnd, blocks)
        for block in maybe:
            expect.pop(block, None)
        expect.update({b: d for b, d in acked.items() if b not in maybe})
        leaks_at_most_and_nothing_acknowledged_lost(image, workdir, expect, rnd)
        listed = _listed(image)
        kept.update(loop.served)
        for name in loop.deleted - loop.maybe:
            kept.pop(name, None)
        must = set(kept) - loop.maybe
        assert must <= listed, f"round {rnd}: snapshots lost: {sorted(must - listed)}"
        assert listed <= set(kept) | loop.maybe, f"round {rnd}: deleted snapshots back: {sorted(listed - set(kept))}"
        for name in listed:
            if kept.get(name) is not None:
                qemu_img("convert", "-O", "raw", "-l", f"snapshot.name={name}", image, workdir / "s.raw")
                assert sha256(workdir / "s.raw") == kept[name], f"round {rnd}: snapshot {name} is not what it served"
        # What is listed now is there for the next round (a create the kill cut: its bytes unknown).
        kept = {name: kept.get(name) for name in listed}

