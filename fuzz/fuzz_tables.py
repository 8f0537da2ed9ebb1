"""Fuzz target "tables": L1, L2 and refcount decoding, behind a header that stays valid.

Mutating whole images spends most inputs on the header. Here the header
comes from a valid template (fuzz/templates/, made by make_corpus.py) and
the input replaces its tables: byte 0 picks the template; the bytes after it
overwrite, in order, the L1 table, each L2 table it names, the refcount table
and each refcount block (a short input leaves the later ones as they were).
The image so made is opened, read, written, flushed and closed
(fuzz_engine.py), and checked and repaired (fuzz_check.py).

First the codecs themselves: entry tables and refcount blocks of every width
must decode and encode back to the same bytes (spec "Host cluster
management": QEMU packs sub-byte refcounts LSB first), and every 8 bytes must
decode as a compressed descriptor at every cluster size without error.
"""

from __future__ import annotations

import functools
import pathlib

from cachefs.qcow2 import format as fmt
from cachefs.qcow2.cluster import Mapping

from fuzz.fuzz_check import exercise_check
from fuzz.fuzz_engine import exercise_engine
from fuzz.harness import MemFile

TEMPLATES = pathlib.Path(__file__).resolve().parent / "templates"
# The codecs see the first bytes only: 128 bytes are 1024 one-bit refcounts, every packing
# case; the whole input made them 60% of an execution.
CODEC_BYTES = 128


@functools.cache
def templates() -> list[tuple[bytes, list[tuple[int, int]]]]:
    """(image bytes, [(offset, length) of each table]) of every template, in name order."""
    out = []
    for path in sorted(TEMPLATES.glob("*.qcow2")):
        data = path.read_bytes()
        out.append((data, regions(data)))
    return out


def regions(data: bytes) -> list[tuple[int, int]]:
    """A valid image's tables, in the order the input overwrites them."""
    f = MemFile(data)
    hdr = f.run(fmt.read_header(len(f)))
    cs = hdr.cluster_size
    out = [(hdr.l1_table_offset, hdr.l1_size * 8)]
    l1 = fmt.decode_table(data[hdr.l1_table_offset:hdr.l1_table_offset + hdr.l1_size * 8])
    out += [(e & fmt.OFFSET_MASK, cs) for e in l1 if e & fmt.OFFSET_MASK]
    rt_bytes = hdr.refcount_table_clusters * cs
    out.append((hdr.refcount_table_offset, rt_bytes))
    reftable = fmt.decode_table(data[hdr.refcount_table_offset:hdr.refcount_table_offset + rt_bytes])
    out += [(e, cs) for e in reftable if e]
    return out


def seed(index: int) -> bytes:
    """The input that rebuilds template ``index`` unchanged."""
    data, spans = templates()[index]
    return bytes([index]) + b"".join(data[o:o + n] for o, n in spans)


def assemble(data: bytes) -> bytes:
    image, spans = templates()[data[0] % len(templates())]
    buf, pos = bytearray(image), 1
    for offset, length in spans:
        piece = data[pos:pos + length]
        buf[offset:offset + len(piece)] = piece
        pos += length
        if pos >= len(data):
            break
    return bytes(buf)


def exercise_codecs(data: bytes) -> None:
    body = data[:min(len(data), CODEC_BYTES) // 8 * 8]
    assert fmt.encode_table(fmt.decode_table(body)) == body
    for order in range(7):
        entries = fmt.RefcountBlock.decode(body, order)
        assert len(entries) == len(body) * 8 >> order
        assert fmt.RefcountBlock.encode(entries, order) == body, f"refcount order {order}"
    for entry in fmt.decode_table(body[:32]):
        for cb in range(fmt.MIN_CLUSTER_BITS, fmt.MAX_CLUSTER_BITS + 1):
            desc = fmt.decode_compressed(entry, cb)
            assert desc.max_length > 0 and len(desc.host_clusters(cb)) >= 1
            Mapping.of(entry, cb)


def exercise_tables(data: bytes) -> None:
    if not data:
        return
    exercise_codecs(data[1:])
    image = assemble(data)
    exercise_engine(image)
    exercise_check(image)


test_one_input = exercise_tables
