"""The machinery of tests/test_dataplane_differential.py: the same steps through the real C (cffi,
no mount) and through tests/simplane.py's model, states compared after each, random sequences
and their shrinking to the shortest one that still disagrees.

A step is an :class:`Op` (a name and plain arguments), so a sequence prints and replays as is.
"""

from __future__ import annotations

import collections
import random
import types

import attrs
import trio

from cachefs import native
from simplane import INO, PublishedPlane, Served

#: The handles every image gets: fh -> (descriptor, O_DSYNC, twin without O_DSYNC or -1). Fake
#: descriptor numbers: nothing is ever read or written through them.
HANDLES = {1: (100, 0, -1),      # writeback, none, unsafe
           2: (200, 1, 201),     # writethrough or directsync, with its twin (it may allocate)
           3: (300, 1, -1)}      # write-through without a twin (it may not)


@attrs.frozen
class Op:
    name: str
    args: tuple = ()

    def __str__(self) -> str:
        args = [a if not isinstance(a, tuple) or len(a) <= 6 else f"({len(a)} items: {a[:3]}...)" for a in self.args]
        return f"{self.name}{tuple(args)}"


@attrs.frozen
class Layout:
    """One sequence's image: its cluster size, its size in clusters, and the guest clusters the
    steps touch (ranges), everything else staying unpublished."""
    cluster_bits: int
    nclusters: int
    windows: tuple[tuple[int, int], ...]

    @property
    def cs(self) -> int:
        return 1 << self.cluster_bits

    def clusters(self) -> list[int]:
        return [c for a, b in self.windows for c in range(a, b)]


@attrs.frozen
class State:
    entries: tuple[int, ...]        # over Layout.clusters()
    spares: tuple[int, ...]         # in the order C takes them
    log: tuple[tuple[int, int], ...]
    claims: tuple[tuple[int, int, int], ...]  # (id, first, end)
    overflow: int
    status: tuple[int, int]
    on: bool
    low_water: int


class Disagreement(AssertionError):
    def __init__(self, what: str, c, sim):
        super().__init__(f"{what}: C {c!r}, simulation {sim!r}")
        self.what = what


def write_data(length: int, zeros: tuple[tuple[int, int], ...]) -> bytes:
    """``length`` bytes of 1, but zeros in the ranges ``zeros`` (relative to the start)."""
    data = bytearray(b"\1" * length)
    for a, b in zeros:
        data[a:b] = bytes(b - a)
    return bytes(data)


# ---------------------------------------------------------------- the two sides

class CSide:
    """The real C: one image of a DataPlane (created without /dev/fuse), its handles published."""

    def __init__(self, plane, layout: Layout):
        ffi, lib = native.ffi, native.lib
        self.plane, self.dp, self.layout = plane, plane._dp, layout
        lib.dp_image_remove(self.dp, INO)  # the previous sequence's, if any
        plane.publish_image(INO, size=layout.nclusters * layout.cs, cluster_size=layout.cs, identity=False)
        for fh, (fd, sync, twin) in HANDLES.items():
            plane.publish_handle(fh, INO, fd, direct=False, fast_write=True, sync=bool(sync), batch_fd=twin)
        lib.dp_alloc_woken(self.dp)  # a wake left over from the previous sequence
        self._plan = ffi.new("struct dp_test_plan *")
        self._alloc = ffi.new("struct dp_test_alloc *")
        self._spares = ffi.new("uint64_t[]", lib.DP_SPARE)
        self._entries = ffi.new("uint64_t[]", max(b - a for a, b in layout.windows))

    def call(self, name: str, *args):
        return getattr(self.plane, name)(INO, *args)

    def write(self, fh: int, off: int, data: bytes) -> Served:
        ffi, lib = native.ffi, native.lib
        buf = ffi.new("char[]", data)
        p = self._plan
        assert lib.dp_test_plan(self.dp, fh, 1, off, len(data), buf, p) in (0, 1)
        if not p.fast:
            return Served("forwarded")
        cb, hosts = self.layout.cluster_bits, []
        for i in range(p.npieces):  # one host per guest cluster the piece covers
            pos, end = off + p.piece_buf[i], off + p.piece_buf[i] + p.piece_len[i]
            while pos < end:
                hosts.append(p.piece_host[i] + (pos - off - p.piece_buf[i]) - (pos & ((1 << cb) - 1)))
                pos = ((pos >> cb) + 1) << cb
        return Served("allocated" if p.nalloc else "in place", tuple(hosts), tuple(p.alloc_cl[0:p.nalloc]),
                      "twin" if p.fd == HANDLES[fh][2] else "fd", bool(p.defer))

    def woken(self) -> bool:
        return bool(native.lib.dp_alloc_woken(self.dp))

    def state(self) -> State:
        lib, a = native.lib, self._alloc
        entries = []
        for first, end in self.layout.windows:
            assert lib.dp_test_entries(self.dp, INO, first, end - first, self._entries) == 0
            entries += list(self._entries[0:end - first])
        n = lib.dp_test_alloc_state(self.dp, INO, a, self._spares)
        assert n >= 0
        ends = native.ffi.unpack(a.claim_end, lib.DP_NCLAIM)
        firsts = native.ffi.unpack(a.claim_first, lib.DP_NCLAIM) if any(ends) else ()
        claims = tuple((i, first, end) for i, (first, end) in enumerate(zip(firsts, ends)) if end)
        return State(tuple(entries), tuple(self._spares[0:n]), tuple(self.plane.alloc_peek_log(INO)), claims,
                     a.overflow, self.plane.alloc_status(INO), bool(a.on), a.low_water)


class _Engine:
    def __init__(self, cs: int):
        self.cs = cs
        self.cache = types.SimpleNamespace(listeners=[])

    def on_mapping_change(self, callback) -> None:
        pass  # PublishedPlane hears of changes through map_clusters


class SimSide:
    """The model: a PublishedPlane with no image behind it (only its plane calls and its plan)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        img = types.SimpleNamespace(engine=_Engine(layout.cs), backends=types.SimpleNamespace())
        self.plane = PublishedPlane(img, None, None, random.Random(0))
        self.plane.guest_clusters = layout.nclusters
        self._clusters = layout.clusters()
        self._cluster_set = frozenset(self._clusters)

    def call(self, name: str, *args):
        return getattr(self.plane, name)(INO, *args)

    def write(self, fh: int, off: int, data: bytes) -> Served:
        return self.plane.plan_write(off, data, sync=bool(HANDLES[fh][1]), twin=HANDLES[fh][2] >= 0)

    def woken(self) -> bool:
        woken = self.plane.wake.is_set()
        self.plane.wake = trio.Event()  # as handles' serve_allocations consumes it
        return woken

    def state(self) -> State:
        p = self.plane
        stray = p.entries.keys() - self._cluster_set
        assert not stray, f"the simulation published clusters no step touched: {sorted(stray)[:5]}"
        claims = tuple(sorted((i, a, b) for i, (a, b) in p.claims.items()))
        return State(tuple(p.entries.get(c, 0) for c in self._clusters), tuple(p.spares), tuple(p.log),
                     claims, p.overflow, p.alloc_status(INO), p.on, p.low_water)


# ---------------------------------------------------------------- running a sequence

class Runner:
    """Both sides of one sequence, and the claims held (C's id, the model's id)."""

    def __init__(self, plane, layout: Layout, seen: collections.Counter | None = None):
        self.c, self.sim, self.layout = CSide(plane, layout), SimSide(layout), layout
        self.held: list[tuple[int, int]] = []
        self.seen = collections.Counter() if seen is None else seen  # what the steps exercised

    def both(self, name: str, *args):
        c, sim = _outcome(self.c, name, args), _outcome(self.sim, name, args)
        if c != sim:
            raise Disagreement(f"{name}{args} returned", c, sim)
        return c

    def step(self, op: Op) -> None:
        getattr(self, "op_" + op.name)(*op.args)
        c, sim = self.c.woken(), self.sim.woken()
        if c != sim:
            raise Disagreement("woke Python", c, sim)
        self.seen["wakes"] += c
        c, sim = self.c.state(), self.sim.state()
        self.seen["overflowed claims"] += c.overflow > 0
        self.seen["steps"] += 1
        for field in attrs.fields(State):
            if getattr(c, field.name) != getattr(sim, field.name):
                raise Disagreement(field.name, *_difference(self.layout, field.name, c, sim))

    def op_map(self, first, entries):
        self.seen["publications over logged clusters"] += any(first <= g < first + len(entries)
                                                               for g, _ in self.sim.plane.log)
        self.both("map_clusters", first, list(entries))

    def op_unmap(self, first, count):
        self.both("unmap_clusters", first, count)

    def op_set(self, on, low_water):
        self.seen["stops with clusters logged"] += not on and bool(self.sim.plane.log)
        self.both("alloc_set", on, low_water)

    def op_give(self, hosts):
        self.both("alloc_give", list(hosts))

    def op_take(self):
        self.both("alloc_take_spares")

    def op_adopt(self, n):
        logged = self.both("alloc_peek_log")
        self.both("alloc_drop_log", min(n, len(logged)))

    def op_claim(self, first, count):
        c, sim = self.c.call("alloc_claim", first, count), self.sim.call("alloc_claim", first, count)
        if c != sim:
            raise Disagreement(f"claim({first}, {count}) id", c, sim)
        self.held.append((c, sim))

    def op_unclaim(self, k):
        if self.held:
            c, sim = self.held.pop(k % len(self.held))
            self.c.call("alloc_unclaim", c)
            self.sim.call("alloc_unclaim", sim)

    def op_write(self, fh, off, length, zeros=(), counted=""):
        data = write_data(length, zeros)
        c, sim = self.c.write(fh, off, data), self.sim.write(fh, off, data)
        if c != sim:
            raise Disagreement(f"write(fh {fh}, {off:#x}+{length:#x})", c, sim)
        seen = self.seen
        seen[counted + c.kind] += 1
        seen[counted + "deferred"] += c.defer
        seen[counted + "through the twin"] += c.via == "twin"
        seen[counted + "allocating several clusters"] += len(c.allocated) > 1
        pieces = 1 + sum(b != a + self.layout.cs for a, b in zip(c.hosts, c.hosts[1:]))
        seen[counted + "in DP_MAXPIECE pieces"] += c.kind != "forwarded" and pieces == native.lib.DP_MAXPIECE
        seen[f"{counted}write-through {c.kind}"] += HANDLES[fh][1]

    def op_write_many(self, fh, first, count, length):
        """One write of ``length`` bytes at the start of each cluster, C's wake checked after each."""
        for vcl in range(first, first + count):
            self.op_write(fh, vcl * self.layout.cs, length, counted="bulk ")
            c, sim = self.c.woken(), self.sim.woken()
            if c != sim:
                raise Disagreement(f"woke Python after the write to cluster {vcl}", c, sim)
            self.seen["wakes"] += c


def _outcome(side, name: str, args):
    """What a plane call returned, or the errno it failed with."""
    try:
        return side.call(name, *args)
    except OSError as exc:
        return f"errno {exc.errno}"


def _difference(layout: Layout, field: str, c: State, sim: State):
    """The first differing item of a long field, so the message stays short."""
    a, b = getattr(c, field), getattr(sim, field)
    if field == "entries":
        clusters = layout.clusters()
        diff = [(clusters[i], hex(x), hex(y)) for i, (x, y) in enumerate(zip(a, b)) if x != y]
        return f"cluster {diff[0][0]}: {diff[0][1]}", diff[0][2]
    if isinstance(a, tuple) and len(a) > 8:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"{len(a)} items, [{i}] = {a[i] if i < len(a) else None}", \
            f"{len(b)} items, [{i}] = {b[i] if i < len(b) else None}"
    return a, b


def run(plane, layout: Layout, ops: list[Op], seen=None) -> tuple[int, Disagreement] | None:
    """Run a sequence; (the index of the step that disagreed, the disagreement), or None."""
    r = Runner(plane, layout, seen)
    for i, op in enumerate(ops):
        try:
            r.step(op)
        except Disagreement as d:
            return i, d
    return None


def shrink(plane, layout: Layout, ops: list[Op], what: str) -> list[Op]:
    """The shortest sub-sequence found (steps removed, not changed) that still disagrees on ``what``."""
    def fails(candidate):
        got = run(plane, layout, candidate)
        return got is not None and got[1].what == what

    chunk = max(1, len(ops) // 2)
    while chunk >= 1:
        i, removed = 0, False
        while i < len(ops):
            candidate = ops[:i] + ops[i + chunk:]
            if candidate and fails(candidate):
                ops, removed = candidate, True
            else:
                i += chunk
        if not removed:
            chunk //= 2
    return ops


# ---------------------------------------------------------------- random sequences

#: Each sequence has a profile: its layout, its length and how often each step comes.
PROFILES = {  # name: (share of sequences, steps, weights of map unmap set give take adopt claim unclaim write)
    "small": (0.80, 40, (14, 4, 3, 8, 2, 6, 5, 5, 40)),
    "chunks": (0.12, 40, (14, 4, 3, 8, 2, 6, 5, 5, 40)),   # straddles C's 4096-cluster chunks
    "claims": (0.04, 300, (4, 1, 1, 4, 0, 2, 50, 4, 20)),  # more than DP_NCLAIM claims at once
    "ring": (0.04, 30, (6, 1, 1, 25, 10, 6, 2, 2, 30)),    # the lent clusters' ring wraps around
    "log": (0.004, 12, (4, 1, 1, 4, 1, 4, 2, 2, 20)),      # the log fills up (DP_ALOG)
}
STEPS = ("map", "unmap", "set", "give", "take", "adopt", "claim", "unclaim", "write")


class Generator:
    """Random steps for one layout; blind to the state (the runner clips what must be clipped)."""

    def __init__(self, rng: random.Random, layout: Layout, profile: str):
        self.rng, self.layout, self.profile = rng, layout, profile
        self.next_host = 1 << 20  # lent hosts: fresh ones, as Python lends (host cluster numbers)

    def sequence(self) -> list[Op]:
        _share, steps, weights = PROFILES[self.profile]
        names = self.rng.choices(STEPS, weights, k=steps)
        return self.opening() + self.fill_log() + [getattr(self, name)() for name in names]

    def fill_log(self) -> list[Op]:
        """The "log" profile: allocate until the log is full, adopting some on the way."""
        if self.profile != "log":
            return []
        rng, half, full = self.rng, native.lib.DP_ALOG // 2, native.lib.DP_ALOG
        a = half + rng.randint(-3, 3)
        b = full + rng.randint(-3, 40)
        return [Op("write_many", (1, 0, a, 512)), Op("adopt", (rng.choice([0, 0, 5, 3000]),)),
                Op("write_many", (rng.choice([1, 2]), a, b - a, 512)), self.write()]

    def opening(self) -> list[Op]:
        """Most sequences start as an image does: allocation allowed, clusters lent, tables published."""
        if self.profile != "log" and self.rng.random() < 0.2:
            return []
        zeros = native.lib.DP_MAP_ZERO | native.lib.DP_MAP_ALLOC  # unallocated: what the log profile fills
        entry = (lambda: zeros) if self.profile == "log" else self._entry
        return [Op("set", (True, self.rng.choice([0, 2, 4, 8]))), self.give(),
                *[Op("map", (a, tuple(entry() for _ in range(a, b)))) for a, b in self.layout.windows]]

    def _range(self, longest: int = 16) -> tuple[int, int]:
        a, b = self.rng.choice(self.layout.windows)
        if self.rng.random() < 0.2:
            return a, b - a
        first = self.rng.randrange(a, b)
        return first, self.rng.randint(1, min(longest, b - first))

    def _entry(self) -> int:
        """What Python publishes (mapping._state, _hold), and now and then what it never does."""
        lib, rng, cs = native.lib, self.rng, self.layout.cs
        W, R, Z, A, U = (lib.DP_MAP_WRITABLE, lib.DP_MAP_READONLY, lib.DP_MAP_ZERO, lib.DP_MAP_ALLOC,
                         lib.DP_MAP_UNSYNCED)
        host = (4096 + rng.randrange(64)) * cs
        return rng.choices([Z | A, 0, host | W, host | R, Z, host | Z, host | Z | A, host | W | U, host | R | A, A | W],
                           [40, 8, 25, 8, 8, 2, 2, 2, 2, 2])[0]

    def map(self) -> Op:
        first, count = self._range()
        if first + count == self.layout.nclusters and self.rng.random() < 0.05:
            count += self.rng.randint(1, 3)  # past the guest's end: refused, nothing published
        if self.rng.random() < 0.1:  # a run all writable in place, scattered: writes across it need many pieces
            if self.rng.random() < 0.5:
                first, end = self.rng.choice(self.layout.windows)
                count = end - first
            hosts = self.rng.sample(range(4096, 4096 + 4 * count), count)
            return Op("map", (first, tuple(h * self.layout.cs | native.lib.DP_MAP_WRITABLE for h in hosts)))
        return Op("map", (first, tuple(self._entry() for _ in range(count))))

    def unmap(self) -> Op:
        return Op("unmap", self._range())

    def set(self) -> Op:
        return Op("set", (self.rng.random() < 0.8, self.rng.choice([0, 1, 2, 4, 4, 8, 1000])))

    def give(self) -> Op:
        n = (self.rng.choice([100, 1000, 3000, 8192]) if self.profile == "ring" else
             native.lib.DP_ALOG + 200 if self.profile == "log" else self.rng.choice([1, 2, 3, 4, 8, 16, 32]))
        step = 1 if self.rng.random() < 0.7 else 2  # lent clusters are not always adjacent
        hosts = tuple(range(self.next_host, self.next_host + step * n, step))
        self.next_host += step * n
        return Op("give", (tuple(h * self.layout.cs for h in hosts),))

    def take(self) -> Op:
        return Op("take")

    def adopt(self) -> Op:
        return Op("adopt", (self.rng.choice([0, 1, 2, 3, 10000]),))

    def claim(self) -> Op:
        first, count = self._range(4)
        return Op("claim", (first, 0 if self.rng.random() < 0.1 else count))

    def unclaim(self) -> Op:
        return Op("unclaim", (self.rng.randrange(1000),))

    def write(self) -> Op:
        rng, cs = self.rng, self.layout.cs
        first, end = rng.choice(self.layout.windows)
        vcl = rng.randrange(first, end)
        fh = rng.choices(list(HANDLES), [7, 2, 1])[0]
        if rng.random() < 0.2:  # across clusters: up to 40 of them, and 1 MiB
            span = min(rng.choice([2, 2, 3, 5, 17, 18, 19, 33, 40]), end - vcl, (1 << 20) // cs)
            off = vcl * cs + rng.randrange(cs)
            length = max(1, min(span * cs - (off - vcl * cs) - rng.randrange(cs), 1 << 20))
            a = max(0, (off + rng.randrange(length)) // cs * cs - off)  # a cluster of it zeroed, now and then
            zeros = ((a, min(a + cs, length)),) if rng.random() < 0.2 else ()
            return Op("write", (fh, off, length, zeros))
        if rng.random() < 0.35:  # a whole cluster
            off, length = 0, cs
            zero = rng.random() < 0.35
        else:
            off = rng.randrange(cs // 512) * 512 if rng.random() < 0.8 else rng.randrange(cs)
            length = rng.randint(1, cs - off)
            zero = rng.random() < 0.1
        one = rng.randrange(length)  # one byte that is not zero: the zero check must see it
        return Op("write", (fh, vcl * cs + off, length, ((0, length),) if zero else ((0, one), (one + 1, length))))


def layout_for(rng: random.Random, profile: str) -> Layout:
    cb = rng.choice([9, 12, 12, 16])
    if profile == "chunks":
        return Layout(cb, 4096 + 64, ((0, 16), (4096 - 24, 4096 + 24)))
    if profile == "log":
        return Layout(9, native.lib.DP_ALOG + 64, ((0, native.lib.DP_ALOG + 64),))
    n = rng.randint(8, 48)
    return Layout(cb, n, ((0, n),))


def random_sequence(rng: random.Random, profile: str | None = None) -> tuple[str, Layout, list[Op]]:
    profile = profile or rng.choices(list(PROFILES), [p[0] for p in PROFILES.values()])[0]
    layout = layout_for(rng, profile)
    return profile, layout, Generator(rng, layout, profile).sequence()
