"""Which opens pass through to the kernel (dataplane/passthrough.py), without a mount: the rule per
cache mode and open flags, one backing id per inode, SERVED opens beside passthrough ones, the
flushes owed to writes the daemon never saw, and the switches refused."""

from __future__ import annotations

import os

import attrs
import pytest

from cachefs.dataplane.passthrough import SERVED, THROUGH, Passthrough, why_not
from cachefs.policy import AUTO, MODES

RO, RW = os.O_RDONLY, os.O_RDWR
D, S = os.O_DIRECT, os.O_DSYNC


@attrs.define
class FakeImage:
    format: str = "raw"
    mode: object = MODES["writeback"]
    backends: object = attrs.Factory(lambda: attrs.make_class("B", {"fd": attrs.field(default=3)})())


@attrs.define
class FakeHandle:
    image: FakeImage
    flags: int
    inode: int = 2
    created: bool = False

    @property
    def mode(self):
        return self.image.mode.for_open(self.flags)


@attrs.define
class FakePlane:
    passthrough: bool = True
    next_id: int = 1
    closed: list[int] = attrs.Factory(list)

    def backing_open(self, fd: int) -> int:
        self.next_id += 1
        return self.next_id - 1

    def backing_close(self, backing_id: int) -> None:
        self.closed.append(backing_id)

    def passthrough_state(self) -> str:
        return "on" if self.passthrough else "off: --passthrough off"


def opener(mode: str, flags: int, **kw) -> FakeHandle:
    return FakeHandle(FakeImage(mode=MODES[mode]), flags, **kw)


@pytest.mark.parametrize("mode,flags,passes", [
    ("writeback", RW, True), ("writeback", RW | D, True), ("unsafe", RW, True),
    ("none", RW | D, True), ("none", RW, False), ("none", RO, False), ("none", RO | D, True),
    ("writethrough", RW, False), ("writethrough", RW | S, True), ("writethrough", RO, True),
    ("directsync", RW | D, False), ("directsync", RW | D | S, True), ("directsync", RO | D, True),
    ("directsync", RW | S, False),
    ("auto", RW, True), ("auto", RW | D, True), ("auto", RW | S, True), ("auto", RW | D | S, True),
])
def test_an_open_passes_through_where_its_flags_keep_the_promise(mode, flags, passes):
    assert (why_not(opener(mode, flags)) is None) == passes


def test_never_for_qcow2_or_an_image_created_through_the_mount():
    assert "qcow2" in why_not(FakeHandle(FakeImage(format="qcow2"), RW))
    assert "created" in why_not(opener("writeback", RW, created=True))


def test_one_backing_id_per_inode_served_beside_and_closed_at_the_last_release():
    plane = FakePlane()
    pt = Passthrough(plane)
    image = FakeImage(mode=MODES["none"])
    writer, reader = FakeHandle(image, RW | D), FakeHandle(image, RO)
    assert pt.decide(1, writer, cached_open=False, paused=False) == (THROUGH, 1)
    # A buffered reader must not pass through under none, but must carry FOPEN_PASSTHROUGH: SERVED.
    assert pt.decide(2, reader, cached_open=False, paused=False) == (SERVED, 1)
    assert pt.decide(3, FakeHandle(image, RO | D), cached_open=False, paused=True) == (SERVED, 1)
    pt.released(1, 2)
    pt.released(2, 2)
    assert plane.closed == []
    pt.released(3, 2)
    assert plane.closed == [1]
    # No passthrough handle left: a page-cache handle open keeps the next one out.
    assert pt.decide(4, FakeHandle(image, RW | D), cached_open=True, paused=False) == (None, 0)
    assert "page-cache" in pt.refused[2]


def test_writers_owe_a_sync_at_each_flush_and_release_readers_do_not():
    pt = Passthrough(FakePlane())
    image = FakeImage()
    pt.decide(1, FakeHandle(image, RW), cached_open=False, paused=False)
    pt.decide(2, FakeHandle(image, RO), cached_open=False, paused=False)
    assert pt.owed(2) == 0
    assert pt.wrote(1, 2) and pt.owed(2) == 1
    assert not pt.wrote(2, 2) and pt.owed(2) == 1
    pt.released(1, 2)
    assert pt.owed(2) == 2
    pt.released(2, 2)
    assert pt.owed(2) == 2


def test_a_switch_an_open_passthrough_handle_cannot_keep_is_refused():
    pt = Passthrough(FakePlane())
    image = FakeImage()
    plain, dsync = FakeHandle(image, RW), FakeHandle(image, RW | S)
    pt.decide(1, plain, cached_open=False, paused=False)
    pt.decide(2, dsync, cached_open=False, paused=False)
    handles = [(1, plain), (2, dsync)]
    assert "O_DSYNC" in pt.switch_conflict(2, MODES["writethrough"], handles)
    assert "O_DIRECT" in pt.switch_conflict(2, MODES["none"], handles)
    assert pt.switch_conflict(2, MODES["unsafe"], handles) is None
    assert pt.switch_conflict(2, AUTO, handles) is None
    pt.released(1, 2)
    assert pt.switch_conflict(2, MODES["writethrough"], [(2, dsync)]) is None


def test_nothing_passes_through_when_init_did_not_take_it():
    pt = Passthrough(FakePlane(passthrough=False))
    assert pt.decide(1, opener("writeback", RW), cached_open=False, paused=False) == (None, 0)
    assert pt.info(2, []) == "off: --passthrough off"
