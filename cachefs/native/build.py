"""cffi build script (API mode) for ``cachefs.native._cachefs_native``.

It is run at install time through ``setup.py``'s ``cffi_modules``, and can be
run by hand (``python cachefs/native/build.py``) to compile in place.

The module is assembled from *sections*. Each section contributes C
declarations (``cdef``) and the C source that implements or includes them.
Later work (io_uring) adds a section here and its Python wrapper in
``__init__.py``; nothing else needs to change.
"""

from __future__ import annotations

import os

from cffi import FFI

MODULE_NAME = "cachefs.native._cachefs_native"

# Each entry: (name, cdef, C source). Order is the order in the module.
SECTIONS: list[tuple[str, str, str]] = []


def section(name: str, cdef: str, source: str = "") -> None:
    SECTIONS.append((name, cdef, source))


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
    static const int IOCB_CMD_FSYNC;
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


def make_ffibuilder() -> FFI:
    builder = FFI()
    builder.cdef("\n".join(cdef for _name, cdef, _src in SECTIONS))
    # No feature macros here: cffi includes Python.h first, and its pyconfig.h
    # already defines _GNU_SOURCE and _FILE_OFFSET_BITS=64 (64-bit off_t).
    builder.set_source(
        MODULE_NAME,
        "\n".join(src for _name, _cdef, src in SECTIONS),
        extra_compile_args=["-O2", "-Wall"],
    )
    return builder


ffibuilder = make_ffibuilder()


if __name__ == "__main__":
    # Compile next to the package so `import cachefs.native` finds it, under
    # the same name `pip install` gives it (cffi builds for the limited API).
    # A module with a version tag (_cachefs_native.cpython-311-...so) would
    # win the import over the .abi3.so, so a stale one from an older build
    # is removed: the module just built is the one that gets imported.
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    target = "_cachefs_native.abi3.so"  # build_ext puts it in the package dir
    for name in os.listdir(here):
        if name.startswith("_cachefs_native.") and name.endswith(".so"):
            os.unlink(os.path.join(here, name))
    ffibuilder.compile(tmpdir=root, verbose=True, target=target)
