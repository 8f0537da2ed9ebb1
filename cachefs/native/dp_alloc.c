/* Allocating writes in the data plane (issue 14; docs/design.md "Allocating in C").
 *
 * Python lends an image host clusters taken from its reservation (cachefs/dataplane/lending.py). Each is
 * fresh: inside the file as a hole that was never written, so it reads as zeros after a crash,
 * and counted by a refcount that an earlier flush made durable (DESIGN.md section 3, "Reserve
 * ahead"). A WRITE that lands in a cluster published DP_MAP_ZERO | DP_MAP_ALLOC (unallocated, or
 * a zero cluster without a host cluster) takes the next lent cluster: C maps it writable at once,
 * so reads and the next writes see it, writes the data there, and logs (guest cluster, host
 * offset). Python adopts the log as L2 updates: before it plans anything that touches those
 * clusters (it claims the range first, so C allocates nothing there meanwhile), at every flush,
 * and when C wakes it (the log half full, or few lent clusters left).
 *
 * Why no ordering is needed (the reservation's crash argument): until a record is adopted and
 * its L2 table written, nothing on disk points at the cluster, whose refcount is durable: a leak
 * at worst. Once the entry is on disk it points at a counted cluster whose bytes are the guest's
 * or zeros, which is what the unallocated cluster read as. A partial first write needs no COW.
 *
 * A write-through handle (writethrough, directsync) allocates too, if Python gave it the twin
 * descriptor without O_DSYNC: its write is acknowledged as durable, so it waits for Python's sync
 * of the new mapping (dp_park.c). Such entries carry DP_MAP_UNSYNCED until Python republishes them.
 *
 * A write to a shared data cluster (DP_MAP_READONLY | DP_MAP_COW, issue 23) takes a lent cluster
 * the same way and copies on write into it (dp_cow.c); it is logged only once its write completed,
 * and Python's adoption then orders the data's sync before the L2 entry (Engine.adopt).
 *
 * Everything here runs under dp->lock: planning and committing in the loop thread, the
 * dp_alloc_* calls from Python.
 */
#include "dp_internal.h"

static int dp_alloc_claimed(const struct dp_alloc *a, uint64_t cl) {
    if (a->overflow)
        return 1;
    for (int i = 0; i < DP_NCLAIM; i++)
        if (a->claim[i].end && a->claim[i].first <= cl && cl < a->claim[i].end)
            return 1;
    return 0;
}

/* Planning: may guest cluster `cl` be allocated by this request? 1 with `*host` the lent cluster
 * it would take (the plan's nth allocation takes the nth lent cluster); nothing is taken yet. */
int dp_alloc_may(const struct dp_image *im, const struct dp_handle *h, uint64_t cl, struct dp_slot *s,
                 uint64_t *host) {
    const struct dp_alloc *a = &im->alloc;
    if (!a->on || (h->sync && h->batch_fd < 0) || s->nalloc == DP_MAXALLOC || dp_alloc_claimed(a, cl))
        return 0;
    if ((uint32_t)s->nalloc >= a->spare_count || a->log_count + a->ncow + s->nalloc >= DP_ALOG)
        return 0;  /* copies on write in flight (dp_cow.c) log later: their room is kept */  /* forwarded: Python allocates it, then refills (dataplane/lending.py) */
    *host = a->spare[(a->spare_head + s->nalloc) % DP_SPARE];
    s->alloc_cl[s->nalloc++] = cl;
    return 1;
}

/* The request was planned and will be served: take its lent clusters, map and log them.
 * 1 when Python should be woken (few lent clusters left, or the log half full). An allocation
 * refused for want of either wakes nobody: the write goes to Python, which allocates it and
 * then refills (dataplane/lending.py), in that order, so it takes what a refill would have reserved. */
int dp_alloc_commit(struct dp_image *im, struct dp_slot *s) {
    struct dp_alloc *a = &im->alloc;
    for (int i = 0; i < s->nalloc; i++) {
        uint64_t host = a->spare[a->spare_head];
        a->spare_head = (a->spare_head + 1) % DP_SPARE;
        a->spare_count--;
        s->alloc_host[i] = host;
        if (s->cow_mask & (1u << i)) {  /* a copy on write: logged once written (dp_cow.c) */
            dp_cow_begin(im, s->alloc_cl[i], host);
            continue;
        }
        /* The chunk exists: the entry was published as allocatable. */
        dp_set_entry(im, s->alloc_cl[i], host | DP_MAP_WRITABLE | DP_MAP_UNSYNCED);
        a->log[a->log_count++] = (struct dp_logrec){ s->alloc_cl[i], host };
    }
    dp_count(&im->c[DP_C_ALLOCATIONS], (uint64_t)(s->nalloc - __builtin_popcount(s->cow_mask)));
    return dp_alloc_wake(a);
}

/* 1 when Python should be woken now (few lent clusters left, or the log half full), once until it
 * lends or adopts. */
int dp_alloc_wake(struct dp_alloc *a) {
    if (a->wake_sent || (a->spare_count > a->low_water && a->log_count < DP_ALOG / 2))
        return 0;
    a->wake_sent = 1;
    return 1;
}

/* After Python published entries [first, first+count): the clusters C allocated there and
 * Python has not adopted keep C's mapping (writable, or read-only while allocation is off). */
void dp_alloc_restore(struct dp_image *im, uint64_t first, uint64_t count) {
    const struct dp_alloc *a = &im->alloc;
    for (uint32_t i = 0; i < a->log_count; i++)
        if (a->log[i].guest >= first && a->log[i].guest - first < count)
            dp_set_entry(im, a->log[i].guest,
                         a->log[i].host | (a->on ? DP_MAP_WRITABLE | DP_MAP_UNSYNCED : DP_MAP_READONLY));
    dp_cow_restore(im, first, count);
}

void dp_alloc_free(struct dp_image *im) {
    free(im->alloc.spare);
    free(im->alloc.log);
    free(im->alloc.cow);
    memset(&im->alloc, 0, sizeof im->alloc);
}

/* ------------------------------------------------------------ Python's side */

static struct dp_image *dp_alloc_image(struct dp *dp, uint64_t ino) {
    struct dp_image *im = dp_map_get(&dp->images, ino);
    return im && !im->identity ? im : NULL;
}

/* Allow allocation (1) or stop it (0). Stopping makes the clusters allocated and not yet
 * adopted read-only: a write-through handle is about to be published, and their mappings are
 * not durable (dataplane/mapping.py, "Durable before writable"). */
int dp_alloc_set(struct dp *dp, uint64_t ino, int on, uint32_t low_water) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_alloc_image(dp, ino);
    if (im) {
        struct dp_alloc *a = &im->alloc;
        a->on = on;
        a->low_water = low_water;
        for (uint32_t i = 0; !on && i < a->log_count; i++)
            if (DP_MAP_STATE(dp_entry(im, a->log[i].guest)) == DP_MAP_WRITABLE)
                dp_set_entry(im, a->log[i].guest, a->log[i].host | DP_MAP_READONLY);
    }
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

/* Lend host clusters (offsets). Returns how many were taken (the ring's room bounds it). */
int dp_alloc_give(struct dp *dp, uint64_t ino, const uint64_t *hosts, uint32_t n) {
    int rc = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_alloc_image(dp, ino);
    struct dp_alloc *a = im ? &im->alloc : NULL;
    if (!im) {
        rc = -ENOENT;
    } else if (!a->spare && (!(a->spare = calloc(DP_SPARE, sizeof *a->spare)) ||
                             !(a->log = calloc(DP_ALOG, sizeof *a->log)) ||
                             !(a->cow = calloc(DP_NCOW, sizeof *a->cow)))) {
        dp_alloc_free(im);
        rc = -ENOMEM;
    } else {
        for (; (uint32_t)rc < n && a->spare_count < DP_SPARE; rc++)
            a->spare[(a->spare_head + a->spare_count++) % DP_SPARE] = hosts[rc];
        a->wake_sent = 0;
    }
    pthread_mutex_unlock(&dp->lock);
    return rc;
}

/* Take every lent cluster back (a close, a switch to compress-on-write): up to `max`. */
int dp_alloc_take_spares(struct dp *dp, uint64_t ino, uint64_t *out, uint32_t max) {
    int n = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_alloc_image(dp, ino);
    struct dp_alloc *a = im ? &im->alloc : NULL;
    for (; a && a->spare && (uint32_t)n < max && a->spare_count; n++) {
        out[n] = a->spare[a->spare_head];
        a->spare_head = (a->spare_head + 1) % DP_SPARE;
        a->spare_count--;
    }
    pthread_mutex_unlock(&dp->lock);
    return im ? n : -ENOENT;
}

/* Copy up to `max` log records, oldest first, as (guest cluster, host offset) pairs in `out`.
 * They stay logged (so a table published meanwhile keeps them C's: dp_alloc_restore) until
 * Python has adopted them and drops them (dp_alloc_drop_log). */
int dp_alloc_peek_log(struct dp *dp, uint64_t ino, uint64_t *out, uint32_t max) {
    uint32_t n = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_alloc_image(dp, ino);
    struct dp_alloc *a = im ? &im->alloc : NULL;
    if (a && a->log) {
        n = a->log_count < max ? a->log_count : max;
        for (uint32_t i = 0; i < n; i++) {
            out[2 * i] = a->log[i].guest;
            out[2 * i + 1] = a->log[i].host;
        }
    }
    pthread_mutex_unlock(&dp->lock);
    return im ? (int)n : -ENOENT;
}

/* The oldest `n` records are adopted: forget them (records logged since stay). */
int dp_alloc_drop_log(struct dp *dp, uint64_t ino, uint32_t n) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_alloc_image(dp, ino);
    struct dp_alloc *a = im ? &im->alloc : NULL;
    if (a && a->log) {
        n = n < a->log_count ? n : a->log_count;
        memmove(a->log, a->log + n, (a->log_count - n) * sizeof *a->log);
        a->log_count -= n;
        dp_cflush_dropped(im, n);
        if (a->log_count < DP_ALOG / 2 && a->spare_count > a->low_water)
            a->wake_sent = 0;
    }
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

/* Python is about to change guest clusters [first, first+count): C allocates none of them until
 * dp_alloc_unclaim. Returns the claim's id (DP_NCLAIM: no room, so nothing is allocated at all). */
int dp_alloc_claim(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count) {
    int id = -ENOENT;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_alloc_image(dp, ino);
    if (im) {
        struct dp_alloc *a = &im->alloc;
        for (id = 0; id < DP_NCLAIM && a->claim[id].end; id++)
            ;
        if (id < DP_NCLAIM)
            a->claim[id] = (struct dp_claim){ first, first + (count ? count : 1) };
        else
            a->overflow++;
    }
    pthread_mutex_unlock(&dp->lock);
    return id;
}

int dp_alloc_unclaim(struct dp *dp, uint64_t ino, int id) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_alloc_image(dp, ino);
    if (im && id == DP_NCLAIM && im->alloc.overflow)
        im->alloc.overflow--;
    else if (im && id >= 0 && id < DP_NCLAIM)
        im->alloc.claim[id].end = 0;
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

/* Lent clusters left and log records waiting, in out[0] and out[1]. */
int dp_alloc_status(struct dp *dp, uint64_t ino, uint64_t *out) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_alloc_image(dp, ino);
    out[0] = im ? im->alloc.spare_count : 0;
    out[1] = im ? im->alloc.log_count : 0;
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

/* 1 when DP_ST_ALLOC was posted since the last call (cleared). */
int dp_alloc_woken(struct dp *dp) {
    return (__atomic_fetch_and(&dp->state, ~(unsigned)DP_ST_ALLOC, __ATOMIC_ACQ_REL) & DP_ST_ALLOC) != 0;
}
