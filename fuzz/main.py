"""Run one fuzz target under atheris (libFuzzer): ``python -m fuzz.main TARGET [libFuzzer options] [CORPUS...]``.

TARGET is one of :data:`TARGETS`. cachefs is imported under atheris's
instrumentation, so coverage guides the mutations through the qcow2 core.
Examples (from the project root; `make fuzz` runs them all)::

    .venv/bin/python -m fuzz.main header -runs=100000 /var/tmp/cachefs-fuzz/header fuzz/corpus/header
    .venv/bin/python -m fuzz.main engine -max_total_time=60 fuzz/corpus/engine

The first corpus directory receives the new inputs libFuzzer keeps: give a
scratch one first to leave the seed corpus in the repository unchanged.
"""

from __future__ import annotations

import importlib
import sys

TARGETS = ("header", "tables", "check", "engine")


def load(target: str):
    """The target's test_one_input (fuzz/fuzz_<target>.py)."""
    if target not in TARGETS:
        raise SystemExit(f"unknown fuzz target {target!r}; one of: {', '.join(TARGETS)}")
    return importlib.import_module(f"fuzz.fuzz_{target}").test_one_input


def main(argv: list[str]) -> None:
    import atheris

    if len(argv) < 2:
        raise SystemExit(__doc__)
    target = argv[1]
    with atheris.instrument_imports(include=["cachefs"]):
        one = load(target)
    atheris.Setup([argv[0], *argv[2:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
