/* Guest flushes served in C (issue 24; docs/design.md "Guest flushes served in C").
 *
 * A guest FSYNC of a qcow2 image used to go to Python: adopt C's allocation log into the L2
 * cache, write the changed L2 pages, one fdatasync. In the common case every change since the
 * last flush is C's own allocations of lent clusters (refcount raise already durable) into L2
 * tables that are on disk. Then C writes those entries itself and issues the one fdatasync:
 *
 *   FSYNC (handle allowed: writeback, none) --under dp->lock--> gate open? every unwritten log
 *   record fresh (not a copy on write) and in a table Python published as on disk? enough lent
 *   clusters left? no sticky error?  --no--> Python's FSYNC path, as before (dp_pyq.c)
 *                                    --yes-> pwrite each new L2 entry (8 bytes, big-endian,
 *   host | COPIED) through the handle's buffered descriptor, then IORING_OP_FSYNC (DATASYNC) on it;
 *   the FSYNC is answered with its result. FSYNCs arriving meanwhile wait for the next one
 *   (group commit), which writes what was logged since and syncs once for all of them.
 *
 * Write-through (writethrough, directsync) allocating writes take the same way instead of
 * parking for Python's sync (dp_park.c): the data through the twin without O_DSYNC, then C's
 * entry write and fdatasync, then the WRITE's reply (dp_cflush_write). Once that sync is done
 * the cluster is plainly writable, so later overwrites are single O_DSYNC writes.
 *
 * C writes through the requester's own descriptor (the FSYNC's handle's mode descriptor, a write's
 * twin without O_DSYNC): no descriptor of its own, so each mode's flags hold for every descriptor
 * of the image. Its slot stays active until answered, so a drain (handle withdrawn, image paused
 * for a mode switch or resize) waits for C's flush before Python closes that descriptor. Through
 * an O_DIRECT descriptor (none, directsync: the mode keeps the image out of the page cache), each
 * 4 KiB page holding new entries is read, patched and written whole (dp_cflush_pages); the page
 * on disk is current (no write of Python's is under way while the gate is open).
 *
 * Why 8-byte entry writes through a buffered descriptor, not whole 4 KiB pages: C does not
 * hold an L2 table's bytes (compressed, zero-flag and backing entries are not in its mapping),
 * and a page built from anything but the current table would write stale entries. An entry is
 * 8-byte aligned, inside one 512-byte sector, so a torn write-back leaves each entry old or
 * new, and each is valid on its own: a new entry points at a counted cluster holding the
 * guest's bytes or zeros, an old one leaks that cluster. The page cache keeps C's entry
 * writes coherent with Python's own metadata writes, O_DIRECT ones too: the kernel writes
 * back and invalidates the cached range around a direct write, and a direct read writes the
 * range back first. The two never run at once (the gate, below).
 *
 * The gate (Python's side: cachefs/dataplane/cflush.py). Python closes it whenever it takes
 * an image's write lock, the only place it changes or writes metadata, and opens it on release
 * only when its metadata queue is empty (nothing dirty, nothing written and unsynced, no free
 * pending), so every lent cluster's refcount raise is durable (invariant 1) and every write it
 * served is covered by a completed sync. C writes entries only under dp->lock with the gate
 * open, and closing takes dp->lock: once Python holds the lock, no entry write of C's is under
 * way or will start, and Python adopts C's log (written entries included) before it writes any
 * L2 page, so it never writes a page older than C's over it.
 *
 * Loop thread: dp_cflush_try, dp_cflush_done. Python: the dp_cflush_* calls of dp_abi.h.
 */
#include "dp_internal.h"
#include <endian.h>

#define L2_COPIED (1ull << 63)  /* qcow2 spec: refcount 1, writable in place */

static void dp_cflush_settle(struct dp_image *im, uint64_t from, uint64_t to);

/* An FSYNC gets its result; a write-through WRITE (dp_cflush_write) its reply, or the error. */
static void dp_cflush_answer(struct dp *dp, struct dp_slot *s, int err) {
    __atomic_store_n(&s->active, 0, __ATOMIC_RELEASE);  /* a drain waiting for it may end */
    dp->completed = 1;
    if (s->write) {
        s->err = err;
        dp_answer(dp, s);
        return;
    }
    dp_reply(dp, ((struct fuse_in_header *)s->hdr)->unique, err, NULL, 0);
    dp_free_slot(dp, s);
}

static void dp_cflush_answer_all(struct dp *dp, struct dp_slot *s, int err) {
    for (struct dp_slot *next; s; s = next) {
        next = s->next;
        dp_cflush_answer(dp, s, err);
    }
}

/* May C serve a flush of `im` now? Every record it would write is a fresh cluster (a copy on
 * write needs its data synced first: invariant 3) in a table it may write in place. */
static int dp_cflush_may(const struct dp_image *im) {
    const struct dp_cflush *cf = &im->cflush;
    const struct dp_alloc *a = &im->alloc;
    if (!cf->open || !cf->page || im->paused || !a->on || a->spare_count <= cf->min_spare)
        return 0;
    uint64_t from = cf->written > cf->log_base ? cf->written - cf->log_base : 0;
    for (uint64_t i = from; i < a->log_count; i++) {
        uint64_t t = a->log[i].guest >> cf->table_bits;
        if (a->log[i].cow || t >= cf->nl2 || !cf->l2off[t])
            return 0;
    }
    return 1;
}

/* Under dp->lock: the new entries of log records [from, end) through a buffered descriptor, one
 * 8-byte write each. 0, or -1 when a write failed. */
static int dp_cflush_entries(struct dp_image *im, uint64_t from) {
    struct dp_cflush *cf = &im->cflush;
    const struct dp_alloc *a = &im->alloc;
    uint64_t mask = (1ull << cf->table_bits) - 1;
    for (uint64_t i = from; i < a->log_count; i++) {
        uint64_t be = htobe64(a->log[i].host | L2_COPIED);
        uint64_t at = cf->l2off[a->log[i].guest >> cf->table_bits] + (a->log[i].guest & mask) * 8;
        if (pwrite(cf->fd, &be, sizeof be, (off_t)at) != (ssize_t)sizeof be)
            return -1;
        cf->written = cf->log_base + i + 1;
        dp_count(&im->c[DP_C_CFLUSH_ENTRIES], 1);
    }
    return 0;
}

/* The same through an O_DIRECT descriptor (none, directsync: no page cache of the image, metadata
 * included): each 4 KiB page holding new entries read, patched, written whole. The page on disk is
 * current: the gate is open, so no write of Python's is under way or pending, and C's own are done. */
static int dp_cflush_pages(struct dp_image *im, uint64_t from) {
    struct dp_cflush *cf = &im->cflush;
    const struct dp_alloc *a = &im->alloc;
    uint64_t mask = (1ull << cf->table_bits) - 1;
    char done[DP_ALOG] = { 0 };
    for (uint64_t i = from; i < a->log_count; i++) {
        if (done[i])
            continue;
        uint64_t at = cf->l2off[a->log[i].guest >> cf->table_bits] + (a->log[i].guest & mask) * 8;
        uint64_t page = at & ~(uint64_t)4095;
        if (pread(cf->fd, cf->page, 4096, (off_t)page) != 4096)
            return -1;
        for (uint64_t j = i; j < a->log_count; j++) {
            uint64_t atj = cf->l2off[a->log[j].guest >> cf->table_bits] + (a->log[j].guest & mask) * 8;
            if (!done[j] && (atj & ~(uint64_t)4095) == page) {
                uint64_t be = htobe64(a->log[j].host | L2_COPIED);
                memcpy(cf->page + (atj - page), &be, sizeof be);
                done[j] = 1;
                dp_count(&im->c[DP_C_CFLUSH_ENTRIES], 1);
            }
        }
        if (pwrite(cf->fd, cf->page, 4096, (off_t)page) != 4096)
            return -1;
    }
    cf->written = cf->log_base + a->log_count;
    return 0;
}

/* Under dp->lock, with dp_cflush_may: write the new entries through the descriptor of `s` (the
 * FSYNC's handle's, or the write's), submit the fdatasync. 0: started;
 * -1: an entry write failed (Python's path writes them again: nothing is lost, they stay logged). */
static int dp_cflush_start(struct dp *dp, struct dp_image *im, const struct dp_slot *s) {
    struct dp_cflush *cf = &im->cflush;
    const struct dp_alloc *a = &im->alloc;
    uint64_t from = cf->written > cf->log_base ? cf->written - cf->log_base : 0;
    cf->fd = s->fd;  /* the requester's descriptor: drains wait for C's flush (its slot is active) */
    if ((s->cflush_direct ? dp_cflush_pages(im, from) : dp_cflush_entries(im, from)) < 0)
        return -1;
    cf->syncing = cf->log_base + a->log_count;
    cf->mark = __atomic_load_n(&im->c[DP_C_UNSYNCED_WRITES], __ATOMIC_RELAXED);
    cf->running = 1;
    dp->active++;  /* the loop ends only once it completed (dp_control) */
    if (cf->skip_sync) {  /* tests only: the power-cut test must catch an ack without a sync */
        struct io_uring_sqe *sqe = dp_sqe(dp);
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, TAG(T_CFLUSH) | (uint64_t)(uintptr_t)im);
        return 0;
    }
    struct io_uring_sqe *sqe = dp_sqe(dp);
    io_uring_prep_fsync(sqe, cf->fd, IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data64(sqe, TAG(T_CFLUSH) | (uint64_t)(uintptr_t)im);
    dp_count(&im->c[DP_C_CFSYNCS], 1);
    /* Charged to the mode of the handle whose descriptor it runs on (a FSYNC's and a WRITE's fh lead) */
    struct dp_handle *h = dp_map_get(&dp->handles, *(const uint64_t *)((const struct fuse_in_header *)s->hdr + 1));
    if (h)
        h->c[DP_H_FDATASYNCS]++;
    return 0;
}

/* The loop thread, an FSYNC: 1 when C serves it (answered now or by a sync of C's), 0 when it
 * goes Python's way. */
int dp_cflush_try(struct dp *dp, struct dp_slot *s) {
    struct fuse_in_header *ih = (void *)s->hdr;
    if (s->len < sizeof *ih + sizeof(struct fuse_fsync_in))
        return 0;
    uint64_t fh = ((const struct fuse_fsync_in *)(ih + 1))->fh;
    int err = 0, taken = 0;
    s->write = 0;  /* an FSYNC (dp_cflush_answer): the slot may have served a WRITE before */
    pthread_mutex_lock(&dp->lock);
    struct dp_handle *h = dp_map_get(&dp->handles, fh);
    struct dp_image *im = h && h->cflush ? h->img : NULL;
    struct dp_cflush *cf = im ? &im->cflush : NULL;
    if (h) {
        s->fd = h->fd;  /* the handle's mode descriptor; O_DIRECT: whole pages (dp_cflush_pages) */
        s->cflush_direct = h->align > 1;
    }
    if (cf && cf->err) {  /* sticky: this flush fails too, whoever would have served it */
        err = cf->err;
        taken = 1;
    } else if (cf && cf->running) {  /* group commit: the next sync covers it */
        s->next = cf->next;
        cf->next = s;
        taken = 1;
    } else if (cf && dp_cflush_may(im) && dp_cflush_start(dp, im, s) == 0) {
        s->next = cf->cur;
        cf->cur = s;
        taken = 1;
    }
    if (taken && !err) {  /* active until answered: a drain (unpublish, pause) waits for it */
        s->seq = ++dp->seq;
        __atomic_store_n(&s->active, 1, __ATOMIC_RELEASE);
    }
    if (taken) {
        dp_count(&im->c[DP_C_CFLUSHES], 1);
        h->c[DP_H_FLUSHES]++;  /* a guest flush of this handle's mode (FastPaths charges it) */
        h->c[DP_H_WRITES_FLUSHED] = h->c[DP_H_WRITES];  /* its close owes no flush for these */
    }
    else if (cf)
        dp_count(&im->c[DP_C_CFLUSH_FORWARDED], 1);
    pthread_mutex_unlock(&dp->lock);
    if (taken)
        dp_count(&dp->g[DP_G_FAST], 1);
    if (err)
        dp_cflush_answer(dp, s, err);
    return taken;
}

/* The loop thread: C's fdatasync of `im` ended with `res`. Its FSYNCs get the result; those that
 * waited get the next sync, or Python's path when the gate closed meanwhile. */
void dp_cflush_done(struct dp *dp, struct dp_image *im, int res) {
    struct dp_cflush *cf = &im->cflush;
    pthread_mutex_lock(&dp->lock);
    dp->active--;
    cf->running = 0;
    if (res < 0 && !cf->err)
        cf->err = res;  /* sticky (DESIGN.md section 2): every later flush fails */
    if (res >= 0) {
        dp_cflush_settle(im, cf->durable, cf->syncing);
        cf->durable = cf->syncing;  /* the entries written before it are durable now */
        cf->covered = cf->mark;     /* ... and the fast writes completed before it */
    }
    struct dp_slot *done = cf->cur, *wait = cf->next, *failed = NULL, *forward = NULL;
    int rdone = res < 0 ? res : cf->err, rfailed = cf->err;  /* Python's failure since: fail too */
    cf->cur = cf->next = NULL;
    if (wait && cf->err)
        failed = wait;  /* sticky: those waiting fail too */
    else if (wait && dp_cflush_may(im) && dp_cflush_start(dp, im, wait) == 0)
        cf->cur = wait;
    else
        forward = wait;  /* the gate closed meanwhile: Python's path, as any FSYNC it gets */
    pthread_mutex_unlock(&dp->lock);
    dp_cflush_answer_all(dp, done, rdone);
    dp_cflush_answer_all(dp, failed, rfailed);
    for (struct dp_slot *s = forward, *next; s; s = next) {
        next = s->next;
        __atomic_store_n(&s->active, 0, __ATOMIC_RELEASE);
        dp->completed = 1;
        if (s->write)
            dp_park(dp, s);  /* Python's sync makes it durable, as before */
        else
            dp_pyq_serve(dp, s);
    }
}

/* Under dp->lock, after a good sync: the clusters whose entries it made durable are plainly
 * writable now, so a write-through overwrite there is one O_DSYNC write (dp_take_fast), as on
 * any durable mapping. A table published since may have restored the flag (dp_alloc_restore). */
static void dp_cflush_settle(struct dp_image *im, uint64_t from, uint64_t to) {
    const struct dp_alloc *a = &im->alloc;
    const struct dp_cflush *cf = &im->cflush;
    from = from > cf->log_base ? from - cf->log_base : 0;
    to = to > cf->log_base ? to - cf->log_base : 0;
    for (uint64_t i = from; i < to && i < a->log_count; i++) {
        uint64_t want = a->log[i].host | DP_MAP_WRITABLE | DP_MAP_UNSYNCED;
        if (dp_entry(im, a->log[i].guest) == want)
            dp_set_entry(im, a->log[i].guest, want & ~(uint64_t)DP_MAP_UNSYNCED);
    }
}

/* The loop thread: a write-through WRITE onto a mapping that is not durable (C allocated it)
 * completed its data write through the twin without O_DSYNC. 1: C makes it durable itself, its
 * L2 entry and its data in C's next fdatasync (the same conditions as a guest flush: the gate
 * open, nothing of Python's queued), and answers it then; 0: it parks for Python's sync. */
int dp_cflush_write(struct dp *dp, struct dp_slot *s) {
    struct dp_image *im = s->img;
    struct dp_cflush *cf = &im->cflush;
    int taken = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_handle *h = dp_map_get(&dp->handles, ((const struct fuse_write_in *)((struct fuse_in_header *)s->hdr + 1))->fh);
    s->cflush_direct = h && h->align > 1;  /* s->fd: the twin without O_DSYNC it was written through */
    if (!h || cf->err) {
        taken = 0;
    } else if (cf->running) {
        s->next = cf->next;
        cf->next = s;
        taken = 1;
    } else if (dp_cflush_may(im) && dp_cflush_start(dp, im, s) == 0) {
        s->next = cf->cur;
        cf->cur = s;
        taken = 1;
    }
    if (taken) {  /* active again (its dispatch number kept): drains wait until it is answered */
        __atomic_store_n(&s->active, 1, __ATOMIC_RELEASE);
        dp_count(&im->c[DP_C_CFLUSH_WRITES], 1);
    }
    pthread_mutex_unlock(&dp->lock);
    return taken;
}

/* Python dropped the oldest `n` log records (adopted): absolute numbers move on. */
void dp_cflush_dropped(struct dp_image *im, uint32_t n) {
    im->cflush.log_base += n;
}

/* The image is withdrawn (under dp->lock): C serves none of its flushes any more. */
void dp_cflush_free(struct dp_image *im) {
    struct dp_cflush *cf = &im->cflush;
    free(cf->l2off);
    cf->l2off = NULL;
    free(cf->page);  /* a sync still running restarts nothing without it (dp_cflush_may) */
    cf->page = NULL;
    cf->nl2 = 0;
    cf->open = 0;
}

/* ------------------------------------------------------------ Python's side */

static struct dp_image *dp_cflush_image(struct dp *dp, uint64_t ino) {
    struct dp_image *im = dp_map_get(&dp->images, ino);
    return im && !im->identity ? im : NULL;
}

int dp_cflush_setup(struct dp *dp, uint64_t ino, unsigned table_bits, uint64_t ntables) {
    int rc = 0;
    uint64_t *l2off = calloc(ntables ? ntables : 1, sizeof *l2off);
    char *page = NULL;
    if (posix_memalign((void **)&page, 4096, 4096))
        page = NULL;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_cflush_image(dp, ino);
    struct dp_cflush *cf = im ? &im->cflush : NULL;
    if (!im || !l2off || !page || table_bits > 40) {
        rc = !im ? -ENOENT : !l2off || !page ? -ENOMEM : -EINVAL;
    } else {
        free(cf->l2off);
        cf->l2off = l2off, l2off = NULL;
        if (!cf->page)
            cf->page = page, page = NULL;
        cf->nl2 = ntables;
        cf->table_bits = table_bits;
        cf->open = 0;
    }
    pthread_mutex_unlock(&dp->lock);
    free(l2off);
    free(page);
    return rc;
}

int dp_cflush_gate(struct dp *dp, uint64_t ino, int open, uint32_t min_spare) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_cflush_image(dp, ino);
    if (im) {
        im->cflush.open = open && im->cflush.l2off != NULL;
        im->cflush.min_spare = min_spare;
    }
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

int dp_cflush_table(struct dp *dp, uint64_t ino, uint64_t index, uint64_t offset) {
    int rc = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_cflush_image(dp, ino);
    if (!im || !im->cflush.l2off)
        rc = -ENOENT;
    else if (index >= im->cflush.nl2)
        rc = -ERANGE;
    else
        im->cflush.l2off[index] = offset;
    pthread_mutex_unlock(&dp->lock);
    return rc;
}

int dp_cflush_status(struct dp *dp, uint64_t ino, uint64_t *out) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    const struct dp_cflush *cf = im ? &im->cflush : NULL;
    out[0] = cf && cf->durable > cf->log_base ? cf->durable - cf->log_base : 0;
    out[1] = cf ? (uint64_t)(int64_t)cf->err : 0;
    out[2] = cf ? cf->covered : 0;
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

int dp_cflush_fail(struct dp *dp, uint64_t ino, int err) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    if (im && !im->cflush.err)
        im->cflush.err = err < 0 ? err : -EIO;
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

int dp_cflush_testhook(struct dp *dp, uint64_t ino, int skip_sync) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    if (im)
        im->cflush.skip_sync = skip_sync;
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

int dp_handle_cflush(struct dp *dp, uint64_t fh, int on) {
    pthread_mutex_lock(&dp->lock);
    struct dp_handle *h = dp_map_get(&dp->handles, fh);
    if (h)
        h->cflush = on;
    pthread_mutex_unlock(&dp->lock);
    return h ? 0 : -ENOENT;
}
