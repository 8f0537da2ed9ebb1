/* The test hooks' interface with Python (dp_testhooks.c; tests/difftest.py): cdef'd by build.py
 * like dp_abi.h, after it, in the build with liburing only (the stubs have no loop to observe).
 * The same cffi subset as dp_abi.h. */
#ifndef CACHEFS_DP_TESTHOOKS_H
#define CACHEFS_DP_TESTHOOKS_H

#include "dp_abi.h"

/* What the loop decided for one request (dp_test_plan). */
struct dp_test_plan {
    int fast;                  /* served here (1) or forwarded (0) */
    int fd, sync, defer;       /* the descriptor its I/O would use, O_DSYNC, answered after Python's sync */
    int unsynced;              /* the plan touched a mapping that is not durable */
    int nalloc, npieces;
    uint32_t reply_len;
    uint64_t seq;              /* its dispatch number (a drain ticket) */
    uint64_t alloc_cl[DP_MAXALLOC];  /* guest clusters it allocated, in plan order */
    uint64_t piece_host[DP_MAXPIECE];
    uint32_t piece_buf[DP_MAXPIECE], piece_len[DP_MAXPIECE];
    int piece_fd[DP_MAXPIECE];       /* -1: the descriptor above; else a backing image's (issue 22) */
    int backing;                     /* a READ that reads from the backing chain */
    uint32_t cow_mask;               /* which of alloc_cl copy on write (dp_cow.c); they complete at once */
    int cow_piece;                   /* the piece that writes a partial copy's whole new cluster, or -1 */
};

/* An image's allocation state (dp_alloc.c), copied under the lock. */
struct dp_test_alloc {
    int on, wake_sent;
    uint32_t low_water, overflow, spare_count, log_count;
    uint64_t claim_first[DP_NCLAIM], claim_end[DP_NCLAIM];  /* claim_end 0: the id is free */
};

int dp_test_plan(struct dp *dp, uint64_t fh, int write, uint64_t off, uint32_t size, char *data,
                 struct dp_test_plan *out);
int dp_test_entries(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count, uint64_t *out);
int dp_test_alloc_state(struct dp *dp, uint64_t ino, struct dp_test_alloc *out, uint64_t *spares);
/* dp_uring.c: the ring's entries lend payload buffers of `bytes` (a refused registration). */
int dp_test_uring_payload(struct dp *dp, uint32_t bytes);

#endif
