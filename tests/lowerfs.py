"""A test filesystem under the image directory: tests/faultyfs.py or tests/recordfs.py, run as a
subprocess and unmounted again (plain helper module, not a test file)."""

from __future__ import annotations

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
