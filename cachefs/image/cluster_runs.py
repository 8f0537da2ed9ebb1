"""Host cluster numbers as text, "first-last" runs ("7-9,12"): the ``user.cachefs.reserved`` xattr.

The image writes it (qcow2image.Qcow2Image.info: the clusters its mount holds in
reserve); ``cachefs check -U`` reads it back (cli/served.py) to tell those
clusters from leaks.
"""

from __future__ import annotations


def format_runs(clusters) -> str:
    """Sorted cluster numbers as "first-last" runs: "7-9,12"."""
    runs: list[list[int]] = []
    for c in sorted(clusters):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def parse_runs(text: str) -> set[int]:
    out: set[int] = set()
    for run in filter(None, text.split(",")):
        first, _, last = run.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out
