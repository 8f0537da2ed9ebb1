/* Forwarding to libfuse, and libfuse's replies: the data plane's slow path (DATAPLANE.md "Shape").
 *
 * A request C does not serve goes, unchanged, as one SOCK_SEQPACKET message to libfuse (pyfuse3);
 * its one answer comes back the same way and is written to /dev/fuse, after the INIT and OPEN
 * replies are patched (max_background, max_write, parallel direct writes). Notifications
 * (unique 0) are written by an io-wq worker, never by the loop (a page lock may wait on a READ
 * in our own queue). The loop (dp_loop.c) calls dp_forward, dp_flush_sendq and dp_drain_sock.
 */
#include "dp_internal.h"
#include <stddef.h>
#include <sys/socket.h>
#include <time.h>

/* ------------------------------------------------------------ forwarding to libfuse */

static void dp_track_add(struct dp *dp, uint64_t unique, uint32_t opcode) {
    for (int i = 0; i < DP_TRACK; i++)
        if (!dp->track[i].unique) {
            dp->track[i] = (struct dp_track){ unique, opcode };
            return;
        }
    /* Full: that reply goes unpatched, a missed hint and nothing worse. */
}

static uint32_t dp_track_take(struct dp *dp, uint64_t unique) {
    for (int i = 0; i < DP_TRACK; i++)
        if (dp->track[i].unique == unique) {
            dp->track[i].unique = 0;
            return dp->track[i].opcode;
        }
    return 0;
}

static void dp_count_forward(struct dp *dp, const struct fuse_in_header *ih) {
    struct dp_image *im = NULL;
    dp_count(&dp->g[DP_G_FORWARDED], 1);
    pthread_mutex_lock(&dp->lock);
    if (ih->opcode == FUSE_READ || ih->opcode == FUSE_WRITE) {
        struct dp_handle *h = dp_map_get(&dp->handles, ((const struct fuse_read_in *)(ih + 1))->fh);
        im = h ? h->img : NULL;
    }
    if (!im && ih->nodeid)
        im = dp_map_get(&dp->images, ih->nodeid);
    if (im)
        dp_count(&im->c[DP_C_FORWARDED], 1);
    pthread_mutex_unlock(&dp->lock);
}

/* One request, unchanged, as one message. 0, -EAGAIN (socket full), -ENOBUFS (no memory for the
 * message now: dp_send_stalled), or -errno. */
static int dp_send(struct dp *dp, struct dp_slot *s) {
    struct iovec iov[2] = { { s->hdr, s->len < DP_HDR ? s->len : DP_HDR },
                            { s->data, s->len > DP_HDR ? s->len - DP_HDR : 0 } };
    struct msghdr mh = { .msg_iov = iov, .msg_iovlen = s->len > DP_HDR ? 2 : 1 };
    for (;;) {
        if (sendmsg(dp->sock_fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) {
            dp->send_stalled_since = 0;
            return 0;
        }
        if (errno == ENOBUFS || errno == ENOMEM)
            return -ENOBUFS;
        if (errno != EINTR)
            return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    }
}

/* sendmsg failed with ENOBUFS: the kernel could not allocate the message, which is transient, not
 * a refusal. A unix datagram (our SOCK_SEQPACKET) is one skb whose linear part is all of it but
 * MAX_SKB_FRAGS pages (net/unix/af_unix.c, unix_dgram_sendmsg): a forwarded 1 MiB WRITE needs a
 * physically contiguous ~1 MiB kmalloc, an order-8 allocation that fails, with no retry, when
 * memory is fragmented (a long-running CI VM with its page cache full). Answering EIO then, as
 * for a dead socket, failed a guest's write (an async direct write got EIO: the CI flake of
 * test_fio_verify_under_each_submitter[plane-on-native-none], the first 1 MiB write forwarded
 * once C had no lent clusters left). So the request stays queued, in order, and is sent again
 * after a pause that doubles from 1 ms to 64 ms (the failed allocation woke kswapd and kcompactd);
 * only one that could not be sent for DP_SEND_STALL_MS gets EIO. 1: keep it queued (the loop
 * arms the retry: dp_arm_send_retry); 0: give up on it. */
#define DP_SEND_STALL_MS 10000
static int dp_send_stalled(struct dp *dp) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    if (!dp->send_stalled_since) {
        dp->send_stalled_since = now;
        dp->send_pause_ms = 0;
    } else if (now - dp->send_stalled_since > DP_SEND_STALL_MS * 1000000ull) {
        dp->send_stalled_since = 0;
        return 0;
    }
    dp->send_pause_ms = dp->send_pause_ms ? (dp->send_pause_ms < 64 ? dp->send_pause_ms * 2 : 64) : 1;
    dp->send_retry = 1;
    dp_count(&dp->g[DP_G_SEND_RETRIES], 1);
    return 1;
}

/* The loop: the send queue waits for a pause after ENOBUFS, not for POLLOUT (the socket has room). */
void dp_arm_send_retry(struct dp *dp) {
    if (dp->send_retry_armed)
        return;
    struct io_uring_sqe *sqe = dp_sqe(dp);
    dp->send_retry_ts = (struct __kernel_timespec){ .tv_sec = 0, .tv_nsec = (long long)dp->send_pause_ms * 1000000 };
    io_uring_prep_timeout(sqe, &dp->send_retry_ts, 0, 0);
    io_uring_sqe_set_data64(sqe, TAG(T_SEND_RETRY));
    dp->send_retry_armed = 1;
}

/* The socket refused a request for good: it still needs its one answer, unless it gets none. */
static void dp_forward_failed(struct dp *dp, struct dp_slot *s) {
    struct fuse_in_header *ih = (void *)s->hdr;
    dp_count(&dp->g[DP_G_FORWARD_ERRORS], 1);
    if (ih->opcode != FUSE_FORGET && ih->opcode != FUSE_BATCH_FORGET && ih->opcode != FUSE_INTERRUPT)
        dp_reply(dp, ih->unique, -EIO, NULL, 0);
    dp_free_slot(dp, s);
}

/* Send what waited for room, in order; stop at the first that still has none. */
void dp_flush_sendq(struct dp *dp) {
    if (dp->send_retry && !dp->sock_eof)
        return;  /* after ENOBUFS: the retry's timeout has not fired yet */
    while (dp->sendq) {
        struct dp_slot *s = dp->sendq;
        int rc = dp->sock_eof ? -EPIPE : dp_send(dp, s);
        if (rc == -EAGAIN || (rc == -ENOBUFS && dp_send_stalled(dp)))
            return;
        dp->sendq = s->next;
        if (rc < 0)
            dp_forward_failed(dp, s);
        else
            dp_free_slot(dp, s);
    }
    dp->sendq_tail = NULL;
}

void dp_forward(struct dp *dp, struct dp_slot *s) {
    struct fuse_in_header *ih = (void *)s->hdr;
    dp_count_forward(dp, ih);
    if (ih->opcode == FUSE_INIT) {
        dp_passthrough_init_in(dp, s);  /* does the kernel offer passthrough? */
        dp_uring_init_in(dp, s);        /* ... and FUSE over io_uring? */
    }
    if (s->uent)
        dp_count(&dp->g[DP_G_URING_FORWARDED], 1);  /* came over the ring: its answer is committed there */
    if (ih->opcode == FUSE_INIT || ih->opcode == FUSE_OPEN || ih->opcode == FUSE_CREATE)
        dp_track_add(dp, ih->unique, ih->opcode);
    s->next = NULL;
    int rc = dp->sendq || dp->sock_eof ? -EAGAIN : dp_send(dp, s);
    if (rc == -ENOBUFS && dp_send_stalled(dp))
        rc = -EAGAIN;  /* queued like a full socket's, sent again after a pause */
    if (rc == 0) {
        dp_free_slot(dp, s);
    } else if (rc == -EAGAIN) {  /* keep the order: behind whatever already waits */
        if (dp->sendq_tail)
            dp->sendq_tail->next = s;
        else
            dp->sendq = s;
        dp->sendq_tail = s;
        dp_count(&dp->g[DP_G_SEND_QUEUED], 1);
        if (dp->sock_eof)
            dp_flush_sendq(dp);
    } else {
        dp_forward_failed(dp, s);
    }
}

/* ------------------------------------------------------------ libfuse's replies */

/* INIT: max_background/congestion_threshold (u16 at 16 and 18 of fuse_init_out) replace the
 * fusectl write; max_write is only ever lowered, to what the socketpair carries in one message. */
static void dp_patch_init(struct dp *dp, struct fuse_init_out *o, size_t len) {
    o->max_background = (uint16_t)dp->max_background;
    o->congestion_threshold = (uint16_t)(dp->max_background * 3 / 4);
    if (len >= offsetof(struct fuse_init_out, map_alignment) && o->max_write + 4096 + DP_HDR > dp->msg_limit) {
        o->max_write = (dp->msg_limit - 4096 - DP_HDR) & ~4095u;
        o->max_pages = (uint16_t)(o->max_write / 4096);
    }
    dp_passthrough_init_out(dp, o, len);  /* before INIT_DONE: Python reads the outcome then */
    dp_uring_init_out(dp, o, len);        /* FUSE_OVER_IO_URING; and the record of what was negotiated */
    dp_post(dp, DP_ST_INIT_DONE);
}

static void dp_patch_reply(struct dp *dp, struct fuse_out_header *oh, size_t n) {
    uint32_t opcode = dp_track_take(dp, oh->unique);
    char *arg = (char *)(oh + 1);
    size_t len = n - sizeof *oh;
    if (!opcode || oh->error)
        return;
    if (opcode == FUSE_INIT && len >= offsetof(struct fuse_init_out, max_write)) {
        dp_patch_init(dp, (struct fuse_init_out *)arg, len);
    } else if (opcode != FUSE_INIT && len >= sizeof(struct fuse_open_out)) {
        /* OPEN's reply is fuse_open_out; CREATE's ends with it, after the entry. Without
         * FOPEN_PARALLEL_DIRECT_WRITES, direct writes to one inode take its lock exclusively. */
        struct fuse_open_out *o = (void *)(arg + len - sizeof *o);
        if (o->open_flags & FOPEN_DIRECT_IO)
            o->open_flags |= FOPEN_PARALLEL_DIRECT_WRITES;
        dp_passthrough_open_out(dp, o);  /* a handle Python marked: FOPEN_PASSTHROUGH and its backing id */
    }
}

/* A notification: written by an io-wq worker (IOSQE_ASYNC), never blocking this thread. */
static void dp_note(struct dp *dp, const char *msg, size_t n) {
    struct dp_note *note = malloc(sizeof *note + n);
    if (!note) {
        dp_count(&dp->g[DP_G_REPLY_ERRORS], 1);
        return;
    }
    note->len = n;
    memcpy(note->data, msg, n);
    struct io_uring_sqe *sqe = dp_sqe(dp);
    io_uring_prep_write(sqe, dp->fuse_fd, note->data, (unsigned)n, (uint64_t)-1);
    sqe->flags |= IOSQE_ASYNC;
    io_uring_sqe_set_data64(sqe, TAG(T_NOTE) | (uint64_t)(uintptr_t)note);
    dp_count(&dp->g[DP_G_NOTIFICATIONS], 1);
}

/* Only after its poll fired: a recv that finds nothing is a syscall per wakeup for nothing. */
void dp_drain_sock(struct dp *dp) {
    while (dp->sock_ready && !dp->sock_eof) {
        ssize_t n = recv(dp->sock_fd, dp->rbuf, DP_RBUF, MSG_DONTWAIT | MSG_TRUNC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {  /* EAGAIN: drained; 0 or an error: libfuse's end is closed */
            dp->sock_eof = n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
            dp->sock_ready = 0;
            return;
        }
        struct fuse_out_header *oh = (void *)dp->rbuf;
        if ((size_t)n < sizeof *oh) {
            dp_count(&dp->g[DP_G_REPLY_ERRORS], 1);
        } else if (n > DP_RBUF) {  /* cut (cannot happen below max_pages): still one answer */
            dp_count(&dp->g[DP_G_REPLY_ERRORS], 1);
            dp_reply(dp, oh->unique, -EIO, NULL, 0);
        } else if (oh->unique == 0) {
            dp_note(dp, dp->rbuf, n);
        } else {
            struct iovec iov = { dp->rbuf, (size_t)n };
            dp_patch_reply(dp, oh, n);
            dp_count(&dp->g[DP_G_REPLIES], 1);
            dp_write_fuse(dp, &iov, 1);
        }
    }
}

