"""cffi build script (API mode) for ``cachefs.native._cachefs_native``.

It is run at install time through ``setup.py``'s ``cffi_modules``, and can be
run by hand (``python cachefs/native/build.py``) to compile in place.

The module is assembled from *sections*. Each section contributes C
declarations (``cdef``) and the C source that implements or includes them.
A section may also name libraries to link (io_uring links liburing). A new
kernel interface adds a section here and its Python wrapper in ``__init__.py``;
nothing else needs to change.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from cffi import FFI

MODULE_NAME = "cachefs.native._cachefs_native"

# Each entry: (name, cdef, C source, libraries). Order is the order in the module.
SECTIONS: list[tuple[str, str, str, tuple[str, ...]]] = []

#: This directory: a section whose C lives in files here #includes them by name.
HERE = os.path.dirname(os.path.abspath(__file__))


def section(name: str, cdef: str, source: str = "", libraries: tuple[str, ...] = ()) -> None:
    SECTIONS.append((name, cdef, source, libraries))


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


if have_liburing():
    section("io_uring", cdef=_URING_CDEF, source=_URING_SOURCE, libraries=("uring",))
else:
    section("io_uring", cdef=_URING_CDEF, source=_URING_STUB_SOURCE)


# The data plane (DESIGN.md section 4, issue 11; ../shared/DATAPLANE.md): one C thread that
# owns /dev/fuse and serves published READs and WRITEs on io_uring, forwarding everything else
# to libfuse over a socketpair. Too big for a string here, so its C is in dp_*.c / dp*.h beside
# this file. Python drives it through the functions below (cachefs/dataplane/plane.py); each returns
# >= 0 or -errno. Without liburing it compiles to stubs (dp_stub.c) and dp_built() == 0.
_DP_CDEF = """
    struct dp { ...; };
    static const int DP_MAP_ABSENT, DP_MAP_WRITABLE, DP_MAP_READONLY, DP_MAP_ZERO;
    #define DP_MAP_ALLOC ...
    #define DP_MAP_UNSYNCED ...
    #define DP_SPARE ...
    #define DP_ALOG ...
    #define DP_NCLAIM ...
    #define DP_MAXALLOC ...
    static const int DP_C_FAST_READS, DP_C_FAST_WRITES, DP_C_BYTES_READ, DP_C_BYTES_WRITTEN;
    static const int DP_C_FORWARDED, DP_C_ERRORS, DP_C_UNSYNCED_WRITES, DP_C_NIMAGE;
    static const int DP_G_REQUESTS, DP_G_FAST, DP_G_FORWARDED, DP_G_REPLIES, DP_G_NOTIFICATIONS;
    static const int DP_G_FORWARD_ERRORS, DP_G_REPLY_ERRORS, DP_G_PEAK_ACTIVE, DP_G_SEND_QUEUED, DP_G_N;
    static const int DP_STOP_READING, DP_QUIT;
    static const int DP_ST_INIT_DONE, DP_ST_DEAD, DP_ST_STOPPED, DP_ST_EXITED, DP_ST_ALLOC, DP_ST_SYNC;

    int dp_built(void);
    int dp_create(int sock_fd, int evt_fd, unsigned max_background, uint32_t msg_limit,
                  struct dp **out);
    int dp_start(struct dp *dp, int fuse_fd);
    void dp_request(struct dp *dp, unsigned what);
    unsigned dp_state(struct dp *dp);
    void dp_waiting(struct dp *dp, int delta);
    int dp_join(struct dp *dp);
    void dp_destroy(struct dp *dp);
    uint64_t dp_ticket(struct dp *dp);
    int dp_drained(struct dp *dp, uint64_t ticket);
    int dp_image_publish(struct dp *dp, uint64_t ino, uint64_t vsize, unsigned cluster_bits, int identity);
    int dp_image_pause(struct dp *dp, uint64_t ino, int paused);
    int dp_image_remove(struct dp *dp, uint64_t ino);
    int dp_map_clusters(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count, const uint64_t *entries);
    int dp_unmap_clusters(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count);
    uint64_t dp_image_map_bytes(struct dp *dp, uint64_t ino);
    int dp_handle_publish(struct dp *dp, uint64_t fh, uint64_t ino, int fd, unsigned align, int fast_write,
                          int sync, int batch_fd);
    int dp_handle_unpublish(struct dp *dp, uint64_t fh);
    int dp_handle_counters(struct dp *dp, uint64_t fh, uint64_t *out, int n);
    static const int DP_H_READS, DP_H_WRITES, DP_H_BYTES_READ, DP_H_BYTES_WRITTEN, DP_H_N;
    int dp_plan_probe(struct dp *dp, uint64_t fh, int write, uint64_t off, uint32_t size, char *data,
                      uint64_t *out, uint32_t *reply_len);
    static const int DP_MAXPIECE;
    int dp_image_counters(struct dp *dp, uint64_t ino, uint64_t *out, int n);
    void dp_counters(struct dp *dp, uint64_t *out, int n);
    int dp_notify_inval_inode(struct dp *dp, uint64_t ino, int64_t off, int64_t len);
    struct dp_pyreq { uint64_t unique, nodeid, fh, offset, length; uint32_t opcode, mode, uid, gid, pid, padding; };
    static const int DP_PYQ;
    int dp_alloc_set(struct dp *dp, uint64_t ino, int on, uint32_t low_water);
    int dp_alloc_give(struct dp *dp, uint64_t ino, const uint64_t *hosts, uint32_t n);
    int dp_alloc_take_spares(struct dp *dp, uint64_t ino, uint64_t *out, uint32_t max);
    int dp_alloc_peek_log(struct dp *dp, uint64_t ino, uint64_t *out, uint32_t max);
    int dp_alloc_drop_log(struct dp *dp, uint64_t ino, uint32_t n);
    int dp_alloc_claim(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count);
    int dp_alloc_unclaim(struct dp *dp, uint64_t ino, int id);
    int dp_alloc_status(struct dp *dp, uint64_t ino, uint64_t *out);
    int dp_alloc_woken(struct dp *dp);
    int dp_sync_woken(struct dp *dp);
    uint64_t dp_sync_ticket(struct dp *dp, uint64_t ino);
    int dp_sync_release(struct dp *dp, uint64_t ino, uint64_t ticket, int err);
    int dp_pyq_fd(struct dp *dp);
    int dp_pyq_take(struct dp *dp, struct dp_pyreq *out, int max);
    int dp_pyq_reply(struct dp *dp, uint64_t unique, int err, uint64_t offset);
"""


def make_ffibuilder() -> FFI:
    builder = FFI()
    builder.cdef("\n".join(cdef for _name, cdef, _src, _libs in SECTIONS))
    # No feature macros here: cffi includes Python.h first, and its pyconfig.h
    # already defines _GNU_SOURCE and _FILE_OFFSET_BITS=64 (64-bit off_t).
    builder.set_source(
        MODULE_NAME,
        "\n".join(src for _name, _cdef, src, _libs in SECTIONS),
        libraries=sorted({lib for *_rest, libs in SECTIONS for lib in libs}),
        include_dirs=[HERE],
        extra_compile_args=["-O2", "-Wall"],
    )
    return builder


# Test hooks (dp_testhooks.c): the loop's decisions without a mount or I/O, for the differential
# test of C against tests/simplane.py. Only with the real data plane: the stubs have no loop.
_DP_TEST_CDEF = """
    struct dp_test_plan {
        int fast, fd, sync, defer, unsynced, nalloc, npieces;
        uint32_t reply_len;
        uint64_t seq;
        uint64_t alloc_cl[...];
        uint64_t piece_host[...];
        uint32_t piece_buf[...], piece_len[...];
    };
    struct dp_test_alloc {
        int on, wake_sent;
        uint32_t low_water, overflow, spare_count, log_count;
        uint64_t claim_first[...], claim_end[...];
    };
    int dp_test_plan(struct dp *dp, uint64_t fh, int write, uint64_t off, uint32_t size, char *data,
                     struct dp_test_plan *out);
    int dp_test_entries(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count, uint64_t *out);
    int dp_test_alloc_state(struct dp *dp, uint64_t ino, struct dp_test_alloc *out, uint64_t *spares);
"""


if have_liburing():
    section("dataplane", cdef=_DP_CDEF + _DP_TEST_CDEF,
            source='#include "dp_table.c"\n#include "dp_alloc.c"\n#include "dp_loop.c"\n#include "dp_park.c"\n'
                   '#include "dp_pyq.c"\n#include "dp_testhooks.c"\n',
            libraries=("uring", "pthread"))
else:
    section("dataplane", cdef=_DP_CDEF, source='#include "dp_stub.c"\n')


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
