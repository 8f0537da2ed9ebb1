"""Power cuts during snapshot operations (issue 23, qcow2/generation.py).

Each operation's requests (the new structures, a sync, the header sector, a sync) are cut
after every prefix. A write not followed by a completed sync may or may not have landed:
each cut is judged with none, all, and a seeded random half of those writes on disk.
qemu-img check must then exit 0 or 3 (leaks), never 2; the operation is wholly there or
wholly absent (the snapshot list, the snapshot's bytes, the active layer's bytes).
"""

from __future__ import annotations

import os
import random

import pytest

from cachefs.qcow2 import format as fmt
from conftest import qemu_img, qemu_io
from snapshotting import active_raw, is_sync, is_write, plan, requests, snapshot_names, snapshot_raw

SEED = int(os.environ.get("CACHEFS_SNAPSHOT_SEED", "2301"))
OPS = {"create": ("mine",), "delete": ("q1",), "apply": ("q1",), "unshare": ()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 4k-cluster image (several L2 tables) with a qemu-img snapshot sharing them, and data after it."""
    d = tmp_path_factory.mktemp("snapcut")
    img = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "8M")
    qemu_io(img, "write -P 0x11 0 3M", "write -c -P 0x12 5M 64k", "write -P 0x13 7M 8k")
    qemu_img("snapshot", "-c", "q1", img)
    q1 = snapshot_raw(img, "q1", d / "q1.raw")
    qemu_io(img, "write -P 0x21 1M 16k", "write -z 5M 8k")
    return d, bytearray(img.read_bytes()), q1, active_raw(img, d / "a.raw")


def landed(buf: bytearray, reqs: list, cut: int, pick) -> bytearray:
    """The file after a cut following ``cut`` completed requests: writes up to the last completed
    sync are there; each later one is there if ``pick(i)`` says so."""
    synced = max((i for i in range(cut) if is_sync(reqs[i])), default=-1)
    out = bytearray(buf)
    for i, req in enumerate(reqs[:cut]):
        if is_write(req) and (i < synced or pick(i)):
            end = req.offset + len(req.data)
            out.extend(bytes(max(0, end - len(out))))
            out[req.offset:end] = req.data
    return out


def expected(op: str, names: list[str], q1: bytes, active: bytes) -> tuple[list[str], bytes]:
    """The snapshot list and active bytes once ``op`` is done."""
    if op == "create":
        return [*names, "mine"], active
    if op == "delete":
        return [n for n in names if n != "q1"], active
    if op == "apply":
        return names, q1
    return names, active


def judge(path, op: str, states: tuple, q1: bytes) -> bool:
    """Check one cut's file; returns whether the operation happened."""
    r = qemu_img("check", path, check=False)
    assert r.returncode in (0, 3), r.stdout + r.stderr
    names = snapshot_names(path)
    assert names in (states[0][0], states[1][0]), names
    act = active_raw(path, path.with_suffix(".raw"))
    done = names == states[1][0] if states[0][0] != states[1][0] else act == states[1][1]
    assert act == states[done][1], f"active layer is neither old nor new (done={done})"
    if "q1" in names:
        assert snapshot_raw(path, "q1", path.with_suffix(".q1")) == q1
    if "mine" in names:
        assert snapshot_raw(path, "mine", path.with_suffix(".mine")) == states[0][1]
    return done


@pytest.mark.parametrize("op", sorted(OPS))
def test_power_cut_leaves_old_or_new(base, op):
    d, buf, q1, active = base
    gen = plan(buf, op, *OPS[op])
    reqs = requests(gen)
    states = (["q1"], active), expected(op, ["q1"], q1, active)
    rng = random.Random(f"{SEED}-{op}")
    path = d / f"cut-{op}.qcow2"
    outcomes = set()
    for cut in range(len(reqs) + 1):
        for name, pick in (("none", lambda i: False), ("all", lambda i: True),
                           ("random", lambda i: rng.random() < 0.5)):
            path.write_bytes(landed(buf, reqs, cut, pick))
            try:
                outcomes.add(judge(path, op, states, q1))
            except AssertionError as exc:
                raise AssertionError(f"seed {SEED} ({op}, cut after {cut} of {len(reqs)} requests, "
                                     f"unsynced writes: {name}): {exc}") from None
    # unshare changes nothing a reader sees: its new generation shows in the L1 table only.
    assert outcomes == ({True} if op == "unshare" else {False, True})
    done = landed(buf, reqs, len(reqs), lambda i: True)
    l1 = fmt.decode_table(bytes(done[gen.header.l1_table_offset:][:gen.header.l1_size * 8]))
    assert all(e & fmt.L1_COPIED for e in l1 if e & fmt.OFFSET_MASK)
