"""The backing-chain commands against real qemu-img (issue 22): create -b, info --backing-chain,
map with depth, rebase -u, commit; hostile names refused in one line by each.

Every chain here is made by qemu-img and qemu-io, and every result is read back by
qemu-img (info, check, map, compare, convert): cachefs must write what QEMU reads and say
what QEMU says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import cachefs, one_line_error, qemu_img, qemu_io

KiB, MiB = 1 << 10, 1 << 20


def qinfo(*args) -> dict | list:
    return json.loads(qemu_img("info", "--output=json", *args).stdout)


def chain3(d, base_fmt: str = "raw") -> dict[str, str]:
    """base.{raw|qcow2} <- mid.qcow2 <- top.qcow2, 4 MiB, each layer with data, zeros and holes."""
    base = d / f"base.{base_fmt}"
    qemu_img("create", "-q", "-f", base_fmt, base, "4M")
    qemu_io(base, "write -P 1 0 1M", "write -P 7 2M 512k", fmt=base_fmt)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", base_fmt, d / "mid.qcow2")
    qemu_io(d / "mid.qcow2", "write -P 2 512k 1M", "write -z 2M 64k", "write -P 9 2200k 3k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", d / "top.qcow2")
    qemu_io(d / "top.qcow2", "write -P 3 1M 64k", "write -z 512k 64k", "write -c -P 5 3M 64k")
    return {"base": str(base), "mid": str(d / "mid.qcow2"), "top": str(d / "top.qcow2")}


@pytest.fixture
def hostile(workdir):
    """Overlays naming /etc/shadow and a FIFO (qemu-img create -u: it opens neither)."""
    os.mkfifo(workdir / "fifo.raw")
    for name, target in (("shadow.qcow2", "/etc/shadow"), ("fifo.qcow2", "fifo.raw")):
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", target, "-F", "raw", workdir / name, "1M")
    return {"shadow.qcow2": "outside", "fifo.qcow2": "FIFO"}


# ---------------------------------------------------------------- create -b

@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_create_overlay_as_qemu_img_reads_it(workdir, base_fmt):
    base = workdir / f"base.{base_fmt}"
    qemu_img("create", "-q", "-f", base_fmt, base, "3M")
    r = cachefs("create", "-b", base.name, "-F", base_fmt, workdir / "ov.qcow2")
    assert "backing_file=base." in r.stdout
    info = qinfo(workdir / "ov.qcow2")
    assert info["backing-filename"] == base.name  # recorded as given: relative stays relative
    assert info["backing-filename-format"] == base_fmt
    assert info["full-backing-filename"] == str(base)
    assert info["virtual-size"] == 3 * MiB  # the base's size
    qemu_img("check", workdir / "ov.qcow2")
    cachefs("create", "-b", base.name, "-F", base_fmt, workdir / "sized.qcow2", "8M")
    assert qinfo(workdir / "sized.qcow2")["virtual-size"] == 8 * MiB


def test_create_base_in_a_backing_dir(workdir):
    (workdir / "images").mkdir()
    (workdir / "bases").mkdir()
    base = workdir / "bases" / "b.raw"
    base.write_bytes(bytes(MiB))
    ov = workdir / "images" / "ov.qcow2"
    line = one_line_error(cachefs("create", "-b", "../bases/b.raw", "-F", "raw", ov, check=False))
    assert "outside" in line and not ov.exists()
    cachefs("create", "--backing-dir", workdir / "bases", "-b", "../bases/b.raw", "-F", "raw", ov)
    assert qinfo(ov)["backing-filename"] == "../bases/b.raw"
    assert qinfo(ov)["virtual-size"] == MiB


def test_create_mistakes_are_one_line(workdir, hostile):
    (workdir / "b.qcow2").write_bytes(b"")
    qemu_img("create", "-q", "-f", "qcow2", workdir / "b.qcow2", "1M")
    cases = {
        ("-b", "b.qcow2"): "-F",                          # qemu-img 7.2 requires -F
        ("-F", "raw"): "needs a backing file",
        ("-b", "b.qcow2", "-F", "raw"): "recorded as raw",
        ("-b", "/etc/shadow", "-F", "raw"): "outside",
        ("-b", "fifo.raw", "-F", "raw"): "FIFO",
        ("-b", "nothere.raw", "-F", "raw"): "does not exist",
    }
    for args, word in cases.items():
        line = one_line_error(cachefs("create", *args, workdir / "new.qcow2", check=False, timeout=20))
        assert word in line, (args, line)
        assert not (workdir / "new.qcow2").exists()
    line = one_line_error(cachefs("create", "-b", "b.qcow2", "-F", "qcow2", workdir / "r.raw", check=False))
    assert "qcow2" in line
    assert "SIZE" in one_line_error(cachefs("create", workdir / "new.qcow2", check=False))


# ---------------------------------------------------------------- info

@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_info_backing_chain_is_qemu_imgs(workdir, base_fmt, monkeypatch):
    chain = chain3(workdir, base_fmt)
    for top in (chain["top"], "top.qcow2", "./top.qcow2"):  # absolute, bare and ./ names, as qemu-img combines them
        monkeypatch.chdir(workdir)
        ours = cachefs("info", "--backing-chain", "--output=json", top).stdout
        assert json.loads(ours) == qinfo("--backing-chain", top)
        assert ours.rstrip("\n") == qemu_img("info", "--backing-chain", "--output=json", top).stdout.rstrip("\n")
        human = cachefs("info", "--backing-chain", top).stdout
        assert human == qemu_img("info", "--backing-chain", top).stdout
        assert cachefs("info", "--output=json", top).stdout == qemu_img("info", "--output=json", top).stdout
        assert cachefs("info", top).stdout == qemu_img("info", top).stdout
    assert "(actual path: " in cachefs("info", chain["top"]).stdout


def test_info_without_chain_opens_nothing_it_names(workdir, hostile):
    for name in hostile:
        out = json.loads(cachefs("info", "--output=json", workdir / name, timeout=20).stdout)
        assert out["backing-filename"] in ("/etc/shadow", "fifo.raw")
        assert out["backing-filename-format"] == "raw"
        assert "full-backing-filename" not in out  # the name breaks the rule: no actual path
        human = cachefs("info", workdir / name, timeout=20).stdout
        assert "(cannot determine actual path)" in human


def test_info_backing_chain_refuses_hostile_names(workdir, hostile):
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", workdir / "a.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", workdir / "b.qcow2", "1M")
    for name, word in {**hostile, "a.qcow2": "loop"}.items():
        for out in ([], ["--output=json"]):
            line = one_line_error(cachefs("info", "--backing-chain", *out, workdir / name, check=False, timeout=20))
            assert word in line and line.startswith("cachefs: ") and ": backing file " in line, line


# ---------------------------------------------------------------- map

def test_map_depth_is_qemu_imgs(workdir):
    """3-deep chains (raw and qcow2 bottoms: holes and unallocated everywhere), a 2-deep one, a
    base shorter than its overlay: the JSON equal to qemu-img's, entry for entry."""
    tops = []
    for fmt in ("raw", "qcow2"):
        d = workdir / fmt
        d.mkdir()
        chain = chain3(d, fmt)
        tops += [chain["top"], chain["mid"]]
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", workdir / "qcow2" / "long.qcow2", "6M")
    qemu_io(workdir / "qcow2" / "long.qcow2", "write -P 4 5M 64k")
    tops.append(workdir / "qcow2" / "long.qcow2")
    for top in tops:
        ours = cachefs("map", "--output=json", top).stdout
        theirs = qemu_img("map", "--output=json", top).stdout
        assert json.loads(ours) == json.loads(theirs), top
        assert ours == theirs
        human, qhuman = cachefs("map", top, check=False), qemu_img("map", top, check=False)
        if qhuman.returncode == 0:
            assert human.stdout == qhuman.stdout  # the File column: each layer's
        else:  # qemu-img stops at a compressed cluster, after some lines; cachefs says so before any
            assert "compressed" in one_line_error(human)
    depths = {e["depth"] for e in json.loads(cachefs("map", "--output=json", tops[0]).stdout)}
    assert depths == {0, 1, 2}


def test_map_merges_as_qemu_img_merges():
    from cachefs.cli.map import MapEntry, merged
    a = MapEntry(0, 64 * KiB, True, False, True, 1 * MiB, 1)
    b = MapEntry(64 * KiB, 64 * KiB, True, False, True, 1 * MiB + 64 * KiB, 1)
    far = MapEntry(128 * KiB, 64 * KiB, True, False, True, 5 * MiB, 1)
    deeper = MapEntry(192 * KiB, 64 * KiB, True, False, True, 5 * MiB + 64 * KiB, 2)
    holes = [MapEntry(256 * KiB, 64 * KiB, False, True, False, None, 2),
             MapEntry(320 * KiB, 64 * KiB, False, True, False, None, 2)]
    out = merged([a, b, far, deeper, *holes])
    assert [(e.start, e.length, e.depth) for e in out] == [
        (0, 128 * KiB, 1), (128 * KiB, 64 * KiB, 1), (192 * KiB, 64 * KiB, 2), (256 * KiB, 128 * KiB, 2)]


def test_map_refuses_hostile_names(workdir, hostile):
    for name, word in hostile.items():
        line = one_line_error(cachefs("map", "--output=json", workdir / name, check=False, timeout=20))
        assert word in line, line


# ---------------------------------------------------------------- rebase -u

def test_rebase_unsafe_as_qemu_img_reads_it(workdir):
    chain = chain3(workdir)
    old = workdir / "old.raw"
    qemu_img("convert", "-O", "raw", chain["top"], old)
    shutil.copy(chain["mid"], workdir / "moved.qcow2")  # the same guest bytes under another name
    cachefs("rebase", "-u", "-b", "moved.qcow2", "-F", "qcow2", chain["top"])
    info = qinfo(chain["top"])
    assert (info["backing-filename"], info["backing-filename-format"]) == ("moved.qcow2", "qcow2")
    qemu_img("check", chain["top"])
    qemu_img("compare", "-q", chain["top"], old)
    cachefs("rebase", "-u", "-b", "", chain["top"])
    assert "backing-filename" not in qinfo(chain["top"])
    qemu_img("check", chain["top"])
    assert qemu_io(chain["top"], "read -P 3 1M 64k").returncode == 0  # its own data stays


def test_rebase_refusals_are_one_line(workdir, hostile):
    chain = chain3(workdir)
    top = chain["top"]
    before = open(top, "rb").read()
    cases = {
        ("-u", "-b", "/etc/shadow", "-F", "raw"): "outside",
        ("-u", "-b", "fifo.raw", "-F", "raw"): "FIFO",
        ("-u", "-b", "top.qcow2", "-F", "qcow2"): "loop",
        ("-u", "-b", "mid.qcow2"): "-F",
        ("-b", "mid.qcow2", "-F", "qcow2"): "-u",
    }
    for args, word in cases.items():
        assert word in one_line_error(cachefs("rebase", *args, top, check=False, timeout=20)), args
    # A loop through the chain: base.raw cannot name anything; mid -> top -> mid can.
    assert "loop" in one_line_error(cachefs("rebase", "-u", "-b", "top.qcow2", "-F", "qcow2", chain["mid"],
                                            check=False))
    assert open(top, "rb").read() == before
    with _held(top):
        assert "in use" in one_line_error(cachefs("rebase", "-u", "-b", "", top, check=False))
    assert open(top, "rb").read() == before


class _held:
    """QEMU's write lock on ``path``, held by this process as a running VM would hold it."""

    def __init__(self, path):
        self.path = str(path)

    def __enter__(self):
        from cachefs.image.locking import ImageLock
        self.fd = os.open(self.path, os.O_RDWR)
        self.lock = ImageLock.acquire(self.fd, self.path, True)
        return self

    def __exit__(self, *exc):
        self.lock.release()
        os.close(self.fd)


# ---------------------------------------------------------------- commit

@pytest.mark.parametrize("keep", [False, True])
def test_commit_equals_qemu_img_commit(workdir, keep):
    """The same chain twice; cachefs commits one, qemu-img the other: byte for byte the same."""
    ours, theirs = workdir / "ours", workdir / "theirs"
    ours.mkdir()
    theirs.mkdir()
    a, b = chain3(ours), chain3(theirs)
    old = workdir / "old.raw"
    qemu_img("convert", "-O", "raw", a["top"], old)
    flags = ["-d"] if keep else []
    assert cachefs("commit", *flags, a["top"]).stdout == "Image committed.\n"
    qemu_img("commit", "-q", *flags, b["top"])
    for chain in (a, b):
        for layer in ("top", "mid"):
            qemu_img("check", chain[layer])
        qemu_img("compare", "-q", chain["top"], old)  # the new chain reads as the old one
        qemu_img("compare", "-q", chain["mid"], old)  # and so does the base alone
    for layer in ("top", "mid"):
        qemu_img("convert", "-O", "raw", a[layer], workdir / f"a-{layer}.raw")
        qemu_img("convert", "-O", "raw", b[layer], workdir / f"b-{layer}.raw")
        assert (workdir / f"a-{layer}.raw").read_bytes() == (workdir / f"b-{layer}.raw").read_bytes()
    ov_map = json.loads(qemu_img("map", "--output=json", a["top"]).stdout)
    assert any(e["depth"] == 0 for e in ov_map) == keep  # emptied: every range reads the base
    if not keep:
        assert qinfo(a["top"])["backing-filename"] == "mid.qcow2"
        assert os.path.getsize(a["top"]) == os.path.getsize(b["top"])


def test_commit_into_a_raw_base(workdir):
    chain = chain3(workdir)
    old, old_top = workdir / "old.raw", workdir / "old-top.raw"
    qemu_img("convert", "-O", "raw", chain["mid"], old)
    qemu_img("convert", "-O", "raw", chain["top"], old_top)
    cachefs("commit", chain["mid"])
    assert open(chain["base"], "rb").read() == old.read_bytes()
    qemu_img("check", chain["mid"])
    qemu_img("compare", "-q", chain["top"], old_top)  # the overlay above reads what it read


def test_commit_refusals_are_one_line(workdir, hostile):
    for name, word in hostile.items():
        assert word in one_line_error(cachefs("commit", workdir / name, check=False, timeout=20))
    chain = chain3(workdir)
    before = {k: open(p, "rb").read() for k, p in chain.items()}
    with _held(chain["top"]):
        assert "in use" in one_line_error(cachefs("commit", chain["top"], check=False))
    with _held(chain["mid"]):  # the base is in use: nothing is written anywhere
        assert "in use" in one_line_error(cachefs("commit", chain["top"], check=False))
    qemu_img("snapshot", "-c", "s1", chain["top"])
    before["top"] = open(chain["top"], "rb").read()
    assert "snapshots" in one_line_error(cachefs("commit", chain["top"], check=False))
    assert {k: open(p, "rb").read() for k, p in chain.items()} == before
    assert "only a qcow2" in one_line_error(cachefs("commit", chain["base"], check=False))
    qemu_img("create", "-q", "-f", "qcow2", workdir / "alone.qcow2", "1M")
    assert "no backing file" in one_line_error(cachefs("commit", workdir / "alone.qcow2", check=False))
