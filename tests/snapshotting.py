"""What the snapshot tests share: a snapshot generation (qcow2/generation.py) run over an image
file's bytes or over a live engine (tests/memimage.py), and qemu-img's view of the result."""

from __future__ import annotations

import json
import time

from cachefs.qcow2 import format as fmt
from cachefs.qcow2 import generation
from cachefs.qcow2.plan import SyncRequest, WriteRequest, run_sync
from conftest import qemu_img

OPS = {"create": generation.create_snapshot, "delete": generation.delete_snapshot,
       "apply": generation.apply_snapshot, "unshare": generation.unshare}


class BufIO:
    """plan.run_sync's io over a bytearray that grows as written."""

    def __init__(self, buf: bytearray):
        self.buf = buf

    def pwrite(self, off: int, data) -> None:
        if len(self.buf) < off + len(data):
            self.buf.extend(bytes(off + len(data) - len(self.buf)))
        self.buf[off:off + len(data)] = data

    def sync(self) -> None:
        pass


def reader(buf: bytearray):
    return lambda off, n: bytes(buf[off:off + n])


def plan(buf: bytearray, op: str, *args, alloc_from: int = 0, hdr: fmt.Header | None = None):
    """The Generation of ``op`` on the image in ``buf`` (None: unshare found nothing shared)."""
    if hdr is None:
        hdr = run_sync(fmt.read_header(len(buf)), reader(buf))
    if op == "create":
        args = (*args, time.time_ns())
    return run_sync(OPS[op](hdr, len(buf), alloc_from, *args), reader(buf))


def run_op(buf: bytearray, op: str, *args):
    """``op`` planned and written over ``buf``; returns the Generation."""
    gen = plan(buf, op, *args)
    if gen is not None:
        run_sync(generation.write_generation(gen), reader(buf), BufIO(buf))
    return gen


def live_op(mem, op: str, *args):
    """``op`` on a live MemImage: made durable first, then written and adopted by its engine."""
    mem.flush()
    eng = mem.engine
    gen = plan(mem.buf, op, *args, alloc_from=eng.alloc_from, hdr=eng.current_header())
    if gen is not None:
        run_sync(generation.write_generation(gen), reader(mem.buf), BufIO(mem.buf))
        eng.switch_generation(gen)
    return gen


def requests(gen) -> list:
    """write_generation's requests, in order."""
    out, g = [], generation.write_generation(gen)
    try:
        req = next(g)
        while True:
            out.append(req)
            req = g.send(None)
    except StopIteration:
        return out


def is_write(req) -> bool:
    return type(req) is WriteRequest


def is_sync(req) -> bool:
    return type(req) is SyncRequest


def snapshot_names(path) -> list[str]:
    info = json.loads(qemu_img("info", "--output=json", "-U", path).stdout)
    return [s["name"] for s in info.get("snapshots", [])]


def snapshot_raw(path, name: str, out) -> bytes:
    """A snapshot's guest bytes, as qemu-img reads them."""
    qemu_img("convert", "-U", "-l", f"snapshot.name={name}", "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def active_raw(path, out) -> bytes:
    qemu_img("convert", "-U", "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()
