"""The target tables of the side-by-side report: issue 11's (the data plane) and issue 14's (allocating
and write-through writes), and issue 5's for results from before the data plane (no probe, no
data-plane targets).

Every figure is a ratio of medians from the one run the page reports, never across runs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from sidebyside_cells import Cells, fratio, short, table, target_info


@dataclass(frozen=True)
class Goal:
    label: str
    job: str
    ref: str            # the target it is compared with: qsd, host or probe
    want: float         # the ratio to reach (at least)
    image: str = "qcow2"  # the cachefs targets it judges: those serving a qcow2, or a raw image


GOALS = (
    Goal("4k random read, QD32, O_DIRECT", "randread4k-qd32", "qsd", 1.5),
    Goal("4k random overwrite, QD32, O_DIRECT, prefilled image", "overwrite4k-qd32", "qsd", 1.5),
    Goal("4k random read, QD1, O_DIRECT", "randread4k-qd1", "qsd", 1.2),
    Goal("4k random overwrite, QD1, O_DIRECT, prefilled image", "overwrite4k-qd1", "qsd", 1.2),
    Goal("4k random write, QD1, O_DIRECT, fresh image (allocating)", "randwrite4k-qd1", "qsd", 1.2),
    *(Goal(f"{bs} sequential {rw}, O_DIRECT, QD1 (seed 004)", f"seq{bs}-{rw}", "host", 0.9)
      for bs in ("16k", "64k", "256k") for rw in ("read", "write")),
    Goal("raw image: 4k random read, QD32, O_DIRECT", "randread4k-qd32", "probe", 0.8, "raw"),
    Goal("raw image: 4k random overwrite, QD32, O_DIRECT", "overwrite4k-qd32", "probe", 0.8, "raw"),
)
# Issue 14: allocating writes, all against qsd on fresh images (qcow2 targets only: allocation is qcow2's).
GOALS14 = (
    Goal("4k random write, QD32, O_DIRECT, fresh image (allocating)", "randwrite4k-qd32", "qsd", 1.3),
    Goal("4k random write, fdatasync every 16, fresh image, writeback (IOPS)", "alloc-flush16", "qsd", 1.3),
    Goal("4k random write, fdatasync after every write, fresh image, writeback (IOPS)", "alloc-flush1", "qsd", 1.3),
    Goal("4k random write, QD1, fresh image, writethrough", "wt-randwrite4k-qd1", "qsd", 1.0),
    Goal("4k random write, QD32 (32 writers), fresh image, writethrough", "wt-randwrite4k-qd32", "qsd", 1.0),
    Goal("4k random write, QD1, fresh image, directsync", "ds-randwrite4k-qd1", "qsd", 1.0),
    Goal("4k random write, QD32 (32 writers), fresh image, directsync", "ds-randwrite4k-qd32", "qsd", 1.0),
    Goal("1M sequential write, QD4, O_DIRECT, fresh image", "seq1m-write", "qsd", 0.9),
)
# Issue 24: past the /dev/fuse ceiling (passthrough for raw images, the io_uring transport, flushes in C).
GOALS24 = (
    Goal("qcow2: 4k random read, QD32, O_DIRECT", "randread4k-qd32", "probe", 1.15),
    Goal("qcow2: 4k random read, QD1, O_DIRECT", "randread4k-qd1", "probe", 1.15),
    Goal("qcow2: 64k sequential read, QD1, O_DIRECT", "seq64k-read", "host", 0.9),
    *(g for g in GOALS14 if g.job in ("alloc-flush16", "alloc-flush1", "wt-randwrite4k-qd1", "ds-randwrite4k-qd1")),
)
RAW_VS_HOST = 0.9  # issue 24: a raw image's every O_DIRECT job, against the host file
SYNCS_PER_FLUSH = 1.0  # issue 14: at most one fdatasync per guest flush, cachefs's own counters
CPU_LABEL = "daemon CPU per I/O (median over the O_DIRECT jobs both ran)"
PROBE_JOBS = ("randread4k-qd32", "overwrite4k-qd32", "randwrite4k-qd32", "randread4k-qd1", "overwrite4k-qd1",
              "randwrite4k-qd1", "seq1m-read", "seq1m-write")


def is_dataplane_run(res: dict) -> bool:
    info = target_info(res)
    return "probe" in res["targets"] or any(x.get("dataplane") for x in info.values())


def verdict(v: float | None, want: float, at_most: bool = False) -> str:
    """"1.62× ✓ met" or "1.06× ✗ missed by 29%"."""
    if v is None:
        return "—"
    ok = v <= want if at_most else v >= want
    if ok:
        return f"{fratio(v)} ✓ met"
    return f"{fratio(v)} ✗ missed by {abs(v / want - 1) * 100:.0f}%"


def goal_cell(c: Cells, g: Goal, t: str, image: str) -> str:
    if image != g.image:
        return "n/a"
    if g.job not in c.jobs:
        return "not run (job not selected)"
    for who in (t, g.ref):
        if c.status(g.job, who) != "ok":
            return f"— ({who}: {short(c.status(g.job, who))})"
    return verdict(c.ratio(g.job, t, g.ref), g.want)


def syncs_cell(c: Cells, job: str, t: str, image: str) -> str:
    """cachefs's backend fdatasyncs per guest flush over the timed rounds (its own counters), ≤ 1.0."""
    if image != "qcow2":
        return "n/a"
    if job not in c.jobs:
        return "not run (job not selected)"
    if c.status(job, t) != "ok":
        return f"— ({t}: {short(c.status(job, t))})"
    pair = c.own_syncs(job, t)
    if pair is None or not pair[1]:
        return "— (no counters)"
    v = pair[0] / pair[1]
    ok = round(v, 2) <= SYNCS_PER_FLUSH  # judged as shown: the one sync at close is not a miss
    return (f"{v:.2f} ({pair[0]}/{pair[1]}) " +
            ("✓ met" if ok else f"✗ missed by {abs(v / SYNCS_PER_FLUSH - 1) * 100:.0f}%"))


def cpu_cell(c: Cells, t: str, image: str) -> tuple[str, bool | None]:
    """The median over O_DIRECT jobs of (daemon CPU per I/O / qsd's), ≤ 1.0 wanted."""
    if image != "qcow2":
        return "n/a", None
    per_job = [(j, c.cpu_us_per_io(j, t), c.cpu_us_per_io(j, "qsd")) for j, job in c.jobs.items() if job["direct"]]
    ratios = [a / b for _, a, b in per_job if a is not None and b]
    if not ratios:
        return "— (no O_DIRECT job ran on both)", None
    med = statistics.median(ratios)
    spread = (f" (median of {len(ratios)} jobs, {min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1
              else f" ({next(j for j, a, b in per_job if a is not None and b)} only)")
    return verdict(med, 1.0, at_most=True) + spread, med <= 1.0


def dataplane_section(res: dict, c: Cells) -> list[str]:
    """Issue 11's target table: each goal, per cachefs target, measured ratio and met or missed."""
    info = target_info(res)
    cols = [t for t in c.targets if info[t]["kind"] == "cachefs"]
    if not cols:
        return []
    rows, met, judged = [], {t: 0 for t in cols}, {t: 0 for t in cols}
    for g in GOALS:
        cells = [goal_cell(c, g, t, info[t]["image"]) for t in cols]
        for t, cell in zip(cols, cells):
            judged[t] += "✓" in cell or "✗" in cell
            met[t] += "✓" in cell
        rows.append([g.label, f"≥ {g.want:.1f}× {g.ref}", *cells])
    cpu = [cpu_cell(c, t, info[t]["image"]) for t in cols]
    for t, (_, ok) in zip(cols, cpu):
        judged[t] += ok is not None
        met[t] += bool(ok)
    rows.append([CPU_LABEL, "≤ 1.0× qsd", *[text for text, _ in cpu]])
    tally = "; ".join(f"{t} {met[t]} of {judged[t]}" for t in cols if judged[t])
    return ["## Targets (issue 11: the data plane)", "",
            "Ratios of medians (MB/s; for CPU, of µs per I/O) from this run. ✓ met, ✗ missed, and by how much "
            "(the measured ratio's shortfall from the target). qcow2 rows judge the targets serving a qcow2 "
            "image (beside qsd's qcow2 and the host file); raw rows judge those serving a raw image, against "
            "the ceiling probe on the same kind of raw file. n/a: the row is not about that target.", "",
            *table(["job", "target", *cols], rows), "",
            f"Targets met: {tally or 'none judged'}.", "",
            "Where a target is missed, what limits it is profiled by hand (`perf`), not by this page: "
            "see [benchmark-history.md](benchmark-history.md), \"The data plane serves qcow2 (issue 11, "
            "stage 2)\".", "",
            *probe_fraction(c, info)]


class Judged:
    """A target table's rows, and per target how many of its cells were judged and met."""

    def __init__(self, cols: list[str]) -> None:
        self.cols, self.rows = cols, []
        self.met, self.judged = {t: 0 for t in cols}, {t: 0 for t in cols}

    def add(self, label: str, want: str, cells: list[str]) -> None:
        for t, cell in zip(self.cols, cells):
            self.judged[t] += "✓" in cell or "✗" in cell
            self.met[t] += "✓" in cell
        self.rows.append([label, want, *cells])

    def add_goals(self, c: Cells, info: dict, goals, digits: int, syncs_label: str) -> None:
        """A row per goal, and after each flush job its fdatasyncs per flush (``syncs_label`` names
        the job as {job})."""
        for g in goals:
            self.add(g.label, f"≥ {g.want:.{digits}f}× {g.ref}",
                     [goal_cell(c, g, t, info[t]["image"]) for t in self.cols])
            if g.job.startswith("alloc-flush"):
                self.add(syncs_label.format(job=g.job), f"≤ {SYNCS_PER_FLUSH:.1f}",
                         [syncs_cell(c, g.job, t, info[t]["image"]) for t in self.cols])

    def tally(self) -> str:
        return "; ".join(f"{t} {self.met[t]} of {self.judged[t]}" for t in self.cols if self.judged[t])


def issue14_section(res: dict, c: Cells) -> list[str]:
    """Issue 14's target table: allocating and write-through writes vs qsd, per cachefs qcow2 target,
    with cachefs's fdatasyncs per flush beside the flush jobs."""
    info = target_info(res)
    cols = [t for t in c.targets if info[t]["kind"] == "cachefs" and info[t]["image"] == "qcow2"]
    if not cols:
        return []
    judged = Judged(cols)
    judged.add_goals(c, info, GOALS14, 1, "… its fdatasyncs per guest flush (cachefs's own counters, `{job}`)")
    rows, tally = judged.rows, judged.tally()
    return ["## Targets (issue 14: allocating writes, write-through modes)", "",
            "Ratios of medians (MB/s, the same ratio as IOPS) from this run, fresh images, each cachefs qcow2 "
            "target against qsd. The writethrough and directsync rows compare with qsd's writethrough: its "
            "export opened O_DSYNC by fio (`--sync=dsync`), with the mode's `cache.direct`; cachefs gets the "
            "plain job and `--cache MODE`. Their writes are synchronous (`psync`; QD32 is 32 writers): "
            "the kernel follows an O_DSYNC write to a FUSE file with a FUSE_FSYNC only when the write "
            "completes in its call, never an O_DIRECT one from libaio. fdatasyncs per flush: cachefs's "
            "`stats.backend_fdatasyncs` / `stats.guest_flushes` over the timed rounds (the flush at close "
            "included), judged at the two decimals shown. ✓ met, ✗ missed, and by how much; not run: the "
            "job was not in this run's JOBS.", "",
            *table(["job", "target", *cols], rows), "",
            f"Targets met: {tally or 'none judged'}.", ""]


def issue24_section(res: dict, c: Cells) -> list[str]:
    """Issue 24's targets: qcow2 past the probe, raw images at the host's speed (kernel passthrough),
    the flush and write-through jobs against qsd; qsd 11 beside qsd 7.2 where it ran."""
    info = target_info(res)
    cols = [t for t in c.targets if info[t]["kind"] == "cachefs" and info[t]["dataplane"] == "on"]
    if not cols:
        return []
    judged = Judged(cols)
    judged.add_goals(c, info, GOALS24, 2, "… its fdatasyncs per guest flush (`{job}`)")
    for j, job in c.jobs.items():
        if job["direct"] and c.status(j, "host") == "ok":
            g = Goal(f"raw image: `{j}`", j, "host", RAW_VS_HOST, "raw")
            judged.add(g.label, f"≥ {RAW_VS_HOST:.1f}× host", [goal_cell(c, g, t, info[t]["image"]) for t in cols])
    rows, tally = judged.rows, judged.tally()
    return ["## Targets (issue 24: past the /dev/fuse ceiling)", "",
            "Ratios of medians from this run. qcow2 rows judge the cachefs targets serving a qcow2 image; "
            "the raw rows judge those serving a raw image (kernel passthrough, on by default) against the "
            "host file, one row per O_DIRECT job that ran on the host.", "",
            *table(["job", "target", *cols], rows), "",
            f"Targets met: {tally or 'none judged'}.", "", *qsd11_rows(c)]


def qsd11_rows(c: Cells) -> list[str]:
    """qsd 11.x (multi-threaded export) beside qsd 7.2, per job both ran: the second peer."""
    if "qsd11" not in c.targets:
        return []
    rows = [[f"`{j}`", fratio(c.ratio(j, "qsd11", "qsd"))] for j in c.jobs
            if c.status(j, "qsd11") == "ok" and c.status(j, "qsd") == "ok"]
    return ["### qsd 11 beside qsd 7.2", "", *table(["job", "qsd11 / qsd"], rows), ""] if rows else []


def probe_fraction(c: Cells, info: dict[str, dict]) -> list[str]:
    """Each FUSE server as a fraction of the ceiling probe (the same fio job, O_DIRECT)."""
    if "probe" not in c.targets:
        return []
    cols = [t for t in c.targets if info[t]["kind"] in ("qsd", "cachefs")]
    rows = []
    for j in PROBE_JOBS:
        if j in c.jobs and c.status(j, "probe") == "ok":
            rows.append([f"`{j}`", *[fratio(c.ratio(j, t, "probe")) if c.status(j, t) == "ok" else "—"
                                     for t in cols]])
    if not rows:
        return []
    return ["### The data plane as a fraction of the ceiling probe", "",
            "Median MB/s of each FUSE server over the probe's, same job (the probe serves a raw file; qsd and "
            "the cachefs qcow2 targets a qcow2 image, so their gap includes qcow2's cost). Every O_DIRECT job "
            "is in the plot below the overview.", "",
            *table(["job", *cols], rows), ""]


def issue5_section(c: Cells) -> list[str]:
    """Issue 5's targets (engines vs qsd and host), for results from before the data plane."""
    engines = [t for t in c.targets if t.startswith("cachefs-")]
    rows: list[list[str]] = []

    def ratio_row(label: str, goal: str, job: str, ref: str, ok) -> None:
        if job not in c.jobs:
            return
        cells = []
        for e in engines:
            v = c.ratio(job, e, ref)
            cells.append(fratio(v) + (" ✓" if v is not None and ok(v) else " ✗" if v is not None else
                                      f" ({short(c.status(job, e))})" if c.status(job, e) != "ok" else ""))
        rows.append([label, goal, *cells])

    ratio_row("4k random read, QD32, O_DIRECT, vs qsd", "≥ 1.0×", "randread4k-qd32", "qsd", lambda v: v >= 1.0)
    ratio_row("4k random write, QD32, O_DIRECT, vs qsd", "≥ 1.0×", "randwrite4k-qd32", "qsd", lambda v: v >= 1.0)
    for bs in ("64k", "256k"):
        for rw in ("read", "write"):
            ratio_row(f"{bs} sequential {rw}, O_DIRECT, vs host", "≥ 0.90×", f"seq{bs}-{rw}", "host",
                      lambda v: v >= 0.9)
    rows += engine_cpu_rows(c, engines)
    if not rows:
        return []
    return ["## Targets (issue 5)", "",
            "Ratios of medians (MB/s). ✓ the target is met, ✗ it is not.", "",
            *table(["target", "goal", *engines], rows), ""]


def engine_cpu_rows(c: Cells, engines: list[str]) -> list[list[str]]:
    rows = []
    for e in engines:
        if e == "cachefs-threads" or "cachefs-threads" not in engines:
            continue
        per_job = [(j, c.cpu_us_per_io(j, e), c.cpu_us_per_io(j, "cachefs-threads"))
                   for j, job in c.jobs.items() if job["direct"]]
        ratios = [a / b for _, a, b in per_job if a is not None and b]
        label = f"{e.split('-', 1)[1]} engine: daemon CPU per I/O vs threads (O_DIRECT jobs)"
        if ratios:
            med = statistics.median(ratios)
            val = f"{fratio(med)} {'✓' if med < 1 else '✗'}" + (
                f" (median of {len(ratios)} jobs, {min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1
                else f" ({next(j for j, a, b in per_job if a is not None and b)} only)")
        else:
            val = "— (no O_DIRECT job ran on both)"
        rows.append([label, "< 1.0×", *[val if t == e else "" for t in engines]])
    return rows


def targets_section(res: dict, c: Cells) -> list[str]:
    if is_dataplane_run(res):
        return dataplane_section(res, c) + issue14_section(res, c) + issue24_section(res, c)
    return issue5_section(c) + issue14_section(res, c)
