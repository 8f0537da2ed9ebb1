"""Shared fixtures for tests that drive real mounts with real clients.

Kept small on purpose:

- ``workdir``: a fresh directory on a real disk (never tmpfs: O_DIRECT,
  st_blocks and fdatasync behave differently there).
- ``mounted``: a factory that mounts an image directory with the real CLI
  and always unmounts it again, failing the test if the daemon logged a
  Python traceback. A test (or module) marked ``both_planes`` runs twice,
  with the data plane on and off (``--dataplane``, issue 11), unless it
  passes ``--dataplane`` itself.
- ``image``: an image directory with a fresh 256 MiB qcow2, vm.qcow2 (the
  fio tests and the submitters' mount tests).
- plain helpers (import them with ``from conftest import ...``):
  ``qemu_img``, ``qemu_io``, ``cachefs``, ``make_random_raw``, ``sha256``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120


def _env() -> dict[str, str]:
    """The CLI runs as ``python -m cachefs.cli`` from the source tree or an installed venv."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run(*args, check: bool = True, timeout: float = TIMEOUT, **kw) -> subprocess.CompletedProcess:
    """Run a command, text output captured; with check, fail the test (showing stderr) on non-zero exit."""
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def qemu_img(*args, check: bool = True) -> subprocess.CompletedProcess:
    """``qemu-img ARGS``; fails the test on a non-zero exit unless check=False."""
    return run("qemu-img", *args, check=check)


def qemu_io(image, *commands: str, fmt: str = "qcow2", check: bool = True) -> subprocess.CompletedProcess:
    """``qemu-io -f FMT -c CMD ... IMAGE`` (each command as its own -c)."""
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    r = run(*args, image, check=check)
    # qemu-io reports a failed command on stdout/stderr but may still exit 0.
    if check:
        assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    return r


def cachefs(*args, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """The cachefs CLI: ``python -m cachefs.cli ARGS``."""
    return run(sys.executable, "-m", "cachefs.cli", *args, check=check, timeout=timeout, env=_env())


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The failed command's only stderr line: nothing on stdout, no traceback (the house rule for user mistakes)."""
    assert r.returncode != 0, f"accepted:\n{r.stdout}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    assert r.stdout == "", r.stdout
    return lines[0]


def make_random_raw(path, size: int, seed: int) -> Path:
    """A raw file of `size` bytes: deterministic random data with some zero and repeated runs.

    The zero runs let converters leave clusters unallocated; the repeated
    runs compress well, the random ones do not.
    """
    rng = random.Random(seed)
    chunk = 64 << 10
    with open(path, "wb") as f:
        for pos in range(0, size, chunk):
            n = min(chunk, size - pos)
            kind = rng.random()
            if kind < 0.25:
                f.write(bytes(n))
            elif kind < 0.5:
                f.write(bytes([rng.randrange(1, 256)]) * n)
            else:
                f.write(rng.randbytes(n))
    return Path(path)


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _is_tmpfs(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        best, fstype = "", ""
        real = os.path.realpath(path)
        for line in f:
            mnt, typ = line.split()[1:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, typ
    return fstype in ("tmpfs", "ramfs")


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A fresh directory on a real disk: tmp_path unless that is tmpfs, else under /var/tmp (removed after)."""
    if not _is_tmpfs(str(tmp_path)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="cachefs-test-", dir="/var/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def is_mounted(mnt) -> bool:
    mnt = os.path.realpath(mnt)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == mnt for line in f)


class Mount:
    """One live cachefs mount started by the ``mounted`` fixture."""

    def __init__(self, image_dir: Path, mountpoint: Path, log: Path):
        self.image_dir = image_dir
        self.path = mountpoint
        self.log = log
        self.pid = int(os.getxattr(mountpoint, "user.cachefs.pid"))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def stats(self) -> dict:
        import json
        return json.loads(cachefs("stats", self.path, "--json").stdout)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def umount(self) -> None:
        """Unmount with ``cachefs umount``; fails the test if that fails or the daemon logged a traceback.

        Falls back to killing the daemon and a lazy fusermount3 so that the
        machine is never left with a dead mount.
        """
        if not is_mounted(self.path):
            return
        try:
            r = cachefs("umount", self.path, check=False, timeout=60)
            ok = r.returncode == 0 and not is_mounted(self.path)
            why = f"cachefs umount exited {r.returncode}: {r.stderr.strip()}"
        except subprocess.TimeoutExpired:
            ok, why = False, "cachefs umount timed out"
        if not ok:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
            pytest.fail(f"{why}\n--- daemon log ---\n{self.log_text()}")
        self._wait_daemon_gone()
        self.check_log()

    def _wait_daemon_gone(self) -> None:
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
            with open(f"/proc/{self.pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    break
            time.sleep(0.02)

    def check_log(self) -> None:
        text = self.log_text()
        if "Traceback" in text:
            pytest.fail(f"the cachefs daemon logged a traceback:\n{text}")


#: The fuse module's FUSE-over-io_uring switch (cachefs/dataplane/transport.py). The session turns
#: it on where it may, so that every mount (--transport auto, the default) serves over the ring;
#: CACHEFS_TEST_TRANSPORT=dev leaves it alone (the suite then runs over /dev/fuse). Restored at the end.
ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"
_uring_session: dict[str, str] = {}


def _set_enable_uring(value: str) -> bool:
    try:
        with open(ENABLE_URING, "w") as f:
            f.write(value + "\n")
        return True
    except OSError:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "both_planes: run the test's mounts with --dataplane on and off")
    config.addinivalue_line("markers", "both_transports: run the test's mounts over the ring and over /dev/fuse")
    try:
        with open(ENABLE_URING) as f:
            old = f.read().strip()
    except OSError:
        _uring_session["header"] = "FUSE over io_uring: not in this kernel (mounts serve over /dev/fuse)"
        return
    if old == "N" and os.environ.get("CACHEFS_TEST_TRANSPORT") != "dev" and _set_enable_uring("Y"):
        _uring_session.update(old=old, header=f"FUSE over io_uring: set {ENABLE_URING} to Y for this session "
                                              "(mounts serve over the ring; restored to N after)")
    else:
        _uring_session["header"] = f"FUSE over io_uring: {ENABLE_URING} is {old}, left as it is"


def pytest_report_header(config):
    return _uring_session.get("header")


def pytest_sessionstart(session):
    """Said even under -q (which drops the report header): which transport the mounts will use."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.get_verbosity() < 0 and "header" in _uring_session:
        reporter.write_line(_uring_session["header"])


def pytest_unconfigure(config):
    if "old" in _uring_session:
        _set_enable_uring(_uring_session.pop("old"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows the tail of every daemon log in its workdir: a failure seen once in CI
    (an EIO, a lost write) must carry the daemon's side of the story."""
    outcome = yield
    report = outcome.get_result()
    workdir = item.funcargs.get("workdir") if hasattr(item, "funcargs") else None
    if report.when != "call" or not report.failed or workdir is None:
        return
    for log in daemon_logs(Path(workdir))[:8]:
        with contextlib.suppress(OSError):
            tail = log.read_text(errors="replace").splitlines()[-40:]
            report.sections.append((f"daemon log {log.name} (last 40 lines)", "\n".join(tail)))


def daemon_logs(workdir: Path) -> list[Path]:
    """The cachefs*.log files under ``workdir``, not looking into mountpoints (a dead mount answers
    ENOTCONN, a live one is the daemon's, and walking it would ask the daemon)."""
    found = []
    for root, dirs, files in os.walk(workdir, onerror=lambda exc: None):
        dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(root, d))]
        found += [Path(root) / f for f in files if f.startswith("cachefs") and f.endswith(".log")]
    return sorted(found)


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("both_planes") and "mounted" in metafunc.fixturenames:
        metafunc.parametrize("plane", ["on", "off"], indirect=True, ids=lambda p: f"plane-{p}")
    if metafunc.definition.get_closest_marker("both_transports") and "mounted" in metafunc.fixturenames:
        metafunc.parametrize("transport", ["auto", "dev"], indirect=True, ids=lambda t: f"transport-{t}")


@pytest.fixture
def transport(request) -> str | None:
    """The --transport of a ``both_transports`` test: auto (the ring, which the session turns on) and
    dev (/dev/fuse); None elsewhere (auto)."""
    return getattr(request, "param", None)


@pytest.fixture
def plane(request) -> str | None:
    """The --dataplane value of a ``both_planes`` test; None elsewhere (the default)."""
    return getattr(request, "param", None)


@pytest.fixture
def mounted(workdir, plane, transport):
    """Factory: ``mounted(image_dir, *extra_cli_args) -> Mount`` (mountpoint under workdir).

    The mount is live when the call returns. Teardown always unmounts
    (``cachefs umount``, falling back to ``fusermount3 -uz``) and fails the
    test if the daemon log contains "Traceback". Tests that inspect images
    after unmounting call ``m.umount()`` themselves.
    """
    mounts: list[Mount] = []

    def mount(image_dir, *extra) -> Mount:
        if plane is not None and "--dataplane" not in map(str, extra):
            extra = (*extra, "--dataplane", plane)
        if transport is not None and "--transport" not in map(str, extra) and plane != "off":
            extra = (*extra, "--transport", transport)
        n = len(mounts)
        mnt = workdir / f"mnt{n}"
        mnt.mkdir()
        log = workdir / f"cachefs{n}.log"
        r = cachefs("mount", image_dir, mnt, "--log", log, *extra, check=False)
        if r.returncode != 0:
            if is_mounted(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            text = log.read_text() if log.exists() else ""
            pytest.fail(f"cachefs mount exited {r.returncode}: {r.stderr.strip()}\n--- daemon log ---\n{text}")
        try:
            m = Mount(Path(image_dir), mnt, log)
        except OSError as exc:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            pytest.fail(f"mounted, but the root has no user.cachefs.pid: {exc}")
        mounts.append(m)
        return m

    yield mount
    failures = []
    for m in mounts:
        try:
            m.umount()
        except pytest.fail.Exception as exc:
            failures.append(str(exc))
    if failures:
        pytest.fail("\n".join(failures))


@pytest.fixture
def image(workdir):
    """workdir/images holding vm.qcow2, a fresh 256 MiB qcow2 (served as vm.raw)."""
    d = workdir / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "vm.qcow2", "256M")
    return d


@pytest.fixture
def raw(workdir):
    """workdir/images holding disk.raw, a sparse 256 MiB raw image."""
    d = workdir / "images"
    d.mkdir()
    with open(d / "disk.raw", "wb") as f:
        f.truncate(256 << 20)
    return d
