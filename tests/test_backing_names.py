"""Backing file names resolved safely (issue 22; docs/design.md, "Backing file names: the security rule").

Every hostile name is written into a real overlay by ``qemu-img create -u`` (unsafe: qemu-img
does not open the target) and read back from its header, so what is refused is what QEMU
records; only a NUL and an empty name, which argv cannot carry, are given as strings. Each
refusal is one UnsafeBackingName line (EACCES) that names the overlay. The strace tests prove
the resolver decides without ever opening the target: a FIFO would block, a device be touched.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from cachefs.errors import UnsafeBackingName
from cachefs.image.backing_names import (MAX_CHAIN_DEPTH, BackingFile, ChainWalk, open_checked,
                                         resolve_backing)
from cachefs.qcow2.format import parse_header_untrusted
from conftest import qemu_img

#: The backing file format name header extension (qcow2 spec, "Header extensions").
EXT_BACKING_FORMAT = 0xE2792ACA


@attrs.frozen
class Tree:
    """tmp_path/img (the image directory), tmp_path/extra (a --backing-dir), tmp_path/outside."""
    img: Path
    extra: Path
    outside: Path

    @property
    def allowed(self) -> list[str]:
        return [str(self.img), str(self.extra)]


@pytest.fixture
def tree(tmp_path) -> Tree:
    t = Tree(tmp_path / "img", tmp_path / "extra", tmp_path / "outside")
    for d in (t.img, t.extra, t.outside):
        d.mkdir()
    return t


def qcow2(path: Path, backing: str | None = None, fmt: str = "qcow2") -> Path:
    """A 1 MiB qcow2 at ``path``, recording ``backing`` (never opened: -u) with format ``fmt``."""
    args = ["-b", backing, "-F", fmt, "-u"] if backing is not None else []
    qemu_img("create", "-q", "-f", "qcow2", *args, str(path), "1M")
    return path


def raw(path: Path) -> Path:
    path.write_bytes(b"\0" * 65536)
    return path


def recorded(overlay: Path) -> tuple[str | None, str | None]:
    """The backing name and recorded backing format from an overlay's header, as qemu-img wrote them."""
    buf = overlay.read_bytes()[:65536]
    hdr = parse_header_untrusted(buf, overlay.stat().st_size)
    name = buf[hdr.backing_file_offset:hdr.backing_file_offset + hdr.backing_file_size].decode() \
        if hdr.backing_file_offset else None
    fmt = next((data.decode() for kind, data in hdr.extensions if kind == EXT_BACKING_FORMAT), None)
    return name, fmt


def resolve(tree: Tree, overlay: Path) -> BackingFile:
    name, fmt = recorded(overlay)
    return resolve_backing(str(overlay), name, fmt, allowed_dirs=tree.allowed)


def refusal(call, overlay: str = "vm.qcow2") -> str:
    """The one-line message a refused call raises; it names the overlay; the client gets EACCES."""
    with pytest.raises(UnsafeBackingName) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and "\0" not in msg, msg
    assert msg.startswith(f"{overlay}: backing file "), msg
    assert info.value.errno == errno.EACCES
    return msg


# ---------------------------------------------------------------- hostile names written by qemu-img

def _mknod(path: Path, kind: int, dev: int) -> None:
    try:
        os.mknod(path, kind | 0o600, dev)
    except PermissionError:
        pytest.skip("device nodes need CAP_MKNOD")


def _device(t: Tree) -> str:
    _mknod(t.img / "disk.raw", stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    return "disk.raw"


def _block_device(t: Tree) -> str:
    _mknod(t.img / "sda.raw", stat.S_IFBLK, os.makedev(7, 0))  # /dev/loop0's numbers
    return "sda.raw"


def _fifo(t: Tree) -> str:
    os.mkfifo(t.img / "pipe.raw")
    return "pipe.raw"


def _socket(t: Tree) -> str:
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(t.img)  # sun_path holds 108 bytes: bind by a short relative name
    try:
        sock.bind("sock.raw")
    finally:
        os.chdir(cwd)
        sock.close()  # the socket file stays
    return "sock.raw"


def _directory(t: Tree) -> str:
    (t.img / "dir.qcow2").mkdir()
    return "dir.qcow2"


def _dotdot_outside(t: Tree) -> str:
    qcow2(t.img.parent / "outside.qcow2")
    return "../outside.qcow2"


def _symlink_outside(t: Tree) -> str:
    (t.img / "link.qcow2").symlink_to(qcow2(t.outside / "base.qcow2"))
    return "link.qcow2"


def _dir_symlink_outside(t: Tree) -> str:
    """A directory symlink: the '..'-free name goes out through it."""
    qcow2(t.outside / "base.qcow2")
    (t.img / "sub").symlink_to(t.outside)
    return "sub/base.qcow2"


def _prefix_sibling(t: Tree) -> str:
    """/x/img2 shares /x/img's string prefix, not its components."""
    (t.img.parent / "img2").mkdir()
    return str(qcow2(t.img.parent / "img2" / "base.qcow2"))


def _symlink_loop(t: Tree) -> str:
    (t.img / "a.qcow2").symlink_to("b.qcow2")
    (t.img / "b.qcow2").symlink_to("a.qcow2")
    return "a.qcow2"


def _raw_behind_qcow2_link(t: Tree) -> str:
    """base.qcow2 -> guest.raw: a raw disk (whose content the guest controls) must stay raw."""
    (t.img / "base.qcow2").symlink_to(raw(t.img / "guest.raw"))
    return "base.qcow2"


def _file(name: str, make=raw):
    def setup(t: Tree) -> str:
        make(t.img / name)
        return name
    return setup


HOSTILE = [  # (id, setup returning the name, recorded format, what the refusal says)
    ("etc-shadow", lambda t: "/etc/shadow", "raw", "resolves outside"),
    ("dev-null-abs", lambda t: "/dev/null", "raw", "resolves outside"),
    ("char-device", _device, "raw", "is a device node, not a regular file"),
    ("block-device", _block_device, "raw", "is a device node, not a regular file"),
    ("fifo", _fifo, "raw", "is a FIFO, not a regular file"),
    ("socket", _socket, "raw", "is a socket, not a regular file"),
    ("directory", _directory, "qcow2", "is a directory, not a regular file"),
    ("dotdot-outside", _dotdot_outside, "qcow2", "resolves outside"),
    ("symlink-outside", _symlink_outside, "qcow2", "resolves outside"),
    ("dir-symlink-outside", _dir_symlink_outside, "qcow2", "resolves outside"),
    ("prefix-sibling", _prefix_sibling, "qcow2", "resolves outside"),
    ("symlink-loop", _symlink_loop, "qcow2", "cannot be resolved (Too many levels of symbolic links)"),
    ("missing", lambda t: "gone.qcow2", "qcow2", "the backing file does not exist"),
    ("json", lambda t: 'json:{"file.filename":"/etc/passwd"}', "raw", "json: specifications are not followed"),
    ("nbd", lambda t: "nbd://host/x", "raw", "protocol 'nbd:' is not followed"),
    ("http", lambda t: "http://x/y", "raw", "protocol 'http:' is not followed"),
    ("https", lambda t: "https://x/y", "raw", "protocol 'https:' is not followed"),
    ("file-protocol", lambda t: "file:/etc/passwd", "raw", "protocol 'file:' is not followed"),
    ("ssh", lambda t: "ssh://h/p", "raw", "protocol 'ssh:' is not followed"),
    ("word-colon", lambda t: "a:b.qcow2", "qcow2", "protocol 'a:' is not followed"),
    ("newline", lambda t: "x\ny.qcow2", "qcow2", "contains a control character"),
    ("raw-recorded-qcow2", _file("base.raw"), "qcow2", "recorded as qcow2 but its name 'base.raw' makes it raw"),
    ("img-recorded-qcow2", _file("base.img"), "qcow2", "recorded as qcow2 but its name 'base.img' makes it raw"),
    ("qcow2-recorded-raw", _file("base.qcow2", qcow2), "raw",
     "recorded as raw but its name 'base.qcow2' makes it qcow2"),
    ("no-suffix", _file("base"), "raw", "'base' has no .qcow2, .raw or .img suffix"),
    ("qcow2-link-to-raw", _raw_behind_qcow2_link, "qcow2", "recorded as qcow2 but its name 'guest.raw' makes it raw"),
    ("unknown-format", _file("base.raw"), "vmdk", "backing format 'vmdk' is not qcow2 or raw"),
]


@pytest.mark.parametrize("setup, fmt, why", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_a_hostile_name_recorded_by_qemu_img_is_refused(tree, setup, fmt, why):
    name = setup(tree)
    overlay = qcow2(tree.img / "vm.qcow2", name, fmt)
    assert recorded(overlay) == (name, fmt)
    msg = refusal(lambda: resolve(tree, overlay))
    assert why in msg, msg
    assert msg.startswith(f"vm.qcow2: backing file {name!r} refused: "), msg


@pytest.mark.parametrize("name, why", [("", "the name is empty"),
                                       ("base\0.qcow2", "contains a control character"),
                                       ("\0/etc/passwd", "contains a control character"),
                                       ("ba\rse.qcow2", "contains a control character")])
def test_names_argv_cannot_carry_are_refused_too(tree, name, why):
    qcow2(tree.img / "base.qcow2")
    msg = refusal(lambda: resolve_backing(str(tree.img / "vm.qcow2"), name, "qcow2", allowed_dirs=tree.allowed))
    assert why in msg and "\0" not in msg


def test_a_long_hostile_name_is_shown_cut_short(tree):
    msg = refusal(lambda: resolve_backing(str(tree.img / "vm.qcow2"), "json:{" + "x" * 1000 + "}", None,
                                          allowed_dirs=tree.allowed))
    assert len(msg) < 300 and "..." in msg


def test_an_overlay_with_a_newline_in_its_own_name_still_gets_one_line(tree):
    msg = refusal(lambda: resolve_backing(str(tree.img / "v\nm.qcow2"), "/etc/passwd", "raw",
                                          allowed_dirs=tree.allowed), overlay="'v\\nm.qcow2'")
    assert "resolves outside" in msg


# ---------------------------------------------------------------- names that are followed

def _same_dir(t: Tree) -> tuple[str, Path]:
    return "base.qcow2", qcow2(t.img / "base.qcow2")


def _subdirectory(t: Tree) -> tuple[str, Path]:
    (t.img / "sub").mkdir()
    return "sub/base.qcow2", qcow2(t.img / "sub" / "base.qcow2")


def _absolute_inside(t: Tree) -> tuple[str, Path]:
    base = qcow2(t.img / "base.qcow2")
    return str(base), base


def _backing_dir_absolute(t: Tree) -> tuple[str, Path]:
    base = qcow2(t.extra / "golden.qcow2")
    return str(base), base


def _backing_dir_relative(t: Tree) -> tuple[str, Path]:
    """'..' leaves the image directory but lands in a --backing-dir: allowed."""
    return "../extra/golden.qcow2", qcow2(t.extra / "golden.qcow2")


def _symlink_inside(t: Tree) -> tuple[str, Path]:
    (t.img / "sub").mkdir()
    base = qcow2(t.img / "sub" / "base.qcow2")
    (t.img / "current.qcow2").symlink_to("sub/base.qcow2")
    return "current.qcow2", base


def _dotdot_inside(t: Tree) -> tuple[str, Path]:
    (t.img / "sub").mkdir()
    return "sub/../base.qcow2", qcow2(t.img / "base.qcow2")


def _colon_after_slash(t: Tree) -> tuple[str, Path]:
    """QEMU reads './a:b.qcow2' as a file (the '/' comes first): so does cachefs."""
    return "./a:b.qcow2", qcow2(t.img / "a:b.qcow2")


ACCEPTED = [("same-dir", _same_dir), ("subdirectory", _subdirectory), ("absolute-inside", _absolute_inside),
            ("backing-dir-absolute", _backing_dir_absolute), ("backing-dir-relative", _backing_dir_relative),
            ("symlink-inside", _symlink_inside), ("dotdot-inside", _dotdot_inside),
            ("colon-after-slash", _colon_after_slash)]


@pytest.mark.parametrize("setup", [a[1] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
@pytest.mark.parametrize("fmt", ["qcow2", None], ids=["recorded", "unrecorded"])
def test_a_name_inside_the_allowed_dirs_is_followed(tree, setup, fmt):
    """``fmt`` None: an overlay without the backing format extension (qemu-img before 6.1 wrote
    none; 7.2 refuses -b without -F), whose base is read in the format its name gives."""
    name, base = setup(tree)
    overlay = qcow2(tree.img / "vm.qcow2", name, "qcow2")
    assert recorded(overlay) == (name, "qcow2")
    got = resolve_backing(str(overlay), name, fmt, allowed_dirs=tree.allowed)
    st = base.stat()
    assert got == BackingFile(os.path.realpath(base), "qcow2", name, overlay=str(overlay),
                              st_dev=st.st_dev, st_ino=st.st_ino)


def test_a_raw_base_is_followed_as_raw(tree):
    raw(tree.img / "base.img")
    got = resolve(tree, qcow2(tree.img / "vm.qcow2", "base.img", "raw"))
    assert (got.path, got.format) == (str(tree.img / "base.img"), "raw")


def test_a_relative_name_resolves_against_the_overlays_directory_not_the_cwd(tree, monkeypatch):
    (tree.img / "sub").mkdir()
    base = qcow2(tree.img / "sub" / "base.qcow2")
    monkeypatch.chdir(tree.outside)
    got = resolve(tree, qcow2(tree.img / "sub" / "vm.qcow2", "base.qcow2"))
    assert got.path == str(base)


# ---------------------------------------------------------------- chains: loops and depth

def walk(tree: Tree, top: Path, limit: int = MAX_CHAIN_DEPTH) -> list[str]:
    """Follow a chain from ``top`` as the image layer will: resolve each name, enter it, go down.
    Returns the real paths of the backing files, top first excluded."""
    chain, current, seen = [], top, ChainWalk(str(top), limit=limit)
    while True:
        name, fmt = recorded(current)
        if name is None:
            return chain
        backing = resolve_backing(str(current), name, fmt, allowed_dirs=tree.allowed)
        seen.enter(backing)
        chain.append(backing.path)
        if backing.format != "qcow2":
            return chain
        current = Path(backing.path)


def test_an_image_backing_itself_is_a_loop(tree):
    top = qcow2(tree.img / "vm.qcow2", "vm.qcow2")
    msg = refusal(lambda: walk(tree, top))
    assert msg.endswith("refused: it is already in the chain (a loop: vm.qcow2 -> vm.qcow2)"), msg


def test_a_three_loop_through_symlinks_is_found_by_file_identity(tree):
    """a -> lb (symlink to b) -> lc (to c) -> la (to a): no name repeats, the files do."""
    for me, nxt in (("a", "b"), ("b", "c"), ("c", "a")):
        qcow2(tree.img / f"{me}.qcow2", f"l{nxt}.qcow2")
        (tree.img / f"l{nxt}.qcow2").symlink_to(f"{nxt}.qcow2")
    msg = refusal(lambda: walk(tree, tree.img / "a.qcow2"), overlay="c.qcow2")
    assert msg == ("c.qcow2: backing file 'la.qcow2' refused: it is already in the chain "
                   "(a loop: a.qcow2 -> b.qcow2 -> c.qcow2 -> a.qcow2)")


def test_a_loop_through_a_hard_link_is_found(tree):
    top = qcow2(tree.img / "vm.qcow2", "again.qcow2")
    os.link(top, tree.img / "again.qcow2")
    assert "already in the chain" in refusal(lambda: walk(tree, top))


def test_a_top_reached_through_a_symlink_is_still_itself(tree):
    """The top is stat'ed following its link: the chain coming back to the real file is a loop."""
    qcow2(tree.img / "real.qcow2", "real.qcow2")
    (tree.img / "vm.qcow2").symlink_to("real.qcow2")
    assert "a loop: vm.qcow2 -> real.qcow2" in refusal(lambda: walk(tree, tree.img / "vm.qcow2"))


def _chain(tree: Tree, depth: int) -> Path:
    """l0 (the top) -> l1 -> ... -> l{depth}: ``depth`` backing files."""
    qcow2(tree.img / f"l{depth}.qcow2")
    for i in reversed(range(depth)):
        qcow2(tree.img / f"l{i}.qcow2", f"l{i + 1}.qcow2")
    return tree.img / "l0.qcow2"


def test_a_chain_of_max_depth_is_followed_and_one_deeper_is_refused(tree):
    assert len(walk(tree, _chain(tree, MAX_CHAIN_DEPTH))) == MAX_CHAIN_DEPTH
    qcow2(tree.img / f"l{MAX_CHAIN_DEPTH}.qcow2", f"l{MAX_CHAIN_DEPTH + 1}.qcow2")
    qcow2(tree.img / f"l{MAX_CHAIN_DEPTH + 1}.qcow2")
    msg = refusal(lambda: walk(tree, tree.img / "l0.qcow2"), overlay=f"l{MAX_CHAIN_DEPTH}.qcow2")
    assert msg.endswith(f"refused: the chain would be deeper than {MAX_CHAIN_DEPTH} backing files"), msg


def test_the_limit_is_a_parameter(tree):
    top = _chain(tree, 3)
    assert len(walk(tree, top, limit=3)) == 3
    assert "deeper than 2 backing files" in refusal(lambda: walk(tree, top, limit=2), overlay="l2.qcow2")


def test_a_hand_made_backing_file_is_not_entered(tree):
    walker = ChainWalk(str(qcow2(tree.img / "vm.qcow2")))
    fake = BackingFile(str(tree.img / "base.qcow2"), "qcow2", "base.qcow2")
    assert "not resolved" in refusal(lambda: walker.enter(fake))
    assert walker.depth == 0


# ---------------------------------------------------------------- open_checked: the open cannot be raced

def _resolved(tree: Tree, name: str = "base.qcow2") -> BackingFile:
    return resolve_backing(str(tree.img / "vm.qcow2"), name, "qcow2", allowed_dirs=tree.allowed)


def test_open_checked_opens_the_resolved_file_blocking_and_close_on_exec(tree):
    base = qcow2(tree.img / "base.qcow2")
    fd = open_checked(_resolved(tree), os.O_RDONLY)
    try:
        assert os.pread(fd, 4, 0) == b"QFI\xfb"
        assert (os.fstat(fd).st_ino, os.readlink(f"/proc/self/fd/{fd}")) == (base.stat().st_ino, str(base))
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert not flags & os.O_NONBLOCK and flags & os.O_ACCMODE == os.O_RDONLY
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)


def test_a_file_renamed_over_the_resolved_one_is_refused(tree):
    qcow2(tree.img / "base.qcow2")
    backing = _resolved(tree)
    os.replace(qcow2(tree.img / "other.qcow2"), tree.img / "base.qcow2")
    assert "the file changed after it was resolved" in refusal(lambda: open_checked(backing, os.O_RDONLY))


def test_a_fifo_swapped_in_is_refused_without_blocking(tree):
    """O_PATH first: the FIFO is never opened for reading, so nothing waits for a writer."""
    qcow2(tree.img / "base.qcow2")
    backing = _resolved(tree)
    os.unlink(tree.img / "base.qcow2")
    os.mkfifo(tree.img / "base.qcow2")
    assert "changed after it was resolved" in refusal(lambda: open_checked(backing, os.O_RDONLY))


def test_a_symlink_swapped_in_is_refused(tree):
    base = qcow2(tree.img / "base.qcow2")
    backing = _resolved(tree)
    os.rename(base, tree.img / "moved.qcow2")
    (tree.img / "base.qcow2").symlink_to("moved.qcow2")  # the same file, by a link: O_NOFOLLOW sees the link
    assert "changed after it was resolved" in refusal(lambda: open_checked(backing, os.O_RDONLY))


def test_a_directory_swapped_for_a_symlink_outside_is_refused_by_path(tree):
    """The same inode, moved outside and reached through a directory symlink: fstat alone would
    pass it; the kernel's path of the descriptor does not."""
    (tree.img / "sub").mkdir()
    qcow2(tree.img / "sub" / "base.qcow2")
    backing = _resolved(tree, "sub/base.qcow2")
    os.rename(tree.img / "sub", tree.outside / "sub")
    (tree.img / "sub").symlink_to(tree.outside / "sub")
    assert "its path changed after it was resolved" in refusal(lambda: open_checked(backing, os.O_RDONLY))


def test_a_vanished_file_is_refused(tree):
    qcow2(tree.img / "base.qcow2")
    backing = _resolved(tree)
    os.unlink(tree.img / "base.qcow2")
    assert "no longer exists" in refusal(lambda: open_checked(backing, os.O_RDONLY))


def test_open_checked_takes_only_resolved_files_and_never_creates(tree):
    qcow2(tree.img / "base.qcow2")
    fake = BackingFile(str(tree.img / "base.qcow2"), "qcow2", "base.qcow2", overlay=str(tree.img / "vm.qcow2"))
    assert "not resolved" in refusal(lambda: open_checked(fake, os.O_RDONLY))
    with pytest.raises(ValueError):
        open_checked(_resolved(tree), os.O_RDWR | os.O_CREAT)


# ---------------------------------------------------------------- the resolver never opens a target

_RESOLVE_EACH = """
import sys
from cachefs.errors import UnsafeBackingName
from cachefs.image.backing_names import resolve_backing
overlay, allowed, *names = sys.argv[1:]
for name in names:
    try:
        print(name, "followed", resolve_backing(overlay, name, None, allowed_dirs=[allowed]).format)
    except UnsafeBackingName as e:
        print(name, "refused", e)
"""

#: Targets the strace run resolves: (setup, what the resolver answers). The regular file is
#: there to show that even a followed name is decided without an open.
_TRACED = [(_fifo, "is a FIFO"), (_device, "is a device node"), (_block_device, "is a device node"),
           (_socket, "is a socket"), (_directory, "is a directory"), (_file("base.raw"), "followed raw")]


def test_the_resolver_never_opens_the_target(tree, tmp_path):
    """Under strace: not one open/openat/openat2 of a FIFO, a device node, a socket, a directory
    or a regular file the names lead to (a FIFO's open would block here, a device's reach its driver)."""
    names = [setup(tree) for setup, _ in _TRACED]
    trace = tmp_path / "trace"
    out = subprocess.run(["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(trace),
                          sys.executable, "-c", _RESOLVE_EACH, str(tree.img / "vm.qcow2"), str(tree.img), *names],
                         capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    lines = out.stdout.splitlines()
    assert len(lines) == len(_TRACED), out
    for line, name, (_, answer) in zip(lines, names, _TRACED):
        assert line.startswith(f"{name} ") and answer in line, line
    opens = trace.read_text().splitlines()
    assert any("backing_names" in o for o in opens), "strace saw no opens at all"
    touched = [o for o in opens if str(tree.img) in o or any(n in o for n in names)]
    assert touched == []
