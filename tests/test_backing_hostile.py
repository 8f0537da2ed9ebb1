"""Hostile backing file names through a real mount (issue 22): each overlay is refused in one line,
the mount keeps serving the others, and the daemon never opens what a hostile name points at
(strace attached to it while it scans them)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

from conftest import qemu_img

KiB, MiB = 1 << 10, 1 << 20


def _overlay(path, backing: str, fmt: str = "raw") -> None:
    """A qcow2 overlay naming ``backing``; -u: qemu-img itself does not open it."""
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, path, "1M")


def _targets(workdir, d) -> dict[str, tuple[str, str, str]]:
    """overlay file -> (backing name, recorded format, a word of the expected refusal)."""
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "secret.raw").write_bytes(b"s" * 4096)
    os.mknod(d / "dev.raw", 0o600 | 0o020000, os.makedev(1, 3))  # a char device, /dev/null's numbers
    os.mkfifo(d / "fifo.raw")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock.raw"))
    sock.close()
    os.symlink(outside / "secret.raw", d / "escape.raw")
    (d / "plain.raw").write_bytes(bytes(64 * KiB))
    return {
        "shadow.qcow2": ("/etc/shadow", "raw", "outside"),
        "dotdot.qcow2": ("../outside/secret.raw", "raw", "outside"),
        "symlink.qcow2": ("escape.raw", "raw", "outside"),
        "json.qcow2": ('json:{"file.filename":"/etc/passwd"}', "raw", "json"),
        "nbd.qcow2": ("nbd://127.0.0.1:10809/x", "raw", "protocol"),
        "http.qcow2": ("http://example.com/x.raw", "raw", "protocol"),
        "fileproto.qcow2": ("file:/etc/passwd", "raw", "protocol"),
        "device.qcow2": ("dev.raw", "raw", "regular"),
        "fifo.qcow2": ("fifo.raw", "raw", "regular"),
        "socket.qcow2": ("sock.raw", "raw", "regular"),
        "missing.qcow2": ("nothere.raw", "raw", "exist"),
        "self.qcow2": ("self.qcow2", "qcow2", "loop"),
        "wrongfmt.qcow2": ("plain.raw", "qcow2", "recorded as qcow2"),
    }


def _strace(pid: int, out) -> subprocess.Popen:
    p = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(out), "-p", str(pid)],
                         stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # attached once it has written its first line (or a poll says so)
        with open(f"/proc/{pid}/status") as f:
            if any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f):
                return p
        time.sleep(0.02)
    p.kill()
    raise AssertionError("strace did not attach")


def test_hostile_backing_names_are_refused_without_opening_them(workdir, mounted):
    d = workdir / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "good.qcow2", "1M")
    m = mounted(d)
    targets = _targets(workdir, d)
    trace = workdir / "daemon.strace"
    tracer = _strace(m.pid, trace)
    try:
        for ov, (name, fmt, _) in targets.items():
            _overlay(d / ov, name, fmt)
        names = os.listdir(m.path)  # the scan that meets them
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches; the daemon goes on
        tracer.wait(timeout=30)
    skipped = json.loads(os.getxattr(m.path, "user.cachefs.skipped"))
    for ov, (name, _, word) in targets.items():
        visible = ov.removesuffix(".qcow2") + ".raw"
        assert visible not in names, f"{ov} (backing {name!r}) is served"
        why = skipped.get(visible, "")
        assert word in why and "\n" not in why and ov in why, f"{ov}: {why!r}"
    assert "good.raw" in names and (m / "good.raw").read_bytes() == bytes(1 * MiB)
    opened = trace.read_text()
    assert "shadow.qcow2" in opened, "strace saw no open of the overlays themselves: it traced nothing"
    for path in ("/etc/shadow", "/etc/passwd", "secret.raw", "dev.raw", "fifo.raw", "sock.raw"):
        assert path not in opened, f"the daemon opened {path}:\n" + \
            "\n".join(line for line in opened.splitlines() if path in line)
