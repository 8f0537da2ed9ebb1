"""The numbers of a side-by-side results JSON and their formatting, shared by the report
(sidebyside_report.py) and its target tables (sidebyside_goals.py), which import this module and
not each other's.
"""

from __future__ import annotations

import statistics

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
