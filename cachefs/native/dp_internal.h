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
 *
 * Files (each its own translation unit, build.py DP_SOURCES; this header is what they share):
 *   dp_abi.h       Python's interface, and the cdef: constants, prototypes (the only exports)
 *   dp_names.c     the counters' names (the stub build has them too)
 *   dp_map.c       the u64 -> pointer table (images, handles) and an image's chunked mapping
 *   dp_plan.c      planning a READ or WRITE against the mapping
 *   dp_publish.c   Python publishing and withdrawing images, mappings and handles; the drain
 *   dp_counters.c  Python reading the counters
 *   dp_alloc.c     allocating writes with clusters Python lent
 *   dp_cow.c       copy on write of shared data clusters into lent clusters (issue 23)
 *   dp_loop.c      the thread: reading /dev/fuse, the fast path, the loop, create/start/destroy
 *   dp_forward.c   forwarding to libfuse and writing its replies back
 *   dp_park.c      write-through writes waiting for Python's sync
 *   dp_pyq.c       FALLOCATE, LSEEK and FSYNC served by Python
 *   dp_cflush.c    guest flushes (FSYNC) served in C: C's own L2 entries, one fdatasync
 *   dp_passthrough.c kernel passthrough: INIT's flag, backing ids, OPEN replies (issue 24)
 *   dp_uring.c     FUSE over io_uring: INIT's flag, ring entries, commits; what INIT negotiated (issue 24)
 *   dp_testhooks.c the loop's decisions for tests, without I/O
 * A function used by another file is declared here with DP_HIDDEN (not exported from the
 * module: only dp_abi.h's are). The hot helpers are static inline here, so they still inline
 * into the fast path as they did when all of this was one translation unit.
 */
#ifndef CACHEFS_DP_INTERNAL_H
#define CACHEFS_DP_INTERNAL_H

/* cffi's own translation unit gets these from Python.h; the data plane's files do not include it. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#ifndef _FILE_OFFSET_BITS
#define _FILE_OFFSET_BITS 64
#endif

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>
#include <linux/fuse.h>
#include <liburing.h>

#ifndef FOPEN_PARALLEL_DIRECT_WRITES
#define FOPEN_PARALLEL_DIRECT_WRITES (1 << 6)  /* fuse.h 7.36; Debian 12's header has it */
#endif

#define DP_NPOOL 64            /* slots read from /dev/fuse: max_background (64) and then some */
#define DP_NRING 256           /* FUSE-over-io_uring entries at most, each with a slot of its own (dp_uring.c) */
#define DP_NSLOT (DP_NPOOL + DP_NRING)  /* every slot: the pool's first, then the ring's */
#define DP_HDR 80              /* fuse_in_header + fuse_read_in / fuse_write_in: the data's offset */
#define DP_DATA ((1u << 20) + 4096)  /* max_write (1 MiB, libfuse's) plus room for any other request */
#define DP_RBUF ((1u << 20) + 65536) /* one libfuse reply: a 1 MiB READ reply and its header */
#define DP_TRACK 256           /* forwarded INIT/OPEN/CREATE whose reply may be patched */

#include "dp_abi.h"

#define DP_MAP_STATE(e) ((unsigned)((e) & 3))
#define DP_MAP_HOST(e) ((e) & ~(uint64_t)511)
#define DP_MAP_CAN_ALLOC(e) (((e) & (DP_MAP_ALLOC | 3)) == (DP_MAP_ALLOC | DP_MAP_ZERO) && !DP_MAP_HOST(e))
/* C's own flag, never Python's: a copy on write of this cluster is in flight (dp_cow.c). The entry
 * is the old host cluster, read-only: reads see the old bytes, writes are forwarded (Python waits
 * for the copy: dp_cow_inflight). */
#define DP_MAP_BUSY 64
#define DP_MAP_CAN_COW(e) (((e) & (DP_MAP_COW | DP_MAP_BUSY | 3)) == (DP_MAP_COW | DP_MAP_READONLY) && DP_MAP_HOST(e))
#define DP_CHUNK_BITS 12       /* clusters per chunk of the mapping table: 4096 (32 KiB) */

struct dp_u64map {             /* open addressing, linear probing, key 0 = empty */
    uint64_t *keys;
    void **vals;
    uint32_t cap, count;
};

/* guest cluster, host offset; cow: a copy on write (dp_cow.c), whose entry must wait for its data's
 * sync, so a flush in C leaves it to Python (dp_cflush.c) */
struct dp_logrec { uint64_t guest, host; int cow; };

struct dp_claim { uint64_t first, end; };     /* end == 0: unused */

struct dp_cowrec { uint64_t guest, old, host; };  /* a copy on write in flight: old entry, new host */

/* An image's allocation state (dp_alloc.c); arrays allocated when Python first lends. */
struct dp_alloc {
    uint64_t *spare;           /* ring of lent host offsets, taken in the order lent */
    uint32_t spare_head, spare_count;
    struct dp_logrec *log;
    uint32_t log_count;
    /* Copies on write in flight (dp_cow.c), logged when their write completes. Invariant:
     * log_count + ncow <= DP_ALOG (room for their records is kept at planning). */
    struct dp_cowrec *cow;
    uint32_t ncow;
    struct dp_claim claim[DP_NCLAIM];
    uint32_t overflow;         /* claims that found no room: no allocation at all while > 0 */
    uint32_t low_water;        /* wake Python when the lent clusters fall to this */
    int on;                    /* Python allows it: no write-through handle, not compress-on-write */
    int wake_sent;             /* DP_ST_ALLOC posted for this image and not yet answered */
    uint64_t park_seq;         /* write-through writes parked so far (dp_park.c), numbered */
    uint64_t released;         /* ... and answered up to this number */
};

/* Guest flushes served in C (dp_cflush.c). Record numbers are absolute: log[0] is record
 * `log_base` (every drop_log adds to it), so Python's drops need not renumber them.
 * Invariant: log_base <= durable <= written, minus what drops cut off (clamped at use). */
struct dp_cflush {
    int fd;                    /* the descriptor the running sync was submitted on (the requester's) */
    int open;                  /* Python's gate: its metadata queue is clean and it holds no lock */
    int err;                   /* sticky: the first failed fdatasync's -errno, whoever ran it */
    int running;               /* C's fdatasync in flight */
    int skip_sync;             /* test hook (sabotage): answer without the fdatasync */
    uint32_t min_spare;        /* forward when the lent clusters are this few: Python reserves ahead */
    unsigned table_bits;       /* guest clusters per L2 table, log2 */
    uint64_t *l2off;           /* per L2 table: its host offset while C may write it in place; 0: not */
    char *page;                /* a page-aligned 4 KiB buffer: pages read and patched through an
                                * O_DIRECT descriptor (dp_cflush_pages); NULL: not set up */
    uint64_t nl2;
    uint64_t log_base, written, durable, syncing;
    uint64_t mark, covered;    /* DP_C_UNSYNCED_WRITES at the running sync's start; at the last good one */
    struct dp_slot *cur, *next;  /* FSYNCs the running sync answers; those the next one will */
};

struct dp_image {
    uint64_t ino;
    uint64_t vsize;            /* the guest's size: READs past it are short, WRITEs past it forwarded */
    unsigned cluster_bits;
    int identity;              /* raw: guest offset == host offset, all writable */
    int paused;                /* a live switch or resize is under way: forward everything */
    uint64_t **chunks;         /* non-identity: chunk -> 4096 entries, NULL = absent */
    uint64_t nchunks;
    /* Per L2 table (2^table_bits clusters): the entry of its clusters whose own entry is absent,
     * where the L1 entry points at no table (dp_map_tables); NULL: none published. */
    uint64_t *tables;
    uint64_t ntables;
    unsigned table_bits;
    /* Backing chains (issue 22): where DP_MAP_BACKING clusters read (dp_image_backing), or NULL;
     * and the descriptor this image is read through as someone's backing image (-1: never). */
    struct dp_image *backing;
    int read_fd;
    unsigned read_align;
    uint64_t c[DP_C_NIMAGE];
    struct dp_alloc alloc;
    struct dp_cflush cflush;
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
    int cflush;                /* its FSYNCs may be served in C (writeback, none: dp_cflush.c) */
    int backing_id;            /* > 0: its OPEN reply passes through (dp_passthrough.c); kept too */
    int pt_served;             /* ... with FOPEN_DIRECT_IO: reads and writes still come here */
};

struct dp_piece { uint64_t host; uint32_t buf, len; int fd; };  /* fd -1: the slot's (its handle's) */

struct dp_slot {
    uint64_t hdr[DP_HDR / 8];  /* the request's first 80 bytes (8-byte aligned for the structs) */
    char *data;                /* the rest: page aligned, so a WRITE payload suits O_DIRECT */
    uint32_t len;              /* bytes read from /dev/fuse */
    uint32_t reply_len;        /* READ: bytes to answer */
    uint64_t seq;              /* dispatch number, for drain tickets; valid while active */
    int active;                /* a fast request whose backend I/O has not completed */
    int nalloc;                /* clusters the plan allocates (dp_alloc_commit), in plan order */
    uint64_t alloc_cl[DP_MAXALLOC];
    uint64_t alloc_host[DP_MAXALLOC];  /* ... and the lent cluster each took (dp_alloc_commit) */
    uint32_t cow_mask;         /* which of them copy on write (bit i: alloc_cl[i]; dp_cow.c) */
    /* A partial copy on write (one per request): piece cow_piece writes the whole new cluster
     * from the buffer at cow_buf, once the old cluster at cow_old is read there and the guest's
     * cow_len bytes at buffer offset cow_src merged in at cow_in. -1: none, or read already. */
    int cow_piece, cow_write;
    uint64_t cow_old;
    uint32_t cow_buf, cow_in, cow_src, cow_len;
    int write, pieces_left, npieces, err, fd, sync;
    int unsynced;              /* the plan touched a mapping that is not durable (DP_MAP_UNSYNCED, or allocated) */
    int defer;                 /* write-through onto such a mapping: answer after Python's sync (dp_park.c) */
    int backing;               /* a READ that reads from a backing image (DP_MAP_BACKING) */
    int cflush_direct;         /* a flush in C through s->fd writes whole pages (O_DIRECT; dp_cflush.c) */
    uint64_t park_seq;
    struct dp_image *img;
    struct dp_piece piece[DP_MAXPIECE];
    struct dp_slot *next;      /* free list or send queue */
    /* A ring entry's slot (dp_uring.c): its data is the entry's payload buffer; it is never on the free
     * list, and its answer is committed into the entry, not written to /dev/fuse. NULL: a pool slot. */
    struct dp_uent *uent;
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
    /* The send queue's head met ENOBUFS (dp_forward.c, dp_send_stalled): try it again when the
     * timeout armed by the loop fires, not at once; since when (CLOCK_MONOTONIC ns, 0: not
     * stalled) and the current pause. */
    int send_retry, send_retry_armed;
    uint64_t send_stalled_since;
    uint32_t send_pause_ms;
    struct __kernel_timespec send_retry_ts;  /* read by the kernel at submission */
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
    int pt_want;               /* take FUSE_PASSTHROUGH at INIT when offered (set before dp_start) */
    unsigned pt_state;         /* DP_PT_* (atomic): what INIT settled */
    struct dp_uring *ur;       /* FUSE over io_uring (dp_uring.c); set before dp_start, or NULL */
    uint64_t init[DP_INIT_N];  /* what INIT negotiated (dp_uring.c), written by the loop before DP_ST_INIT_DONE */
};

#define DP_HIDDEN __attribute__((visibility("hidden")))

/* ------------------------------------------------------------ io_uring user_data (dp_loop.c, dp_forward.c)
 * The top byte tags what completed. A backend I/O (T_IO) carries its slot's index and its piece's
 * index below; a notification (T_NOTE) its buffer's address, which user space keeps below bit 56
 * (x86-64 and arm64 hand out no higher address unless mmap is asked for one). */
enum { T_IO = 1, T_FUSE_POLL, T_SOCK_POLL, T_SOCK_POLLOUT, T_CTL_POLL, T_NOTE, T_SEND_RETRY, T_URING, T_CFLUSH,
       T_NTAGS };
#define DP_UD_TAG_SHIFT 56
#define DP_UD_PIECE_BITS 8
#define DP_UD_SLOT_BITS 16
#define TAG(t) ((uint64_t)(t) << DP_UD_TAG_SHIFT)
#define UNTAG(ud) ((ud) & ((1ull << DP_UD_TAG_SHIFT) - 1))
#define DP_UD_IO(slot, piece) (TAG(T_IO) | (uint64_t)(slot) << DP_UD_PIECE_BITS | (uint64_t)(piece))
#define DP_UD_SLOT(ud) (((ud) >> DP_UD_PIECE_BITS) & ((1u << DP_UD_SLOT_BITS) - 1))
#define DP_UD_PIECE(ud) ((ud) & ((1u << DP_UD_PIECE_BITS) - 1))
_Static_assert(DP_NSLOT <= 1 << DP_UD_SLOT_BITS, "a slot index must fit user_data's slot bits");
_Static_assert(DP_MAXPIECE <= 1 << DP_UD_PIECE_BITS, "a piece index must fit user_data's piece bits");
#define DP_UD_COW_READ ((1u << DP_UD_PIECE_BITS) - 1)  /* the piece index of a copy on write's read */
_Static_assert(DP_MAXPIECE < DP_UD_COW_READ, "the read of a copy on write needs a piece index of its own");
_Static_assert(DP_MAXALLOC <= 32, "cow_mask has a bit per allocation");
_Static_assert(DP_UD_PIECE_BITS + DP_UD_SLOT_BITS <= DP_UD_TAG_SHIFT, "slot and piece must stay below the tag");
_Static_assert(T_NTAGS <= 1 << (64 - DP_UD_TAG_SHIFT), "every tag must fit user_data's top bits");
_Static_assert(sizeof(void *) <= sizeof(uint64_t), "a notification's address must fit user_data");

/* ------------------------------------------------------------ hot helpers, inlined across files */

static inline void dp_count(uint64_t *c, uint64_t n) { __atomic_fetch_add(c, n, __ATOMIC_RELAXED); }

static inline uint32_t dp_hash(uint64_t key, uint32_t cap) {
    key *= 0x9E3779B97F4A7C15ull;  /* fh and inode numbers are sequential: spread them */
    return (uint32_t)(key >> 32) & (cap - 1);
}

/* The value of `key`, or NULL (dp_map.c has the rest of the table). */
static inline void *dp_map_get(const struct dp_u64map *m, uint64_t key) {
    for (uint32_t i = dp_hash(key, m->cap);; i = (i + 1) & (m->cap - 1)) {
        if (m->keys[i] == key)
            return m->vals[i];
        if (m->keys[i] == 0)
            return NULL;
    }
}

/* The published entry of a guest cluster of a mapped image: its own, else its table's (a cluster
 * whose L1 entry points at no table: dp_map_tables), else DP_MAP_ABSENT. */
static inline uint64_t dp_entry(const struct dp_image *im, uint64_t cluster) {
    uint64_t chunk = cluster >> DP_CHUNK_BITS, e = 0;
    if (chunk < im->nchunks && im->chunks[chunk])
        e = im->chunks[chunk][cluster & ((1u << DP_CHUNK_BITS) - 1)];
    if (!e && im->tables && (cluster >> im->table_bits) < im->ntables)
        e = im->tables[cluster >> im->table_bits];
    return e;
}

static inline void dp_free_slot(struct dp *dp, struct dp_slot *s) {
    if (s->uent)
        return;  /* a ring entry's slot stays the entry's: its commit gives it back to the kernel */
    s->next = dp->free;
    dp->free = s;
}

/* ------------------------------------------------------------ functions that cross files */

/* dp_map.c */
DP_HIDDEN int dp_map_init(struct dp_u64map *m);
DP_HIDDEN void dp_map_free(struct dp_u64map *m);
DP_HIDDEN int dp_map_put(struct dp_u64map *m, uint64_t key, void *val);
DP_HIDDEN void *dp_map_del(struct dp_u64map *m, uint64_t key);
DP_HIDDEN uint64_t dp_chunks_for(const struct dp_image *im, uint64_t vsize);
DP_HIDDEN int dp_resize_chunks(struct dp_image *im, uint64_t n);
DP_HIDDEN int dp_set_entry(struct dp_image *im, uint64_t cluster, uint64_t e);
DP_HIDDEN void dp_clear_entries(struct dp_image *im, uint64_t first, uint64_t count);
DP_HIDDEN void dp_image_free_chunks(struct dp_image *im);
/* dp_plan.c */
DP_HIDDEN int dp_plan(const struct dp_image *im, const struct dp_handle *h, int write, uint64_t off,
                      uint32_t size, const char *data, struct dp_slot *s);
/* dp_alloc.c */
DP_HIDDEN int dp_alloc_may(const struct dp_image *im, const struct dp_handle *h, uint64_t cluster,
                           struct dp_slot *s, uint64_t *host);
DP_HIDDEN int dp_alloc_commit(struct dp_image *im, struct dp_slot *s);
DP_HIDDEN void dp_alloc_restore(struct dp_image *im, uint64_t first, uint64_t count);
DP_HIDDEN void dp_alloc_free(struct dp_image *im);
DP_HIDDEN int dp_alloc_wake(struct dp_alloc *a);
/* dp_cow.c */
DP_HIDDEN int dp_cow_may(const struct dp_image *im, const struct dp_handle *h, uint64_t cluster, uint64_t e,
                         uint32_t in, uint32_t n, uint32_t done, uint32_t len, struct dp_slot *s, uint64_t *host);
DP_HIDDEN void dp_cow_begin(struct dp_image *im, uint64_t cluster, uint64_t host);
DP_HIDDEN void dp_cow_restore(struct dp_image *im, uint64_t first, uint64_t count);
DP_HIDDEN void dp_cow_read(struct dp *dp, struct dp_slot *s);
DP_HIDDEN int dp_cow_merge(struct dp_slot *s, int res);
DP_HIDDEN void dp_cow_done(struct dp *dp, struct dp_slot *s);
/* dp_loop.c */
DP_HIDDEN struct io_uring_sqe *dp_sqe(struct dp *dp);
DP_HIDDEN int dp_ring_setup(struct dp *dp, unsigned flags);
DP_HIDDEN void dp_dispatch(struct dp *dp, struct dp_slot *s);
DP_HIDDEN void dp_post(struct dp *dp, unsigned bits);
DP_HIDDEN void dp_write_fuse(struct dp *dp, struct iovec *iov, int n);
DP_HIDDEN void dp_reply(struct dp *dp, uint64_t unique, int err, const void *data, uint32_t len);
DP_HIDDEN void dp_answer(struct dp *dp, struct dp_slot *s);
DP_HIDDEN int dp_take_fast(struct dp *dp, struct dp_slot *s, uint64_t fh, int write, uint64_t off,
                           uint32_t size);
/* dp_forward.c */
DP_HIDDEN void dp_forward(struct dp *dp, struct dp_slot *s);
DP_HIDDEN void dp_flush_sendq(struct dp *dp);
DP_HIDDEN void dp_arm_send_retry(struct dp *dp);
DP_HIDDEN void dp_drain_sock(struct dp *dp);
/* dp_park.c */
DP_HIDDEN void dp_park(struct dp *dp, struct dp_slot *s);
DP_HIDDEN void dp_answer_released(struct dp *dp);
DP_HIDDEN void dp_fail_parked(struct dp *dp);
DP_HIDDEN int dp_parked(struct dp *dp);
/* dp_cflush.c */
DP_HIDDEN int dp_cflush_try(struct dp *dp, struct dp_slot *s);
DP_HIDDEN int dp_cflush_write(struct dp *dp, struct dp_slot *s);
DP_HIDDEN void dp_cflush_done(struct dp *dp, struct dp_image *im, int res);
DP_HIDDEN void dp_cflush_dropped(struct dp_image *im, uint32_t n);
DP_HIDDEN void dp_cflush_free(struct dp_image *im);
/* dp_passthrough.c */
DP_HIDDEN void dp_passthrough_init_in(struct dp *dp, const struct dp_slot *s);
DP_HIDDEN void dp_passthrough_init_out(struct dp *dp, struct fuse_init_out *o, size_t len);
DP_HIDDEN void dp_passthrough_open_out(struct dp *dp, struct fuse_open_out *o);
/* dp_uring.c */
DP_HIDDEN void dp_uring_init_in(struct dp *dp, const struct dp_slot *s);
DP_HIDDEN void dp_uring_init_out(struct dp *dp, struct fuse_init_out *o, size_t len);
DP_HIDDEN void dp_uring_poll(struct dp *dp);
DP_HIDDEN void dp_uring_cqe(struct dp *dp, uint64_t ud, int res);
DP_HIDDEN int dp_uring_commit(struct dp *dp, const struct iovec *iov, int n);
DP_HIDDEN int dp_uring_defer(struct dp *dp, uint64_t unique, int err, const void *arg, uint32_t len);
DP_HIDDEN void dp_uring_free(struct dp *dp);
/* dp_pyq.c */
DP_HIDDEN int dp_pyq_init(struct dp *dp);
DP_HIDDEN void dp_pyq_free(struct dp *dp);
DP_HIDDEN int dp_pyq_serve(struct dp *dp, struct dp_slot *s);
DP_HIDDEN void dp_pyq_admit(struct dp *dp);
DP_HIDDEN int dp_pyq_holds(struct dp *dp, uint64_t unique);

#endif
