"""How requests reach the data plane: ``/dev/fuse`` reads and writes, or FUSE over io_uring (issue 24).

Over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING), the C thread lends the kernel ring entries
and takes requests as completions on the io_uring it already runs (cachefs/native/dp_uring.c);
a request then costs no read(2) and its answer no write(2). The kernel offers it at INIT only
while the fuse module's parameter ``enable_uring`` is Y, which is off by default.

``--transport``/``-o transport=``:

- ``auto`` (the default): the ring when the kernel offers it, else ``/dev/fuse``. It never
  changes the module parameter: with it off, it says so in one line of the log (and how to turn
  it on) and serves over ``/dev/fuse``.
- ``uring``: the ring, asked for. As root it turns ``enable_uring`` on (and logs that it did);
  where it cannot, the mount is refused in one line.
- ``dev``: ``/dev/fuse`` only.

Whatever is asked, a ring the kernel then refuses (a failed registration) falls back to
``/dev/fuse`` in the C thread, and the root's ``user.cachefs.transport`` says which one serves
and why.
"""

from __future__ import annotations

import logging

import attrs

from cachefs.errors import CachefsError

log = logging.getLogger("cachefs.dataplane.transport")

#: The fuse module's switch (fs/fuse/dev_uring.c, module_param enable_uring; root-writable).
ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"
TURN_ON = f"echo Y > {ENABLE_URING}"


class TransportUnavailable(CachefsError):
    """``--transport uring`` cannot be had here; the message is one line saying why."""


@attrs.frozen
class Transport:
    """What the mount asks the C thread for: the ring or not, and why not."""

    uring: bool
    why_not: str | None = None


def read_switch(path: str = ENABLE_URING) -> bool | None:
    """The module parameter: True (Y), False (N), None (no such parameter: no FUSE over io_uring)."""
    try:
        with open(path) as f:
            return f.read().strip() in ("Y", "y", "1")
    except OSError:
        return None


def turn_on(path: str = ENABLE_URING) -> str | None:
    """Set the parameter to Y; None, or why not."""
    try:
        with open(path, "w") as f:
            f.write("Y\n")
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if read_switch(path) else "it still reads N"


def decide(asked: str | None, *, path: str = ENABLE_URING) -> Transport:
    """The transport for ``--transport asked`` (None: auto); TransportUnavailable for a ``uring`` that cannot be."""
    asked = asked or "auto"
    if asked == "dev":
        return Transport(False, "--transport dev")
    switch = read_switch(path)
    if switch is None:
        why = "the kernel has no FUSE over io_uring (Linux 6.14 or later, CONFIG_FUSE_IO_URING)"
        if asked == "uring":
            raise TransportUnavailable(f"--transport uring: {why}")
        return Transport(False, why)
    if switch:
        return Transport(True)
    if asked != "uring":  # auto: never turns the switch itself
        log.info("FUSE over io_uring is off in the kernel (enable_uring=N): serving over /dev/fuse; "
                 "turn it on with: %s", TURN_ON)
        return Transport(False, f"io_uring is off in the kernel (enable_uring=N; {TURN_ON})")
    why = turn_on(path)
    if why is not None:
        raise TransportUnavailable(f"--transport uring: cannot turn FUSE over io_uring on ({TURN_ON}: {why})")
    log.info("--transport uring: turned FUSE over io_uring on (%s)", TURN_ON)
    return Transport(True)
