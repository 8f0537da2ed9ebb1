/* Copy on write of shared data clusters in the data plane (issue 23; docs/design.md "Internal
 * snapshots (issue 23)", "Allocating in C").
 *
 * After a snapshot every data cluster of the live image is shared (refcount > 1, L2 COPIED clear)
 * and Python publishes it DP_MAP_READONLY | DP_MAP_COW (dataplane/mapping.py). Reads read it in
 * place. A WRITE there takes a lent cluster (dp_alloc.c, as an allocating write does) and copies on
 * write into it, all here:
 *
 *   whole cluster   the guest's bytes are the new cluster: one write to the lent cluster;
 *   partial         the old cluster is read into the slot's own buffer, past the payload (page
 *                   aligned, so O_DIRECT holds), the guest's bytes merged in, and the whole new
 *                   cluster written (dp_loop.c chains the two: DP_UD_COW_READ).
 *
 * While it is in flight the guest cluster's entry is the old one with DP_MAP_BUSY instead of
 * DP_MAP_COW: reads still see the old bytes (the write is not answered yet), writes are forwarded,
 * and Python, whose claim of a range stops new copies there, waits for the ones in flight
 * (dp_cow_inflight, then a drain) before it adopts the log and plans. Once the write completed,
 * before the slot stops being active (so a drain that returns sees it), the pair (guest cluster,
 * new host) is logged as any allocation of C's, and the entry points at the new cluster, writable
 * and DP_MAP_UNSYNCED (dp_park.c answers a write-through write after Python's sync). A failed read
 * or write puts the old entry back; the lent cluster, written in part, is never lent again (a
 * leak, which qemu-img check allows).
 *
 * The crash argument is Python's (Engine.adopt): unlike a fresh allocation, the new entry must
 * not reach the disk before the copied data, or a crash would turn the old bytes into zeros. C
 * logs only completed writes; the adoption makes the queue's data item dirty and the new L2
 * entry depend on it, so a sync after C's write lands before the L2 write. The old cluster loses
 * one reference once that L2 table is durable (invariant 2), after a drain of every fast request
 * dispatched before the adoption (MappingPublisher.fence): none still reads it then.
 *
 * Everything that touches an image's state runs under dp->lock; the I/O steps in the loop thread.
 */
#include "dp_internal.h"

/* Planning, under the lock: may guest cluster `cl` (entry `e`, DP_MAP_CAN_COW) copy on write for
 * this request, whose bytes [done, done+n) land at `in` in it (`len`: the request's length)? 1 with
 * `*host` the lent cluster it would take; a partial one adds its piece (the whole new cluster). */
int dp_cow_may(const struct dp_image *im, const struct dp_handle *h, uint64_t cl, uint64_t e, uint32_t in,
               uint32_t n, uint32_t done, uint32_t len, struct dp_slot *s, uint64_t *host) {
    const struct dp_alloc *a = &im->alloc;
    uint32_t csize = 1u << im->cluster_bits, cows = (uint32_t)__builtin_popcount(s->cow_mask);
    uint32_t at = ((len + 4095u) & ~4095u) + 4096;  /* a page apart: never merged with a payload piece */
    int part = n < csize;
    if (!a->cow || a->ncow + cows >= DP_NCOW)
        return 0;
    if (part && (s->cow_piece >= 0 || im->cluster_bits > 20 || (csize & (h->align - 1)) ||
                 at + (uint64_t)csize > DP_DATA || s->npieces == DP_MAXPIECE))
        return 0;
    int i = s->nalloc;
    if (!dp_alloc_may(im, h, cl, s, host))
        return 0;
    s->cow_mask |= 1u << i;
    if (part) {
        s->cow_piece = s->npieces;
        s->piece[s->npieces++] = (struct dp_piece){ *host, at, csize, -1 };
        s->cow_old = DP_MAP_HOST(e);
        s->cow_buf = at;
        s->cow_in = in;
        s->cow_src = done;
        s->cow_len = n;
    }
    return 1;
}

/* Dispatch, under the lock (dp_alloc_commit): the copy of `cl` into `host` is in flight. */
void dp_cow_begin(struct dp_image *im, uint64_t cl, uint64_t host) {
    struct dp_alloc *a = &im->alloc;
    uint64_t old = dp_entry(im, cl);
    a->cow[a->ncow++] = (struct dp_cowrec){ cl, old, host };
    dp_set_entry(im, cl, DP_MAP_HOST(old) | DP_MAP_READONLY | DP_MAP_BUSY);
}

/* After Python published entries [first, first+count) (dp_alloc_restore): a copy in flight there
 * keeps its busy entry, so no second copy of the cluster starts. */
void dp_cow_restore(struct dp_image *im, uint64_t first, uint64_t count) {
    const struct dp_alloc *a = &im->alloc;
    for (uint32_t i = 0; i < a->ncow; i++)
        if (a->cow[i].guest >= first && a->cow[i].guest - first < count)
            dp_set_entry(im, a->cow[i].guest, DP_MAP_HOST(a->cow[i].old) | DP_MAP_READONLY | DP_MAP_BUSY);
}

/* The loop thread, submitting the partial copy's piece: its old cluster is read first. */
void dp_cow_read(struct dp *dp, struct dp_slot *s) {
    struct io_uring_sqe *sqe = dp_sqe(dp);
    s->cow_write = s->cow_piece;
    s->cow_piece = -1;  /* the piece's next submission is its write */
    io_uring_prep_read(sqe, s->fd, s->data + s->cow_buf, 1u << s->img->cluster_bits, s->cow_old);
    io_uring_sqe_set_data64(sqe, DP_UD_IO(s - dp->slots, DP_UD_COW_READ));
    dp_count(&s->img->c[DP_C_COW_READS], 1);
}

/* The loop thread: the old cluster's read ended with `res`. The piece to write now (the whole new
 * cluster, the guest's bytes merged in), or -1 when the read failed (the request fails). */
int dp_cow_merge(struct dp_slot *s, int res) {
    uint32_t csize = 1u << s->img->cluster_bits;
    if (res < 0) {
        if (!s->err)
            s->err = res;
        return -1;
    }
    if ((uint32_t)res < csize)  /* the image file ends inside the old cluster: zeros, as Python pads */
        memset(s->data + s->cow_buf + res, 0, csize - (uint32_t)res);
    memcpy(s->data + s->cow_buf + s->cow_in, s->data + s->cow_src, s->cow_len);
    return s->cow_write;
}

/* The loop thread, once the request's I/O is over and before it stops being active: log each copy
 * that was written (Python adopts it) and map the new cluster, or put the old entry back. */
void dp_cow_done(struct dp *dp, struct dp_slot *s) {
    struct dp_image *im = s->img;
    struct dp_alloc *a = &im->alloc;
    pthread_mutex_lock(&dp->lock);
    for (int i = 0; a->cow && i < s->nalloc; i++) {
        if (!(s->cow_mask & (1u << i)))
            continue;
        uint64_t cl = s->alloc_cl[i], host = s->alloc_host[i];
        uint32_t k = 0;
        while (k < a->ncow && (a->cow[k].guest != cl || a->cow[k].host != host))
            k++;
        if (k == a->ncow)
            continue;  /* the image was withdrawn meanwhile (dp_alloc_free) */
        struct dp_cowrec r = a->cow[k];
        a->cow[k] = a->cow[--a->ncow];
        int busy = (dp_entry(im, cl) & DP_MAP_BUSY) != 0;  /* else its table left Python's cache */
        if (s->err) {
            if (busy)
                dp_set_entry(im, cl, r.old);
            continue;
        }
        if (a->log_count < DP_ALOG)  /* always: planning kept room (dp_alloc_may) */
            a->log[a->log_count++] = (struct dp_logrec){ cl, host, 1 };
        if (busy)  /* as dp_alloc_restore maps a logged cluster */
            dp_set_entry(im, cl, host | (a->on ? DP_MAP_WRITABLE | DP_MAP_UNSYNCED : DP_MAP_READONLY));
        dp_count(&im->c[DP_C_COWS], 1);
    }
    int wake = a->cow && dp_alloc_wake(a);
    pthread_mutex_unlock(&dp->lock);
    if (wake)
        dp_post(dp, DP_ST_ALLOC);
}

/* ------------------------------------------------------------ Python's side */

int dp_cow_inflight(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count) {
    int n = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    const struct dp_alloc *a = im && !im->identity ? &im->alloc : NULL;
    for (uint32_t i = 0; a && i < a->ncow; i++)
        n += a->cow[i].guest >= first && a->cow[i].guest - first < count;
    pthread_mutex_unlock(&dp->lock);
    return im ? n : -ENOENT;
}
