"""Host cluster numbers as text, "first-last" runs ("7-9,12"): the ``user.cachefs.reserved`` xattr.

The image writes it (qcow2image.Qcow2Image.info: the clusters its mount holds in
reserve); ``cachefs check -U`` reads it back (cli/served.py) to tell those
clusters from leaks.
"""

from __future__ import annotations


def runs_of(clusters) -> list[tuple[int, int]]:
    """Cluster numbers as sorted (first, count) runs of consecutive ones."""
    runs: list[list[int]] = []
    for c in sorted(set(clusters)):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return [(a, b - a + 1) for a, b in runs]


def format_runs(clusters) -> str:
    """Sorted cluster numbers as "first-last" runs: "7-9,12"."""
    return ",".join(f"{a}-{a + n - 1}" if n > 1 else str(a) for a, n in runs_of(clusters))


def parse_runs(text: str) -> set[int]:
    out: set[int] = set()
    for run in filter(None, text.split(",")):
        first, _, last = run.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out
