"""The data plane's tables, without a mount: what a published handle and mapping let C serve.

``dp_plan_probe`` plans a READ or WRITE exactly as the loop does when a request
arrives (cachefs/native/dp_table.c ``dp_plan``), so these tests pin down the
mapping contract of ../shared/DATAPLANE.md: a raw image is one identity
mapping; a mapped image (stage 2, qcow2) serves only clusters that are
published, writes only to clusters writable in place, never a full-cluster
write of zeros; O_DIRECT requests that are not aligned are forwarded; READs
past the guest's end are short, WRITEs past it go to Python.
"""

from __future__ import annotations

import pytest

from cachefs import native
from cachefs.dataplane import plane as dataplane
from cachefs.cli.options import MountOptionError, MountOptions, merge, parse_options
from mounting import plane  # noqa: F401 (a fixture)

needs_dataplane = pytest.mark.skipif(dataplane.why_unavailable() is not None,
                                     reason=str(dataplane.why_unavailable()))

KiB, MiB = 1 << 10, 1 << 20
FORWARD = None


def test_the_option():
    assert parse_options(["cache=none,dataplane=off"]).dataplane == "off"
    assert parse_options([]).dataplane is None  # the daemon decides: on when the module has it
    with pytest.raises(MountOptionError, match="dataplane=maybe: choose one of on, off"):
        parse_options(["dataplane=maybe"])
    with pytest.raises(MountOptionError, match="--dataplane on and -o dataplane=off disagree"):
        merge(MountOptions(dataplane="on"), parse_options(["dataplane=off"]))


def plan(p, fh, off, size, *, write=False, data=None):
    """(pieces as (host, buffer offset, length), reply length), or FORWARD."""
    ffi, lib = native.ffi, native.lib
    buf = ffi.new("char[]", max(size, 1))
    if data is not None:
        ffi.memmove(buf, data, len(data))
    out = ffi.new("uint64_t[]", 3 * lib.DP_MAXPIECE)
    reply = ffi.new("uint32_t *")
    n = lib.dp_plan_probe(p._dp, fh, int(write), off, size, buf, out, reply)
    assert n >= -1, n
    if n == -1:
        return FORWARD
    return [tuple(out[3 * i:3 * i + 3]) for i in range(n)], reply[0], bytes(ffi.buffer(buf, size))


@needs_dataplane
def test_raw_identity_mapping(plane):
    plane.publish_image(7, size=10 * MiB + 1000, identity=True)
    plane.publish_handle(1, 7, 99, direct=False, fast_write=True, sync=False)
    assert plan(plane, 1, 4096, 8192)[:2] == ([(4096, 0, 8192)], 8192)
    assert plan(plane, 1, 3, 5, write=True)[:2] == ([(3, 0, 5)], 5)  # buffered: any alignment
    # Past the guest's end: answered short (a buffered descriptor reads just that much), or empty.
    assert plan(plane, 1, 10 * MiB, 4096)[:2] == ([(10 * MiB, 0, 1000)], 1000)
    assert plan(plane, 1, 11 * MiB, 4096)[:2] == ([], 0)
    # A write past it is Python's (cut short, ENOSPC, or a grow with -o growable).
    assert plan(plane, 1, 10 * MiB, 4096, write=True) is FORWARD
    # No such handle: ENOENT (the loop forwards it).
    assert native.lib.dp_plan_probe(plane._dp, 2, 0, 0, 1, native.ffi.NULL, native.ffi.NULL,
                                    native.ffi.new("uint32_t *")) == -2  # -ENOENT


@needs_dataplane
def test_direct_alignment_and_short_tail(plane):
    plane.publish_image(7, size=10 * MiB + 1000, identity=True)
    plane.publish_handle(1, 7, 99, direct=True, fast_write=True, sync=False)
    assert plan(plane, 1, 8192, 4096)[:2] == ([(8192, 0, 4096)], 4096)
    for off, size in ((512, 4096), (4096, 512), (100, 100)):
        assert plan(plane, 1, off, size) is FORWARD, (off, size)
        assert plan(plane, 1, off, size, write=True) is FORWARD, (off, size)
    # An aligned direct read across the end keeps its aligned length (the file's EOF cuts it).
    assert plan(plane, 1, 10 * MiB, 4096)[:2] == ([(10 * MiB, 0, 4096)], 1000)


@needs_dataplane
def test_fast_write_off_and_pause(plane):
    plane.publish_image(7, size=MiB, identity=True)
    plane.publish_handle(1, 7, 99, direct=False, fast_write=False, sync=False)
    assert plan(plane, 1, 0, 4096, write=True) is FORWARD
    assert plan(plane, 1, 0, 4096) is not FORWARD  # reads stay fast (coherence needs only writes)
    plane.pause_image(7, True)
    assert plan(plane, 1, 0, 4096) is FORWARD
    plane.pause_image(7, False)
    assert plane.handle_counters(1) == [0] * len(dataplane.HANDLE_COUNTERS)  # the probe plans; only a dispatch counts
    plane.unpublish_handle(1)
    assert plane.handle_counters(1) is None


def entries(*pairs):
    return native.ffi.new("uint64_t[]", [host | state for host, state in pairs])


@needs_dataplane
def test_mapped_image_serves_only_what_is_published(plane):
    lib = native.lib
    cs = 64 * KiB
    plane.publish_image(9, size=64 * MiB, cluster_size=cs, identity=False)
    plane.publish_handle(3, 9, 99, direct=True, fast_write=True, sync=False)
    assert plan(plane, 3, 0, 4096) is FORWARD  # nothing published yet
    mapping = entries((1 * MiB, lib.DP_MAP_WRITABLE), (1 * MiB + cs, lib.DP_MAP_WRITABLE),
                      (5 * MiB, lib.DP_MAP_READONLY), (0, lib.DP_MAP_ZERO), (0, lib.DP_MAP_ABSENT))
    assert lib.dp_map_clusters(plane._dp, 9, 0, 5, mapping) == 0
    # Two host-contiguous clusters are one piece; a shared one is its own.
    assert plan(plane, 3, 4096, 2 * cs)[:2] == ([(1 * MiB + 4096, 0, 2 * cs - 4096), (5 * MiB, 2 * cs - 4096, 4096)],
                                                2 * cs)
    # Zero clusters read as zeros without any I/O; absent ones go to Python.
    pieces, n, data = plan(plane, 3, 3 * cs, cs, data=b"\xff" * cs)
    assert (pieces, n, data) == ([], cs, bytes(cs))
    assert plan(plane, 3, 4 * cs, 4096) is FORWARD
    # Writes: only in place, never to a shared or zero cluster, never a full cluster of zeros.
    assert plan(plane, 3, cs, 4096, write=True, data=b"x" * 4096)[:2] == ([(1 * MiB + cs, 0, 4096)], 4096)
    assert plan(plane, 3, 2 * cs, 4096, write=True, data=b"x" * 4096) is FORWARD
    assert plan(plane, 3, 3 * cs, 4096, write=True, data=b"x" * 4096) is FORWARD
    assert plan(plane, 3, 0, cs, write=True, data=bytes(cs)) is FORWARD
    assert plan(plane, 3, 0, cs, write=True, data=b"y" + bytes(cs - 1)) is not FORWARD
    # Taken back: forwarded again.
    assert lib.dp_unmap_clusters(plane._dp, 9, 0, 2) == 0
    assert plan(plane, 3, 0, 4096) is FORWARD
    # Past the guest's size: refused.
    assert lib.dp_map_clusters(plane._dp, 9, 64 * MiB // cs, 1, entries((0, lib.DP_MAP_ZERO))) == -34  # ERANGE


@needs_dataplane
def test_too_many_pieces_are_forwarded(plane):
    lib = native.lib
    cs = 4 * KiB
    plane.publish_image(9, size=MiB, cluster_size=cs, identity=False)
    plane.publish_handle(3, 9, 99, direct=False, fast_write=True, sync=False)
    scattered = entries(*[((i * 2 + 10) * cs, lib.DP_MAP_WRITABLE) for i in range(32)])
    assert lib.dp_map_clusters(plane._dp, 9, 0, 32, scattered) == 0
    assert len(plan(plane, 3, 0, lib.DP_MAXPIECE * cs)[0]) == lib.DP_MAXPIECE
    assert plan(plane, 3, 0, (lib.DP_MAXPIECE + 1) * cs) is FORWARD


@needs_dataplane
def test_drain_ticket_and_remove(plane):
    plane.publish_image(7, size=MiB, identity=True)
    plane.publish_handle(1, 7, 99, direct=False, fast_write=True, sync=False)
    t = plane.unpublish_handle(1)
    assert native.lib.dp_drained(plane._dp, t) == 1  # nothing in flight: drained at once
    plane.publish_handle(1, 7, 99, direct=False, fast_write=True, sync=False)
    assert native.lib.dp_image_remove(plane._dp, 7) == 0
    assert native.lib.dp_plan_probe(plane._dp, 1, 0, 0, 1, native.ffi.NULL, native.ffi.NULL,
                                    native.ffi.new("uint32_t *")) == -2  # its handles went with it
    assert plane.image_counters(7)["fast_reads"] == 0  # the last counters seen stay readable
