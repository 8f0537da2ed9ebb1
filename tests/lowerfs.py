"""A test filesystem under the image directory: tests/faultyfs.py or tests/recordfs.py, run as a
subprocess and unmounted again (plain helper module, not a test file).

:class:`Faulty` is faultyfs's, and the ``faulty`` fixture starts one under
the test's workdir (import it explicitly: ``from lowerfs import faulty``).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _env, is_mounted

HERE = Path(__file__).resolve().parent


class LowerMount:
    """``tests/SCRIPT SOURCE PATH [ARGS]`` serving SOURCE at ``path``; its stderr goes to ``stderr``."""

    def __init__(self, script: str, source: Path, path: Path, stderr: Path, *args) -> None:
        self.source, self.path, self.stderr = source, path, stderr
        with open(stderr, "w") as err:  # a file, not a pipe nobody drains: a full pipe would stall the filesystem
            self.proc = subprocess.Popen([sys.executable, HERE / script, source, path, *args],
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=_env())
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready" or not is_mounted(path):
            pytest.fail(f"{script} did not start: {line!r}\n{self.stop()}")

    def stop(self) -> str:
        """Unmount (SIGTERM; a lazy unmount if that did not do it) and return its stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
        self.proc.stdout.close()
        return self.stderr.read_text()


class Faulty(LowerMount):
    """One faultyfs mount: SOURCE served at ``path``, failing requests once armed."""

    def __init__(self, source: Path, path: Path, log: Path) -> None:
        super().__init__("faultyfs.py", source, path, log)
        self.log = log

    def arm(self, **rules) -> None:
        """``read=[[lo, hi]], write=[[lo, hi]], errno=N, file=NAME`` (host byte ranges of the lower file)."""
        os.setxattr(self.path, "user.faulty.arm", json.dumps(rules).encode())

    def disarm(self) -> None:
        os.setxattr(self.path, "user.faulty.disarm", b"")

    def state(self) -> dict:
        return json.loads(os.getxattr(self.path, "user.faulty.state"))


@pytest.fixture
def faulty(workdir):
    """``faulty() -> Faulty``: workdir/src served at workdir/lower (before ``mounted``: torn down after it)."""
    started: list[Faulty] = []

    def start() -> Faulty:
        src, lower = workdir / "src", workdir / "lower"
        lower.mkdir()
        started.append(Faulty(src, lower, workdir / "faultyfs.log"))
        return started[-1]

    (workdir / "src").mkdir()
    yield start
    errors = [err for f in started if "Traceback" in (err := f.stop())]
    assert not errors, f"faultyfs logged a traceback:\n{errors[0]}"
