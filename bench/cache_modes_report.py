#!/usr/bin/env python3
"""Parsing and the report for bench/cache_modes.sh (stdlib only).

  cache_modes_report.py fio FIO.json           -> "IOPS WRITE_IOS" (or exit 1)
  cache_modes_report.py xattrs GETFATTR.txt    -> "GUEST_FLUSHES BACKEND_FDATASYNCS GUEST_WRITES"
  cache_modes_report.py strace STRACE-c.txt    -> fdatasync + fsync calls
  cache_modes_report.py table RESULTS.tsv FSYNC_EVERY  -> the markdown tables

RESULTS.tsv columns: round mode target status iops writes flushes syncs check note load1
(target host | qsd | cachefs | qsdcount: the traced qsd runs of round "C")
(status is "ok" or a short failure text; empty numbers are "-").
"""

from __future__ import annotations

import json
import statistics
import sys

TARGETS = ("host", "qsd", "cachefs")


def fio(path: str) -> None:
    with open(path) as f:
        text = f.read()
    # fio may print warnings before the JSON document
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        sys.exit(f"fio error {job['error']}")
    w = job["write"]
    print(f"{w['iops']:.1f} {w['total_ios']}")


def xattrs(path: str) -> None:
    vals = {}
    with open(path) as f:
        for line in f:
            if "=" in line and line.startswith("user.cachefs."):
                k, v = line.rstrip("\n").split("=", 1)
                vals[k[len("user.cachefs."):]] = v.strip('"')
    print(vals.get("stats.guest_flushes", "-"), vals.get("stats.backend_fdatasyncs", "-"),
          vals.get("stats.guest_writes", "-"))


def strace(path: str) -> None:
    n = 0
    with open(path) as f:
        for line in f:
            p = line.split()
            if p and p[-1] in ("fdatasync", "fsync") and p[3].isdigit():
                n += int(p[3])
    print(n)


def _num(s: str):
    return None if s in ("-", "") else float(s)


def table(path: str, every: int) -> None:
    rows = []
    with open(path) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) < 10 or p[0] == "round":
                continue
            rows.append(dict(round=p[0], mode=p[1], target=p[2], status=p[3], iops=_num(p[4]),
                             writes=_num(p[5]), flushes=_num(p[6]), syncs=_num(p[7]), check=p[8], note=p[9],
                             load=p[10] if len(p) > 10 else "-"))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    rounds = sorted({r["round"] for r in rows if r["round"].isdigit()}, key=int)
    nrounds = len(rounds)

    def cell(mode, target):
        rs = [r for r in rows if r["mode"] == mode and r["target"] == target]
        ok = [r["iops"] for r in rs if r["status"] == "ok" and r["iops"] is not None]
        bad = [r["status"] for r in rs if r["status"] != "ok"]
        return rs, ok, bad

    def iops_text(ok, bad):
        if not ok:
            return "FAIL: " + "; ".join(dict.fromkeys(bad)) if bad else "n/a"
        t = f"{statistics.median(ok):.0f}"
        if len(ok) > 1:
            t += f" ({min(ok):.0f}-{max(ok):.0f})"
        if bad:
            t += f" [{len(bad)} failed: {'; '.join(dict.fromkeys(bad))}]"
        return t

    def per_flush(rs):
        ok = [r for r in rs if r["status"] == "ok" and r["syncs"] is not None and r["flushes"]]
        if not ok:
            return "n/a"
        s, g = sum(r["syncs"] for r in ok), sum(r["flushes"] for r in ok)
        return f"{s / g:.2f} ({s:.0f}/{g:.0f})"

    med = {}
    print("| mode | host IOPS | qsd IOPS | cachefs IOPS | cachefs/qsd | cachefs fdatasyncs per flush "
          "| qsd fdatasyncs per flush | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for m in modes:
        cells = {t: cell(m, t) for t in TARGETS}
        for t in TARGETS:
            med[(m, t)] = statistics.median(cells[t][1]) if cells[t][1] else None
        ratio = (f"{med[(m, 'cachefs')] / med[(m, 'qsd')]:.2f}"
                 if med[(m, "cachefs")] and med[(m, "qsd")] else "n/a")
        notes = "; ".join(dict.fromkeys(r["note"] for t in TARGETS for r in cells[t][0] if r["note"] != "-"))
        print(f"| {m} | {iops_text(*cells['host'][1:])} | {iops_text(*cells['qsd'][1:])} "
              f"| {iops_text(*cells['cachefs'][1:])} | {ratio} | {per_flush(cells['cachefs'][0])} "
              f"| {per_flush(cell(m, 'qsdcount')[0])} | {notes} |")
    print()
    print(f"IOPS: median of {nrounds} round(s), (min-max) when more than one. "
          f"fdatasyncs per flush: all fdatasync+fsync calls of the server over guest flushes, "
          f"as (calls/flushes). A guest flush is one of fio's fdatasync calls (every {every} writes). "
          f"cachefs: its own counters (user.cachefs.stats.backend_fdatasyncs, .guest_flushes, read "
          f"before unmount), summed over the rounds. qsd: strace -f -c --seccomp-bpf in a separate "
          f"count pass (same job, fresh image; strace slows qsd, so those runs give no IOPS), "
          f"flushes = fio's writes/{every}.")
    print()
    for t in ("cachefs", "qsd", "host"):
        wb, un = med.get(("writeback", t)), med.get(("unsafe", t))
        if wb and un:
            per_round = []
            for rd in rounds:
                a = [r["iops"] for r in rows if r["round"] == rd and r["target"] == t
                     and r["mode"] == "unsafe" and r["status"] == "ok"]
                b = [r["iops"] for r in rows if r["round"] == rd and r["target"] == t
                     and r["mode"] == "writeback" and r["status"] == "ok"]
                if a and b:
                    per_round.append(f"{a[0] / b[0]:.2f}")
            extra = " (same job on the host in both modes: this line is run-to-run noise)" if t == "host" else ""
            print(f"- unsafe vs writeback, {t}: {un / wb:.2f}x ({(un / wb - 1) * 100:+.0f}%), "
                  f"median {un:.0f} vs {wb:.0f} IOPS; per round: {', '.join(per_round) or 'n/a'}{extra}")
        elif ("writeback", t) in med or ("unsafe", t) in med:
            print(f"- unsafe vs writeback, {t}: n/a (a run failed)")
    print()
    print("Every run (round C: the qsd count pass, traced, IOPS not comparable):")
    print()
    print("| round | mode | target | status | IOPS | writes | guest flushes | backend fdatasyncs | image check "
          "| load avg after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    for r in rows:
        print(f"| {r['round']} | {r['mode']} | {r['target']} | {r['status']} | {fmt(r['iops'])} "
              f"| {fmt(r['writes'])} | {fmt(r['flushes'])} | {fmt(r['syncs'])} | {r['check']} | {r['load']} |")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "fio":
        fio(sys.argv[2])
    elif cmd == "xattrs":
        xattrs(sys.argv[2])
    elif cmd == "strace":
        strace(sys.argv[2])
    elif cmd == "table":
        table(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"unknown command {cmd}")
