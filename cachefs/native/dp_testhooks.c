/* Test hooks: the data plane's decisions, observed without a mount and without I/O (issue 19,
 * "C checked against its model"; tests/test_dataplane_differential.py drives them side by side
 * with tests/simplane.py). cachefs itself never calls them.
 *
 * A planned request goes through the loop's own dp_take_fast (dp_loop.c): the same plan
 * (dp_plan), the same dp_alloc_may and dp_alloc_commit, the same wake and the same choice of
 * descriptor as a request read from /dev/fuse; only the backend I/O and the reply are left out.
 * The other hooks only read.
 */
#include "dp_internal.h"
#include "dp_testhooks.h"

/* Plan and dispatch a READ or WRITE of handle `fh` as the loop does when one arrives, then
 * report what it decided. `data` holds `size` bytes: the payload (a READ gets its zero
 * clusters zeroed there). A fast request is not active afterwards (its I/O never runs). */
int dp_test_plan(struct dp *dp, uint64_t fh, int write, uint64_t off, uint32_t size, char *data,
                 struct dp_test_plan *out) {
    struct dp_slot s = { .data = data };
    memset(out, 0, sizeof *out);
    out->fast = dp_take_fast(dp, &s, fh, write, off, size);
    if (!out->fast)
        return 0;
    __atomic_store_n(&s.active, 0, __ATOMIC_RELEASE);
    out->cow_mask = s.cow_mask;
    out->cow_piece = s.cow_piece;
    if (s.cow_mask)
        dp_cow_done(dp, &s);  /* its copies on write complete at once: logged, mapped to the new cluster */
    out->fd = s.fd;
    out->sync = s.sync;
    out->defer = s.defer;
    out->unsynced = s.unsynced;
    out->nalloc = s.nalloc;
    out->npieces = s.npieces;
    out->backing = s.backing;
    out->reply_len = s.reply_len;
    out->seq = s.seq;
    memcpy(out->alloc_cl, s.alloc_cl, sizeof s.alloc_cl);
    for (int i = 0; i < s.npieces; i++) {
        out->piece_host[i] = s.piece[i].host;
        out->piece_buf[i] = s.piece[i].buf;
        out->piece_len[i] = s.piece[i].len;
        out->piece_fd[i] = s.piece[i].fd;
    }
    return 1;
}

/* The published entries of guest clusters [first, first+count): host | DP_MAP_* (0: absent). */
int dp_test_entries(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count, uint64_t *out) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    for (uint64_t i = 0; im && !im->identity && i < count; i++)
        out[i] = dp_entry(im, first + i);
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

/* The allocation state, and the lent clusters in the order C takes them (up to DP_SPARE of
 * them into `spares`). Returns how many are lent. */
int dp_test_alloc_state(struct dp *dp, uint64_t ino, struct dp_test_alloc *out, uint64_t *spares) {
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    const struct dp_alloc *a = im && !im->identity ? &im->alloc : NULL;
    if (a) {
        *out = (struct dp_test_alloc){ a->on, a->wake_sent, a->low_water, a->overflow, a->spare_count,
                                       a->log_count };
        for (int i = 0; i < DP_NCLAIM; i++) {
            out->claim_first[i] = a->claim[i].first;
            out->claim_end[i] = a->claim[i].end;
        }
        for (uint32_t i = 0; i < a->spare_count; i++)
            spares[i] = a->spare[(a->spare_head + i) % DP_SPARE];
    }
    pthread_mutex_unlock(&dp->lock);
    return a ? (int)out->spare_count : -ENOENT;
}
