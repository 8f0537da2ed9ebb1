/* The data plane's interface with Python (cachefs/dataplane/plane.py): its only source.
 *
 * build.py hands this file to cffi as the data plane's cdef (build.py, abi_cdef: the comments
 * and the lines cffi cannot read, the include guard and #include, taken out). Every C file of
 * the data plane includes it, the stub (dp_stub.c) too, so the compiler checks each definition
 * against the prototype Python is given. So it stays in the subset of C that cffi's cdef reads:
 * enums, `#define NAME <integer>`, structs and prototypes (abi_cdef refuses anything else and
 * names the line). What C alone needs is in dp_internal.h.
 *
 * Each function returns >= 0 or -errno unless it says otherwise.
 */
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
/* A flag on a DP_MAP_ABSENT entry of an overlay (issue 22): the cluster is unallocated there and
 * reads from the backing image at the same guest offset (dp_plan.c follows the chain, through the
 * backing image's own published entries: dp_image_backing). Its state bits stay ABSENT, so any
 * code that does not know the flag forwards the request; a WRITE there is forwarded (Python copies
 * on write). */
#define DP_MAP_BACKING 16
/* A flag on a DP_MAP_READONLY entry (issue 23): a shared data cluster of a writable image (refcount
 * > 1, L2 COPIED clear, not compressed: a snapshot holds it too). Reads read it in place; a WRITE
 * may copy on write into a lent cluster (dp_cow.c): the old cluster read (a partial write), the
 * guest bytes merged, the whole new cluster written, then (guest cluster, new host) logged as an
 * allocation that Python adopts with the old cluster losing one reference (Engine.adopt). Code
 * that does not know the flag sees READONLY and forwards the write. */
#define DP_MAP_COW 32
/* How deep dp_plan.c follows a chain of backing images (image/backing_names.MAX_CHAIN_DEPTH). */
#define DP_MAXCHAIN 16

/* Per-image counters: the order of dp_image_counters()'s output. */
enum { DP_C_FAST_READS, DP_C_FAST_WRITES, DP_C_BYTES_READ, DP_C_BYTES_WRITTEN, DP_C_FORWARDED,
       DP_C_ERRORS, DP_C_UNSYNCED_WRITES, DP_C_ALLOCATIONS, DP_C_BACKING_READS, DP_C_COWS, DP_C_COW_READS,
       DP_C_CFLUSHES, DP_C_CFSYNCS, DP_C_CFLUSH_ENTRIES, DP_C_CFLUSH_FORWARDED,
       DP_C_CFLUSH_WRITES, DP_C_NIMAGE };
/* Per-handle counters, counted at dispatch: Python charges them to the handle's cache mode. */
/* DP_H_WRITES_FLUSHED: DP_H_WRITES when C last took a guest flush of the handle (fs.flush: a close
 * owes no flush for writes a flush covered). */
enum { DP_H_READS, DP_H_WRITES, DP_H_BYTES_READ, DP_H_BYTES_WRITTEN, DP_H_FLUSHES, DP_H_FDATASYNCS,
       DP_H_WRITES_FLUSHED, DP_H_N };
/* Whole-connection counters: dp_counters()'s output. */
enum { DP_G_REQUESTS, DP_G_FAST, DP_G_FORWARDED, DP_G_REPLIES, DP_G_NOTIFICATIONS,
       DP_G_FORWARD_ERRORS, DP_G_REPLY_ERRORS, DP_G_PEAK_ACTIVE, DP_G_SEND_QUEUED, DP_G_SEND_RETRIES,
       DP_G_PASSTHROUGH_OPENS, DP_G_URING_REQUESTS, DP_G_URING_FORWARDED, DP_G_URING_LOST, DP_G_INTERRUPTS, DP_G_N };
/* The three counter tables, for dp_counter_name. */
enum { DP_COUNTERS_IMAGE, DP_COUNTERS_HANDLE, DP_COUNTERS_CONNECTION };

/* What Python asks (dp_request) and what the loop tells (dp_state). */
enum { DP_STOP_READING = 1, DP_QUIT = 2 };
enum { DP_ST_INIT_DONE = 2, DP_ST_DEAD = 4, DP_ST_STOPPED = 8, DP_ST_EXITED = 16,
       DP_ST_ALLOC = 32, /* an image's lent clusters run low or its allocation log fills: dp_alloc_woken */
       DP_ST_SYNC = 64, /* write-through writes wait for a sync: dp_sync_woken, dp_sync_ticket */
       DP_ST_URING = 128 /* the ring's registration is settled: dp_uring */ };

/* Allocation in C (dp_alloc.c): lent clusters per image, log records, claims. */
#define DP_SPARE 8192          /* lent host clusters an image holds at most */
#define DP_ALOG 4096           /* allocations logged and not yet adopted by Python */
#define DP_NCLAIM 128          /* guest ranges Python is changing at once (more: no allocation at all) */
#define DP_MAXALLOC 32         /* clusters one request may allocate (copies on write included) */
#define DP_NCOW 256            /* copies on write in flight per image (dp_cow.c); more are forwarded */

/* Requests Python serves (FALLOCATE, LSEEK; dp_pyq.c): pyfuse3 has
 * no handler for them and libfuse's ENOSYS would turn them off for the connection's life. C
 * copies each into a bounded table; Python takes them (dp_pyq_take) and answers from its own
 * thread (dp_pyq_reply). `mode`: FALLOCATE's mode, or LSEEK's whence. */
#define DP_PYQ 64
struct dp_pyreq {
    uint64_t unique, nodeid, fh, offset, length;
    uint32_t opcode, mode, uid, gid, pid, padding;
};

/* The data plane: opaque to Python (dp_internal.h defines it). */
struct dp;

/* dp_names.c, in both builds: the name (in stats) of counter `i` of a table (DP_COUNTERS_*), or
 * NULL past its end. Python builds its tuples of names from these (cachefs/native/__init__.py). */
const char *dp_counter_name(int table, int i);

/* dp_loop.c: the thread's life. 1 when built with liburing (dp_stub.c: 0). dp_create before the
 * mount exists (-errno when io_uring is refused), dp_start once /dev/fuse is open. */
int dp_built(void);
int dp_create(int sock_fd, int evt_fd, unsigned max_background, uint32_t msg_limit,
              struct dp **out);
int dp_start(struct dp *dp, int fuse_fd);
void dp_request(struct dp *dp, unsigned what);
unsigned dp_state(struct dp *dp);
void dp_waiting(struct dp *dp, int delta);
int dp_join(struct dp *dp);
void dp_destroy(struct dp *dp);
int dp_notify_inval_inode(struct dp *dp, uint64_t ino, int64_t off, int64_t len);

/* dp_publish.c: publishing images, mappings and handles; the drain. */
uint64_t dp_ticket(struct dp *dp);
int dp_drained(struct dp *dp, uint64_t ticket);
int dp_image_publish(struct dp *dp, uint64_t ino, uint64_t vsize, unsigned cluster_bits, int identity);
int dp_image_pause(struct dp *dp, uint64_t ino, int paused);
int dp_image_remove(struct dp *dp, uint64_t ino);
int dp_map_clusters(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count, const uint64_t *entries);
int dp_unmap_clusters(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count);
uint64_t dp_image_map_bytes(struct dp *dp, uint64_t ino);
/* The entry of every cluster of L2 tables [first, first+count) (2^table_bits clusters each) whose
 * own entry is absent: what a qcow2 image's clusters are where its L1 entry points at no table
 * (DP_MAP_BACKING, or DP_MAP_ZERO). 0 takes it back. A table published since clears it first. */
int dp_map_tables(struct dp *dp, uint64_t ino, unsigned table_bits, uint64_t first, uint64_t count,
                  const uint64_t *entries);
/* Backing chains (issue 22): `ino` reads its DP_MAP_BACKING clusters from image `backing_ino`
 * (0: none, every such read forwarded). An image read as a backing image is read through its own
 * read descriptor (dp_image_reader; -1: none), with that O_DIRECT alignment. */
int dp_image_backing(struct dp *dp, uint64_t ino, uint64_t backing_ino);
int dp_image_reader(struct dp *dp, uint64_t ino, int fd, unsigned align);
int dp_handle_publish(struct dp *dp, uint64_t fh, uint64_t ino, int fd, unsigned align, int fast_write,
                      int sync, int batch_fd);
int dp_handle_unpublish(struct dp *dp, uint64_t fh);
int dp_plan_probe(struct dp *dp, uint64_t fh, int write, uint64_t off, uint32_t size, char *data,
                  uint64_t *out, uint32_t *reply_len);

/* dp_counters.c: the counters (names: dp_counter_name). */
int dp_handle_counters(struct dp *dp, uint64_t fh, uint64_t *out, int n);
int dp_image_counters(struct dp *dp, uint64_t ino, uint64_t *out, int n);
void dp_counters(struct dp *dp, uint64_t *out, int n);

/* dp_pyq.c: the requests Python serves. */
int dp_pyq_fd(struct dp *dp);
int dp_pyq_take(struct dp *dp, struct dp_pyreq *out, int max);
int dp_pyq_reply(struct dp *dp, uint64_t unique, int err, uint64_t offset);

/* dp_alloc.c: clusters lent to C, its allocation log, claims. */
int dp_alloc_set(struct dp *dp, uint64_t ino, int on, uint32_t low_water);
int dp_alloc_give(struct dp *dp, uint64_t ino, const uint64_t *hosts, uint32_t n);
int dp_alloc_take_spares(struct dp *dp, uint64_t ino, uint64_t *out, uint32_t max);
int dp_alloc_peek_log(struct dp *dp, uint64_t ino, uint64_t *out, uint32_t max);
int dp_alloc_drop_log(struct dp *dp, uint64_t ino, uint32_t n);
int dp_alloc_claim(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count);
int dp_alloc_unclaim(struct dp *dp, uint64_t ino, int id);
int dp_alloc_status(struct dp *dp, uint64_t ino, uint64_t *out);
int dp_alloc_woken(struct dp *dp);
/* dp_cow.c: copies on write in flight in guest clusters [first, first+count) (logged once their
 * write completed). Python claims a range, then drains while this is > 0, then adopts the log. */
int dp_cow_inflight(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count);

/* dp_cflush.c: guest flushes served in C (docs/design.md "Guest flushes served in C").
 * dp_cflush_setup: the image's L2 tables' size (C writes through the requester's descriptor:
 * the FSYNC's handle's, a write-through write's twin). dp_cflush_gate: Python's gate (1: its queue is clean, it holds no lock; 0: it
 * may write metadata now). Closing it returns once no L2 write of C's is under way: they run
 * under dp->lock. `min_spare`: with this few lent clusters left C forwards, so Python reserves.
 * dp_cflush_table: L2 table `index` is on disk at `offset`, owned (L1 COPIED) and synced: C may
 * write entries into it (0: not). dp_cflush_status: out[0] log records whose entries C made
 * durable (a prefix of the log), out[1] the sticky error (-errno or 0), out[2] the count of
 * DP_C_UNSYNCED_WRITES that C's last good fdatasync covers. dp_cflush_fail: Python's fdatasync
 * failed: every later flush fails, in C too. dp_handle_cflush: this handle's FSYNCs may be C's. */
int dp_cflush_setup(struct dp *dp, uint64_t ino, unsigned table_bits, uint64_t ntables);
int dp_cflush_gate(struct dp *dp, uint64_t ino, int open, uint32_t min_spare);
int dp_cflush_table(struct dp *dp, uint64_t ino, uint64_t index, uint64_t offset);
int dp_cflush_status(struct dp *dp, uint64_t ino, uint64_t *out);
int dp_cflush_fail(struct dp *dp, uint64_t ino, int err);
int dp_cflush_testhook(struct dp *dp, uint64_t ino, int skip_sync);
int dp_handle_cflush(struct dp *dp, uint64_t fh, int on);

/* dp_passthrough.c: kernel passthrough (issue 24, Linux 6.9+). dp_passthrough_want before dp_start:
 * take FUSE_PASSTHROUGH at INIT if the kernel offers it. dp_passthrough, once DP_ST_INIT_DONE: the
 * DP_PT_* bits (offered by the kernel; taken; refused because libfuse's reply has the writeback
 * cache). dp_backing_open: a backing id (> 0) for a descriptor of an image file. dp_handle_passthrough:
 * the OPEN/CREATE reply of published handle `fh` carries FOPEN_PASSTHROUGH and `backing_id`; `served`
 * adds FOPEN_DIRECT_IO, so its reads and writes still come here (0 as backing_id: an ordinary reply). */
enum { DP_PT_OFFERED = 1, DP_PT_ON = 2, DP_PT_WBCACHE = 4,
       /* FUSE_HANDLE_KILLPRIV_V2 offered by the kernel; taken (dp_passthrough.c, the write's capability probe) */
       DP_PT_NOSEC_OFFERED = 8, DP_PT_NOSEC = 16 };
int dp_passthrough_want(struct dp *dp, int on);
int dp_passthrough(struct dp *dp);
int dp_backing_open(struct dp *dp, int fd);
int dp_backing_close(struct dp *dp, int backing_id);
int dp_handle_passthrough(struct dp *dp, uint64_t fh, int backing_id, int served);

/* dp_uring.c: FUSE over io_uring (issue 24; Linux 6.14+, module parameter enable_uring). dp_uring_want
 * before dp_start: the ring is made again with SQE128 (the kernel takes FUSE_IO_URING_CMD_* from 128-byte
 * SQEs only), INIT takes FUSE_OVER_IO_URING when the kernel offers it, and the loop then registers
 * DP_URING_DEPTH entries for each possible CPU (fewer if that makes more than DP_NRING). dp_uring: the
 * DP_UR_* bits (DP_ST_URING once settled). dp_init_info: what INIT negotiated and the ring's shape, in
 * DP_INIT_* order (n of them at most; returns how many). */
#define DP_URING_DEPTH 32
enum { DP_UR_WANTED = 1, DP_UR_OFFERED = 2, DP_UR_TAKEN = 4, DP_UR_REGISTERED = 8, DP_UR_FAILED = 16 };
enum { DP_INIT_KERNEL_FLAGS, DP_INIT_FLAGS, DP_INIT_MAX_WRITE, DP_INIT_MAX_PAGES, DP_INIT_MAX_BACKGROUND,
       DP_INIT_CONGESTION, DP_INIT_QUEUES, DP_INIT_DEPTH, DP_INIT_URING_ERR, DP_INIT_N };
int dp_uring_want(struct dp *dp, int on);
int dp_uring(struct dp *dp);
int dp_init_info(struct dp *dp, uint64_t *out, int n);

/* dp_park.c: write-through writes that wait for Python's sync. */
int dp_sync_woken(struct dp *dp);
uint64_t dp_sync_ticket(struct dp *dp, uint64_t ino);
int dp_sync_release(struct dp *dp, uint64_t ino, uint64_t ticket, int err);

#endif
