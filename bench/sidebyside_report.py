#!/usr/bin/env python3
"""The report of bench/sidebyside.py: results JSON -> docs/benchmarks.md and docs/bench-*.png.

  sidebyside_report.py RESULTS.json [DOCS_DIR]    (the same as sidebyside.py --report-only)

Every cell is the median over the rounds of the runs that succeeded. Ratios compare
medians of MB/s (for one job, MB/s and IOPS give the same ratio). The target tables
(issues 11 and 14, or issue 5's for older results) are in sidebyside_goals.py. The plots need
matplotlib (the `bench` extra); without it the report says so and has no plots.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HISTORY = "benchmark-history.md"
PLOTS = {"host": "bench-vs-host.png", "qsd": "bench-vs-qsd.png", "probe": "bench-vs-probe.png"}
REFS = ("host", "qsd", "probe")  # the targets others are compared with
GROUPS = {
    "throughput": "Throughput, O_DIRECT (cachefs `--cache none`; qsd `cache.direct=on,aio=native`)",
    "seed004": "Seed 004: O_DIRECT sequential at 16k, 64k, 256k, QD1 (iozone -I's table)",
    "flush": "Allocating writes with flushes (issues 4 and 14), writeback",
    "write-through": "Allocating writes in the write-through modes (issue 14): cachefs `--cache MODE`; qsd the "
                     "mode's `cache.direct`, fio `--sync=dsync` (O_DSYNC); synchronous writes",
    "cache-mode": "Cache modes (seed 001): one flush-heavy job per mode",
    "memory": "Bounded memory: 4k random writes over the whole image",
}
SMOKE = {"RUNTIME": 5, "ROUNDS": 2}  # below either of these, the numbers are a smoke run (fio needs seconds to settle)


# ------------------------------------------------------------------ the numbers


def target_info(res: dict) -> dict[str, dict]:
    """Per target: kind, image, dataplane, engine (inferred from the names in older results)."""
    info = dict(res.get("target_info") or {})
    for t in res["targets"]:
        if t not in info:
            kind = t.split("-", 1)[0] if t.split("-", 1)[0] in ("host", "probe", "qsd") else "cachefs"
            info[t] = {"kind": kind, "image": "raw" if kind in ("host", "probe") else "qcow2",
                       "dataplane": None, "engine": t.split("-", 1)[1] if kind == "cachefs" else None}
    return info



class Cells:
    """Medians per (job, target) over the timed rounds, and the count pass."""

    def __init__(self, results: dict) -> None:
        self.r = results
        self.jobs = {j["name"]: j for j in results["jobs"]}
        self.targets = results["targets"]
        self.info = target_info(results)
        self.not_run: dict[str, dict[str, str]] = results["meta"].get("not_run", {})
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
            return f"n/a: {self.not_run[target][job]}" if job in self.not_run.get(target, {}) else "not run"
        if any(x["status"] == "ok" for x in runs):
            return "ok"
        return runs[0]["status"]

    def refs(self, target: str) -> list[str]:
        """What a target's figures are compared with: qcow2 servers with host and qsd, raw ones with host
        and the probe."""
        kind, image = self.info[target]["kind"], self.info[target]["image"]
        if kind == "host":
            return []
        if kind in ("qsd", "probe"):
            return ["host"]
        return [r for r in ("host", "qsd" if image == "qcow2" else "probe") if r in self.targets]

    def ratio(self, job: str, target: str, ref: str, key: str = "mbps") -> float | None:
        a, b = self.median(job, target, key), self.median(job, ref, key)
        return a / b if a is not None and b else None

    def fast_share(self, job: str, target: str) -> float | None:
        """The data plane's fast reads + writes per fio I/O (median): 1.0 = every I/O served in C."""
        vals = [x["fast_ios"] / x["ios"] for x in self.ok(job, target) if x.get("fast_ios") is not None and x["ios"]]
        return statistics.median(vals) if vals else None

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
             "cache modes of seed 001, metadata queue of issue 4, the data plane's stage 1 from "
             f"`bench/dataplane.sh`) are in [{HISTORY}]({HISTORY}).", ""]
    if is_smoke(m):
        lines += [f"> **Smoke run** (RUNTIME={s['RUNTIME']} s, ROUNDS={s['ROUNDS']}): these numbers only show "
                  "that every job runs on every target. They are not measurements; `make bench` with the "
                  "defaults (RUNTIME=8, ROUNDS=2) gives the real table.", ""]
    if s.get("JOBS"):
        lines += [f"> **Focused run**: only the jobs named in JOBS ran ({s['JOBS']}); the rest of "
                  "`make bench`'s jobs are not on this page.", ""]
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
        f"images {s['IMG_SIZE']} virtual, targets: {s['TARGETS']}",
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


def overview_section(c: Cells, pngs: dict[str, str]) -> list[str]:
    rows = []
    for name, job in c.jobs.items():
        cells = []
        for t in c.targets:
            st = c.status(name, t)
            if st != "ok":
                cells.append(st.split(":")[0])
                continue
            v = c.median(name, t, "mbps")
            extra = [f"{fratio(c.ratio(name, t, r))} {r}" for r in c.refs(t)]
            cells.append(f"{fnum(v, 1)}" + (f" ({', '.join(extra)})" if extra else ""))
        rows.append([f"`{name}`", *cells])
    out = ["## Overview: MB/s (ratio to host, to qsd or the probe)", "",
           "Median MB/s per job and target; the ratios are of the medians: a qcow2 server's to host and qsd, "
           "a raw one's to host and the ceiling probe. n/a: the target does not run the job (the probe and "
           "the raw cachefs target run O_DIRECT jobs only). Skips and failures are listed below the detail "
           "tables.", "",
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
    refs = [r for r in REFS if r in c.targets]
    fast = any(c.fast_share(n, t) is not None for n in names for t in c.targets)
    head = ["job", "target", "MB/s", "IOPS (range)", *[f"× {r}" for r in refs], "CPU s/GiB", "CPU µs/IO",
            "peak RSS MiB", "page cache MiB"] + ["served in C"] * fast
    if flush:
        head += ["fdatasyncs/flush, own counters", "fdatasyncs/flush, strace pass"]
    rows = []
    for n in names:
        shown = [t for t in c.targets if not c.status(n, t).startswith("n/a")]
        for i, t in enumerate(shown):
            first = f"`{n}`" if i == 0 else ""
            st = c.status(n, t)
            if st != "ok":
                why = "skipped: refused by the daemon (below)" if st.startswith("skipped") else short(st)
                rows.append([first, t, why, *[""] * (len(head) - 3)])
                continue
            rows.append([first, t, *detail_cells(c, n, t, refs, fast, flush)])
    titles = "; ".join(f"`{n}`: {c.jobs[n]['title']}" for n in names)
    return [f"### {GROUPS.get(group, group)}", "", titles + ".", "", *table(head, rows), ""]


def detail_cells(c: Cells, n: str, t: str, refs: list[str], fast: bool, flush: bool) -> list[str]:
    sp = c.spread(n, t, "iops")
    iops = fnum(c.median(n, t, "iops")) + (f" ({fnum(sp[0])}–{fnum(sp[1])})" if sp else "")
    row = [fnum(c.median(n, t, "mbps"), 1), iops,
           *["1" if r == t else fratio(c.ratio(n, t, r)) for r in refs],
           fnum(c.median(n, t, "cpu_s_per_gib"), 2), fnum(c.cpu_us_per_io(n, t), 1),
           fmib(c.median(n, t, "peak_rss_kib"), 1024), fmib(c.median(n, t, "page_cache_bytes"), 2**20)]
    if fast:
        share = c.fast_share(n, t)
        row.append("" if share is None else f"{share * 100:.0f}%")
    if flush:
        row += [fsyncs(c.own_syncs(n, t)), strace_cell(c, n, t)]
    return row


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
    out = ["## Skipped and failed runs", "",
           *(lines or ["None: every run finished, every image checked clean after unmount."]), ""]
    for t, per_job in c.not_run.items():
        for why in dict.fromkeys(per_job.values()):
            jobs = ", ".join(f"`{j}`" for j, w in per_job.items() if w == why)
            out += [f"Not run on **{t}** ({why}): {jobs}.", ""]
    return out


def method_section(c: Cells) -> list[str]:
    return [
        "## How it is measured", "",
        "- **Targets.** `host` is a fresh sparse raw file in the work dir (the limit). `probe` is the FUSE "
        "ceiling probe (`../shared/bench/fuse-ceiling/probe.c`: one C thread, `/dev/fuse` and the backend "
        "I/O on one io_uring, no image format), built into the work dir and serving that same fresh raw "
        "file: the fastest any FUSE server serves a file here. `qsd` is qemu-storage-daemon exporting a "
        "fresh qcow2 over FUSE (the peer). `cachefs-dp-ENGINE` is `cachefs mount --aio ENGINE "
        "--dataplane on` (the default mount: the C data plane serves mapped READs and WRITEs, ENGINE "
        "serves what it forwards to pyfuse3) of a directory holding a fresh qcow2 of the same size; "
        "`cachefs-dpoff-ENGINE` is the same with `--dataplane off` (pyfuse3 serves everything); "
        "`cachefs-dp-raw` serves a fresh sparse raw image with the data plane on. Older results name "
        "`cachefs-ENGINE` (before the data plane). Every qcow2 is made by `qemu-img create`, every "
        "image is fresh for every run, so write jobs allocate; read and overwrite jobs first write "
        "their region (prefill, untimed), since a qcow2 read of unallocated space costs nothing.",
        "- **Like for like.** O_DIRECT jobs run cachefs in `--cache none` and qsd with "
        "`cache.direct=on,aio=native`; buffered jobs cachefs `--cache writeback` and qsd "
        "`cache.direct=off,aio=threads`. The cache-mode and write-through jobs give qsd the mode's `cache.direct`/"
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
        "- **Page cache**: bytes of the backing file in the host page cache right after the job (mincore(2), "
        "as `fincore` counts them): the whole qcow2, or the span the job covers of a raw file (the rest is a "
        "hole no job touches).",
        "- **Served in C**: the data plane's `stats.fast_reads` + `stats.fast_writes` over the timed run, "
        "per I/O fio made (the kernel may split a request, so it can exceed 100%); the rest was "
        "forwarded to pyfuse3 (`stats.forwarded`).",
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
              "The fio jobs as run on the host file (and prefill first for read and overwrite jobs); on "
              "the probe, qsd and cachefs only `--filename` differs (the FUSE file), and cachefs never "
              "gets `--sync=dsync`:",
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
    for ref, png in PLOTS.items():
        if ref not in c.targets:
            continue
        shown = [t for t in c.targets if t != ref and not (ref != "host" and t == "host")]
        jobs = [j for j in c.jobs if c.status(j, ref) == "ok"]
        if shown and jobs:
            draw(plt, c, ref, shown, jobs)
            plt.gcf().savefig(docs / png, dpi=90)
            plt.close(plt.gcf())
            written[ref] = png
    return written


def draw(plt, c: Cells, ref: str, shown: list[str], jobs: list[str]) -> None:
    """Horizontal bars, one group per job, one bar per target: its median MB/s over ref's (log scale)."""
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.42 * len(jobs) * max(1, len(shown)) / 2.5))
    h = 0.8 / len(shown)
    all_vals = [v for t in shown for j in jobs if (v := c.ratio(j, t, ref))]
    lo = min([*all_vals, 0.5]) / 1.5
    hi = max([*all_vals, 1.0]) * 1.6
    for k, t in enumerate(shown):
        ys = [i + (k - (len(shown) - 1) / 2) * h for i in range(len(jobs))]
        vals = [c.ratio(j, t, ref) for j in jobs]
        ax.barh(ys, [v or 0 for v in vals], height=h, label=t, color=f"C{c.targets.index(t) % 10}")
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
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=min(len(shown), 4), fontsize="small", frameon=False)
    fig.tight_layout()


# ------------------------------------------------------------------ the page


def render(res: dict, docs: Path) -> str:
    c = Cells(res)
    lines = header(res)
    pngs = plots(c, docs)
    from sidebyside_goals import targets_section  # it imports this module's Cells and formatting
    lines += targets_section(res, c)
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
              "`make bench-modes`, `make bench-metaqueue`, `bench/dataplane.sh`).", ""]
    return "\n".join(lines)


def write(res: dict, docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks.md").write_text(render(res, docs))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    write(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]) if len(sys.argv) > 2 else
          Path(__file__).resolve().parent.parent / "docs")
