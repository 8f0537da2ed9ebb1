"""The command line keeps qemu-img's conventions and never surprises (issue 9, items 1, 6 and 7).

Real qemu-img and qemu-io against real files on a real disk:

- the format comes from the name: a raw file holding a qcow2 header is raw,
  unless the user asks for ``-f probe``; a ``.qcow2`` with bad magic is refused;
- ``create -f/-o`` makes what qemu-img reads back with the same options;
- ``info --output=json`` is qemu-img's JSON (and the human form its text);
- ``-U`` looks at an image that qemu-io holds; without it, one line refuses;
- a closed pipe ends the command quietly, every mistake is one stderr line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import _env, cachefs, one_line_error, qemu_img, qemu_io, run
from mounting import wait_held_by

QCOW2_MAGIC = b"QFI\xfb"


def info_json(*args) -> dict:
    return json.loads(cachefs("info", "--output=json", *args).stdout)


def qemu_info_json(*args) -> dict:
    return json.loads(qemu_img("info", "--output=json", *args).stdout)


# ---------------------------------------------------------------- format by name (item 1)

@pytest.fixture
def disguised(workdir) -> Path:
    """``cp a.qcow2 disguised.raw``: a raw file whose bytes are a qcow2 image."""
    qemu_img("create", "-q", "-f", "qcow2", workdir / "a.qcow2", "64M")
    qemu_io(workdir / "a.qcow2", "write -P 0x5a 0 64k")
    shutil.copy(workdir / "a.qcow2", workdir / "disguised.raw")
    assert (workdir / "disguised.raw").read_bytes()[:4] == QCOW2_MAGIC
    return workdir / "disguised.raw"


def test_raw_name_wins_over_qcow2_content(disguised):
    size = disguised.stat().st_size
    ours = info_json(disguised)
    assert (ours["format"], ours["virtual-size"]) == ("raw", size)
    assert "format-specific" not in ours
    assert "file format: raw" in cachefs("info", disguised).stdout
    assert "raw image: nothing to check" in cachefs("check", disguised).stdout


def test_probe_only_when_asked(disguised):
    probed = info_json("-f", "probe", disguised)
    assert (probed["format"], probed["virtual-size"]) == ("qcow2", 64 << 20)
    assert probed == {**qemu_info_json("-f", "qcow2", disguised), "filename": str(disguised)}
    r = cachefs("check", "-f", "probe", disguised)
    assert "No errors were found on the image." in r.stdout
    plain = disguised.with_name("plain.raw")
    plain.write_bytes(bytes(1 << 20))
    assert info_json("-f", "probe", plain)["format"] == "raw"


def test_daemon_opens_disguised_raw_as_raw(disguised):
    """open_image is what the mount calls: by name, raw, and its bytes are the file's."""
    import trio

    from cachefs.image.raw import RawImage
    from cachefs.image.opening import open_image

    async def first_bytes():
        img = await open_image(str(disguised), writable=False)
        try:
            return type(img), img.size, bytes(await img.read(0, 4))
        finally:
            await img.close()

    kind, size, head = trio.run(first_bytes)
    assert (kind, size, head) == (RawImage, disguised.stat().st_size, QCOW2_MAGIC)


def test_qcow2_with_bad_magic_refused_in_one_line(workdir):
    bad = workdir / "bad.qcow2"
    bad.write_bytes(b"QFI\x00" + os.urandom(4096))
    for cmd in ("info", "check"):
        line = one_line_error(cachefs(cmd, bad, check=False))
        assert "bad.qcow2" in line and "bad magic" in line, line
    raw = workdir / "r.raw"
    raw.write_bytes(os.urandom(4096))
    assert "bad magic" in one_line_error(cachefs("info", "-f", "qcow2", raw, check=False))
    assert info_json("-f", "raw", bad)["format"] == "raw"  # -f raw: the user says so

    import trio

    from cachefs.errors import CorruptImage
    from cachefs.image.opening import open_image
    with pytest.raises(CorruptImage, match="bad magic"):
        trio.run(lambda: open_image(str(bad), writable=False))


def test_a_name_without_format_needs_f(workdir):
    img = workdir / "disk"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    for cmd in ("info", "check"):
        assert "-f" in one_line_error(cachefs(cmd, img, check=False))
    assert info_json("-f", "qcow2", img)["format"] == "qcow2"
    assert info_json("-f", "probe", img)["format"] == "qcow2"
    assert info_json("-f", "raw", img)["format"] == "raw"


# ---------------------------------------------------------------- create (item 7)

CREATE_CASES = {
    "qemu-spelling": (["-f", "qcow2", "-o", "cluster_size=64k,refcount_bits=16,lazy_refcounts=on"], 65536, 16, True),
    "small": (["-o", "cluster_size=4k,refcount_bits=4,lazy_refcounts=off"], 4096, 4, False),
    "repeated-o": (["-o", "cluster_size=2M", "-o", "lazy_refcounts"], 2 << 20, 16, True),
    "aliases": (["--format", "qcow2", "--cluster-size", "512", "--refcount-bits", "1"], 512, 1, False),
    "defaults": ([], 65536, 16, False),
}


@pytest.mark.parametrize("case", sorted(CREATE_CASES))
def test_create_options_as_qemu_img_reads_them(workdir, case):
    args, cluster, bits, lazy = CREATE_CASES[case]
    img = workdir / "new.qcow2"
    cachefs("create", *args, img, "3G")
    q = qemu_info_json(img)
    data = q["format-specific"]["data"]
    assert (q["format"], q["virtual-size"], q["cluster-size"]) == ("qcow2", 3 << 30, cluster)
    assert (data["compat"], data["refcount-bits"], data["lazy-refcounts"]) == ("1.1", bits, lazy)
    assert "No errors were found on the image." in qemu_img("check", img).stdout
    qemu_io(img, "write -P 0x11 1M 192k")  # QEMU writes to it (lazy: refcounts at close) and it stays clean
    qemu_img("check", img)
    assert info_json(img) == qemu_info_json(img)


def test_create_raw_by_flag_or_by_name(workdir):
    cachefs("create", "-f", "raw", workdir / "a.img", "20M")
    cachefs("create", workdir / "b.raw", "20M")  # the name says raw
    for name in ("a.img", "b.raw"):
        q = qemu_info_json(workdir / name)
        assert (q["format"], q["virtual-size"]) == ("raw", 20 << 20)


@pytest.mark.parametrize("args,says", [
    (["-o", "bogus=1"], "bogus"),
    (["-o", "cluster_size=3k"], "power of two"),
    (["-o", "cluster_size=4M"], "cluster size"),
    (["-o", "refcount_bits=3"], "refcount_bits"),
    (["-o", "lazy_refcounts=maybe"], "lazy_refcounts"),
    (["--cluster-size", "4k", "-o", "cluster_size=4k"], "both"),
    (["-f", "raw", "-o", "cluster_size=4k"], "raw"),
    (["-f", "vmdk"], "vmdk"),
])
def test_create_refuses_bad_options_in_one_line(workdir, args, says):
    img = workdir / ("x.raw" if "raw" in args else "x.qcow2")
    line = one_line_error(cachefs("create", *args, img, "1G", check=False))
    assert says in line, line
    assert not img.exists()


def test_create_refuses_a_format_the_name_contradicts(workdir):
    line = one_line_error(cachefs("create", "-f", "qcow2", workdir / "vm.img", "1G", check=False))
    assert "raw" in line and "vm.img" in line, line
    assert not (workdir / "vm.img").exists()


# ---------------------------------------------------------------- info --output=json (item 7)

def _dirty_lazy(path):
    """A lazy-refcounts image whose writer died: the dirty bit stays set."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 0 128k", "-c", "abort", path, check=False)


INFO_IMAGES = {
    "default.qcow2": lambda p: qemu_img("create", "-q", "-f", "qcow2", p, "1G"),
    "v2.qcow2": lambda p: qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "1G"),
    "lazy4k.qcow2": lambda p: qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k",
                                       p, "100M"),
    "zstd.qcow2": lambda p: qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", p, "1G"),
    "rc64.qcow2": lambda p: qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=64,cluster_size=512",
                                     p, "8M"),
    "dirty.qcow2": _dirty_lazy,
    "disk.raw": lambda p: qemu_img("create", "-q", "-f", "raw", p, "10M"),
}


@pytest.mark.parametrize("name", sorted(INFO_IMAGES))
def test_info_is_qemu_img_info(workdir, name):
    img = workdir / name
    INFO_IMAGES[name](img)
    if name.endswith(".qcow2") and name != "dirty.qcow2":
        qemu_io(img, "write -P 0x33 4M 64k")  # some allocation, so actual-size is more than the header
    theirs = qemu_info_json(img)
    ours = info_json(img)
    assert ours == theirs  # every key, and each value of the same JSON type
    assert json.loads(cachefs("info", "--json", img).stdout) == ours
    assert cachefs("info", img).stdout == qemu_img("info", img).stdout
    if name == "dirty.qcow2":
        assert ours["dirty-flag"] is True


# ---------------------------------------------------------------- -U while QEMU holds the image (item 7)

def test_force_share_while_qemu_io_holds_the_image(workdir):
    img = workdir / "held.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_held_by(proc, img)
        for cmd in ("info", "check"):
            line = one_line_error(cachefs(cmd, img, check=False))
            assert "in use" in line and "-U" in line, line
        assert info_json("-U", img) == qemu_info_json("-U", img)
        assert "virtual size: 16 MiB" in cachefs("info", "--force-share", img).stdout
        r = cachefs("check", "-U", img)
        assert "No errors were found on the image." in r.stdout
        assert "-U" in one_line_error(cachefs("check", "-U", "--repair", "leaks", img, check=False))
        assert proc.poll() is None, "qemu-io must keep running: -U takes nothing from it"
    finally:
        proc.stdin.write(b"quit\n")
        proc.stdin.close()
        proc.wait(timeout=10)
        proc.stderr.close()
    qemu_img("check", img)


def test_force_share_while_a_mount_holds_the_image(workdir, mounted):
    images = workdir / "images"
    images.mkdir()
    cachefs("create", images / "vm.qcow2", "32M")
    m = mounted(images)
    assert "in use" in one_line_error(cachefs("info", images / "vm.qcow2", check=False))
    assert info_json("-U", images / "vm.qcow2")["virtual-size"] == 32 << 20
    assert cachefs("check", "-U", images / "vm.qcow2").returncode == 0
    m.umount()


# ---------------------------------------------------------------- messages (item 6)

CLI = f"{sys.executable} -m cachefs.cli"


def shell(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=_env(), timeout=120)


@pytest.mark.parametrize("args", [["info"], ["info", "--output=json"], ["check"]])
def test_closed_pipe_ends_quietly(workdir, args):
    img = workdir / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1G")
    cmd = f"{CLI} {' '.join(args)} {img}"
    r = shell(f"{cmd} | head -1")
    assert r.stderr == "" and len(r.stdout.splitlines()) == 1, r.stderr
    # `| true` closes the pipe before the first write: the broken pipe always happens.
    r = shell(f"{cmd} | true; echo ${{PIPESTATUS[0]}}")
    assert r.stderr == "", r.stderr
    assert r.stdout.strip() == "141", "exit as a tool that SIGPIPE ended (128 + 13)"


def test_stats_json_keeps_types(workdir, mounted):
    images = workdir / "images"
    images.mkdir()
    cachefs("create", images / "vm.qcow2", "32M")
    cachefs("create", images / "disk.img", "8M")
    (images / "broken.qcow2").write_bytes(b"QFI\xfb" + bytes(100))
    m = mounted(images)
    with open(m / "vm.raw", "r+b") as f:
        f.write(b"x" * 4096)
        os.fsync(f.fileno())
    out = json.loads(cachefs("stats", "--json", m.path).stdout)
    vm, disk = out["images"]["vm.raw"], out["images"]["disk.img"]
    for x in (vm, disk):
        for key in ("virtual_size", "allocated", "cluster_size", "stats.guest_writes", "stats.backend_fdatasyncs"):
            assert type(x[key]) is int, (key, x[key])
        assert x["writable"] is True
        assert x["cache"] == "writeback" and isinstance(x["stats.aio"], str)
    assert (vm["format"], vm["virtual_size"], vm["stats.guest_writes"]) == ("qcow2", 32 << 20, 1)
    assert isinstance(vm["stats.fdatasyncs_per_flush"], (int, float))
    assert isinstance(out["skipped"]["broken.raw"], str)
    m.umount()


def test_xattr_values_become_json_values():
    from cachefs.cli.main import xattr_value
    cases = {"42": 42, "0": 0, "1.500": 1.5, "true": True, "false": False, '{"a.raw": "why"}': {"a.raw": "why"},
             "writeback": "writeback", "writeback:threads": "writeback:threads", "": "", "NaN": "NaN",
             "/var/tmp/x.qcow2": "/var/tmp/x.qcow2", '"quoted"': '"quoted"', "007": "007"}
    assert {k: xattr_value(k) for k in cases} == cases


def test_help_and_version_short_options():
    assert cachefs("-V").stdout == cachefs("--version").stdout != ""
    for cmd in ([], ["create"], ["info"], ["check"], ["map"], ["stats"], ["cache"], ["mount"], ["umount"]):
        short = cachefs(*cmd, "-h")
        assert short.stdout.startswith("Usage:") and short.stdout == cachefs(*cmd, "--help").stdout


@pytest.fixture
def mistakes():
    """A directory anyone can enter, holding what the mistakes below need."""
    d = Path(tempfile.mkdtemp(prefix="cachefs-mistakes-", dir="/var/tmp"))
    d.chmod(0o755)
    qemu_img("create", "-q", "-f", "qcow2", d / "good.qcow2", "16M")
    (d / "garbage.qcow2").write_bytes(os.urandom(8192))
    (d / "short.qcow2").write_bytes(QCOW2_MAGIC + bytes(10))
    (d / "noext").write_bytes(os.urandom(8192))
    (d / "secret.qcow2").write_bytes((d / "good.qcow2").read_bytes())
    (d / "secret.qcow2").chmod(0)
    (d / "adir.qcow2").mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


MISTAKES = [
    ["info", "missing.qcow2"], ["info", "adir.qcow2"], ["info", "garbage.qcow2"], ["info", "short.qcow2"],
    ["info", "noext"], ["info", "--output=xml", "good.qcow2"], ["info", "--bogus", "good.qcow2"],
    ["check", "missing.qcow2"], ["check", "adir.qcow2"], ["check", "garbage.qcow2"], ["check", "noext"],
    ["check", "-U", "-r", "all", "good.qcow2"], ["check", "-r", "everything", "good.qcow2"],
    ["create", "good.qcow2", "1G"], ["create", "nodir/x.qcow2", "1G"], ["create", "x.qcow2", "lots"],
    ["create", "x.qcow2"], ["create", "adir.qcow2", "1G"],
    ["map", "missing.qcow2"], ["map", "garbage.qcow2"], ["map", "short.qcow2"], ["map", "noext"],
    ["map", "--output=xml", "good.qcow2"],
    ["stats", "."], ["stats", "good.qcow2"], ["stats", "missing"], ["cache", "good.qcow2"],
    ["frobnicate"],
]


@pytest.mark.parametrize("args", MISTAKES, ids=" ".join)
def test_every_mistake_is_one_line(mistakes, args):
    r = subprocess.run([sys.executable, "-m", "cachefs.cli", *args], cwd=mistakes, capture_output=True,
                       text=True, env=_env(), timeout=60)
    one_line_error(r)


@pytest.mark.parametrize("cmd", ["info", "check", "map"])
def test_permission_denied_is_one_line(mistakes, cmd):
    """Root reads any file through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: drop both from the
    bounding set (root's exec gets no others), but stay root, so a checkout in a 0700 directory
    (a clone under /root, or in a mktemp -d) still runs its own venv (issue 19: as nobody, it
    could not)."""
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    r = subprocess.run([*drop, sys.executable, "-m", "cachefs.cli", cmd, "secret.qcow2"], cwd=mistakes,
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert "readable" in one_line_error(r) or "Permission denied" in r.stderr
