"""Power-cut helpers shared by the tests: what a cut may leave, and what it must keep.

- :func:`allowed_by_sector`: for each sector a workload wrote, the contents a
  crash state may show (the newest promised write, or anything written later).
- :class:`CrashLog`: one file's history in a recordfs log (tests/recordfs.py),
  and the crash states it allows: everything the widest completed sync covers,
  plus every write logged DURABLE (O_DSYNC), plus a random subset of the other
  records before the cut (whole, or page by page). :func:`choose_cuts` picks
  cut points (around every sync, where promises start, and anywhere).
- :class:`GuestWriter`: a guest on a live mount, several threads writing,
  discarding and flushing, each request timestamped against the recordfs log
  (its position, read after the request returned); :func:`promised` says which
  of its writes a cut must keep.
- :class:`Judge`: one crash state judged: our checker (leaks at most),
  ``qemu-img check`` when asked, and the promised writes, sector by sector.
- :func:`guest_after_cut`: a simulated cut state checked and read as the guest
  sees it; :func:`compressed_qcow2`: a base image whose clusters are all
  compressed (``qemu-img convert -c``).
"""

from __future__ import annotations

import bisect
import os
import random
import subprocess
import threading

import attrs
import trio

from cachefs.errors import CorruptImage
from cachefs.qcow2.check import check_image
from cachefs.qcow2.plan import run_sync
from cachefs.image.sparse import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from memimage import open_memory, read_all
from recordfs import DURABLE, POSITION, SYNC, TRUNCATE, WRITE, Record

SECTOR = 512


def allowed_by_sector(ops, safe: set[int], sectors: int,
                      initial: bytes | None = None) -> dict[int, set[bytes]]:
    """For each written sector: its newest guaranteed content, or anything written later.

    ``ops``: objects with ``kind`` ("write" counts), ``offset`` and ``data``,
    each sector's writes in the order they happened; ``safe``: the indexes of
    the promised ones; ``initial``: the guest view before the workload (zeros
    if None).
    """
    return SectorHistory(ops).allowed(safe, sectors, initial)


class SectorHistory:
    """Each sector's writes, in order: built once, asked for every crash state's promises."""

    def __init__(self, ops) -> None:
        self.history: dict[int, list[tuple[int, bytes]]] = {}
        for i, op in enumerate(ops):
            if op.kind != "write":
                continue
            for k in range(len(op.data) // SECTOR):
                self.history.setdefault(op.offset // SECTOR + k, []).append((i, op.data[k * SECTOR:(k + 1) * SECTOR]))

    @staticmethod
    def _last_safe(writes: list[tuple[int, bytes]], safe: set[int]) -> int | None:
        return next((j for j in range(len(writes) - 1, -1, -1) if writes[j][0] in safe), None)

    def allowed(self, safe: set[int], sectors: int, initial: bytes | None = None) -> dict[int, set[bytes]]:
        out = {}
        for s, writes in self.history.items():
            if s >= sectors:
                continue
            last_safe = self._last_safe(writes, safe)
            before = bytes(SECTOR) if initial is None else initial[s * SECTOR:(s + 1) * SECTOR]
            base = {before} if last_safe is None else set()
            out[s] = base | {v for _, v in writes[last_safe or 0:]}
        return out

    def lost(self, data: bytes, lo: int, safe: set[int]) -> list[int]:
        """The sectors of ``data`` (the guest view from offset ``lo``; zeros before the workload)
        that show none of the contents :meth:`allowed` allows (the same rule, without the sets)."""
        out, zeros = [], bytes(SECTOR)
        for s, writes in self.history.items():
            last_safe = self._last_safe(writes, safe)
            got = data[s * SECTOR - lo:(s + 1) * SECTOR - lo]
            if last_safe is None and got == zeros:
                continue  # nothing promised yet: the old contents may show
            if not any(got == v for _, v in writes[last_safe or 0:]):
                out.append(s)
        return sorted(out)


# ---------------------------------------------------------------- crash states from a recordfs log

@attrs.frozen
class CrashState:
    """Which file a power cut leaves: enough to build it again from the log."""

    cut: int                 # records that happened before the power went
    durable: int             # records before this position are on disk (the widest completed sync)
    kept: tuple[int, ...]    # positions of the uncovered records that reached the disk anyway
    torn: tuple[tuple[int, int, int], ...] = ()  # (position, file offset, length): parts of the others
    omitted: tuple[int, ...] = ()  # sabotage: covered records left out

    def describe(self) -> str:
        kept = ",".join(map(str, self.kept[:40])) + (",..." if len(self.kept) > 40 else "")
        out = f"cut at log position {self.cut}, durable through {self.durable}, kept uncovered [{kept}]"
        if self.torn:
            out += ", and of torn records only " + ",".join(f"{p}@{o:#x}+{n:#x}" for p, o, n in self.torn[:40])
        return out + (f", omitted {list(self.omitted)}" if self.omitted else "")


def apply(buf: bytearray, rec: Record) -> None:
    if rec.kind == WRITE:
        if rec.arg > len(buf):
            buf.extend(bytes(rec.arg - len(buf)))
        buf[rec.arg:rec.arg + len(rec.data)] = rec.data
    elif rec.kind == TRUNCATE:
        if rec.arg < len(buf):
            del buf[rec.arg:]
        else:
            buf.extend(bytes(rec.arg - len(buf)))


def pages(rec: Record, page: int) -> list[Record]:
    """A write record cut at the page boundaries of the file."""
    out, at, end = [], rec.arg, rec.arg + len(rec.data)
    while at < end:
        stop = min(end, (at // page + 1) * page)
        out.append(rec._replace(arg=at, data=rec.data[at - rec.arg:stop - rec.arg]))
        at = stop
    return out


class CrashLog:
    """One file's records in a recordfs log, and the files a power cut can leave of it.

    Positions count every record of the log (all files), as the recordfs
    position xattr does. Cuts asked in ascending order reuse the durable
    prefix built for the previous one, and every state is built in one
    scratch buffer (a fresh 30 MB buffer per state costs more than judging
    it): what :meth:`state` returns is only valid until the next call.
    """

    def __init__(self, records: list[Record], base: bytes, name: str) -> None:
        self.end = len(records)
        self.base = base
        self.records = [r for r in records if r.file == name and r.kind in (WRITE, TRUNCATE, SYNC)]
        self.positions = [r.pos for r in self.records]
        self.syncs = [r for r in self.records if r.kind == SYNC]
        self._buf, self._upto, self._i = bytearray(base), 0, 0
        self._scratch = bytearray()

    def durable_point(self, cut: int) -> int:
        """The widest coverage of the syncs completed before the cut (syncs may overlap)."""
        return max((s.arg for s in self.syncs if s.pos < cut), default=0)

    def _prefix(self, durable: int) -> bytearray:
        if durable < self._upto:
            self._buf, self._upto, self._i = bytearray(self.base), 0, 0
        while self._i < len(self.records) and self.records[self._i].pos < durable:
            apply(self._buf, self.records[self._i])
            self._i += 1
        self._upto = durable
        self._scratch[:] = self._buf  # same length: copied in place, no allocation
        return self._scratch

    def state(self, cut: int, rng: random.Random, *, keep: float = 0.5, tear: int = 0, ignore_syncs: bool = False,
              omit: frozenset[int] = frozenset()) -> tuple[bytearray, CrashState]:
        """The file after a power cut once ``cut`` records happened.

        ``tear``: a page size; an uncovered write over more than one page then
        lands page by page, each page or not (the page cache writes dirty pages
        back one by one, and a device may persist part of a large write).
        ``ignore_syncs`` and ``omit`` are sabotage (the checks must then fail):
        no sync and no O_DSYNC write made anything durable; or records a sync
        covered are left out.
        """
        durable = 0 if ignore_syncs else self.durable_point(cut)
        start = 0 if omit else durable
        buf = bytearray(self.base) if omit else self._prefix(durable)
        kept, torn = [], []
        lo, hi = bisect.bisect_left(self.positions, start), bisect.bisect_left(self.positions, cut)
        for rec in self.records[lo:hi]:
            if rec.kind == SYNC or rec.pos in omit:
                continue
            if rec.pos < durable or (rec.flags & DURABLE and not ignore_syncs):
                apply(buf, rec)
            elif tear and rec.kind == WRITE and rec.arg // tear != (rec.arg + len(rec.data) - 1) // tear:
                for piece in pages(rec, tear):
                    if rng.random() < keep:
                        apply(buf, piece)
                        torn.append((rec.pos, piece.arg, len(piece.data)))
            elif rng.random() < keep:
                apply(buf, rec)
                kept.append(rec.pos)
        return buf, CrashState(cut, durable, tuple(kept), tuple(torn), tuple(sorted(omit)))


def choose_cuts(log: CrashLog, rng: random.Random, n: int, promise_starts=()) -> list[int]:
    """About ``n`` cut points, sorted: half just before or just after a sync completed (before:
    every write since the previous sync is in doubt), a quarter at ``promise_starts`` (the
    first cuts that count a request as acknowledged: the fewest syncs behind a promise), the
    rest anywhere; the end of the log too."""
    syncs = sorted({s.pos for s in log.syncs} | {s.pos + 1 for s in log.syncs})
    starts = sorted(set(promise_starts))
    picked = set(rng.sample(syncs, min(len(syncs), n // 2))) | set(rng.sample(starts, min(len(starts), n // 4)))
    while len(picked) < min(n, log.end + 1) - 1:
        picked.add(rng.randrange(log.end + 1))
    return sorted(picked | {log.end})


# ---------------------------------------------------------------- a guest with timestamped requests

@attrs.define
class GuestOp:
    kind: str          # "write" (a discard is a write of zeros: it reads so) | "flush"
    offset: int = 0
    data: bytes = b""
    covers: int = 0    # flush: how many ops (in completion order) had completed when it started
    done: int = -1     # the log position read after it returned: it completed before that one


def promised(ops: list[GuestOp], cut: int, write_through: bool) -> set[int]:
    """Indexes of the writes a cut after ``cut`` log records must keep: those completed before a
    flush started that completed before the cut; with write-through, every completed write."""
    upto = max((op.covers for op in ops if op.kind == "flush" and 0 <= op.done <= cut), default=0)
    safe = {i for i in range(upto) if ops[i].kind == "write"}
    if write_through:
        safe |= {i for i, op in enumerate(ops) if op.kind == "write" and 0 <= op.done <= cut}
    return safe


def first_promised(ops: list[GuestOp], i: int, write_through: bool) -> int | None:
    """The first cut at which write ``i`` is promised (None: never)."""
    ends = [op.done for op in ops if op.kind == "flush" and op.covers > i and op.done >= 0]
    if write_through and ops[i].done >= 0:
        ends.append(ops[i].done)
    return min(ends, default=None)


class GuestWriter:
    """Threads that write, discard and flush on a served file, each owning its own units.

    A unit is owned by one thread, so each sector's writes happen in that
    thread's order, which is their order in ``ops`` (appended on completion
    under a lock). The first half of the region is 4 KiB blocks dealt round
    robin (every thread allocates in every cluster), the second half whole
    clusters (discards there free whole clusters). After each request the
    thread reads the recordfs position (``lower``'s root xattr).
    """

    FLUSH, DISCARD, ZEROS = 0.12, 0.27, 0.31  # cumulative shares; the rest writes random data

    def __init__(self, served, lower, region: tuple[int, int], *, threads: int, ops_each: int,
                 seed, cluster: int = 65536) -> None:
        self.served, self.lower, self.region, self.cluster = served, lower, region, cluster
        self.threads, self.ops_each, self.seed = threads, ops_each, seed
        self.ops: list[GuestOp] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def units(self, k: int) -> list[tuple[int, int]]:
        lo, hi = self.region
        half = lo + (hi - lo) // 2
        blocks = [(off, 4096) for n, off in enumerate(range(lo, half, 4096)) if n % self.threads == k]
        clusters = [(off, self.cluster) for n, off in enumerate(range(half, hi, self.cluster)) if n % self.threads == k]
        return blocks + clusters

    def run(self) -> list[GuestOp]:
        threads = [threading.Thread(target=self._worker, args=(k,)) for k in range(self.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.errors:
            raise self.errors[0]
        return self.ops

    def position(self) -> int:
        return int(os.getxattr(self.lower, POSITION))

    def _worker(self, k: int) -> None:
        rng = random.Random(f"{self.seed}-{k}")
        units = self.units(k)
        fd = os.open(self.served, os.O_RDWR)
        try:
            for _ in range(self.ops_each):
                self._one(fd, rng, units)
        except BaseException as exc:  # reported by run(), in the test's thread
            self.errors.append(exc)
        finally:
            os.close(fd)

    def _one(self, fd: int, rng: random.Random, units) -> None:
        roll = rng.random()
        if roll < self.FLUSH:
            with self._lock:
                covers = len(self.ops)
            os.fdatasync(fd)
            op = GuestOp("flush", covers=covers)
        else:
            base, size = rng.choice(units)
            whole = size == self.cluster and rng.random() < 0.5
            sectors = size // SECTOR if whole else rng.choice([1, 2, 3, 8, 8, 16, 24])
            sectors = min(sectors, size // SECTOR)
            off = base + rng.randrange(size // SECTOR - sectors + 1) * SECTOR
            n = sectors * SECTOR
            if roll < self.DISCARD:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
                data = bytes(n)
            else:
                data = bytes(n) if roll < self.ZEROS else rng.randbytes(n)
                os.pwrite(fd, data, off)
            op = GuestOp("write", off, data)
        with self._lock:
            self.ops.append(op)
        op.done = self.position()


# ---------------------------------------------------------------- judging one crash state

@attrs.define
class Verdict:
    corruptions: list = attrs.Factory(list)
    qemu: str = ""                                  # qemu-img check's complaint, if asked and not 0/3
    lost: list[int] = attrs.Factory(list)           # sectors that lost a promised write
    promised: int = 0                               # promised writes this state had to keep

    def failures(self) -> str:
        out = []
        if self.corruptions:
            out.append(f"corruption: {self.corruptions[:3]}")
        if self.qemu:
            out.append(self.qemu)
        if self.lost:
            out.append(f"{len(self.lost)} sectors lost a promised write, first at guest offsets "
                       + ", ".join(f"{s * SECTOR:#x}" for s in self.lost[:8]))
        return "; ".join(out)


async def _guest_read(buf: bytearray, offset: int, length: int) -> bytes:
    img = await open_memory(buf, writable=False)
    return bytes(await img.read(offset, length))


class Judge:
    """Judges the crash states of one workload: ``ops`` (the guest's, all inside ``region``)."""

    def __init__(self, ops: list[GuestOp], write_through: bool, region: tuple[int, int]) -> None:
        self.ops, self.write_through, self.region = ops, write_through, region
        self.history = SectorHistory(ops)

    def promise_starts(self) -> list[int]:
        """The log positions from which on a request's acknowledgement counts (see :func:`promised`)."""
        kinds = ("flush", "write") if self.write_through else ("flush",)
        return [op.done for op in self.ops if op.kind in kinds and op.done >= 0]

    def __call__(self, buf: bytearray, cut: int, qemu_file=None) -> Verdict:
        """Our checker (leaks allowed, corruption never), qemu-img check when given a scratch file,
        and every write promised by the cut, sector by sector."""
        v = Verdict()
        try:
            result = run_sync(check_image(len(buf)), lambda o, n: bytes(buf[o:o + n]))
        except CorruptImage as exc:  # a header naming tables past the end: not even checkable
            v.corruptions = [f"the image does not open: {exc}"]
            return v
        if result.corruptions:
            v.corruptions = list(result.corruptions)
            return v
        if qemu_file is not None:
            v.qemu = qemu_check(buf, qemu_file)
        lo, hi = self.region
        v.promised, v.lost = self.lost(trio.run(_guest_read, buf, lo, hi - lo), cut)
        return v

    def lost(self, data: bytes, cut: int) -> tuple[int, list[int]]:
        """(the writes promised at ``cut``, the sectors of ``data`` that lost one); ``data`` is the
        guest view of the region, read by our engine or through a mount."""
        safe = promised(self.ops, cut, self.write_through)
        return len(safe), self.history.lost(data, self.region[0], safe)


def qemu_check(buf: bytearray, path) -> str:
    """qemu-img check of ``buf`` (written to ``path``, removed after): "" for exit 0 or 3 (leaks)."""
    with open(path, "wb") as f:
        f.write(buf)
    try:
        r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    finally:
        os.unlink(path)
    return "" if r.returncode in (0, 3) else f"qemu-img check exit {r.returncode}: {(r.stdout + r.stderr)[-600:]}"


# ---------------------------------------------------------------- images and guest views of cut states

async def guest_after_cut(state: bytearray) -> tuple[bytes, object]:
    """The guest's view of a cut state, and our checker's result on it (no corruption: asserted)."""
    reader = lambda off, n: bytes(state[off:off + n])  # noqa: E731
    result = run_sync(check_image(len(state)), reader)
    assert not result.corruptions, result.corruptions[:5]
    return await read_all(state), result


def compressed_qcow2(tmp_path, size: int, cluster_bits: int) -> bytes:
    """An image from ``qemu-img convert -c``: every allocated cluster is compressed old data."""
    raw, img = tmp_path / "src.raw", tmp_path / "base.qcow2"
    rng = random.Random(99)
    with open(raw, "wb") as f:
        for off in range(0, size, 1 << 16):
            f.write(bytes([rng.randrange(1, 255)]) * 2048 + rng.randbytes(1024) + bytes((1 << 16) - 3072))
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={1 << cluster_bits}",
                    str(raw), str(img)], check=True)
    return img.read_bytes()
