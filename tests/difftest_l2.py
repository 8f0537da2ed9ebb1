"""The differential test at the level of Python's L2 tables: :class:`simplane.SimulatedPlane`
(which tests/test_powercut_fastalloc.py's workloads run against, and which plans C's writes
from Python's own L2 entries) against the real C fed by the production
``mapping.MappingPublisher`` (which turns those L2 entries, tables entering and leaving the
cache and mapping changes into dp_map_clusters and dp_unmap_clusters).

A fake engine holds the L2 tables (a few clusters each) and reports what the real one
reports: a table entering or leaving the cache (both listen), a mapping change before it
takes effect (both subscribe), and adoption of C's log, which changes the entries without a
report (Engine.adopt: ``remap(report=False)``), after loading the table if need be.
"""

from __future__ import annotations

import collections
import random
import types

import attrs
import trio

from cachefs import native
from cachefs.dataplane.mapping import MappingPublisher
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.cluster import Mapping, MappingChange
from difftest import CSide, Disagreement, Layout, Op, write_data
from simplane import INO, Served, SimulatedPlane

PER_TABLE = 8  # guest clusters per L2 table here: several tables, and evictions, in a small image


class FakeTable:
    kind = "l2"
    durable = True

    def __init__(self, l1_index: int, entries: list[int]):
        self.l1_index, self.entries = l1_index, entries


class FakeEngine:
    """What MappingPublisher and SimulatedPlane read of qcow2.engine.Engine, over tables in memory."""

    def __init__(self, layout: Layout, tables: list[FakeTable]):
        self.cs, self.size = layout.cs, layout.nclusters * layout.cs
        self.tables = tables
        self.cached: dict[int, FakeTable] = {}  # l1 index -> table
        self.cache = types.SimpleNamespace(listeners=[], values=lambda: list(self.cached.values()))
        # Every L1 entry points at a table (none is tableless: dp_map_tables is not modelled).
        self.map = types.SimpleNamespace(l2_entries=PER_TABLE, validate=lambda entry, vcluster: None,
                                         l1=[1] * len(tables))
        self.backing = None  # no backing file (Engine.backing: its name)
        self.subscribers = []

    def on_mapping_change(self, callback) -> None:
        self.subscribers.append(callback)

    def load(self, t: int) -> None:
        if t not in self.cached:
            self.cached[t] = self.tables[t]
            for listener in self.cache.listeners:
                listener.entered(self.tables[t])

    def evict(self, t: int) -> None:
        if self.cached.pop(t, None) is not None:
            for listener in self.cache.listeners:
                listener.left(self.tables[t])

    def remap(self, vcl: int, entry: int, report: bool = True) -> None:
        """ClusterMap.remap: the change is reported before it takes effect."""
        table, cb = self.tables[vcl // PER_TABLE], self.cs.bit_length() - 1
        old = table.entries[vcl % PER_TABLE]
        if report:
            for callback in self.subscribers:
                callback(MappingChange(vcl, 1, Mapping.of(old, cb), Mapping.of(entry, cb)))
        table.entries[vcl % PER_TABLE] = entry


def _tables(entries: list[int]) -> list[FakeTable]:
    return [FakeTable(t, entries[t * PER_TABLE:(t + 1) * PER_TABLE]) for t in range(len(entries) // PER_TABLE)]


class L2Sim(SimulatedPlane):
    """SimulatedPlane reading the fake engine's cached tables as its _entry."""

    def _entry(self, vcl: int) -> int | None:
        table = self.engine.cached.get(vcl // PER_TABLE)
        return None if table is None else table.entries[vcl % PER_TABLE]


@attrs.frozen
class L2State:
    spares: tuple[int, ...]
    log: tuple[tuple[int, int], ...]
    claims: tuple[tuple[int, int, int], ...]
    overflow: int
    status: tuple[int, int]
    on: bool
    low_water: int


class L2Runner:
    """One sequence: C behind a MappingPublisher, and a SimulatedPlane, over one fake engine each."""

    def __init__(self, plane, layout: Layout, initial: list[int], seen: collections.Counter | None = None):
        self.layout, self.seen = layout, collections.Counter() if seen is None else seen
        self.c = CSide(plane, layout)
        self.c_engine, self.sim_engine = FakeEngine(layout, _tables(initial)), FakeEngine(layout, _tables(initial))
        self.publisher = MappingPublisher(plane, INO, self.c_engine)
        img = types.SimpleNamespace(engine=self.sim_engine, backends=types.SimpleNamespace())
        self.sim = L2Sim(img, None, None, random.Random(0))
        self.held: list[tuple[int, int]] = []

    def both(self, name: str, *args):
        c, sim = self.c.call(name, *args), getattr(self.sim, name)(INO, *args)
        if c != sim:
            raise Disagreement(f"{name}{args} returned", c, sim)
        return c

    def step(self, op: Op) -> None:
        getattr(self, "op_" + op.name)(*op.args)
        c, sim = self.c.woken(), self.sim.wake.is_set()
        self.sim.wake = trio.Event()  # as handles' serve_allocations consumes it
        if c != sim:
            raise Disagreement("woke Python", c, sim)
        cs, s = self.c.state(), self.sim
        c = L2State(cs.spares, cs.log, cs.claims, cs.overflow, cs.status, cs.on, cs.low_water)
        sim = L2State(tuple(s.spares), tuple(s.log), tuple(sorted((i, a, b) for i, (a, b) in s.claims.items())),
                      s.overflow, s.alloc_status(INO), s.on, s.low_water)
        for field in attrs.fields(L2State):
            if getattr(c, field.name) != getattr(sim, field.name):
                raise Disagreement(field.name, getattr(c, field.name), getattr(sim, field.name))
        self.seen["steps"] += 1

    def op_load(self, t):
        self.c_engine.load(t)
        self.sim_engine.load(t)

    def op_evict(self, t):
        self.seen["evictions with clusters logged"] += any(g // PER_TABLE == t for g, _ in self.sim.log)
        self.c_engine.evict(t)
        self.sim_engine.evict(t)

    def op_remap(self, vcl, entry):
        if vcl // PER_TABLE in self.c_engine.cached:  # Python changes only what it has loaded
            self.c_engine.remap(vcl, entry)
            self.sim_engine.remap(vcl, entry)

    def op_adopt(self, n):
        """Engine.adopt: the table loaded if need be, the entry changed without a report, then dropped."""
        logged = self.both("alloc_peek_log")
        for g, h in logged[:n]:
            for engine in (self.c_engine, self.sim_engine):
                engine.load(g // PER_TABLE)
                engine.remap(g, h | fmt.L2_COPIED, report=False)
        self.both("alloc_drop_log", min(n, len(logged)))

    def op_set(self, on, low_water):
        self.both("alloc_set", on, low_water)

    def op_give(self, hosts):
        self.both("alloc_give", list(hosts))

    def op_take(self):
        self.both("alloc_take_spares")

    def op_claim(self, first, count):
        c, sim = self.c.call("alloc_claim", first, count), self.sim.alloc_claim(INO, first, count)
        if c != sim:
            raise Disagreement(f"claim({first}, {count}) id", c, sim)
        self.held.append((c, sim))

    def op_unclaim(self, k):
        if self.held:
            c, sim = self.held.pop(k % len(self.held))
            self.c.call("alloc_unclaim", c)
            self.sim.alloc_unclaim(INO, sim)

    def op_write(self, off, length, zeros):
        """A WRITE inside one cluster through a plain handle (SimulatedPlane knows no other)."""
        data = write_data(length, zeros)
        vcl, s = off // self.layout.cs, self.sim
        c = self.c.write(1, off, data)
        allocated = s.allocated
        host = s._plan(vcl, data)
        sim = (Served("forwarded") if host is None else
               Served("allocated" if s.allocated > allocated else "in place", (host,),
                      (vcl,) if s.allocated > allocated else (), "fd", False))
        if c != sim:
            raise Disagreement(f"write({off:#x}+{length:#x})", c, sim)
        self.seen["L2 " + c.kind] += 1


def l2_entry(rng: random.Random, cs: int) -> int:
    """What Python's engine writes in an L2 entry (and a compressed one, as a converted image has)."""
    host = (4096 + rng.randrange(64)) * cs
    return rng.choices([0, fmt.L2_ZERO, host | fmt.L2_COPIED, host, host | fmt.L2_ZERO | fmt.L2_COPIED,
                        host | fmt.L2_ZERO, fmt.L2_COMPRESSED | host],
                       [25, 10, 35, 10, 8, 4, 8])[0]


def l2_sequence(rng: random.Random, steps: int = 50) -> tuple[Layout, list[int], list[Op]]:
    ntables = rng.randint(2, 5)
    layout = Layout(rng.choice([9, 12, 16]), ntables * PER_TABLE, ((0, ntables * PER_TABLE),))
    initial = [l2_entry(rng, layout.cs) for _ in range(layout.nclusters)]
    ops = [Op("set", (True, rng.choice([0, 2, 4]))),
           Op("give", (tuple((1 << 20) * layout.cs + k * layout.cs for k in range(rng.choice([4, 16, 64]))),)),
           *[Op("load", (t,)) for t in range(ntables) if rng.random() < 0.7]]
    next_host = (1 << 20) + 64
    for name in rng.choices(["load", "evict", "remap", "adopt", "set", "give", "take", "claim", "unclaim", "write"],
                            [6, 6, 8, 6, 2, 5, 1, 4, 4, 40], k=steps):
        if name in ("load", "evict"):
            ops.append(Op(name, (rng.randrange(ntables),)))
        elif name == "remap":
            ops.append(Op(name, (rng.randrange(layout.nclusters), l2_entry(rng, layout.cs))))
        elif name == "adopt":
            ops.append(Op(name, (rng.choice([0, 1, 2, 100]),)))
        elif name == "set":
            ops.append(Op(name, (rng.random() < 0.8, rng.choice([0, 2, 4, 8]))))
        elif name == "give":
            n = rng.choice([1, 2, 4, 8])
            ops.append(Op(name, (tuple(h * layout.cs for h in range(next_host, next_host + n)),)))
            next_host += n
        elif name == "take":
            ops.append(Op(name))
        elif name == "claim":
            first = rng.randrange(layout.nclusters)
            ops.append(Op(name, (first, rng.randint(0, min(4, layout.nclusters - first)))))
        elif name == "unclaim":
            ops.append(Op(name, (rng.randrange(100),)))
        else:
            vcl, cs = rng.randrange(layout.nclusters), layout.cs
            inside = rng.randrange(cs // 512) * 512 if rng.random() < 0.6 else 0
            length = cs - inside if rng.random() < 0.4 else rng.randint(1, cs - inside)
            zero = rng.random() < 0.15
            ops.append(Op(name, (vcl * cs + inside, length, ((0, length),) if zero else ((0, length - 1),))))
    return layout, initial, ops


def run_l2(plane, layout: Layout, initial: list[int], ops: list[Op], seen=None):
    """(index of the step that disagreed, the disagreement), or None."""
    r = L2Runner(plane, layout, initial, seen)
    for i, op in enumerate(ops):
        try:
            r.step(op)
        except Disagreement as d:
            return i, d
    return None
