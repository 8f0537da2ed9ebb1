"""examples/cachefs@.service: systemd-analyze accepts it, and its own commands start, notify and stop.

There is no systemd running here (and none in CI), so the second test does
what systemd would with the unit's lines: expand %I/%i and ${VAR}, run
ExecStartPre, run ExecStart with $NOTIFY_SOCKET, wait for READY=1, and stop
with SIGTERM (KillSignal's default) within TimeoutStopSec.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, _env, cachefs, is_mounted, run

UNIT = REPO / "examples" / "cachefs@.service"
INSTALLED_AT = "/usr/local/bin/cachefs"  # where the unit expects the CLI


def unit_lines(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(key + "=")]


def expand(word: str, instance: str, env: dict[str, str]) -> str:
    """systemd's %i/%I specifiers and ${VAR} (a whole word, as systemd does)."""
    word = word.replace("%I", run("systemd-escape", "--unescape", instance).stdout.strip()).replace("%i", instance)
    return re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word)


def command(key: str, instance: str, env: dict[str, str]) -> list[str]:
    [line] = unit_lines(key)
    return [expand(w, instance, env) for w in shlex.split(line)]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(workdir):
    """verify checks the syntax, the specifiers and that ExecStart exists (hence the venv's cachefs)."""
    instance = run("systemd-escape", "--path", str(workdir)).stdout.strip()
    unit = workdir / f"cachefs@{instance}.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_AT, str(Path(sys.executable).parent / "cachefs")))
    r = run("systemd-analyze", "verify", unit, check=False)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_unit_commands_start_notify_and_stop(workdir):
    images = workdir / "imgs"
    images.mkdir()
    cachefs("create", images / "vm.qcow2", "16M")
    instance = run("systemd-escape", "--path", str(images)).stdout.strip()
    env = dict(kv.split("=", 1) for kv in unit_lines("Environment"))
    # What /etc/cachefs/%i.conf (EnvironmentFile=) would say: a mountpoint inside the test's directory.
    env.update(MOUNTPOINT=str(workdir / "mnt"), OPTIONS="cache=none")
    run(*command("ExecStartPre", instance, env))
    start = command("ExecStart", instance, env)
    assert start[0] == INSTALLED_AT
    sock_path = str(workdir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        sock.settimeout(60)
        proc = subprocess.Popen([sys.executable, "-m", "cachefs.cli", *start[1:]], stderr=subprocess.PIPE,
                                text=True, env=dict(_env(), NOTIFY_SOCKET=sock_path))
        try:
            assert sock.recv(256) == b"READY=1"
            mnt = Path(env["MOUNTPOINT"])
            assert is_mounted(mnt) and os.listdir(mnt) == ["vm.raw"]
            assert os.getxattr(mnt / "vm.raw", "user.cachefs.cache") == b"none"
            with open(mnt / "vm.raw", "r+b") as f:
                f.write(b"systemd" * 512)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            assert not is_mounted(mnt)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            subprocess.run(["fusermount3", "-uz", env["MOUNTPOINT"]], capture_output=True)
    assert "Traceback" not in proc.stderr.read()
    run("qemu-img", "check", images / "vm.qcow2")
