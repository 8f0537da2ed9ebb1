/* The data plane's ABI with Python (cachefs/dataplane.py): shared by dp.h and dp_stub.c. */
#ifndef CACHEFS_DP_ABI_H
#define CACHEFS_DP_ABI_H

#include <stdint.h>

#define DP_MAXPIECE 17         /* backend I/Os per fast request: a 1 MiB request over 64 KiB clusters,
                                  * unaligned, touches 17 (a mapping split in host runs) */

/* What a published guest cluster is (the mapping contract, DATAPLANE.md). An entry is
 * host_offset | state: host offsets are cluster aligned, so the low bits are free. */
enum { DP_MAP_ABSENT = 0, DP_MAP_WRITABLE = 1, DP_MAP_READONLY = 2, DP_MAP_ZERO = 3 };
/* A flag on a DP_MAP_ZERO entry with no host cluster (unallocated, or the zero flag alone): a
 * WRITE there may take a lent cluster (dp_alloc.c, issue 14). */
#define DP_MAP_ALLOC 4
/* A flag on a DP_MAP_WRITABLE entry whose mapping may not be durable yet (C allocated it): a
 * write-through write there is answered only after Python's next sync (dp_park.c). */
#define DP_MAP_UNSYNCED 8

/* Per-image counters: the order of dp_image_counters()'s output. */
enum { DP_C_FAST_READS, DP_C_FAST_WRITES, DP_C_BYTES_READ, DP_C_BYTES_WRITTEN, DP_C_FORWARDED,
       DP_C_ERRORS, DP_C_UNSYNCED_WRITES, DP_C_ALLOCATIONS, DP_C_NIMAGE };
/* Per-handle counters, counted at dispatch: Python charges them to the handle's cache mode. */
enum { DP_H_READS, DP_H_WRITES, DP_H_BYTES_READ, DP_H_BYTES_WRITTEN, DP_H_N };
/* Whole-connection counters: dp_counters()'s output. */
enum { DP_G_REQUESTS, DP_G_FAST, DP_G_FORWARDED, DP_G_REPLIES, DP_G_NOTIFICATIONS,
       DP_G_FORWARD_ERRORS, DP_G_REPLY_ERRORS, DP_G_PEAK_ACTIVE, DP_G_SEND_QUEUED, DP_G_N };

/* What Python asks (dp_request) and what the loop tells (dp_state). */
enum { DP_STOP_READING = 1, DP_QUIT = 2 };
enum { DP_ST_INIT_DONE = 2, DP_ST_DEAD = 4, DP_ST_STOPPED = 8, DP_ST_EXITED = 16,
       DP_ST_ALLOC = 32, /* an image's lent clusters run low or its allocation log fills: dp_alloc_woken */
       DP_ST_SYNC = 64 /* write-through writes wait for a sync: dp_sync_woken, dp_sync_ticket */ };

/* Allocation in C (dp_alloc.c): lent clusters per image, log records, claims. */
#define DP_SPARE 8192          /* lent host clusters an image holds at most */
#define DP_ALOG 4096           /* allocations logged and not yet adopted by Python */
#define DP_NCLAIM 128          /* guest ranges Python is changing at once (more: no allocation at all) */
#define DP_MAXALLOC 32         /* clusters one request may allocate */

/* Requests Python serves (FALLOCATE, LSEEK; dp_pyq.c): pyfuse3 has
 * no handler for them and libfuse's ENOSYS would turn them off for the connection's life. C
 * copies each into a bounded table; Python takes them (dp_pyq_take) and answers from its own
 * thread (dp_pyq_reply). `mode`: FALLOCATE's mode, or LSEEK's whence. */
#define DP_PYQ 64
struct dp_pyreq {
    uint64_t unique, nodeid, fh, offset, length;
    uint32_t opcode, mode, uid, gid, pid, padding;
};

#endif
