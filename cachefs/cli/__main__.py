"""``python -m cachefs.cli``: the installed ``cachefs`` command (the benches run it from a source tree)."""

from cachefs.cli.main import main

main(prog_name="cachefs")
