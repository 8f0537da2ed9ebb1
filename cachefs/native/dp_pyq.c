/* Python-served requests: FALLOCATE and LSEEK (docs/design.md "Discard, write-zeroes, SEEK_DATA"),
 * and FSYNC (a guest flush: straight to the image's group flush, without libfuse and pyfuse3).
 *
 * The loop thread calls dp_pyq_serve, dp_pyq_admit and dp_pyq_holds (and dp_pyq_init,
 * dp_pyq_free at create and destroy); Python calls dp_pyq_fd, dp_pyq_take and dp_pyq_reply
 * (cachefs/dataplane/plane.py, for fuse/direct_requests.py).
 *
 * Why they are kept from libfuse: pyfuse3 registers
 * neither, and libfuse's ENOSYS would make the kernel stop sending them for the connection's
 * life (fuse_file_fallocate sets no_fallocate, fuse_lseek no_lseek). So they never reach
 * libfuse: each is copied (header and arguments, under 80 bytes) into a table of DP_PYQ
 * entries, its slot is freed, and Python is woken through an eventfd of its own. Python takes
 * them (dp_pyq_take), serves them on trio and answers from its own thread (dp_pyq_reply: one
 * writev, atomic, as dp_notify_inval_inode writes). A full table holds the request in its
 * slot (`wait`), admitted when an answer frees an entry: the slot pool then bounds them, and
 * once it is empty /dev/fuse is not read (the loop's back-pressure). Nothing is refused for
 * lack of room: an EAGAIN from fallocate(2) would be a spurious failure to the caller, and a
 * forward would be libfuse's ENOSYS. An INTERRUPT of one is dropped (finishing is correct). */
#include "dp_internal.h"
#include <sys/eventfd.h>

enum { PYQ_FREE, PYQ_QUEUED, PYQ_TAKEN };

struct dp_pyq {
    int evt_fd;                         /* Python's wakeup */
    int state[DP_PYQ];                  /* PYQ_*, under dp->lock */
    struct dp_pyreq req[DP_PYQ];
    struct dp_slot *wait, *wait_tail;   /* found the table full (loop thread only) */
    int waiting;                        /* atomic: a reply must wake the loop to admit them */
};

/* 1: the request is in the table (its slot may be freed); 0: the table is full. */
static int dp_pyq_push(struct dp *dp, struct dp_slot *s) {
    struct dp_pyq *q = dp->pyq;
    const struct fuse_in_header *ih = (const void *)s->hdr;
    const uint64_t *a = (const uint64_t *)(ih + 1);  /* fh, offset, then length or whence */
    struct dp_pyreq r = { ih->unique, ih->nodeid, a[0], a[1], 0, ih->opcode, 0, ih->uid, ih->gid, ih->pid, 0 };
    if (ih->opcode == FUSE_FALLOCATE) {
        r.length = a[2];
        r.mode = ((const struct fuse_fallocate_in *)(ih + 1))->mode;
    } else if (ih->opcode == FUSE_LSEEK) {
        r.mode = ((const struct fuse_lseek_in *)(ih + 1))->whence;
    } else {  /* FSYNC: fh and the flags only */
        r.offset = 0;
        r.mode = ((const struct fuse_fsync_in *)(ih + 1))->fsync_flags;
    }
    int i;
    pthread_mutex_lock(&dp->lock);
    for (i = 0; i < DP_PYQ && q->state[i] != PYQ_FREE; i++)
        ;
    if (i < DP_PYQ) {
        q->state[i] = PYQ_QUEUED;
        q->req[i] = r;
    }
    pthread_mutex_unlock(&dp->lock);
    if (i == DP_PYQ)
        return 0;
    uint64_t one = 1;
    (void)!write(q->evt_fd, &one, sizeof one);
    return 1;
}

/* Admit held requests, in order, while the table has room. `waiting` is set before the first
 * try: an answer that frees an entry after a failed try then sees it and wakes the loop (the
 * entry is freed under dp->lock, which orders the two), so no request is left held for good. */
void dp_pyq_admit(struct dp *dp) {
    struct dp_pyq *q = dp->pyq;
    if (!q->wait)
        return;
    __atomic_store_n(&q->waiting, 1, __ATOMIC_RELEASE);
    while (q->wait && dp_pyq_push(dp, q->wait)) {
        struct dp_slot *s = q->wait;
        q->wait = s->next;
        dp_free_slot(dp, s);
    }
    if (!q->wait) {
        q->wait_tail = NULL;
        __atomic_store_n(&q->waiting, 0, __ATOMIC_RELEASE);
    }
}

/* 1: the request was Python's: queued (its slot freed), held in its slot behind those already
 * held (the order kept), or answered here when malformed. */
int dp_pyq_serve(struct dp *dp, struct dp_slot *s) {
    struct dp_pyq *q = dp->pyq;
    struct fuse_in_header *ih = (void *)s->hdr;
    size_t need = sizeof *ih + (ih->opcode == FUSE_FALLOCATE ? sizeof(struct fuse_fallocate_in)
                                : ih->opcode == FUSE_LSEEK ? sizeof(struct fuse_lseek_in)
                                                           : sizeof(struct fuse_fsync_in));
    dp_count(&dp->g[DP_G_FAST], 1);
    if (s->len < need) {
        dp_reply(dp, ih->unique, -EINVAL, NULL, 0);
        dp_free_slot(dp, s);
        return 1;
    }
    s->next = NULL;
    if (q->wait_tail)
        q->wait_tail->next = s;
    else
        q->wait = s;
    q->wait_tail = s;
    dp_pyq_admit(dp);
    return 1;
}

/* An INTERRUPT of a request Python holds: dropped, it finishes normally. */
int dp_pyq_holds(struct dp *dp, uint64_t unique) {
    int found = 0;
    pthread_mutex_lock(&dp->lock);
    for (int i = 0; i < DP_PYQ && !found; i++)
        found = dp->pyq->state[i] != PYQ_FREE && dp->pyq->req[i].unique == unique;
    pthread_mutex_unlock(&dp->lock);
    for (struct dp_slot *w = dp->pyq->wait; w && !found; w = w->next)
        found = ((struct fuse_in_header *)w->hdr)->unique == unique;
    return found;
}

void dp_pyq_free(struct dp *dp) {
    if (dp->pyq && dp->pyq->evt_fd > 0)
        close(dp->pyq->evt_fd);
    free(dp->pyq);
    dp->pyq = NULL;
}

int dp_pyq_init(struct dp *dp) {
    if (!(dp->pyq = calloc(1, sizeof *dp->pyq)))
        return -ENOMEM;
    dp->pyq->evt_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return dp->pyq->evt_fd < 0 ? -errno : 0;
}


/* ------------------------------------------------------------ Python-served requests: Python's side */

/* The eventfd Python awaits: written once per request queued. */
int dp_pyq_fd(struct dp *dp) { return dp->pyq->evt_fd; }

/* Up to `max` queued requests, now Python's to answer (each exactly once, by dp_pyq_reply). */
int dp_pyq_take(struct dp *dp, struct dp_pyreq *out, int max) {
    int n = 0;
    pthread_mutex_lock(&dp->lock);
    for (int i = 0; i < DP_PYQ && n < max; i++)
        if (dp->pyq->state[i] == PYQ_QUEUED) {
            dp->pyq->state[i] = PYQ_TAKEN;
            out[n++] = dp->pyq->req[i];
        }
    pthread_mutex_unlock(&dp->lock);
    return n;
}

/* Answer a request Python took: `err` (0 or -errno), and for a successful LSEEK its offset.
 * Written by the caller's thread, one writev, so the reply is atomic and needs no loop round.
 * 0, -ENOENT (not a request Python holds), or the write's -errno (ENOENT from the kernel: it
 * was interrupted and is gone; ENODEV: unmounted). */
int dp_pyq_reply(struct dp *dp, uint64_t unique, int err, uint64_t offset) {
    struct dp_pyq *q = dp->pyq;
    uint32_t opcode = 0;
    pthread_mutex_lock(&dp->lock);
    for (int i = 0; i < DP_PYQ && !opcode; i++)
        if (q->state[i] == PYQ_TAKEN && q->req[i].unique == unique) {
            opcode = q->req[i].opcode;
            q->state[i] = PYQ_FREE;
        }
    pthread_mutex_unlock(&dp->lock);
    if (!opcode)
        return -ENOENT;
    struct fuse_lseek_out out = { offset };
    int with_arg = !err && opcode == FUSE_LSEEK;
    struct fuse_out_header oh = { (uint32_t)(sizeof oh + (with_arg ? sizeof out : 0)), err, unique };
    struct iovec iov[2] = { { &oh, sizeof oh }, { &out, sizeof out } };
    /* A request that came over the ring is answered in its entry, by the loop (dp_uring.c). */
    int rc = 0, ring = dp_uring_defer(dp, unique, err, &out, with_arg ? sizeof out : 0);
    while (!ring && writev(dp->fuse_fd, iov, with_arg ? 2 : 1) < 0)
        if (errno != EINTR) {
            rc = -errno;
            break;
        }
    if (__atomic_load_n(&q->waiting, __ATOMIC_ACQUIRE)) {  /* room now: the loop admits the held ones */
        uint64_t one = 1;
        (void)!write(dp->ctl_fd, &one, sizeof one);
    }
    return rc;
}
