"""``--backing-dir``, shared by the commands that open backing chains (cli/chain.py), in a module of
its own so that naming it costs `cachefs` nothing (cli/main.py imports the chain code lazily)."""

from __future__ import annotations

import click

BACKING_DIR_OPTION = click.option(
    "--backing-dir", "backing_dir", multiple=True, type=click.Path(exists=True, file_okay=False),
    help="A directory backing files may also be in (repeatable), besides the image's own, as for a mount.")
