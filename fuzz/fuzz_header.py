"""Fuzz target "header": the header, its extensions and what `cachefs info` reads from them.

The input is an image file. The header is parsed from its first cluster
(qcow2/format.py read_header); the tables it names must lie inside the
input's length. A header that parses must survive the way cachefs writes it
back (meta.HeaderItem.placed: Header.encode padded to the cluster): parsed
again it is the same header, or the first write of an accepted image would
change what it says. Then what `cachefs info` lists (cli/info.image_info):
the snapshot table (qcow2/snapshots.py) and the bitmaps extension, directory
and tables (qcow2/bitmaps.py).
"""

from __future__ import annotations

from cachefs.cli.info import size_to_str
from cachefs.qcow2 import bitmaps, check, snapshots
from cachefs.qcow2 import format as fmt
from cachefs.qcow2.compress import compress_of

from fuzz.harness import REFUSALS, MemFile


def exercise_header(data: bytes) -> None:
    f = MemFile(data)
    try:
        hdr = f.run(fmt.read_header(len(f)))
    except REFUSALS:
        return
    compress_of(hdr), size_to_str(hdr.size)
    again = fmt.parse_header_untrusted(hdr.encode().ljust(hdr.cluster_size, b"\0"), len(f))
    assert again == hdr, f"header changes when written back:\n{hdr}\n{again}"
    for gen in (check.read_header(len(f)), snapshots.read_table(hdr, len(f))):
        try:
            f.run(gen)
        except REFUSALS:
            pass
    try:
        found = f.run(bitmaps.read_directory(hdr, len(f)))
        f.run(bitmaps.clusters(hdr, found, len(f)))
    except REFUSALS:
        pass


test_one_input = exercise_header
