"""The compiled cffi module: aligned buffers, posix_fadvise, and the data plane's ABI (dp_abi.h)."""

from __future__ import annotations

import errno
import gc
import os
import re
import shutil
import subprocess
import sys

import pytest

from cachefs import native


def test_native_module_is_built():
    # `pip install` / `make venv` compile it; without it everything still
    # works, but the install step is broken and should be fixed.
    assert native.available(), native.unavailable_reason()


needs_native = pytest.mark.skipif(not native.available(), reason="native module not built")


def address(buf) -> int:
    return int(native.ffi.cast("uintptr_t", native.ffi.from_buffer(buf)))


@needs_native
@pytest.mark.parametrize("size", [0, 1, 511, 4096, 12345, 1 << 20])
@pytest.mark.parametrize("align", [512, 4096, 65536])
def test_aligned_buffer_is_aligned_zeroed_and_writable(size, align):
    buf = native.aligned_buffer(size, align)
    mv = memoryview(buf)
    assert len(mv) == size and mv.format == "B" and not mv.readonly
    assert mv.c_contiguous
    assert address(buf) % align == 0
    assert native.address_of(mv) == address(buf)
    assert bytes(mv) == bytes(size)
    mv[:] = b"\xab" * size
    assert buf[:] == b"\xab" * size


@needs_native
def test_aligned_buffer_default_alignment_and_lifetime():
    mv = memoryview(native.aligned_buffer(3 * 4096))  # only the view survives
    gc.collect()
    assert address(mv) % 4096 == 0
    mv[-5:] = b"alive"
    assert bytes(mv[-5:]) == b"alive"


@needs_native
@pytest.mark.parametrize("align", [0, 3, 4097, 2])
def test_aligned_buffer_rejects_bad_alignment(align):
    with pytest.raises(ValueError):
        native.aligned_buffer(4096, align)


@needs_native
def test_aligned_buffer_usable_for_odirect(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(8192))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("tmp_path filesystem does not support O_DIRECT")
    try:
        buf = native.aligned_buffer(8192)
        assert os.preadv(fd, [buf], 0) == 8192
        assert bytes(buf) == path.read_bytes()
    finally:
        os.close(fd)


def test_fadvise_constants_match_os():
    for name in ("NORMAL", "RANDOM", "SEQUENTIAL", "WILLNEED", "DONTNEED", "NOREUSE"):
        assert getattr(native, f"POSIX_FADV_{name}") == getattr(os, f"POSIX_FADV_{name}")


def resident_bytes(path) -> int | None:
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout.strip())


def test_fadvise_on_a_real_file(tmp_path):
    path = tmp_path / "data"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, os.urandom(1 << 20))
        os.fdatasync(fd)  # DONTNEED only drops clean pages
        native.fadvise(fd, 0, 0, native.POSIX_FADV_DONTNEED)
        before = resident_bytes(path)
        native.fadvise(fd, 0, 1 << 20, native.POSIX_FADV_WILLNEED)
        native.fadvise(fd, 0, 0, native.POSIX_FADV_SEQUENTIAL)
        native.fadvise(fd, 4096, 4096, native.POSIX_FADV_RANDOM)
        native.fadvise(fd, 0, 0, native.POSIX_FADV_NORMAL)
        os.pread(fd, 1 << 20, 0)
        after = resident_bytes(path)
        if before is not None and after is not None:
            assert before == 0, "DONTNEED should have dropped the clean pages"
            assert after == 1 << 20
        with pytest.raises(OSError) as info:
            native.fadvise(fd, 0, 0, 12345)
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        native.fadvise(fd, 0, 0, native.POSIX_FADV_NORMAL)
    assert info.value.errno == errno.EBADF


def test_package_works_without_the_compiled_module(tmp_path):
    """A missing or broken module: available() is False, the rest still runs."""
    code = r"""
import sys, os, errno, trio
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "cachefs.native._cachefs_native":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
from cachefs import native
from cachefs.backend import FileBackend
assert not native.available() and "blocked" in native.unavailable_reason()
try:
    native.aligned_buffer(4096)
except native.NativeUnavailable:
    pass
else:
    raise AssertionError("aligned_buffer without the module")
path = sys.argv[1]
fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
native.fadvise(fd, 0, 0, native.POSIX_FADV_DONTNEED)  # os.posix_fadvise fallback
os.close(fd)
async def main():
    try:
        be = FileBackend.open(path, writable=True, direct=True)
    except Exception:
        be = FileBackend.open(path, writable=True)  # filesystem without O_DIRECT
    with be:
        await be.pwrite(3, b"fallback")
        assert await be.pread(0, 11) == b"\0\0\0fallback"
trio.run(main)
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "f")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_buffer_pool_reuses_memory_and_rezeroes_it():
    pool = native.BufferPool(limit=1 << 20)
    first = native.ffi.buffer(pool.take(8192), 8192)
    addr = native.address_of(first)
    first[:] = b"\xff" * 8192
    del first
    gc.collect()
    assert pool.pooled_bytes == 8192 and pool.stats()["pool_misses"] == 1
    again = pool.take(5000)  # the same 8 KiB class
    assert int(native.ffi.cast("uintptr_t", again)) == addr
    assert pool.hits == 1 and pool.pooled_bytes == 0
    del again
    gc.collect()
    # aligned_buffer zeroes what the shared pool hands back, dirty as it may be.
    dirty = native.aligned_buffer(4096, zero=False)
    dirty[:] = b"\xaa" * 4096
    del dirty
    gc.collect()
    assert bytes(native.aligned_buffer(4096)) == bytes(4096)


def test_buffer_pool_is_bounded():
    pool = native.BufferPool(limit=64 << 10)
    held = [pool.take(16 << 10) for _ in range(8)]  # 128 KiB handed out
    del held
    gc.collect()
    # Only 64 KiB went back on the free lists; the rest was freed.
    assert pool.pooled_bytes == 64 << 10
    big = pool.take(16 << 20)  # above max_class: a plain allocation, never pooled
    del big
    gc.collect()
    assert pool.pooled_bytes == 64 << 10


# ---------------------------------------------------------------- the data plane's ABI (issue 21)
# dp_abi.h is the interface's one source: build.py makes the cdef from it (abi_cdef, check_cdef),
# C includes it, and the counters' names come from C (dp_names.c). These tests call the checks
# the build and the import run, on the real header and on altered copies of it.

def _build_module():
    from cachefs.native import build
    return build


def _abi_text(name: str = "dp_abi.h") -> str:
    with open(os.path.join(os.path.dirname(native.__file__), name)) as f:
        return f.read()


@needs_native
def test_the_built_module_has_every_declaration_of_the_header():
    """A build older than its header (or a cdef that left something out) fails here."""
    from cffi import FFI
    build = _build_module()
    cdef = build.read_abi_cdef("dp_abi.h", "dp_testhooks.h")
    names = set(re.findall(r"\b(dp_\w+)\s*\(", cdef))
    consts = set(re.findall(r"\b(DP_[A-Z0-9_]+)\b", cdef))
    assert {"dp_create", "dp_counter_name", "dp_test_plan"} <= names and "DP_C_NIMAGE" in consts
    assert not [n for n in names if not hasattr(native.lib, n)]
    header = FFI()
    header.cdef(cdef)
    values = header.dlopen(None)  # constants only: nothing is looked up in a library
    assert {c: getattr(native.lib, c) for c in consts} == {c: getattr(values, c) for c in consts}


def test_the_cdef_refuses_a_header_cffi_would_not_read_as_the_compiler_does():
    build = _build_module()
    text = _abi_text()
    assert "dp_create" in build.check_cdef([("dp_abi.h", build.abi_cdef(text))])
    lines = text.split("\n")
    at = lines.index("#define DP_MAP_ALLOC 4")
    for bad, why in [("#define DP_MAP_ALLOC (1 << 2)", "cffi's cdef cannot take it"),
                     ("#ifdef DP_SOMETHING", "cffi's cdef cannot take it"),
                     ("#define DP_TWICE(x) ((x) * 2)", "cffi's cdef cannot take it")]:
        altered = "\n".join(lines[:at] + [bad] + lines[at + 1:])
        with pytest.raises(build.AbiError, match=rf"dp_abi.h:{at + 1}: .*{why}"):
            build.abi_cdef(altered)
    # What only cffi's parser refuses: the error still names the header and the line.
    body = "\n".join(lines[:at] + ["static inline int dp_twice(int x) { return 2 * x; }"] + lines[at + 1:])
    with pytest.raises(build.AbiError, match=rf"cffi refuses .*dp_abi.h:{at + 1}:"):
        build.check_cdef([("dp_abi.h", build.abi_cdef(body))])
    hooks = build.abi_cdef(_abi_text("dp_testhooks.h"), "dp_testhooks.h")
    abi = ("dp_abi.h", build.abi_cdef(text))
    assert "dp_test_plan" in build.check_cdef([abi, ("dp_testhooks.h", hooks)])
    at = next(n for n, line in enumerate(_abi_text("dp_testhooks.h").split("\n")) if "uint64_t seq;" in line)
    with pytest.raises(build.AbiError, match=rf"dp_testhooks.h:{at + 1}:"):
        build.check_cdef([abi, ("dp_testhooks.h", hooks.replace("uint64_t seq;", "uint64_t seq[DP_NOSUCH];"))])


@needs_native
def test_counter_names_come_from_c_and_match_its_counts():
    lib, ffi = native.lib, native.ffi
    assert native.counter_names(lib, ffi) == {"image": native.IMAGE_COUNTERS, "handle": native.HANDLE_COUNTERS,
                                             "connection": native.CONNECTION_COUNTERS}
    assert len(native.IMAGE_COUNTERS) == lib.DP_C_NIMAGE and native.IMAGE_COUNTERS[lib.DP_C_ALLOCATIONS] == \
        "fast_allocations"
    assert len(native.HANDLE_COUNTERS) == lib.DP_H_N and len(native.CONNECTION_COUNTERS) == lib.DP_G_N
    from cachefs.dataplane import plane as dataplane
    assert dataplane.IMAGE_COUNTERS is native.IMAGE_COUNTERS

    class Altered:
        """The real lib with one table's names changed."""

        def __init__(self, table, names):
            self.table, self.names = table, [ffi.new("char[]", n.encode()) for n in names]

        def __getattr__(self, name):
            return getattr(lib, name)

        def dp_counter_name(self, table, i):
            if table != self.table:
                return lib.dp_counter_name(table, i)
            return self.names[i] if i < len(self.names) else ffi.NULL

    for names in [native.IMAGE_COUNTERS[:-1], native.IMAGE_COUNTERS + ("one_more",),
                  ("fast_reads",) * len(native.IMAGE_COUNTERS)]:
        with pytest.raises(native.AbiMismatch, match="image counters"):
            native.counter_names(Altered(lib.DP_COUNTERS_IMAGE, names), ffi)


def test_the_stub_build_has_the_same_abi(tmp_path, monkeypatch):
    """Without liburing (CACHEFS_NATIVE_STUBS=1 forces it): the same cdef from the same header,
    dp_stub.c compiled against it, the counters' names still C's, `--dataplane on` refused."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    build = _build_module()
    monkeypatch.setenv("CACHEFS_NATIVE_STUBS", "1")
    assert not build.use_liburing()
    stub = build.make_ffibuilder(uring=False, absolute_sources=True)
    so = stub.compile(tmpdir=str(tmp_path), target="_cachefs_native.abi3.so")
    code = r"""
import importlib.machinery, importlib.util, sys
so = sys.argv[1]
class Stub:
    def find_spec(self, name, path=None, target=None):
        if name == "cachefs.native._cachefs_native":
            return importlib.util.spec_from_loader(name, importlib.machinery.ExtensionFileLoader(name, so))
sys.meta_path.insert(0, Stub())
from cachefs import native
from cachefs.dataplane import plane as dataplane
assert native.lib.dp_built() == 0 and native.lib.cachefs_uring_built() == 0
print(",".join(native.IMAGE_COUNTERS), ",".join(native.CONNECTION_COUNTERS), dataplane.why_unavailable())
"""
    out = subprocess.run([sys.executable, "-c", code, so], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    images, connection, why = out.stdout.split(" ", 2)
    assert images == ",".join(native.IMAGE_COUNTERS) or not native.available()
    assert connection.split(",")[0] == "requests" and "without liburing" in why


@needs_native
def test_the_module_exports_the_header_functions_and_nothing_else_of_the_data_plane():
    """Each C file is its own translation unit; what one file calls of another is DP_HIDDEN
    (dp_internal.h), so the exported dp_* functions are exactly dp_abi.h's and dp_testhooks.h's."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm")
    from cachefs.native import _cachefs_native
    so = _cachefs_native.__file__
    out = subprocess.run([nm, "-D", "--defined-only", so], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.split()[-1].startswith("dp_")}
    cdef = _build_module().read_abi_cdef("dp_abi.h", "dp_testhooks.h")
    declared = set(re.findall(r"\b(dp_\w+)\s*\(", cdef))
    if not native.lib.dp_built():  # the stub build: no test hooks
        declared = {n for n in declared if not n.startswith("dp_test_")}
    assert exported == declared
