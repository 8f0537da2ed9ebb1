#!/usr/bin/env python3
"""The report of bench/sidebyside.py: results JSON -> docs/benchmarks.md and docs/bench-*.png.

  sidebyside_report.py RESULTS.json [DOCS_DIR]    (the same as sidebyside.py --report-only)

Every cell is the median over the rounds of the runs that succeeded. Ratios compare
medians of MB/s (for one job, MB/s and IOPS give the same ratio). The plots need
matplotlib (the `bench` extra); without it the report says so and has no plots.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HISTORY = "benchmark-history.md"
PLOTS = {"host": "bench-vs-host.png", "qsd": "bench-vs-qsd.png"}
GROUPS = {
    "throughput": "Throughput, O_DIRECT (cachefs `--cache none`; qsd `cache.direct=on,aio=native`)",
    "seed004": "Seed 004: O_DIRECT sequential at 16k, 64k, 256k, QD1 (iozone -I's table)",
    "flush": "Allocating writes with flushes (issue 4), writeback",
    "cache-mode": "Cache modes (seed 001): one flush-heavy job per mode",
    "memory": "Bounded memory: 4k random writes over the whole image",
}
SMOKE = {"RUNTIME": 8, "ROUNDS": 2}  # below either of these, the numbers are a smoke run


# ------------------------------------------------------------------ the numbers


class Cells:
    """Medians per (job, target) over the timed rounds, and the count pass."""

    def __init__(self, results: dict) -> None:
        self.r = results
        self.jobs = {j["name"]: j for j in results["jobs"]}
        self.targets = results["targets"]
        self.timed: dict[tuple[str, str], list[dict]] = {}
        self.counted: dict[tuple[str, str], list[dict]] = {}
        for run in results["runs"]:
            d = self.counted if run["round"] == "C" else self.timed
            d.setdefault((run["job"], run["target"]), []).append(run)

    def ok(self, job: str, target: str) -> list[dict]:
        return [x for x in self.timed.get((job, target), []) if x["status"] == "ok"]

    def median(self, job: str, target: str, key: str) -> float | None:
        vals = [x[key] for x in self.ok(job, target) if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    def spread(self, job: str, target: str, key: str) -> tuple[float, float] | None:
        vals = [x[key] for x in self.ok(job, target) if x.get(key) is not None]
        return (min(vals), max(vals)) if len(vals) > 1 else None

    def status(self, job: str, target: str) -> str:
        """"ok", or why there is no number (the first failure or skip)."""
        runs = self.timed.get((job, target), [])
        if not runs:
            return "not run"
        if any(x["status"] == "ok" for x in runs):
            return "ok"
        return runs[0]["status"]

    def ratio(self, job: str, target: str, ref: str, key: str = "mbps") -> float | None:
        a, b = self.median(job, target, key), self.median(job, ref, key)
        return a / b if a is not None and b else None

    def cpu_us_per_io(self, job: str, target: str) -> float | None:
        vals = [x["cpu_s"] / x["ios"] * 1e6 for x in self.ok(job, target) if x.get("cpu_s") is not None and x["ios"]]
        return statistics.median(vals) if vals else None

    def own_syncs(self, job: str, target: str) -> tuple[int, int] | None:
        """cachefs's own counters over the timed rounds: (backend fdatasyncs, guest flushes)."""
        runs = [x for x in self.ok(job, target) if x.get("backend_fdatasyncs") is not None]
        if not runs:
            return None
        return sum(x["backend_fdatasyncs"] for x in runs), sum(x["guest_flushes"] for x in runs)

    def strace_syncs(self, job: str, target: str) -> tuple[int, int] | None:
        runs = [x for x in self.counted.get((job, target), [])
                if x["status"] == "ok" and x.get("strace_syncs") is not None]
        if not runs:
            return None
        return sum(x["strace_syncs"] for x in runs), sum(x["guest_flushes"] for x in runs)

    def checks(self, target: str) -> list[str]:
        return sorted({f"{x['job']} r{x['round']}: {x['check']}" for x in self.r["runs"]
                       if x["target"] == target and x["check"] not in ("-", "clean")})


# ------------------------------------------------------------------ formatting


def fnum(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "—"
    if digits == 0 and abs(v) >= 10000:
        return f"{v:,.0f}".replace(",", " ")
    return f"{v:.{digits}f}"


def fratio(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}×" if v < 10 else f"{v:.1f}×"


def fmib(v: float | None, scale: float) -> str:
    return "—" if v is None else f"{v / scale:.1f}"


def fsyncs(pair: tuple[int, int] | None) -> str:
    if pair is None:
        return "—"
    s, f = pair
    return f"{s / f:.2f} ({s}/{f})" if f else f"— ({s}/0)"


def short(status: str) -> str:
    return status if len(status) < 90 else status[:87] + "…"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows)]


def is_smoke(meta: dict) -> bool:
    s = meta["settings"]
    return s["RUNTIME"] < SMOKE["RUNTIME"] or s["ROUNDS"] < SMOKE["ROUNDS"]


# ------------------------------------------------------------------ sections


def header(res: dict) -> list[str]:
    m, s, mc = res["meta"], res["meta"]["settings"], res["meta"]["machine"]
    lines = ["# Benchmarks", "",
             "This page is generated by `make bench` (`bench/sidebyside.py`; the report alone: "
             "`bench/sidebyside.py --report-only docs/bench-results.json`). Do not edit it by hand: "
             "the next run overwrites it. The earlier hand-written results (issue 2 baseline, "
             f"cache modes of seed 001, metadata queue of issue 4) are in [{HISTORY}]({HISTORY}).", ""]
    if is_smoke(m):
        lines += [f"> **Smoke run** (RUNTIME={s['RUNTIME']} s, ROUNDS={s['ROUNDS']}): these numbers only show "
                  "that every job runs on every target. They are not measurements; `make bench` with the "
                  "defaults (RUNTIME=8, ROUNDS=2) gives the real table.", ""]
    if m.get("interrupted"):
        lines += ["> **Interrupted run**: the tables cover only the runs done before the interrupt.", ""]
    lines += [
        "One run of the same fio jobs on every target, side by side. Compare the figures as ratios "
        "within this page, never across runs.", "",
        f"- date: {m['date']}; wall time {m['wall_seconds']} s; load average at start "
        f"{' '.join(f'{x:.2f}' for x in m['load_start'])}, at end {' '.join(f'{x:.2f}' for x in m['load_end'])}",
        f"- machine: {mc['nproc']} CPUs ({mc['cpu']}), {mc['memory_gib']} GiB RAM, kernel {mc['kernel']}, "
        f"{mc['os']}; work dir `{m['work']}` on {mc['filesystem']}",
        f"- {mc['fio']}; {mc['qemu']}",
        f"- cachefs: git commit {m['source']}, run from a copy of `cachefs/` taken at the start",
        f"- settings: RUNTIME={s['RUNTIME']} s per run, ROUNDS={s['ROUNDS']}, REGION={s['REGION']}, "
        f"qcow2 images {s['IMG_SIZE']} virtual, targets: {s['TARGETS']}",
        f"- command: `{m.get('command', 'make bench')}` (which runs `bench/sidebyside.py`)",
        f"- engines in use, as each mount's `stats.aio` reported them (cache mode:engine): {engines_seen(res)}",
        ""]
    return lines


def engines_seen(res: dict) -> str:
    seen: dict[str, set[str]] = {}
    for x in res["runs"]:
        if x.get("aio"):
            seen.setdefault(x["target"], set()).add(x["aio"])
    return "; ".join(f"{t} {', '.join(sorted(v))}" for t, v in seen.items()) or "—"


def targets_section(c: Cells) -> list[str]:
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
    if not rows:
        return []
    return ["## Targets (issue 5)", "",
            "Ratios of medians (MB/s). ✓ the target is met, ✗ it is not.", "",
            *table(["target", "goal", *engines], rows), ""]


def overview_section(c: Cells, pngs: dict[str, str]) -> list[str]:
    rows = []
    for name, job in c.jobs.items():
        cells = []
        for t in c.targets:
            st = c.status(name, t)
            if st != "ok":
                cells.append("skipped" if st.startswith("skipped") else "failed" if st.startswith("failed") else st)
                continue
            v = c.median(name, t, "mbps")
            extra = [] if t == "host" else [f"{fratio(c.ratio(name, t, 'host'))} host"]
            if t not in ("host", "qsd") and "qsd" in c.targets:
                extra.append(f"{fratio(c.ratio(name, t, 'qsd'))} qsd")
            cells.append(f"{fnum(v, 1)}" + (f" ({', '.join(extra)})" if extra else ""))
        rows.append([f"`{name}`", *cells])
    out = ["## Overview: MB/s (ratio to host, to qsd)", "",
           "Median MB/s per job and target; the ratios are of the medians. "
           "Skips and failures are listed below the detail tables.", "",
           *table(["job", *c.targets], rows), ""]
    for ref, png in pngs.items():
        out += [f"![throughput relative to {ref}]({png})", ""]
    return out


def strace_cell(c: Cells, job: str, target: str) -> str:
    """strace's count; for cachefs also its own counter over the same (traced) run."""
    text = fsyncs(c.strace_syncs(job, target))
    own = [x["backend_fdatasyncs"] for x in c.counted.get((job, target), [])
           if x["status"] == "ok" and x.get("backend_fdatasyncs") is not None]
    if own and text != "—":
        text += f"; own counter {sum(own)}"
        if c.strace_syncs(job, target)[0] < sum(own):
            text += " (syncs submitted through AIO/io_uring are no syscalls)"
    return text


def detail_section(c: Cells, group: str) -> list[str]:
    names = [n for n, j in c.jobs.items() if j["group"] == group]
    if not names:
        return []
    flush = any(c.jobs[n]["flush_every"] for n in names)
    head = ["job", "target", "MB/s", "IOPS (range)", "× host", "× qsd", "CPU s/GiB", "CPU µs/IO",
            "peak RSS MiB", "page cache MiB"]
    if flush:
        head += ["fdatasyncs/flush, own counters", "fdatasyncs/flush, strace pass"]
    rows = []
    for n in names:
        for i, t in enumerate(c.targets):
            first = f"`{n}`" if i == 0 else ""
            st = c.status(n, t)
            if st != "ok":
                why = "skipped: refused by the daemon (below)" if st.startswith("skipped") else short(st)
                rows.append([first, t, why, *[""] * (len(head) - 3)])
                continue
            sp = c.spread(n, t, "iops")
            iops = fnum(c.median(n, t, "iops")) + (f" ({fnum(sp[0])}–{fnum(sp[1])})" if sp else "")
            row = [first, t, fnum(c.median(n, t, "mbps"), 1), iops,
                   fratio(c.ratio(n, t, "host")) if t != "host" else "1",
                   fratio(c.ratio(n, t, "qsd")) if t != "qsd" else "1",
                   fnum(c.median(n, t, "cpu_s_per_gib"), 2), fnum(c.cpu_us_per_io(n, t), 1),
                   fmib(c.median(n, t, "peak_rss_kib"), 1024), fmib(c.median(n, t, "page_cache_bytes"), 2**20)]
            if flush:
                row += [fsyncs(c.own_syncs(n, t)), strace_cell(c, n, t)]
            rows.append(row)
    titles = "; ".join(f"`{n}`: {c.jobs[n]['title']}" for n in names)
    return [f"### {GROUPS.get(group, group)}", "", titles + ".", "", *table(head, rows), ""]


def problems_section(c: Cells) -> list[str]:
    lines = []
    skipped = c.r["meta"].get("skipped", {})
    for t, modes in skipped.items():
        for mode, why in modes.items():
            lines.append(f"- **{t}**, cache mode {mode}: refused by the daemon, skipped: {why}")
    for run in c.r["runs"]:
        if run["status"].startswith("failed"):
            lines.append(f"- **{run['target']}**, `{run['job']}`, round {run['round']}: {run['status']}")
        if run.get("note"):
            lines.append(f"- **{run['target']}**, `{run['job']}`, round {run['round']}: {run['note']}")
    for t in c.targets:
        for chk in c.checks(t):
            lines.append(f"- **{t}** image check after {chk}")
    return ["## Skipped and failed runs", "",
            *(lines or ["None: every run finished, every image checked clean after unmount."]), ""]


def method_section(c: Cells) -> list[str]:
    return [
        "## How it is measured", "",
        "- **Targets.** `host` is a fresh sparse raw file in the work dir (the limit). `qsd` is "
        "qemu-storage-daemon exporting a fresh qcow2 over FUSE (the peer). `cachefs-ENGINE` is "
        "`cachefs mount --aio ENGINE` of a directory holding a fresh qcow2 of the same size. "
        "Every qcow2 is made by `qemu-img create` and is fresh for every run, so write jobs "
        "allocate; read jobs first write their region (prefill, untimed), since a qcow2 read of "
        "unallocated space costs nothing.",
        "- **Like for like.** O_DIRECT jobs run cachefs in `--cache none` and qsd with "
        "`cache.direct=on,aio=native`; buffered jobs cachefs `--cache writeback` and qsd "
        "`cache.direct=off,aio=threads`. The cache-mode jobs give qsd the mode's `cache.direct`/"
        "`cache.no-flush` on both nodes; qsd has no writethrough export, so for writethrough and "
        "directsync fio opens O_DSYNC (`--sync=dsync`) on host and qsd, while cachefs gets the plain "
        "job and its own mode. Buffered host results can exceed any disk: that is the page cache "
        "(seed 000).",
        "- **Order.** In each round every job runs on every target back to back; the order of the "
        "targets rotates by one each round, so drift hits all alike. Each cell is the median over "
        "the rounds; IOPS show the range when there is more than one round.",
        "- **CPU s/GiB** and **CPU µs/IO**: utime+stime of the daemon process (all threads, "
        "`/proc/PID/stat`) over the timed fio run, per GiB or per I/O moved. The host has no daemon (—).",
        "- **Peak RSS**: VmHWM of the daemon (`/proc/PID/status`), reset before the timed run by "
        "writing 5 to `/proc/PID/clear_refs` (after any prefill).",
        "- **Page cache**: `fincore --bytes` of the backing file (host file, qcow2) right after the job.",
        "- **fdatasyncs per flush** (flush jobs): *own counters* are cachefs's "
        "`stats.backend_fdatasyncs`/`stats.guest_flushes` (what `cachefs stats` shows) over the timed "
        "runs, including the flush at close. The *strace pass* is a separate, untimed run of the same "
        f"job on a fresh image with `{c.r.get('strace_command', 'strace -f -c -p PID')}` attached to "
        "the daemon (a tracer slows the daemon, so that run gives no throughput); guest flushes "
        "there are cachefs's counter, or fio's writes / N for qsd. strace sees only syscalls: "
        "cachefs's native and io_uring engines submit their syncs as AIO/io_uring operations "
        "(IOCB_CMD_FDSYNC, IORING_OP_FSYNC), which strace does not count, so for them the own "
        "counters are the figure.",
        "- **Image check**: `qemu-img check` of every qcow2 after its unmount; any finding is listed above.",
        ""]


def commands_section(c: Cells) -> list[str]:
    cli = c.r["meta"].get("cachefs_cli", "")
    daemons: dict[str, list[str]] = {}
    fio_lines = []
    for job, per_target in c.r.get("commands", {}).items():
        for t, cmds in per_target.items():
            for cmd in cmds:
                cmd = cmd.replace(cli, "cachefs") if cli else cmd
                if cmd.startswith("fio") and t == "host":
                    fio_lines.append(cmd)
                elif not cmd.startswith("fio") and cmd not in daemons.setdefault(t, []):
                    daemons[t].append(cmd)
    lines = ["## The exact commands", "",
             f"`cachefs` below is `{cli}` (the CLI on a copy of the package taken at the start).", "",
             "Per run, each target's setup (round 1; every round runs the same):", "", "```"]
    for t, cmds in daemons.items():
        lines += [f"# {t}", *cmds]
    lines += ["```", "",
              "The fio jobs as run on the host file (and prefill first for read jobs); on qsd and "
              "cachefs only `--filename` differs (the FUSE file), and cachefs never gets `--sync=dsync`:",
              "", "```", *fio_lines, "```", "",
              f"Count pass: `{c.r.get('strace_command', '')}` attached to the daemon's PID.", ""]
    return lines


# ------------------------------------------------------------------ plots


def plots(c: Cells, docs: Path) -> dict[str, str] | None:
    """Draws docs/bench-vs-REF.png per reference; returns {ref: png}, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    written = {}
    jobs = list(c.jobs)
    for ref, png in PLOTS.items():
        if ref not in c.targets:
            continue
        shown = [t for t in c.targets if t != ref and not (ref == "qsd" and t == "host")]
        if not shown:
            continue
        fig, ax = plt.subplots(figsize=(10, 1.2 + 0.42 * len(jobs) * max(1, len(shown)) / 2.5))
        h = 0.8 / len(shown)
        all_vals = [v for t in shown for j in jobs if (v := c.ratio(j, t, ref))]
        lo = min([*all_vals, 0.5]) / 1.5
        hi = max([*all_vals, 1.0]) * 1.6
        for k, t in enumerate(shown):
            ys = [i + (k - (len(shown) - 1) / 2) * h for i in range(len(jobs))]
            vals = [c.ratio(j, t, ref) for j in jobs]
            ax.barh(ys, [v or 0 for v in vals], height=h, label=t, color=f"C{c.targets.index(t)}")
            for y, v in zip(ys, vals):
                ax.text(v if v else lo * 1.05, y, f" {v:.2f}" if v else " n/a", va="center", fontsize=6)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ticks = [t for t in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10) if lo <= t <= hi]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_yticks(range(len(jobs)))
        ax.set_yticklabels(jobs)
        ax.invert_yaxis()
        ax.set_xlabel(f"throughput relative to {ref} (median MB/s ratio, log scale; 1 = {ref})")
        fig.suptitle(f"cachefs side-by-side: each target / {ref}")
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=len(shown), fontsize="small", frameon=False)
        fig.tight_layout()
        fig.savefig(docs / png, dpi=90)
        plt.close(fig)
        written[ref] = png
    return written


# ------------------------------------------------------------------ the page


def render(res: dict, docs: Path) -> str:
    c = Cells(res)
    lines = header(res)
    pngs = plots(c, docs)
    lines += targets_section(c)
    lines += overview_section(c, pngs or {})
    if pngs is None:
        lines += ["(No plots: matplotlib is missing; `make bench` installs the `bench` extra.)", ""]
    lines += ["## Detail", ""]
    for g in GROUPS:
        lines += detail_section(c, g)
    lines += problems_section(c)
    lines += method_section(c)
    lines += commands_section(c)
    lines += ["Older results: [benchmark-history.md](benchmark-history.md) (issue 2 baseline, "
              "`make bench-modes`, `make bench-metaqueue`).", ""]
    return "\n".join(lines)


def write(res: dict, docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks.md").write_text(render(res, docs))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    write(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]) if len(sys.argv) > 2 else
          Path(__file__).resolve().parent.parent / "docs")
