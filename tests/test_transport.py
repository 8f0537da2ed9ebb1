"""--transport's decision against the kernel's switch (cachefs/dataplane/transport.py), on a stand-in
file for /sys/module/fuse/parameters/enable_uring: no kernel, no mount."""

from __future__ import annotations

import logging

import pytest

from cachefs.dataplane import transport
from cachefs.dataplane.transport import Transport, TransportUnavailable, decide


@pytest.fixture
def switch(tmp_path):
    def make(value: str | None):
        path = tmp_path / "enable_uring"
        if value is not None:
            path.write_text(value + "\n")
        return str(path)
    return make


def test_dev_never_reads_the_switch(switch):
    assert decide("dev", path=switch(None)) == Transport(False, "--transport dev")


@pytest.mark.parametrize("asked", [None, "auto", "uring"])
def test_the_ring_when_the_switch_is_on(switch, asked):
    assert decide(asked, path=switch("Y")) == Transport(True)


def test_auto_leaves_the_switch_off_and_says_how_to_turn_it_on(switch, caplog):
    path = switch("N")
    with caplog.at_level(logging.INFO, logger="cachefs.dataplane.transport"):
        t = decide("auto", path=path)
    assert not t.uring and t.why_not.startswith("io_uring is off in the kernel")
    assert open(path).read().strip() == "N"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "echo Y > /sys/module/fuse/parameters/enable_uring" in lines[0], lines


def test_uring_turns_the_switch_on_and_says_so(switch, caplog):
    path = switch("N")
    with caplog.at_level(logging.INFO, logger="cachefs.dataplane.transport"):
        assert decide("uring", path=path) == Transport(True)
    assert open(path).read().strip() == "Y"
    assert any("turned FUSE over io_uring on" in r.getMessage() for r in caplog.records)


def test_uring_that_cannot_turn_it_on_is_one_line(switch, monkeypatch, tmp_path):
    path = switch("N")
    monkeypatch.setattr(transport, "turn_on", lambda p: "Permission denied")  # not root
    with pytest.raises(TransportUnavailable) as exc:
        decide("uring", path=path)
    assert str(exc.value) == ("--transport uring: cannot turn FUSE over io_uring on "
                              "(echo Y > /sys/module/fuse/parameters/enable_uring: Permission denied)")
    assert open(path).read().strip() == "N"
    assert transport.turn_on(str(tmp_path)) is not None  # a write that fails says why (a directory, even as root)


def test_a_kernel_without_it(switch):
    path = switch(None)
    t = decide(None, path=path)
    assert not t.uring and "Linux 6.14" in t.why_not
    with pytest.raises(TransportUnavailable, match="--transport uring: the kernel has no FUSE over io_uring"):
        decide("uring", path=path)
