"""cffi build script (API mode) for ``cachefs.native._cachefs_native``.

It is run at install time through ``setup.py``'s ``cffi_modules``, and can be
run by hand (``python cachefs/native/build.py``) to compile in place.

The module is assembled from *sections*. Each section contributes C
declarations (``cdef``) and the C source that implements or includes them.
A section may also name C files of this directory compiled on their own, and
libraries to link (io_uring links liburing). A new kernel interface adds a
section here and its Python wrapper in ``__init__.py``; nothing else needs to
change.

The data plane's section is different: its cdef is not written here but read
from its header, dp_abi.h (abi_cdef), which its C files include too.
CACHEFS_NATIVE_STUBS=1 builds as a machine without liburing does (stubs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from cffi import FFI, CDefError, FFIError

MODULE_NAME = "cachefs.native._cachefs_native"

#: This directory: a section whose C lives in files here names them (headers, sources).
HERE = os.path.dirname(os.path.abspath(__file__))
#: The project's root (setup.py's directory).
ROOT = os.path.dirname(os.path.dirname(HERE))


class Section:
    """Part of the module: its declarations for cffi, the C that implements or includes them,
    C files of this directory compiled as translation units of their own, libraries to link.
    (A plain class: cffi's setuptools hook runs this file with exec, not as a module, and
    dataclasses needs the module.)"""

    __slots__ = ("name", "cdef", "source", "sources", "libraries")

    def __init__(self, name: str, cdef: str, source: str = "", sources: tuple[str, ...] = (),
                 libraries: tuple[str, ...] = ()) -> None:
        self.name, self.cdef, self.source, self.sources, self.libraries = name, cdef, source, sources, libraries


#: The sections every build has, in module order; make_ffibuilder adds io_uring and the data plane.
SECTIONS: list[Section] = []


def section(name: str, cdef: str, source: str = "", libraries: tuple[str, ...] = ()) -> None:
    SECTIONS.append(Section(name, cdef, source, libraries=libraries))


# Types the cdef parser does not know; the compiler fills in the real size.
section(
    "types",
    cdef="""
    typedef int... off_t;
    """,
    source="""
    #include <sys/types.h>
    """,
)

# Aligned memory for O_DIRECT: the buffer address must be aligned to the
# logical block size of the device (4096 covers every device we expect).
section(
    "aligned",
    cdef="""
    int posix_memalign(void **memptr, size_t alignment, size_t size);
    void free(void *ptr);
    void *memset(void *s, int c, size_t n);
    """,
    source="""
    #include <stdlib.h>
    #include <string.h>
    """,
)

# posix_fadvise returns an errno value (it does not set errno).
section(
    "fadvise",
    cdef="""
    #define POSIX_FADV_NORMAL ...
    #define POSIX_FADV_RANDOM ...
    #define POSIX_FADV_SEQUENTIAL ...
    #define POSIX_FADV_WILLNEED ...
    #define POSIX_FADV_DONTNEED ...
    #define POSIX_FADV_NOREUSE ...
    int posix_fadvise(int fd, off_t offset, off_t len, int advice);
    """,
    source="""
    #include <fcntl.h>
    """,
)

# Linux native AIO (DESIGN.md section 4, seed 004): io_submit with an eventfd
# whose readiness trio awaits, so no thread hop per request. Raw syscalls on
# the kernel ABI of <linux/aio_abi.h>, not libaio: one less build and runtime
# dependency, and we need only five calls. The helpers below exist to keep
# per-field cffi traffic off the hot path: one C call fills an iocb (and its
# slot in the pointer array handed to io_submit), one C call reaps up to N
# events into two flat arrays. Every wrapper returns >= 0 or -errno, the
# kernel's own convention, so Python never has to read errno.
section(
    "linux_aio",
    cdef="""
    typedef int... aio_context_t;
    struct iocb { ...; };
    struct io_event { ...; };
    static const int IOCB_CMD_PREAD;
    static const int IOCB_CMD_PWRITE;
    static const int IOCB_CMD_FDSYNC;
    static const int IOCB_FLAG_RESFD;
    #define EFD_NONBLOCK ...
    #define EFD_CLOEXEC ...

    long cachefs_io_setup(unsigned nr_events, aio_context_t *ctx);
    long cachefs_io_destroy(aio_context_t ctx);
    long cachefs_io_submit(aio_context_t ctx, long nr, struct iocb **iocbs);
    long cachefs_io_cancel(aio_context_t ctx, struct iocb *iocb);
    long cachefs_io_reap(aio_context_t ctx, long min_nr, long nr,
                         struct io_event *scratch, uint64_t *data, int64_t *res);
    void cachefs_iocb_prep(struct iocb *iocbs, struct iocb **ptrs, long pos, long slot,
                           int opcode, int fd, void *buf, uint64_t nbytes,
                           int64_t offset, int resfd);
    int cachefs_eventfd(void);
    """,
    source="""
    #include <errno.h>
    #include <stdint.h>
    #include <string.h>
    #include <time.h>
    #include <unistd.h>
    #include <sys/eventfd.h>
    #include <sys/syscall.h>
    #include <linux/aio_abi.h>

    static long cachefs_ret(long r) { return r < 0 ? -errno : r; }

    long cachefs_io_setup(unsigned nr_events, aio_context_t *ctx) {
        *ctx = 0;  /* io_setup(2): *ctx must be 0 on entry */
        return cachefs_ret(syscall(SYS_io_setup, nr_events, ctx));
    }

    /* Blocks until every request of the context has completed (fs/aio.c,
       io_destroy: "Wait until all IO for the context are done"), so the
       buffers may be freed once it returns. */
    long cachefs_io_destroy(aio_context_t ctx) {
        return cachefs_ret(syscall(SYS_io_destroy, ctx));
    }

    /* Returns how many iocbs (from the front) the kernel took, or -errno
       when it took none: the error belongs to iocbs[0]. */
    long cachefs_io_submit(aio_context_t ctx, long nr, struct iocb **iocbs) {
        return cachefs_ret(syscall(SYS_io_submit, ctx, nr, iocbs));
    }

    /* File I/O is not cancellable (-EINVAL); kept for completeness. Success
       is -EINPROGRESS: the event still arrives through the ring (fs/aio.c). */
    long cachefs_io_cancel(aio_context_t ctx, struct iocb *iocb) {
        struct io_event ev;
        return cachefs_ret(syscall(SYS_io_cancel, ctx, iocb, &ev));
    }

    /* Reap between min_nr and nr events; min_nr == 0 never blocks. */
    long cachefs_io_reap(aio_context_t ctx, long min_nr, long nr,
                         struct io_event *scratch, uint64_t *data, int64_t *res) {
        struct timespec zero = {0, 0};
        long n = cachefs_ret(syscall(SYS_io_getevents, ctx, min_nr, nr, scratch,
                                     min_nr == 0 ? &zero : NULL));
        for (long i = 0; i < n; i++) {
            data[i] = scratch[i].data;
            res[i] = scratch[i].res;
        }
        return n;
    }

    void cachefs_iocb_prep(struct iocb *iocbs, struct iocb **ptrs, long pos, long slot,
                           int opcode, int fd, void *buf, uint64_t nbytes,
                           int64_t offset, int resfd) {
        struct iocb *cb = &iocbs[slot];
        memset(cb, 0, sizeof *cb);  /* aio_reserved2 and aio_rw_flags must be 0 */
        cb->aio_data = (uint64_t)slot;
        cb->aio_lio_opcode = (uint16_t)opcode;
        cb->aio_fildes = (uint32_t)fd;
        cb->aio_buf = (uint64_t)(uintptr_t)buf;
        cb->aio_nbytes = nbytes;
        cb->aio_offset = offset;
        if (resfd >= 0) {
            cb->aio_flags = IOCB_FLAG_RESFD;
            cb->aio_resfd = (uint32_t)resfd;
        }
        ptrs[pos] = cb;
    }

    int cachefs_eventfd(void) {
        int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        return fd < 0 ? -errno : fd;
    }
    """,
)


# io_uring (DESIGN.md section 4, issue 5): like the AIO section, one C call
# preps an SQE and one reaps up to N CQEs into flat arrays, so Python never
# touches ring memory; completions signal an eventfd registered with the
# ring, which trio awaits. Unlike Linux AIO it is asynchronous for buffered
# I/O too. liburing (liburing-dev; 2.3 on Debian 12) does the ring set-up
# and barriers; its inline prep/peek helpers are wrapped here. Every wrapper
# returns >= 0 or -errno, as liburing does.
#
# Without liburing at build time the section compiles to stubs that report
# -ENOSYS and cachefs_uring_built() == 0, so the rest of the module (aligned
# buffers, Linux AIO) still builds and `--aio io_uring` says what is missing.
_URING_CDEF = """
    struct io_uring { ...; };
    static const int IORING_OP_FSYNC;
    static const int IORING_OP_READ;
    static const int IORING_OP_WRITE;
    static const int IORING_FSYNC_DATASYNC;

    int cachefs_uring_built(void);
    int cachefs_uring_init(struct io_uring *ring, unsigned entries, int efd);
    int cachefs_uring_prep(struct io_uring *ring, int opcode, int fd, void *buf, unsigned nbytes,
                           uint64_t offset, unsigned flags, uint64_t user_data);
    int cachefs_uring_submit(struct io_uring *ring);
    unsigned cachefs_uring_sq_ready(struct io_uring *ring);
    unsigned cachefs_uring_unprep(struct io_uring *ring);
    int cachefs_uring_reap(struct io_uring *ring, unsigned min_nr, unsigned nr,
                           uint64_t *data, int64_t *res);
    int cachefs_uring_exit(struct io_uring *ring, unsigned in_flight);
"""

_URING_SOURCE = """
    #include <errno.h>
    #include <stdint.h>
    #include <liburing.h>

    int cachefs_uring_built(void) { return 1; }

    /* IORING_SETUP_SUBMIT_ALL (5.18): one bad SQE does not stop the rest of
       the batch, it completes with its error like the others. Older kernels
       refuse the flag (-EINVAL) and get a plain ring. */
    int cachefs_uring_init(struct io_uring *ring, unsigned entries, int efd) {
        int r = io_uring_queue_init(entries, ring, IORING_SETUP_SUBMIT_ALL);
        if (r == -EINVAL)
            r = io_uring_queue_init(entries, ring, 0);
        if (r < 0)
            return r;
        r = io_uring_register_eventfd(ring, efd);
        if (r < 0)
            io_uring_queue_exit(ring);
        return r;
    }

    /* One SQE; -EBUSY when the SQ ring is full (callers keep in-flight
       requests under the ring size, so never in practice). For FSYNC the
       flags are the fsync_flags (IORING_FSYNC_DATASYNC), which share the
       rw_flags word; for READ/WRITE they are RWF_* flags. */
    int cachefs_uring_prep(struct io_uring *ring, int opcode, int fd, void *buf, unsigned nbytes,
                           uint64_t offset, unsigned flags, uint64_t user_data) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
        if (!sqe)
            return -EBUSY;
        io_uring_prep_rw(opcode, sqe, fd, buf, nbytes, offset);
        sqe->rw_flags = flags;
        io_uring_sqe_set_data64(sqe, user_data);
        return 0;
    }

    /* SQEs handed to the kernel by this call, or -errno (none taken). */
    int cachefs_uring_submit(struct io_uring *ring) { return io_uring_submit(ring); }

    /* Prepared SQEs the kernel has not consumed yet. */
    unsigned cachefs_uring_sq_ready(struct io_uring *ring) { return io_uring_sq_ready(ring); }

    /* Take back the SQEs a failed io_uring_submit left in the SQ ring, so a
       refused request is refused for good rather than submitted by some
       later call after its caller was told it failed. Safe without SQPOLL:
       the kernel reads the SQ tail only inside io_uring_enter, which this
       thread alone calls, and its head is then the ring's khead. Returns how
       many were dropped (the last ones prepped). */
    unsigned cachefs_uring_unprep(struct io_uring *ring) {
        unsigned head = *ring->sq.khead;
        unsigned n = ring->sq.sqe_tail - head;
        ring->sq.sqe_tail = ring->sq.sqe_head = head;
        io_uring_smp_store_release(ring->sq.ktail, head);
        return n;
    }

    /* Reap up to nr CQEs, first waiting for min_nr of them (0: never blocks). */
    int cachefs_uring_reap(struct io_uring *ring, unsigned min_nr, unsigned nr,
                           uint64_t *data, int64_t *res) {
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;
        if (min_nr) {
            int r = io_uring_wait_cqe_nr(ring, &cqe, min_nr);
            if (r < 0)
                return r;
        }
        io_uring_for_each_cqe(ring, head, cqe) {
            if (n == nr)
                break;
            data[n] = cqe->user_data;
            res[n] = cqe->res;
            n++;
        }
        io_uring_cq_advance(ring, n);
        return (int)n;
    }

    /* Tear the ring down once the kernel is done with every buffer.
       Closing the ring fd alone does not wait: the kernel cancels or
       finishes in-flight requests in a background worker, and a buffered
       read punted to io-wq may still write into its buffer after close
       returns. So first wait for the completions of the requests the kernel
       took (in_flight minus those still sitting unsubmitted in the SQ
       ring). 0, or -errno with the ring left open (the caller then must
       not free the buffers). */
    int cachefs_uring_exit(struct io_uring *ring, unsigned in_flight) {
        unsigned unsubmitted = io_uring_sq_ready(ring);
        unsigned owed = in_flight > unsubmitted ? in_flight - unsubmitted : 0;
        while (owed) {
            struct io_uring_cqe *cqe;
            unsigned head, n = 0;
            int r = io_uring_wait_cqe(ring, &cqe);
            if (r == -EINTR || r == -EAGAIN)
                continue;
            if (r < 0)
                return r;
            io_uring_for_each_cqe(ring, head, cqe)
                n++;
            io_uring_cq_advance(ring, n);
            owed = n < owed ? owed - n : 0;
        }
        io_uring_queue_exit(ring);
        return 0;
    }
"""

# Built without liburing: the same names, kernel-ABI constants, no ring.
_URING_STUB_SOURCE = """
    #include <errno.h>
    #include <stdint.h>
    struct io_uring { int unused; };
    static const int IORING_OP_FSYNC = 3;
    static const int IORING_OP_READ = 22;
    static const int IORING_OP_WRITE = 23;
    static const int IORING_FSYNC_DATASYNC = 1;
    int cachefs_uring_built(void) { return 0; }
    int cachefs_uring_init(struct io_uring *ring, unsigned entries, int efd) { return -ENOSYS; }
    int cachefs_uring_prep(struct io_uring *ring, int opcode, int fd, void *buf, unsigned nbytes,
                           uint64_t offset, unsigned flags, uint64_t user_data) { return -ENOSYS; }
    int cachefs_uring_submit(struct io_uring *ring) { return -ENOSYS; }
    unsigned cachefs_uring_sq_ready(struct io_uring *ring) { return 0; }
    unsigned cachefs_uring_unprep(struct io_uring *ring) { return 0; }
    int cachefs_uring_reap(struct io_uring *ring, unsigned min_nr, unsigned nr,
                           uint64_t *data, int64_t *res) { return -ENOSYS; }
    int cachefs_uring_exit(struct io_uring *ring, unsigned in_flight) { return 0; }
"""


def have_liburing() -> bool:
    """Whether liburing's header and library are there to compile and link against."""
    cc = os.environ.get("CC", "cc").split()
    if shutil.which(cc[0]) is None:
        return False
    probe = "#include <liburing.h>\nint main(void) { struct io_uring r; return io_uring_queue_init(1, &r, 0); }\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(probe)
        r = subprocess.run([*cc, src, "-o", os.path.join(tmp, "probe"), "-luring"], capture_output=True)
    return r.returncode == 0


def use_liburing() -> bool:
    """Build the io_uring section and the data plane for real: liburing is there, and
    CACHEFS_NATIVE_STUBS=1 does not ask for the stubs (what a machine without liburing builds)."""
    return os.environ.get("CACHEFS_NATIVE_STUBS", "") in ("", "0") and have_liburing()


# The data plane (DESIGN.md section 4, issue 11; ../shared/DATAPLANE.md): one C thread that
# owns /dev/fuse and serves published READs and WRITEs on io_uring, forwarding everything else
# to libfuse over a socketpair. Its C is in dp_*.c / dp*.h beside this file. Python drives it
# through the functions of dp_abi.h (cachefs/dataplane/plane.py), whose text is the cdef: the header
# is the interface's one source, and every C file includes it, so C, the stubs and the cdef
# cannot disagree. Without liburing it compiles to stubs (dp_stub.c) and dp_built() == 0.

#: The data plane's C files, each its own translation unit (dp_internal.h says what each owns
#: and declares what they share).
DP_SOURCES = ("dp_map.c", "dp_plan.c", "dp_publish.c", "dp_counters.c", "dp_alloc.c", "dp_loop.c",
              "dp_forward.c", "dp_park.c", "dp_pyq.c", "dp_passthrough.c", "dp_testhooks.c", "dp_cow.c",
              "dp_uring.c", "dp_cflush.c")
#: What the stub build compiles instead (no loop, no test hooks); dp_names.c is in both.
DP_STUB_SOURCES = ("dp_stub.c",)
DP_COMMON_SOURCES = ("dp_names.c",)


class AbiError(Exception):
    """A header that cannot be the cdef: its name, the line, and why."""


_DEFINE_INT = re.compile(r"#\s*define\s+[A-Za-z_]\w*\s+(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\s*$")
_GUARD = re.compile(r"#\s*(ifndef|define)\s+([A-Za-z_]\w*)\s*$")


def _strip_comments(text: str) -> str:
    """Comments out, each newline kept, so line numbers still count the header's lines."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group().count("\n") + " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def abi_cdef(text: str, name: str = "dp_abi.h") -> str:
    """The cdef text of a header written in cffi's subset of C (dp_abi.h, dp_testhooks.h).

    Comments, ``#include`` lines and the include guard (``#ifndef G``, ``#define G``, the last
    ``#endif``) are taken out; ``#define NAME <integer>`` stays, as cffi reads it. Any other
    preprocessor line raises AbiError naming the header's line: what the compiler would read
    and cffi would not is how the copies used to drift apart. check_cdef then has cffi's parser
    read the result.
    """
    lines = _strip_comments(text).split("\n")
    directives = [n for n, line in enumerate(lines) if line.lstrip().startswith("#")]
    guard: set[int] = set()
    if len(directives) >= 3:
        first, second = (_GUARD.match(lines[n].strip()) for n in directives[:2])
        last = lines[directives[-1]].strip()
        if (first and second and first.group(1) == "ifndef" and second.group(1) == "define"
                and first.group(2) == second.group(2) and re.fullmatch(r"#\s*endif", last)):
            guard = {directives[0], directives[1], directives[-1]}
    # Line markers (which cffi keeps) make its errors name the header's own lines: one at the
    # top, and one after each #define, as cffi's removal of a #define takes the blank lines
    # before it along.
    out = [f'# 1 "{name}"']
    for n, line in enumerate(lines):
        stripped = line.strip()
        if n in guard or re.match(r"#\s*include\s*[<\"]", stripped):
            out.append("")
        elif stripped.startswith("#") and not _DEFINE_INT.match(stripped):
            raise AbiError(f"{name}:{n + 1}: {stripped!r}: cffi's cdef cannot take it; the header keeps to "
                           "enums, #define NAME <integer>, structs and prototypes "
                           "(C-only things go in dp_internal.h)")
        elif stripped.startswith("#"):
            out += [line, f'# {n + 2} "{name}"']
        else:
            out.append(line)
    return "\n".join(out)


def check_cdef(parts: list[tuple[str, str]]) -> str:
    """The cdefs of (header name, abi_cdef text) pairs joined, once cffi's parser has read them
    all; AbiError (with the header's name and line, from abi_cdef's markers) if it refuses them."""
    for k in range(1, len(parts) + 1):  # header by header, so the error names the one at fault
        cdef = "\n".join(text for _name, text in parts[:k])
        try:
            FFI().cdef(cdef)
        except (CDefError, FFIError) as exc:
            name, msg = parts[k - 1][0], str(exc)
            if msg.startswith(":"):  # some of cffi's errors give the line alone
                msg = name + msg
            raise AbiError(f"cffi refuses the cdef of {name}: {msg}") from exc
    return cdef


def read_abi_cdef(*names: str) -> str:
    """The cdef of headers of this directory, in order (a later one may use an earlier one's names)."""
    parts = []
    for name in names:
        with open(os.path.join(HERE, name)) as f:
            parts.append((name, abi_cdef(f.read(), name)))
    return check_cdef(parts)


def dataplane_section(uring: bool) -> Section:
    """The data plane with liburing: the loop and its test hooks; without it, the stubs."""
    if uring:
        return Section("dataplane", cdef=read_abi_cdef("dp_abi.h", "dp_testhooks.h"),
                       source='#include "dp_abi.h"\n#include "dp_testhooks.h"\n',
                       sources=DP_COMMON_SOURCES + DP_SOURCES, libraries=("uring", "pthread"))
    return Section("dataplane", cdef=read_abi_cdef("dp_abi.h"), source='#include "dp_abi.h"\n',
                   sources=DP_COMMON_SOURCES + DP_STUB_SOURCES)


def make_ffibuilder(uring: bool | None = None, *, absolute_sources: bool = False) -> FFI:
    """The module's builder; ``uring`` None: as use_liburing() says (False: the stub build).

    The C files are named relative to the project's root, where setuptools runs (it refuses
    absolute paths); ``absolute_sources`` for ``compile(tmpdir=...)``, which runs the compiler
    in tmpdir and then puts their objects under it, by their absolute path.
    """
    if uring is None:
        uring = use_liburing()
    uring_section = (Section("io_uring", cdef=_URING_CDEF, source=_URING_SOURCE, libraries=("uring",)) if uring
                     else Section("io_uring", cdef=_URING_CDEF, source=_URING_STUB_SOURCE))
    sections = [*SECTIONS, uring_section, dataplane_section(uring)]
    builder = FFI()
    builder.cdef("\n".join(sec.cdef for sec in sections))
    # No feature macros here: cffi includes Python.h first, and its pyconfig.h
    # already defines _GNU_SOURCE and _FILE_OFFSET_BITS=64 (64-bit off_t).
    builder.set_source(
        MODULE_NAME,
        "\n".join(sec.source for sec in sections),
        sources=[os.path.join(HERE if absolute_sources else os.path.relpath(HERE, ROOT), name)
                 for sec in sections for name in sec.sources],
        libraries=sorted({lib for sec in sections for lib in sec.libraries}),
        include_dirs=[HERE],
        extra_compile_args=["-O2", "-Wall"],
    )
    return builder


ffibuilder = make_ffibuilder()


if __name__ == "__main__":
    # Compile next to the package so `import cachefs.native` finds it, under
    # the same name `pip install` gives it (cffi builds for the limited API).
    # A module with a version tag (_cachefs_native.cpython-311-...so) would
    # win the import over the .abi3.so, so a stale one from an older build
    # is removed: the module just built is the one that gets imported. The
    # generated C and the objects stay in build/ (the C files are compiled
    # by absolute path, so their objects land under build/ by that path).
    target = "_cachefs_native.abi3.so"  # build_ext puts it in the package dir, under tmpdir
    for name in os.listdir(HERE):
        if name.startswith("_cachefs_native.") and name.endswith(".so"):
            os.unlink(os.path.join(HERE, name))
    built = make_ffibuilder(absolute_sources=True).compile(
        tmpdir=os.path.join(ROOT, "build", "cffi-inplace"), verbose=True, target=target)
    os.replace(built, os.path.join(HERE, target))
