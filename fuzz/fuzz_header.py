"""Fuzz target "header": the header and its extensions (qcow2/format.py read_header).

The input is an image file; only its first cluster is parsed, and the
tables the header names must lie inside the input's length. A header that
parses must survive the way cachefs writes it back (meta.HeaderItem.placed:
Header.encode padded to the cluster): parsed again it is the same header.
Otherwise the first write of an accepted image would change what it says.
"""

from __future__ import annotations

from cachefs.infocmd import size_to_str
from cachefs.qcow2 import check
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
    try:
        f.run(check.read_header(len(f)))
    except REFUSALS:
        pass


test_one_input = exercise_header
