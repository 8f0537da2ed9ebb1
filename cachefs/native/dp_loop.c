/* The data plane's thread: one event loop over one io_uring (DATAPLANE.md "Shape").
 *
 * Every wakeup drains /dev/fuse (non-blocking) while a request slot is free, then drains
 * libfuse's replies from the socketpair, then sleeps in io_uring_submit_and_wait until a
 * backend I/O completes or a poll fires: /dev/fuse readable, the socket readable (or writable
 * again when a forward had to wait), or Python's control eventfd. A fast request holds its
 * slot until its last backend piece completes and its reply is written; a forwarded one only
 * until the socket took it, so the pool bounds memory and, once empty, stops the reading of
 * /dev/fuse (back-pressure) until a fast request completes.
 *
 * Who answers what (DATAPLANE.md "Requests that get no reply, or two"): a fast request is
 * answered here, once, after its backend write completed (so a flush that follows covers it);
 * a forwarded one only by libfuse; FORGET and BATCH_FORGET by nobody; an INTERRUPT of a fast
 * request is dropped (letting it finish is a correct answer), any other goes to libfuse.
 * Notifications from libfuse (unique 0) are written by an io-wq worker, never by this thread:
 * notify_inval_inode waits for page locks that a READ in our own queue may hold.
 */
#include "dp_internal.h"
#include <time.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>

static void dp_finish(struct dp *dp, struct dp_slot *s);

/* ------------------------------------------------------------ small helpers */

struct io_uring_sqe *dp_sqe(struct dp *dp) {
    struct io_uring_sqe *sqe;
    while (!(sqe = io_uring_get_sqe(&dp->ring)))
        io_uring_submit(&dp->ring);  /* the SQ ring is full: hand it over and take a new one */
    return sqe;
}

/* Tell Python (its trio task awaits evt_fd): a state bit newly set, or progress for a drain. */
void dp_post(struct dp *dp, unsigned bits) {
    unsigned old = __atomic_fetch_or(&dp->state, bits, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if ((old & bits) != bits || !bits)
        (void)!write(dp->evt_fd, &one, sizeof one);
}

void dp_write_fuse(struct dp *dp, struct iovec *iov, int n) {
    if (dp->ur && dp_uring_commit(dp, iov, n))
        return;  /* the answer to a request that came over the ring goes back into its entry */
    while (writev(dp->fuse_fd, iov, n) < 0) {
        if (errno == EINTR)
            continue;
        if (errno == ENODEV)  /* unmounted or aborted: nobody wants the answer any more */
            dp->dead = 1;
        else if (errno != ENOENT)  /* ENOENT: the request was interrupted and is gone */
            dp_count(&dp->g[DP_G_REPLY_ERRORS], 1);
        return;
    }
}

void dp_reply(struct dp *dp, uint64_t unique, int err, const void *data, uint32_t len) {
    struct fuse_out_header oh = { (uint32_t)sizeof oh + (err ? 0 : len), err, unique };
    struct iovec iov[2] = { { &oh, sizeof oh }, { (void *)data, len } };
    dp_write_fuse(dp, iov, err || !len ? 1 : 2);
}

/* ------------------------------------------------------------ the fast path */

static void dp_submit_piece(struct dp *dp, struct dp_slot *s, int i) {
    if (i == s->cow_piece) {  /* a partial copy on write: its old cluster is read first (dp_cow.c) */
        dp_cow_read(dp, s);
        return;
    }
    struct dp_piece *p = &s->piece[i];
    struct io_uring_sqe *sqe = dp_sqe(dp);
    int fd = p->fd >= 0 ? p->fd : s->fd;  /* a backing image's piece: its own read descriptor */
    if (s->write)
        io_uring_prep_write(sqe, fd, s->data + p->buf, p->len, p->host);
    else
        io_uring_prep_read(sqe, fd, s->data + p->buf, p->len, p->host);
    io_uring_sqe_set_data64(sqe, DP_UD_IO(s - dp->slots, i));
}

/* Plan a READ or WRITE of handle `fh` and, if it is served here, dispatch it: take its lent
 * clusters, number it, choose its descriptor. 1: fast (the slot is active, its I/O is the
 * caller's). Apart from the I/O, all of the loop's decision, so that dp_testhooks.c checks
 * this very code against tests/simplane.py without a mount. */
int dp_take_fast(struct dp *dp, struct dp_slot *s, uint64_t fh, int write, uint64_t off, uint32_t size) {
    pthread_mutex_lock(&dp->lock);
    struct dp_handle *h = dp_map_get(&dp->handles, fh);
    int planned = h && !h->img->paused, fast = planned && dp_plan(h->img, h, write, off, size, s->data, s) == 0;
    /* Allocating writes (dp_alloc.c): take the lent clusters the plan chose; wake Python when they run low. */
    int wake = fast && write && s->nalloc && dp_alloc_commit(h->img, s);
    if (fast) {
        h->c[DP_H_READS + write]++;
        h->c[DP_H_BYTES_READ + write] += write ? size : s->reply_len;
        s->seq = ++dp->seq;
        s->img = h->img;
        /* Write-through onto a mapping that is not durable: through the twin without O_DSYNC,
         * answered after Python's sync (dp_park.c). */
        s->defer = write && h->sync && s->unsynced;
        s->fd = s->defer && h->batch_fd >= 0 ? h->batch_fd : h->fd;
        s->sync = s->defer && h->batch_fd >= 0 ? 0 : h->sync;
        s->write = write;
        __atomic_store_n(&s->active, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&dp->lock);
    if (wake)
        dp_post(dp, DP_ST_ALLOC);
    return fast;
}

/* Serve a READ or WRITE here if its handle is published and its range maps. 1: taken. */
static int dp_try_fast(struct dp *dp, struct dp_slot *s) {
    struct fuse_in_header *ih = (void *)s->hdr;
    const struct fuse_read_in *in = (const void *)(ih + 1);  /* fh, offset, size: as fuse_write_in */
    int write = ih->opcode == FUSE_WRITE;
    if (s->len < DP_HDR || ih->total_extlen || (write && s->len != DP_HDR + in->size))
        return 0;
    if (!dp_take_fast(dp, s, in->fh, write, in->offset, in->size))
        return 0;
    if (++dp->active > (int)dp->g[DP_G_PEAK_ACTIVE])
        dp->g[DP_G_PEAK_ACTIVE] = dp->active;
    dp_count(&dp->g[DP_G_FAST], 1);
    s->err = 0;
    s->pieces_left = s->npieces;
    if (s->npieces == 0)
        dp_finish(dp, s);  /* all zeros, or past the guest's end */
    for (int i = 0; i < s->npieces; i++)
        dp_submit_piece(dp, s, i);
    return 1;
}

static void dp_piece_done(struct dp *dp, struct dp_slot *s, int i, int res) {
    if (i == DP_UD_COW_READ && (i = dp_cow_merge(s, res)) >= 0) {  /* old bytes in: write the new cluster */
        dp_submit_piece(dp, s, i);
        return;
    }
    if (i < 0) {  /* the copy's read failed: its write never runs */
        if (--s->pieces_left == 0)
            dp_finish(dp, s);
        return;
    }
    struct dp_piece *p = &s->piece[i];
    if (res < 0) {
        if (!s->err)
            s->err = res;  /* the backend's errno reaches the client (DATAPLANE.md "Errors") */
    } else if ((uint32_t)res < p->len) {
        if (s->write && res > 0) {  /* a short write: write the rest */
            p->host += res;
            p->buf += res;
            p->len -= res;
            dp_submit_piece(dp, s, i);
            return;
        }
        if (s->write && !s->err)
            s->err = -EIO;
        else if (!s->write)  /* the file ends before the guest does: zeros, as Python pads */
            memset(s->data + p->buf + res, 0, p->len - res);
    }
    if (--s->pieces_left == 0)
        dp_finish(dp, s);
}

/* The last piece is done: answer (or park until Python's sync), free. */
static void dp_finish(struct dp *dp, struct dp_slot *s) {
    if (s->write && !s->sync)
        dp_count(&s->img->c[DP_C_UNSYNCED_WRITES], 1);  /* before the reply: the next flush must see it */
    if (s->cow_mask)
        dp_cow_done(dp, s);  /* logged while still active: a drain that returns sees the log */
    __atomic_store_n(&s->active, 0, __ATOMIC_RELEASE);
    dp->active--;
    dp->completed = 1;
    if (!s->defer || s->err)
        dp_answer(dp, s);
    else if (!dp_cflush_write(dp, s))  /* made durable by C's own flush (dp_cflush.c), or by Python's */
        dp_park(dp, s);
}

/* Count, answer, free. */
void dp_answer(struct dp *dp, struct dp_slot *s) {
    struct fuse_in_header *ih = (void *)s->hdr;
    uint64_t *c = s->img->c;
    uint32_t size = ((const struct fuse_read_in *)(ih + 1))->size;
    if (s->err) {
        dp_count(&c[DP_C_ERRORS], 1);
        dp_reply(dp, ih->unique, s->err, NULL, 0);
    } else if (s->write) {
        struct fuse_write_out out = { .size = size };
        dp_count(&c[DP_C_FAST_WRITES], 1);
        dp_count(&c[DP_C_BYTES_WRITTEN], size);
        dp_reply(dp, ih->unique, 0, &out, sizeof out);
    } else {
        dp_count(&c[DP_C_FAST_READS], 1);
        dp_count(&c[DP_C_BACKING_READS], (uint64_t)s->backing);
        dp_count(&c[DP_C_BYTES_READ], s->reply_len);
        dp_reply(dp, ih->unique, 0, s->data, s->reply_len);
    }
    dp_free_slot(dp, s);
}

/* An INTERRUPT of a fast request: let it finish (1: drop the INTERRUPT). */
static int dp_interrupts_fast(struct dp *dp, struct dp_slot *s) {
    uint64_t unique = ((const struct fuse_interrupt_in *)((struct fuse_in_header *)s->hdr + 1))->unique;
    for (int i = 0; i < DP_NSLOT; i++) {
        struct dp_slot *o = &dp->slots[i];
        if (o->active && ((struct fuse_in_header *)o->hdr)->unique == unique)
            return 1;
    }
    return dp_pyq_holds(dp, unique);
}

/* ------------------------------------------------------------ reading /dev/fuse */

/* GETXATTR of a name outside user.cachefs.: no such attribute, the answer fs.getxattr gives.
 * The kernel asks for security.capability before every write through a cached handle
 * (file_remove_privs), so answering it here keeps those writes out of Python. */
static int dp_foreign_xattr(struct dp *dp, struct dp_slot *s) {
    static const char prefix[] = "user.cachefs.";
    size_t at = sizeof(struct fuse_in_header) + sizeof(struct fuse_getxattr_in);
    char name[sizeof prefix];
    if (s->len < at + 1 || ((struct fuse_in_header *)s->hdr)->total_extlen)
        return 0;
    for (size_t i = 0; i < sizeof name; i++) {  /* the name spans both iovecs */
        size_t pos = at + i;
        name[i] = pos >= s->len ? 0 : pos < DP_HDR ? ((char *)s->hdr)[pos] : s->data[pos - DP_HDR];
    }
    if (strncmp(name, prefix, sizeof prefix - 1) == 0)
        return 0;
    dp_count(&dp->g[DP_G_FAST], 1);
    dp_reply(dp, ((struct fuse_in_header *)s->hdr)->unique, -ENODATA, NULL, 0);
    dp_free_slot(dp, s);
    return 1;
}

void dp_dispatch(struct dp *dp, struct dp_slot *s) {
    struct fuse_in_header *ih = (void *)s->hdr;
    dp_count(&dp->g[DP_G_REQUESTS], 1);
    if ((ih->opcode == FUSE_READ || ih->opcode == FUSE_WRITE) && dp_try_fast(dp, s))
        return;
    if (ih->opcode == FUSE_GETXATTR && dp_foreign_xattr(dp, s))
        return;
    if (ih->opcode == FUSE_FSYNC && dp_cflush_try(dp, s))  /* a guest flush C can serve (dp_cflush.c) */
        return;
    if ((ih->opcode == FUSE_FALLOCATE || ih->opcode == FUSE_LSEEK || ih->opcode == FUSE_FSYNC) &&
        dp_pyq_serve(dp, s))
        return;
    dp_count(&dp->g[DP_G_INTERRUPTS], ih->opcode == FUSE_INTERRUPT);
    if (ih->opcode == FUSE_INTERRUPT && s->len >= sizeof *ih + 8 && dp_interrupts_fast(dp, s)) {
        dp_free_slot(dp, s);
        return;
    }
    dp_forward(dp, s);
}

/* Read requests while a slot is free. The first iovec is exactly 80 bytes, so a WRITE's
 * payload lands at the start of the page-aligned buffer, ready for O_DIRECT without a copy. */
static void dp_drain_fuse(struct dp *dp) {
    while (dp->free && dp->reading && dp->fuse_ready) {
        struct dp_slot *s = dp->free;
        struct iovec iov[2] = { { s->hdr, DP_HDR }, { s->data, DP_DATA } };
        ssize_t n = readv(dp->fuse_fd, iov, 2);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT)  /* ENOENT: interrupted before we read it */
                continue;
            if (errno != EAGAIN)  /* ENODEV: unmounted; anything else: no way to go on */
                dp->dead = 1;
            dp->fuse_ready = 0;
            return;
        }
        dp->free = s->next;
        s->len = (uint32_t)n;
        dp_dispatch(dp, s);
    }
}

/* ------------------------------------------------------------ the loop */

static void dp_poll(struct dp *dp, int fd, unsigned events, int tag, int *armed) {
    if (*armed)
        return;
    struct io_uring_sqe *sqe = dp_sqe(dp);
    io_uring_prep_poll_add(sqe, fd, events);
    io_uring_sqe_set_data64(sqe, TAG(tag));
    *armed = 1;
}

static void dp_cqe(struct dp *dp, uint64_t ud, int res) {
    switch (ud >> DP_UD_TAG_SHIFT) {
    case T_IO:
        dp_piece_done(dp, &dp->slots[DP_UD_SLOT(ud)], (int)DP_UD_PIECE(ud), res);
        break;
    case T_FUSE_POLL:
        dp->fuse_polled = 0;
        dp->fuse_ready = 1;
        break;
    case T_SOCK_POLL:
        dp->sock_polled = 0;
        dp->sock_ready = 1;
        break;
    case T_SOCK_POLLOUT:
        dp->sock_out_polled = 0;
        break;
    case T_SEND_RETRY:  /* the pause after ENOBUFS is over: dp_flush_sendq tries again */
        dp->send_retry_armed = 0;
        dp->send_retry = 0;
        break;
    case T_CTL_POLL: {
        uint64_t v;
        dp->ctl_polled = 0;
        (void)!read(dp->ctl_fd, &v, sizeof v);
        break;
    }
    case T_CFLUSH:  /* C's fdatasync of a guest flush (dp_cflush.c): dead images are kept till destroy */
        dp_cflush_done(dp, (struct dp_image *)(uintptr_t)UNTAG(ud), res);
        break;
    case T_NOTE:
        free((void *)(uintptr_t)UNTAG(ud));
        if (res < 0 && res != -ENOENT && res != -ENODEV)
            dp_count(&dp->g[DP_G_REPLY_ERRORS], 1);
        break;
    case T_URING:  /* a ring entry's request, or its end (dp_uring.c) */
        dp_uring_cqe(dp, ud, res);
        break;
    }
}

static void dp_reap(struct dp *dp) {
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(&dp->ring, head, cqe) {
        n++;
        dp_cqe(dp, cqe->user_data, cqe->res);
    }
    io_uring_cq_advance(&dp->ring, n);
}

/* Python's requests in, the loop's state out. 1 when the loop may end. */
static int dp_control(struct dp *dp) {
    unsigned req = __atomic_load_n(&dp->requests, __ATOMIC_ACQUIRE);
    if ((req & (DP_STOP_READING | DP_QUIT)) || dp->dead || dp->sock_eof)
        dp->reading = 0;
    dp_answer_released(dp);
    if (req & DP_QUIT)
        dp_fail_parked(dp);  /* pyfuse3's loop is over: no sync will release them */
    if (dp->active == 0 && dp->dead)
        dp_post(dp, DP_ST_DEAD);
    if (dp->active == 0 && !dp->reading && !dp_parked(dp))
        dp_post(dp, DP_ST_STOPPED);
    if (dp->completed && __atomic_load_n(&dp->drain_waiters, __ATOMIC_ACQUIRE))
        dp_post(dp, 0);
    dp->completed = 0;
    return dp->active == 0 && ((req & DP_QUIT) || dp->sock_eof);
}

static void *dp_main(void *arg) {
    struct dp *dp = arg;
    if (dp->ring_disabled)  /* this thread becomes the ring's single issuer (liburing 2.3 lacks the helper) */
        syscall(__NR_io_uring_register, dp->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
    for (;;) {
        dp_pyq_admit(dp);
        dp_drain_fuse(dp);
        dp_drain_sock(dp);
        dp_uring_poll(dp);  /* after INIT's reply: the ring's registration; Python's answers to ring requests */
        dp_flush_sendq(dp);
        if (dp_control(dp))
            break;
        if (dp->reading && !dp->fuse_ready)
            dp_poll(dp, dp->fuse_fd, POLLIN, T_FUSE_POLL, &dp->fuse_polled);
        if (!dp->sock_eof && !dp->sock_ready)
            dp_poll(dp, dp->sock_fd, POLLIN, T_SOCK_POLL, &dp->sock_polled);
        if (dp->sendq && !dp->sock_eof && dp->send_retry)
            dp_arm_send_retry(dp);  /* ENOBUFS: the socket has room, the kernel no memory (dp_forward.c) */
        else if (dp->sendq && !dp->sock_eof)
            dp_poll(dp, dp->sock_fd, POLLOUT, T_SOCK_POLLOUT, &dp->sock_out_polled);
        dp_poll(dp, dp->ctl_fd, POLLIN, T_CTL_POLL, &dp->ctl_polled);
        io_uring_submit_and_wait(&dp->ring, 1);  /* -EINTR and friends: just go round again */
        dp_reap(dp);
    }
    dp_post(dp, DP_ST_EXITED);
    return NULL;
}

/* ------------------------------------------------------------ Python's handle on it */

static int dp_alloc_buffers(struct dp *dp) {
    /* mmap: untouched pages cost nothing, so 64 MiB of slots is what the load touches. */
    char *data = mmap(NULL, (size_t)DP_NSLOT * DP_DATA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED)
        return -ENOMEM;
    for (int i = DP_NSLOT - 1; i >= 0; i--) {
        dp->slots[i].data = data + (size_t)i * DP_DATA;
        if (i < DP_NPOOL)
            dp_free_slot(dp, &dp->slots[i]);  /* the rest are ring entries' (dp_uring.c) */
    }
    dp->rbuf = mmap(NULL, DP_RBUF, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return dp->rbuf == MAP_FAILED ? -ENOMEM : 0;
}

int dp_built(void) { return 1; }

/* The ring, created (again, by dp_uring_want, with IORING_SETUP_SQE128) before the thread starts.
 * A CQ of 4096 entries (CQSIZE) against a 512-entry SQ: more can be in flight than the SQ
 * holds (DP_NSLOT requests of up to DP_MAXPIECE pieces, the polls, the notifications).
 * One thread submits and reaps (SINGLE_ISSUER, 6.0), and the ring starts disabled
 * (R_DISABLED) so that the loop thread, not this one, enables it and becomes that issuer
 * (dp_main). DEFER_TASKRUN is not set: completion work runs as ordinary task work. A kernel
 * that refuses these flags (-EINVAL) gets a plain ring with the same CQ size. */
static int dp_ring_setup_once(struct dp *dp, unsigned flags) {
    struct io_uring_params p = { .flags = IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER |
                                          IORING_SETUP_R_DISABLED | flags,
                                 .cq_entries = 4096 };
    int rc = io_uring_queue_init_params(512, &dp->ring, &p);
    dp->ring_disabled = rc == 0;
    if (rc == -EINVAL) {
        p = (struct io_uring_params){ .flags = IORING_SETUP_CQSIZE | flags, .cq_entries = 4096 };
        rc = io_uring_queue_init_params(512, &dp->ring, &p);
    }
    return rc;
}

/* The ring's memory is allocated without reclaim (io_uring/memmap.c io_region_allocate_pages:
 * __GFP_NOWARN compound pages, then a bulk allocation that gives up short): under memory
 * pressure, a page cache filling the cgroup, or the rings of exited daemons not yet freed (their
 * teardown is a kernel work item), io_uring_setup fails with -ENOMEM where a moment later it
 * succeeds (seen once in a suite of 1200 mounts). So -ENOMEM is tried again for about 2 s. */
int dp_ring_setup(struct dp *dp, unsigned flags) {
    int rc = dp_ring_setup_once(dp, flags);
    for (unsigned ms = 10; rc == -ENOMEM && ms <= 640; ms *= 2) {
        struct timespec ts = { 0, (long)ms * 1000000L };
        nanosleep(&ts, NULL);
        rc = dp_ring_setup_once(dp, flags);
    }
    return rc;
}

/* -errno when io_uring is refused (seccomp, kernel.io_uring_disabled): the mount says so. */
/* Before the mount exists (dp_start gets its descriptor), so a refusal leaves nothing mounted. */
int dp_create(int sock_fd, int evt_fd, unsigned max_background, uint32_t msg_limit, struct dp **out) {
    struct dp *dp = calloc(1, sizeof *dp);
    int rc;
    if (!dp)
        return -ENOMEM;
    *dp = (struct dp){ .fuse_fd = -1, .sock_fd = sock_fd, .evt_fd = evt_fd, .reading = 1,
                       .fuse_ready = 1, .sock_ready = 1,
                       .max_background = max_background, .msg_limit = msg_limit, .rbuf = MAP_FAILED };
    pthread_mutex_init(&dp->lock, NULL);
    dp->ctl_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    rc = dp->ctl_fd < 0 ? -errno : dp_ring_setup(dp, 0);
    if (rc < 0) {
        if (dp->ctl_fd >= 0)
            close(dp->ctl_fd);
        free(dp);
        return rc;
    }
    if ((rc = dp_map_init(&dp->images)) < 0 || (rc = dp_map_init(&dp->handles)) < 0 ||
        (rc = dp_alloc_buffers(dp)) < 0 || (rc = dp_pyq_init(dp)) < 0) {
        dp->started = -1;
        dp_destroy(dp);
        return rc;
    }
    *out = dp;
    return 0;
}

int dp_start(struct dp *dp, int fuse_fd) {
    sigset_t all, old;
    dp->fuse_fd = fuse_fd;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);  /* signals are Python's, in its main thread */
    int rc = pthread_create(&dp->thread, NULL, dp_main, dp);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0)
        dp->started = 1;
    return -rc;
}

void dp_request(struct dp *dp, unsigned what) {
    uint64_t one = 1;
    __atomic_fetch_or(&dp->requests, what, __ATOMIC_RELEASE);
    (void)!write(dp->ctl_fd, &one, sizeof one);
}

unsigned dp_state(struct dp *dp) { return __atomic_load_n(&dp->state, __ATOMIC_ACQUIRE); }

void dp_waiting(struct dp *dp, int delta) { __atomic_fetch_add(&dp->drain_waiters, delta, __ATOMIC_RELEASE); }

int dp_join(struct dp *dp) {
    if (dp->started != 1)
        return 0;
    dp->started = 2;
    return -pthread_join(dp->thread, NULL);
}

/* After dp_join. Notifications still being written by io-wq keep their buffers (leaked):
 * the kernel may read them until the connection is gone. */
void dp_destroy(struct dp *dp) {
    if (dp->started == 1)
        return;  /* never free what a running thread uses */
    io_uring_queue_exit(&dp->ring);
    if (dp->slots[0].data)
        munmap(dp->slots[0].data, (size_t)DP_NSLOT * DP_DATA);
    if (dp->rbuf != MAP_FAILED)
        munmap(dp->rbuf, DP_RBUF);
    for (uint32_t i = 0; dp->images.keys && i < dp->images.cap;)
        if (!dp->images.keys[i] || dp_image_remove(dp, dp->images.keys[i]) < 0)
            i++;  /* a removal may shift another image into slot i: look at it again */
    for (struct dp_image *im = dp->dead_images, *next; im; im = next) {
        next = im->next_dead;
        free(im);
    }
    dp_map_free(&dp->images);
    dp_map_free(&dp->handles);
    dp_pyq_free(dp);
    dp_uring_free(dp);
    close(dp->ctl_fd);
    pthread_mutex_destroy(&dp->lock);
    free(dp);
}

/* notify_inval_inode written by the caller's thread (a trio worker): it returns once the kernel
 * dropped the pages, as pyfuse3.invalidate_inode does, so a reply sent after it is ordered. */
int dp_notify_inval_inode(struct dp *dp, uint64_t ino, int64_t off, int64_t len) {
    if (dp->fuse_fd < 0)
        return -ENOTCONN;
    struct { struct fuse_out_header oh; struct fuse_notify_inval_inode_out arg; } m = {
        { sizeof m, FUSE_NOTIFY_INVAL_INODE, 0 }, { ino, off, len } };
    while (write(dp->fuse_fd, &m, sizeof m) < 0)
        if (errno != EINTR)
            return -errno;
    return 0;
}
