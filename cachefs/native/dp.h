/* The data plane's shared definitions (docs/design.md "Two planes"; ../shared/DATAPLANE.md).
 *
 * One C thread owns /dev/fuse. READ and WRITE requests whose handle is published and whose
 * whole range maps go to io_uring on the handle's descriptor; everything else is forwarded
 * unchanged to libfuse (pyfuse3) over a SOCK_SEQPACKET socketpair, whose replies and
 * notifications go back to /dev/fuse.
 *
 * Locking: `lock` protects the two tables (images by inode, handles by fh), every image's
 * mapping, and the dispatch of a fast request (lookup + `seq` + marking its slot active), so
 * that Python's unpublish is effective for the next request the moment it returns, and a drain
 * ticket (`seq` after the unpublish) names every request that could still use the old mapping.
 * Counters are written by the loop thread only, read by Python with relaxed atomic loads.
 */
#ifndef CACHEFS_DP_H
#define CACHEFS_DP_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <linux/fuse.h>
#include <liburing.h>

#ifndef FOPEN_PARALLEL_DIRECT_WRITES
#define FOPEN_PARALLEL_DIRECT_WRITES (1 << 6)  /* fuse.h 7.36; Debian 12's header has it */
#endif

#define DP_NSLOT 64            /* requests held at once: max_background (64) and then some */
#define DP_HDR 80              /* fuse_in_header + fuse_read_in / fuse_write_in: the data's offset */
#define DP_DATA ((1u << 20) + 4096)  /* max_write (1 MiB, libfuse's) plus room for any other request */
#define DP_RBUF ((1u << 20) + 65536) /* one libfuse reply: a 1 MiB READ reply and its header */
#define DP_TRACK 256           /* forwarded INIT/OPEN/CREATE whose reply may be patched */

#include "dp_abi.h"

#define DP_MAP_STATE(e) ((unsigned)((e) & 3))
#define DP_MAP_HOST(e) ((e) & ~(uint64_t)511)
#define DP_MAP_CAN_ALLOC(e) (((e) & (DP_MAP_ALLOC | 3)) == (DP_MAP_ALLOC | DP_MAP_ZERO) && !DP_MAP_HOST(e))
#define DP_CHUNK_BITS 12       /* clusters per chunk of the mapping table: 4096 (32 KiB) */

struct dp_u64map {             /* open addressing, linear probing, key 0 = empty */
    uint64_t *keys;
    void **vals;
    uint32_t cap, count;
};

struct dp_logrec { uint64_t guest, host; };  /* guest cluster, host offset */

struct dp_claim { uint64_t first, end; };     /* end == 0: unused */

/* An image's allocation state (dp_alloc.c); arrays allocated when Python first lends. */
struct dp_alloc {
    uint64_t *spare;           /* ring of lent host offsets, taken in the order lent */
    uint32_t spare_head, spare_count;
    struct dp_logrec *log;
    uint32_t log_count;
    struct dp_claim claim[DP_NCLAIM];
    uint32_t overflow;         /* claims that found no room: no allocation at all while > 0 */
    uint32_t low_water;        /* wake Python when the lent clusters fall to this */
    int on;                    /* Python allows it: no write-through handle, not compress-on-write */
    int wake_sent;             /* DP_ST_ALLOC posted for this image and not yet answered */
    uint64_t park_seq;         /* write-through writes parked so far (dp_park.c), numbered */
    uint64_t released;         /* ... and answered up to this number */
};

struct dp_image {
    uint64_t ino;
    uint64_t vsize;            /* the guest's size: READs past it are short, WRITEs past it forwarded */
    unsigned cluster_bits;
    int identity;              /* raw: guest offset == host offset, all writable */
    int paused;                /* a live switch or resize is under way: forward everything */
    uint64_t **chunks;         /* non-identity: chunk -> 4096 entries, NULL = absent */
    uint64_t nchunks;
    uint64_t c[DP_C_NIMAGE];
    struct dp_alloc alloc;
    struct dp_image *next_dead;
};

struct dp_handle {
    struct dp_image *img;
    int fd;                    /* the handle's mode descriptor, owned by Python */
    unsigned align;            /* O_DIRECT: offsets and sizes must be multiples; else 1 */
    int fast_write;            /* off while a cached and a direct handle share the inode */
    int sync;                  /* O_DSYNC: a completed write is durable, no fdatasync owed */
    int batch_fd;              /* write-through: the twin without O_DSYNC for writes a sync follows, or -1 */
    uint64_t c[DP_H_N];        /* under lock; kept when the handle is published again */
};

struct dp_piece { uint64_t host; uint32_t buf, len; };

struct dp_slot {
    uint64_t hdr[DP_HDR / 8];  /* the request's first 80 bytes (8-byte aligned for the structs) */
    char *data;                /* the rest: page aligned, so a WRITE payload suits O_DIRECT */
    uint32_t len;              /* bytes read from /dev/fuse */
    uint32_t reply_len;        /* READ: bytes to answer */
    uint64_t seq;              /* dispatch number, for drain tickets; valid while active */
    int active;                /* a fast request whose backend I/O has not completed */
    int nalloc;                /* clusters the plan allocates (dp_alloc_commit), in plan order */
    uint64_t alloc_cl[DP_MAXALLOC];
    int write, pieces_left, npieces, err, fd, sync;
    int unsynced;              /* the plan touched a mapping that is not durable (DP_MAP_UNSYNCED, or allocated) */
    int defer;                 /* write-through onto such a mapping: answer after Python's sync (dp_park.c) */
    uint64_t park_seq;
    struct dp_image *img;
    struct dp_piece piece[DP_MAXPIECE];
    struct dp_slot *next;      /* free list or send queue */
};

struct dp_track { uint64_t unique; uint32_t opcode; };

struct dp_note { size_t len; char data[]; };

struct dp {
    int fuse_fd, sock_fd, ctl_fd, evt_fd;
    unsigned max_background;
    uint32_t msg_limit;        /* the largest message the socketpair carries */
    struct io_uring ring;
    int ring_disabled;         /* created disabled: the loop thread enables it (single issuer) */
    pthread_t thread;
    int started;
    pthread_mutex_t lock;
    struct dp_u64map images, handles;
    struct dp_image *dead_images;
    uint64_t seq;              /* under lock */
    struct dp_slot slots[DP_NSLOT];
    struct dp_slot *free, *sendq, *sendq_tail;
    int active;                /* fast requests in flight (loop thread) */
    int completed;             /* one completed since the last look: wake a drain */
    int reading, dead, sock_eof;
    int fuse_polled, sock_polled, sock_out_polled, ctl_polled;
    int fuse_ready, sock_ready;  /* may have something to read: not seen EAGAIN since the last poll */
    char *rbuf;
    struct dp_track track[DP_TRACK];
    unsigned requests;         /* DP_STOP_READING | DP_QUIT, atomic */
    unsigned state;            /* DP_ST_*, atomic */
    int drain_waiters;         /* atomic: Python waits for completions */
    uint64_t g[DP_G_N];
    struct dp_pyq *pyq;        /* FALLOCATE and LSEEK, served by Python (dp_loop.c) */
    struct dp_slot *parked;    /* write-through writes done, waiting for Python's sync (under lock) */
    struct dp_slot *released;  /* ... whose sync ended: the loop answers them (under lock) */
    int nparked;               /* parked + released (under lock) */
};

/* dp_table.c */
int dp_map_init(struct dp_u64map *m);
void dp_map_free(struct dp_u64map *m);
void *dp_map_get(const struct dp_u64map *m, uint64_t key);
int dp_map_put(struct dp_u64map *m, uint64_t key, void *val);
void *dp_map_del(struct dp_u64map *m, uint64_t key);
int dp_plan(const struct dp_image *im, const struct dp_handle *h, int write, uint64_t off,
            uint32_t size, const char *data, struct dp_slot *s);
void dp_image_free_chunks(struct dp_image *im);
uint64_t dp_entry(const struct dp_image *im, uint64_t cluster);
int dp_set_entry(struct dp_image *im, uint64_t cluster, uint64_t e);
/* dp_alloc.c */
int dp_alloc_may(const struct dp_image *im, const struct dp_handle *h, uint64_t cluster, struct dp_slot *s,
                 uint64_t *host);
int dp_alloc_commit(struct dp_image *im, struct dp_slot *s);
void dp_alloc_restore(struct dp_image *im, uint64_t first, uint64_t count);
void dp_alloc_free(struct dp_image *im);
int dp_image_remove(struct dp *dp, uint64_t ino);
void dp_destroy(struct dp *dp);

static inline void dp_count(uint64_t *c, uint64_t n) { __atomic_fetch_add(c, n, __ATOMIC_RELAXED); }

#endif
