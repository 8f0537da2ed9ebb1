"""Files on a filesystem that really does direct I/O, for the native submitters' tests (plain
helper module).

O_DIRECT and AIO only behave like production on a filesystem that really
does direct I/O (tmpfs accepts O_DIRECT since 6.6 but never goes to a
device), so the ``disk_dir`` fixture is a directory under /var/tmp, or
tmp_path, whichever is such a filesystem (import it explicitly:
``from directio import disk_dir``). :func:`fdinfo_flags` reads a
descriptor's open flags as the kernel has them.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from cachefs.backend import filesystem_type


O_DIRECT_FLAG = 0o40000  # fdinfo "flags:" is octal; x86/arm64 value


O_DSYNC_FLAG = 0o10000


def _does_direct_io(directory: Path) -> bool:
    if filesystem_type(directory) in ("tmpfs", "ramfs"):
        return False
    probe = directory / f".odirect-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return True


@pytest.fixture
def disk_dir(tmp_path):
    for base in (Path("/var/tmp"), tmp_path):
        if base.is_dir() and _does_direct_io(base):
            d = Path(tempfile.mkdtemp(prefix="cachefs-aio-", dir=base))
            yield d
            shutil.rmtree(d, ignore_errors=True)
            return
    pytest.skip("no directory on a filesystem that does direct I/O")


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_file(directory: Path, data: bytes, name: str = "img") -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def fdinfo_flags(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags line in fdinfo")
