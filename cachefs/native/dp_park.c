/* Write-through writes onto mappings that are not durable yet (issue 14; docs/design.md
 * "Allocating in C").
 *
 * A write through an O_DSYNC descriptor (writethrough, directsync) is acknowledged as durable,
 * metadata included (seed 002). When C allocated its cluster, or the cluster's mapping carries
 * DP_MAP_UNSYNCED (C allocated it and Python has not made the L2 entry durable), the data alone
 * is not enough: the write goes through the handle's twin without O_DSYNC, and once it completes
 * its slot is *parked* instead of answered. Python wakes (DP_ST_SYNC), takes a ticket
 * (dp_sync_ticket: the image's last parked number), adopts the allocation log and runs one
 * metadata-queue flush, whose one fdatasync covers the data and the new L2 entries of every
 * write parked before the ticket (group commit, as QEMU emulates writethrough: data, metadata,
 * one flush). dp_sync_release then hands those slots back with the flush's result, and the loop
 * answers them. So a write-through allocating write costs one device sync, shared with every
 * write parked meanwhile.
 *
 * A parked slot's backend I/O is done: it is not `active`, so a drain does not wait for it (the
 * flush that releases it may itself wait for a drain). The parked and released lists are under
 * dp->lock; answering is the loop thread's.
 */
#include "dp_internal.h"

/* The loop thread: the slot's write completed; it waits for the image's next sync. */
void dp_park(struct dp *dp, struct dp_slot *s) {
    pthread_mutex_lock(&dp->lock);
    s->park_seq = ++s->img->alloc.park_seq;
    s->next = dp->parked;
    dp->parked = s;
    dp->nparked++;
    pthread_mutex_unlock(&dp->lock);
    dp_post(dp, DP_ST_SYNC);
}

/* The loop thread: answer what Python released (after its sync), in any order. */
void dp_answer_released(struct dp *dp) {
    if (!__atomic_load_n(&dp->released, __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&dp->lock);
    struct dp_slot *s = dp->released;
    dp->released = NULL;
    pthread_mutex_unlock(&dp->lock);
    for (struct dp_slot *next; s; s = next) {
        next = s->next;
        dp_answer(dp, s);
        pthread_mutex_lock(&dp->lock);
        dp->nparked--;
        pthread_mutex_unlock(&dp->lock);
    }
}

/* The loop thread, quitting: nobody will sync any more; what is still parked fails. */
void dp_fail_parked(struct dp *dp) {
    pthread_mutex_lock(&dp->lock);
    for (struct dp_slot *s = dp->parked, *next; s; s = next) {
        next = s->next;
        s->err = -EIO;
        s->next = dp->released;
        dp->released = s;
    }
    dp->parked = NULL;
    pthread_mutex_unlock(&dp->lock);
    dp_answer_released(dp);
}

int dp_parked(struct dp *dp) {
    pthread_mutex_lock(&dp->lock);
    int n = dp->nparked;
    pthread_mutex_unlock(&dp->lock);
    return n;
}

/* ------------------------------------------------------------ Python's side */

/* 1 when DP_ST_SYNC was posted since the last call (cleared). */
int dp_sync_woken(struct dp *dp) {
    return (__atomic_fetch_and(&dp->state, ~(unsigned)DP_ST_SYNC, __ATOMIC_ACQ_REL) & DP_ST_SYNC) != 0;
}

/* The image's last parked number if some wait (a sync started now covers them), else 0. */
uint64_t dp_sync_ticket(struct dp *dp, uint64_t ino) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    uint64_t t = im && im->alloc.park_seq > im->alloc.released ? im->alloc.park_seq : 0;
    pthread_mutex_unlock(&dp->lock);
    return t;
}

/* A sync that started after `ticket` was taken ended with `err` (0 or -errno): the image's writes
 * parked up to it are answered with it. */
int dp_sync_release(struct dp *dp, uint64_t ino, uint64_t ticket, int err) {
    uint64_t one = 1;
    int n = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    struct dp_slot **link = &dp->parked;
    while (im && *link) {
        struct dp_slot *s = *link;
        if (s->img == im && s->park_seq <= ticket) {
            *link = s->next;
            s->err = err;
            s->next = dp->released;
            dp->released = s;
            n++;
        } else {
            link = &s->next;
        }
    }
    if (im && ticket > im->alloc.released)
        im->alloc.released = ticket;
    pthread_mutex_unlock(&dp->lock);
    if (n)
        (void)!write(dp->ctl_fd, &one, sizeof one);
    return im ? n : -ENOENT;
}
