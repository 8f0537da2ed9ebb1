"""The backend: async pread/pwrite/fdatasync on the file that holds an image.

This layer owns the backing file and nothing above it: it knows offsets and
bytes, not clusters, cache modes or FUSE. It must not import cachefs.qcow2
or pyfuse3 (tests/test_backend.py checks). The layers above talk to the
``Backend`` protocol (its contract is in ``base``), so a core test can swap
the real file for ``MemoryBackend``, and a fault test can wrap either in
``FaultyBackend``.

Who owns what:

- ``base``: the protocol, ``IOCounters``, ``ALIGN`` and aligned buffers,
  ``open_backing``, and ``BackingFile``, the class every file backend is
  (descriptor, pread/pwrite/truncate, O_DIRECT read-modify-write);
- the three *submitters*, what ``--aio`` picks to carry requests to the
  kernel: ``file.FileBackend`` (``threads``: a thread per syscall,
  buffered or O_DIRECT), ``aio.AioBackend`` (``native``: Linux AIO,
  O_DIRECT only) and ``uring.UringBackend`` (``io_uring``: buffered or
  O_DIRECT). The last two complete into an eventfd, no thread per request,
  through what they share, ``eventfd.EventfdBackend``;
- ``memory`` and ``faulty``: backends for tests.

This package only re-exports; nothing in it imports the package itself.
"""

from __future__ import annotations

import importlib

#: The submitters that carry a backend's requests to the kernel: threads (FileBackend),
#: native Linux AIO (AioBackend) and io_uring (UringBackend); ``--aio``/``-o aio=`` names one.
SUBMITTERS = ("threads", "native", "io_uring")

#: Where each name lives, imported on first use (PEP 562): the CLI's option parsing needs
#: SUBMITTERS only, and every `cachefs` command would otherwise pay for trio and the submitters.
_HOMES = {
    "AioBackend": ".aio", "AioUnavailable": ".aio",
    "ALIGN": ".base", "Backend": ".base", "IOCounters": ".base", "buffer_pool_stats": ".base",
    "SubmitterUnavailable": ".eventfd",
    "FaultyBackend": ".faulty", "Fault": ".faulty", "RecordingBackend": ".faulty", "Sync": ".faulty",
    "Truncate": ".faulty", "Write": ".faulty", "replay": ".faulty",
    "FileBackend": ".file", "MemoryBackend": ".memory",
    "UringBackend": ".uring", "UringUnavailable": ".uring",
    "filesystem_type": "..mountinfo",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "SUBMITTERS",
    "ALIGN",
    "Backend",
    "IOCounters",
    "buffer_pool_stats",
    "FileBackend",
    "AioBackend",
    "AioUnavailable",
    "UringBackend",
    "UringUnavailable",
    "SubmitterUnavailable",
    "filesystem_type",
    "MemoryBackend",
    "FaultyBackend",
    "Fault",
    "RecordingBackend",
    "Write",
    "Sync",
    "Truncate",
    "replay",
]
