/* FUSE over io_uring (issue 24; Linux 6.14+, CONFIG_FUSE_IO_URING, module parameter enable_uring), and
 * the record of what INIT negotiated.
 *
 * With /dev/fuse, a request costs a read(2) and its answer a write(2). Over the ring, the daemon lends
 * the kernel entries (a header buffer and a payload buffer each, FUSE_IO_URING_CMD_REGISTER on the
 * /dev/fuse descriptor); a request arrives as the CQE of an entry, already copied into its buffers, and
 * its answer is a FUSE_IO_URING_CMD_COMMIT_AND_FETCH SQE that also lends the entry again. They ride the
 * loop's own io_uring (dp_loop.c), so one io_uring_enter answers requests, takes the next ones and
 * submits their backend I/O.
 *
 * What the kernel requires (fs/fuse/dev_uring.c, 6.18):
 *  - 128-byte SQEs: fuse_uring_cmd refuses a command without IO_URING_F_SQE128 (dp_uring_want makes the
 *    ring again with IORING_SETUP_SQE128 before the thread starts);
 *  - a registered connection: REGISTER says -EAGAIN until INIT's reply has been processed
 *    (fc->initialized), so the loop registers right after relaying that reply (dp_uring_poll);
 *  - a payload buffer of at least max(max_write, max_pages pages) (fuse_uring_create_ring_ent);
 *  - one queue per possible CPU: a request goes to the queue of the CPU its caller runs on
 *    (fuse_uring_task_to_queue), and the ring only takes requests once every queue has an entry
 *    (is_ring_ready); until then, and for INIT, FORGET and INTERRUPT always, /dev/fuse carries them, so
 *    the loop keeps reading it and both paths work at once.
 *
 * An entry's payload buffer is its slot's data buffer (page aligned), and a request is laid out in the
 * slot as read(2) would have put it (dp_uring_unpack), so everything after it is the /dev/fuse code:
 * a WRITE's data is where an O_DIRECT backend write takes it from, a READ's answer is read where the
 * commit takes it from (no copy either way), and a request for libfuse is forwarded as is. Its answer,
 * from C or from libfuse, goes through dp_write_fuse, which commits it into the entry (dp_uring_commit)
 * instead of writing it: the request is on the queue's own processing list, where a write to /dev/fuse
 * does not look (-ENOENT). Python's answers (dp_pyq.c) come from its own thread: they are handed to
 * the loop (dp_uring_defer), which alone submits to the ring (SINGLE_ISSUER).
 *
 * Teardown (fuse_uring_stop_queues, fuse_uring_cancel): an entry the kernel holds comes back as a CQE
 * of -ENOTCONN (abort, unmount) or -ECANCELED (the daemon dying); one held here is released by the
 * kernel itself, its request ended, and its late commit fails with -ENOTCONN. So nothing here waits
 * for the ring at the end: the entries are simply gone (UE_GONE).
 */
#include "dp_internal.h"
#include "dp_testhooks.h"
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>

/* include/uapi/linux/fuse.h 7.42 (Debian 12's header is 7.38). */
#define DP_FUSE_OVER_IO_URING (1u << (41 - 32))  /* FUSE_OVER_IO_URING (1ULL << 41), in flags2 */
#define DP_FUSE_ASYNC_DIO (1u << 15)
#define DP_FUSE_MAX_PAGES (1u << 22)
#ifndef FUSE_INIT_EXT
#define FUSE_INIT_EXT (1u << 30)
#endif
enum { DP_URING_CMD_REGISTER = 1, DP_URING_CMD_COMMIT_AND_FETCH = 2 };
struct dp_uring_ent_in_out { uint64_t flags, commit_id; uint32_t payload_sz, padding; uint64_t reserved; };
struct dp_uring_req_header {   /* struct fuse_uring_req_header */
    char in_out[128];          /* fuse_in_header in, fuse_out_header back */
    char op_in[128];           /* the request's first argument (its op header), when it has one */
    struct dp_uring_ent_in_out ent;
};
_Static_assert(sizeof(struct dp_uring_req_header) == 288, "struct fuse_uring_req_header (7.42)");
struct dp_uring_cmd_req { uint64_t flags, commit_id; uint16_t qid; uint8_t padding[6]; };  /* in sqe->cmd */
_Static_assert(offsetof(struct io_uring_sqe, cmd) + sizeof(struct dp_uring_cmd_req) <= 128, "SQE128's command area");

/* The payload buffer lent: the slot's data less room to move a long op header in front of the payload
 * (dp_uring_unpack). It must hold max_write (1 MiB, what libfuse negotiates; dp_patch_init only lowers it). */
#define DP_URING_PAYLOAD (DP_DATA - 128)
_Static_assert(DP_URING_PAYLOAD >= (1u << 20), "an entry's payload must hold a 1 MiB WRITE");

enum { UE_IDLE, UE_KERNEL, UE_USER, UE_GONE };

struct dp_uent {
    struct dp_uring_req_header hdr;  /* the kernel's to write until the CQE, ours until the commit */
    struct iovec iov[2];             /* REGISTER's: the header, the slot's data */
    uint16_t qid;
    int state;                       /* UE_* (loop thread) */
    int held;                        /* came after DP_STOP_READING: never served, the abort ends it */
    uint64_t unique;                 /* atomic: the request held here (UE_USER), else 0 */
    int d_err;                       /* an answer from Python's thread (dp_uring_defer) */
    uint32_t d_len;
    char d_arg[16];
    struct dp_slot *d_next;
};

struct dp_uring {
    int want;
    unsigned bits;                   /* DP_UR_* (atomic) */
    int err;                         /* REGISTER's refusal (-errno), or 0 */
    int register_now;                /* INIT took it: register at the loop's next turn */
    unsigned nq, depth, n;           /* queues (possible CPUs), entries per queue, entries */
    int nuser;                       /* entries in UE_USER (loop thread) */
    unsigned reregistered;
    uint32_t payload;                /* the payload buffer lent: DP_URING_PAYLOAD (dp_test_uring_payload) */
    struct dp_uent *ents;            /* n; entry i is slot DP_NPOOL + i */
    struct dp_slot *deferred;        /* Python's answers, for the loop (under dp->lock) */
};

static void dp_ur_set(struct dp_uring *u, unsigned bits) { __atomic_fetch_or(&u->bits, bits, __ATOMIC_RELEASE); }

/* ------------------------------------------------------------ before the thread: Python's side */

/* The kernel makes a queue per possible CPU (fuse_uring_create: num_possible_cpus()). */
static unsigned dp_possible_cpus(void) {
    char buf[256];
    int fd = open("/sys/devices/system/cpu/possible", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    unsigned count = 0, a, b;
    if (fd >= 0)
        close(fd);
    buf[n > 0 ? n : 0] = 0;
    for (char *p = buf; *p;) {  /* "0-3,8-11": ranges, commas */
        int used = 0;
        if (sscanf(p, "%u-%u%n", &a, &b, &used) == 2 && used)
            count += b - a + 1;
        else if (sscanf(p, "%u%n", &a, &used) == 1 && used)
            count++;
        else
            break;
        p += used + (p[used] == ',');
    }
    return count;
}

int dp_uring_want(struct dp *dp, int on) {
    if (dp->started)
        return -EBUSY;  /* INIT may be under way */
    if (!on || dp->ur)
        return 0;
    struct dp_uring *u = calloc(1, sizeof *u);
    unsigned nq = dp_possible_cpus();
    int rc;
    if (!u)
        return -ENOMEM;
    u->nq = nq;
    u->depth = nq ? (nq * DP_URING_DEPTH <= DP_NRING ? DP_URING_DEPTH : DP_NRING / nq) : 0;
    u->n = nq * u->depth;
    if (u->depth < 4 || !(u->ents = calloc(u->n, sizeof *u->ents))) {  /* too many CPUs for DP_NRING */
        rc = u->depth < 4 ? -E2BIG : -ENOMEM;
        free(u);
        return rc;
    }
    io_uring_queue_exit(&dp->ring);  /* never used yet: the thread has not started */
    rc = dp_ring_setup(dp, IORING_SETUP_SQE128);
    if (rc < 0) {  /* SQE128 refused (before 5.19): a plain ring again, over /dev/fuse */
        free(u->ents);
        free(u);
        int again = dp_ring_setup(dp, 0);
        return again < 0 ? again : rc;
    }
    u->want = 1;
    u->bits = DP_UR_WANTED;
    u->payload = DP_URING_PAYLOAD;
    dp->ur = u;
    return 0;
}

int dp_uring(struct dp *dp) { return dp->ur ? (int)__atomic_load_n(&dp->ur->bits, __ATOMIC_ACQUIRE) : 0; }

int dp_init_info(struct dp *dp, uint64_t *out, int n) {
    int i;
    for (i = 0; i < n && i < DP_INIT_N; i++)
        out[i] = __atomic_load_n(&dp->init[i], __ATOMIC_RELAXED);
    if (dp->ur && n > DP_INIT_URING_ERR) {
        out[DP_INIT_QUEUES] = dp->ur->nq;
        out[DP_INIT_DEPTH] = dp->ur->depth;
        out[DP_INIT_URING_ERR] = (uint64_t)-__atomic_load_n(&dp->ur->err, __ATOMIC_ACQUIRE);
    }
    return i;
}

void dp_uring_free(struct dp *dp) {
    if (dp->ur)
        free(dp->ur->ents);
    free(dp->ur);
    dp->ur = NULL;
}

/* Tests: lend payload buffers of `bytes` (one the kernel refuses, below max_write: a registration
 * that fails, and the fallback to /dev/fuse). Before dp_start. */
int dp_test_uring_payload(struct dp *dp, uint32_t bytes) {
    if (dp->started || !dp->ur || bytes > DP_URING_PAYLOAD)
        return -EINVAL;
    dp->ur->payload = bytes;
    return 0;
}

/* ------------------------------------------------------------ INIT (the loop, relaying it: dp_forward.c) */

void dp_uring_init_in(struct dp *dp, const struct dp_slot *s) {
    const struct fuse_init_in *in = (const void *)((const struct fuse_in_header *)s->hdr + 1);
    size_t need = sizeof(struct fuse_in_header) + offsetof(struct fuse_init_in, flags2) + 4;
    uint64_t f = s->len >= need ? in->flags : 0;
    if (f & FUSE_INIT_EXT)  /* flags2 counts only with FUSE_INIT_EXT */
        f |= (uint64_t)in->flags2 << 32;
    __atomic_store_n(&dp->init[DP_INIT_KERNEL_FLAGS], f, __ATOMIC_RELAXED);
    if (dp->ur && (f >> 32) & DP_FUSE_OVER_IO_URING)
        dp_ur_set(dp->ur, DP_UR_OFFERED);
}

/* libfuse 3.14 knows nothing of the ring: the reply takes FUSE_OVER_IO_URING here (after which the
 * kernel holds new requests back until the ring is ready: fuse_block_alloc, or until a REGISTER fails,
 * which clears fc->io_uring and wakes them: fuse_uring_cmd). FUSE_ASYNC_DIO too, if libfuse left it
 * out: without it an async O_DIRECT request to a FUSE file is waited for in io_submit itself
 * (fs/fuse/file.c fuse_direct_IO), so a guest's queue depth collapses to 1. */
void dp_uring_init_out(struct dp *dp, struct fuse_init_out *o, size_t len) {
    struct dp_uring *u = dp->ur;
    uint64_t kf = dp->init[DP_INIT_KERNEL_FLAGS];
    int ext = len >= offsetof(struct fuse_init_out, flags2) + 4;
    if ((kf & DP_FUSE_ASYNC_DIO) && !(o->flags & DP_FUSE_ASYNC_DIO))
        o->flags |= DP_FUSE_ASYNC_DIO;
    if (u && u->want && ext && ((kf >> 32) & DP_FUSE_OVER_IO_URING)) {
        o->flags |= FUSE_INIT_EXT;
        o->flags2 |= DP_FUSE_OVER_IO_URING;
        dp_ur_set(u, DP_UR_TAKEN);
        u->register_now = 1;
    }
    uint64_t f = o->flags | ((o->flags & FUSE_INIT_EXT) && ext ? (uint64_t)o->flags2 << 32 : 0);
    uint64_t rec[] = { [DP_INIT_FLAGS] = f, [DP_INIT_MAX_WRITE] = o->max_write,
                       [DP_INIT_MAX_PAGES] = o->flags & DP_FUSE_MAX_PAGES ? o->max_pages : 32,
                       [DP_INIT_MAX_BACKGROUND] = o->max_background, [DP_INIT_CONGESTION] = o->congestion_threshold };
    for (int i = DP_INIT_FLAGS; i <= DP_INIT_CONGESTION; i++)
        __atomic_store_n(&dp->init[i], rec[i], __ATOMIC_RELAXED);
}

/* ------------------------------------------------------------ the entries (loop thread) */

static void dp_uring_cmd(struct dp *dp, struct dp_slot *s, uint32_t op, uint64_t commit_id) {
    struct dp_uent *e = s->uent;
    struct io_uring_sqe *sqe = dp_sqe(dp);
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = dp->fuse_fd;
    sqe->cmd_op = op;
    if (op == DP_URING_CMD_REGISTER) {  /* fuse_uring_get_iovec_from_sqe: addr -> iovec[2], len 2 */
        sqe->addr = (uint64_t)(uintptr_t)e->iov;
        sqe->len = 2;
    }
    struct dp_uring_cmd_req *req = (void *)sqe->cmd;
    req->qid = e->qid;
    req->commit_id = commit_id;
    io_uring_sqe_set_data64(sqe, TAG(T_URING) | (uint64_t)(s - dp->slots));
    e->state = UE_KERNEL;
}

/* Lend every entry, once INIT's reply is in. REGISTER runs at submission and completes nothing when
 * it worked (fuse_uring_cmd returns -EIOCBQUEUED: the CQE is the first request), so a refusal is in
 * the CQ when io_uring_submit returns: look (dp_reap consumes them), settle, tell Python. */
static void dp_uring_register(struct dp *dp) {
    struct dp_uring *u = dp->ur;
    struct io_uring_cqe *cqe;
    unsigned head;
    for (unsigned i = 0; i < u->n; i++) {
        struct dp_slot *s = &dp->slots[DP_NPOOL + i];
        struct dp_uent *e = &u->ents[i];
        s->uent = e;
        e->qid = (uint16_t)(i / u->depth);
        e->iov[0] = (struct iovec){ &e->hdr, sizeof e->hdr };
        e->iov[1] = (struct iovec){ s->data, u->payload };
        dp_uring_cmd(dp, s, DP_URING_CMD_REGISTER, 0);
    }
    io_uring_submit(&dp->ring);
    io_uring_for_each_cqe(&dp->ring, head, cqe)
        if (cqe->user_data >> DP_UD_TAG_SHIFT == T_URING && cqe->res < 0 && !u->err)
            __atomic_store_n(&u->err, cqe->res, __ATOMIC_RELEASE);
    dp_ur_set(u, u->err ? DP_UR_FAILED : DP_UR_REGISTERED);
    dp_post(dp, DP_ST_URING);
}

/* The request in the entry, laid out as read(2) puts it: fuse_in_header, its op header (in_h.len
 * tells its length: in_h.len counts every argument, fs/fuse/dev.c queue_request_and_unlock), then the
 * payload; the first DP_HDR bytes in s->hdr, the rest in s->data. The payload is already at s->data;
 * an op header of exactly DP_HDR - 40 bytes (READ's, WRITE's) leaves it there, a shorter one pulls its
 * start into s->hdr, a longer one pushes it along (names, xattrs: small). -EIO: lengths that do not add up. */
static int dp_uring_unpack(struct dp_slot *s) {
    const struct dp_uring_req_header *h = &s->uent->hdr;
    struct fuse_in_header ih;
    memcpy(&ih, h->in_out, sizeof ih);
    uint32_t p = h->ent.payload_sz, room = DP_HDR - sizeof ih;
    if (p > DP_URING_PAYLOAD || ih.len < sizeof ih + p || ih.len - sizeof ih - p > sizeof h->op_in)
        return -EIO;
    uint32_t op = ih.len - (uint32_t)sizeof ih - p;
    char *hb = (char *)s->hdr + sizeof ih;
    memcpy(s->hdr, &ih, sizeof ih);
    if (op <= room) {
        uint32_t k = room - op < p ? room - op : p;
        memcpy(hb, h->op_in, op);
        memcpy(hb + op, s->data, k);
        memmove(s->data, s->data + k, p - k);
    } else {
        memcpy(hb, h->op_in, room);
        memmove(s->data + (op - room), s->data, p);
        memcpy(s->data, h->op_in + room, op - room);
    }
    s->len = ih.len;
    return 0;
}

/* An entry's CQE: a request (0), or the entry is gone (-ENOTCONN, -ECANCELED: teardown; a failed
 * commit, e.g. -ENOENT when its request had already ended: lent again, as a new entry). */
void dp_uring_cqe(struct dp *dp, uint64_t ud, int res) {
    struct dp_slot *s = &dp->slots[UNTAG(ud)];
    struct dp_uent *e = s->uent;
    struct dp_uring *u = dp->ur;
    if (res < 0) {
        int teardown = res == -ENOTCONN || res == -ECANCELED || res == -ECONNABORTED || res == -ENODEV;
        e->state = UE_GONE;
        dp_count(&dp->g[DP_G_URING_LOST], 1);
        if (!teardown && !u->err && !dp->dead && u->reregistered++ < 4 * u->n)
            dp_uring_cmd(dp, s, DP_URING_CMD_REGISTER, 0);
        return;
    }
    struct fuse_in_header *ih = (void *)s->hdr;
    e->state = UE_USER;
    u->nuser++;
    dp_count(&dp->g[DP_G_URING_REQUESTS], 1);
    int rc = dp_uring_unpack(s);
    __atomic_store_n(&e->unique, rc ? e->hdr.ent.commit_id : ih->unique, __ATOMIC_RELEASE);
    if (rc)
        dp_reply(dp, e->unique, rc, NULL, 0);
    else if (!dp->reading)
        e->held = 1;  /* the loop is stopping: as an unread request, it waits for the unmount */
    else
        dp_dispatch(dp, s);
}

/* The entry holding request `unique`, or NULL. A scan: DP_NRING entries at most, and cheaper than the
 * syscall it saves. */
static struct dp_slot *dp_uring_find(struct dp *dp, uint64_t unique) {
    struct dp_uring *u = dp->ur;
    for (unsigned i = 0; i < u->n; i++)
        if (u->ents[i].state == UE_USER && u->ents[i].unique == unique)
            return &dp->slots[DP_NPOOL + i];
    return NULL;
}

/* The answer into the entry: fuse_out_header into in_out, the arguments into the payload (not copied
 * when already there: a fast READ's data). The kernel reads payload_sz bytes of arguments
 * (fuse_uring_copy_from_ring; the header is not counted in them). */
static void dp_uring_fill(struct dp_slot *s, const struct iovec *iov, int n) {
    struct dp_uent *e = s->uent;
    struct fuse_out_header oh;
    size_t at = 0, skip = sizeof oh;
    memcpy(&oh, iov[0].iov_base, sizeof oh);
    for (int i = 0; i < n && !oh.error; i++) {
        const char *p = (const char *)iov[i].iov_base + (skip < iov[i].iov_len ? skip : iov[i].iov_len);
        size_t len = iov[i].iov_len - (size_t)(p - (const char *)iov[i].iov_base);
        skip -= skip < iov[i].iov_len ? skip : iov[i].iov_len;
        if (at + len > DP_URING_PAYLOAD) {
            oh.error = -EIO;  /* cannot happen below max_pages: still one answer */
            break;
        }
        if (len && p != s->data + at)
            memcpy(s->data + at, p, len);
        at += len;
    }
    at = oh.error ? 0 : at;
    oh.len = (uint32_t)(sizeof oh + at);
    memcpy(e->hdr.in_out, &oh, sizeof oh);
    e->hdr.ent.payload_sz = (uint32_t)at;
}

/* dp_write_fuse: an answer to a request that came over the ring is committed into its entry, which
 * the same SQE lends again (1); anything else goes to /dev/fuse (0). */
int dp_uring_commit(struct dp *dp, const struct iovec *iov, int n) {
    struct dp_uring *u = dp->ur;
    if (!u->nuser || iov[0].iov_len < sizeof(struct fuse_out_header))
        return 0;
    struct dp_slot *s = dp_uring_find(dp, ((const struct fuse_out_header *)iov[0].iov_base)->unique);
    if (!s)
        return 0;
    struct dp_uent *e = s->uent;
    uint64_t id = e->unique;
    dp_uring_fill(s, iov, n);
    u->nuser--;
    e->held = 0;
    __atomic_store_n(&e->unique, 0, __ATOMIC_RELEASE);
    dp_uring_cmd(dp, s, DP_URING_CMD_COMMIT_AND_FETCH, id);
    return 1;
}

/* ------------------------------------------------------------ Python's answers (dp_pyq.c) */

/* Python's thread: an answer to a request that came over the ring (1), for the loop to commit: the
 * loop alone submits (SINGLE_ISSUER). The entry stays in UE_USER, its unique set, until that commit. */
int dp_uring_defer(struct dp *dp, uint64_t unique, int err, const void *arg, uint32_t len) {
    struct dp_uring *u = dp->ur;
    struct dp_uent *e = NULL;
    unsigned i;
    if (!u || !u->ents || len > sizeof e->d_arg)
        return 0;
    for (i = 0; i < u->n && !e; i++)
        if (__atomic_load_n(&u->ents[i].unique, __ATOMIC_ACQUIRE) == unique)
            e = &u->ents[i];
    if (!e)
        return 0;
    e->d_err = err;
    e->d_len = err ? 0 : len;
    memcpy(e->d_arg, arg, e->d_len);
    pthread_mutex_lock(&dp->lock);
    e->d_next = u->deferred;
    __atomic_store_n(&u->deferred, &dp->slots[DP_NPOOL + (e - u->ents)], __ATOMIC_RELEASE);
    pthread_mutex_unlock(&dp->lock);
    uint64_t one = 1;
    (void)!write(dp->ctl_fd, &one, sizeof one);
    return 1;
}

/* The loop, each turn: register once INIT took the ring; commit Python's answers. */
void dp_uring_poll(struct dp *dp) {
    struct dp_uring *u = dp->ur;
    if (!u)
        return;
    if (u->register_now) {
        u->register_now = 0;
        dp_uring_register(dp);
    }
    if (!__atomic_load_n(&u->deferred, __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&dp->lock);
    struct dp_slot *s = u->deferred;
    u->deferred = NULL;
    pthread_mutex_unlock(&dp->lock);
    for (struct dp_slot *next; s; s = next) {
        next = s->uent->d_next;
        dp_reply(dp, s->uent->unique, s->uent->d_err, s->uent->d_arg, s->uent->d_len);
    }
}
