/* The data plane without liburing at build time: the same names (dp_abi.h), each saying -ENOSYS, and
 * dp_built() == 0, so `--dataplane on` is refused in one line (cachefs/dataplane/plane.py). */
#include <errno.h>
#include <stdint.h>
#include "dp_abi.h"
struct dp { int unused; };
int dp_built(void) { return 0; }
int dp_create(int sock_fd, int evt_fd, unsigned max_background, uint32_t msg_limit,
              struct dp **out) { return -ENOSYS; }
int dp_start(struct dp *dp, int fuse_fd) { return -ENOSYS; }
void dp_request(struct dp *dp, unsigned what) {}
unsigned dp_state(struct dp *dp) { return 0; }
void dp_waiting(struct dp *dp, int delta) {}
int dp_join(struct dp *dp) { return 0; }
void dp_destroy(struct dp *dp) {}
uint64_t dp_ticket(struct dp *dp) { return 0; }
int dp_drained(struct dp *dp, uint64_t ticket) { return 1; }
int dp_image_publish(struct dp *dp, uint64_t ino, uint64_t vsize, unsigned cluster_bits, int identity) { return -ENOSYS; }
int dp_image_pause(struct dp *dp, uint64_t ino, int paused) { return -ENOSYS; }
int dp_image_remove(struct dp *dp, uint64_t ino) { return -ENOSYS; }
int dp_map_clusters(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count, const uint64_t *entries) { return -ENOSYS; }
int dp_unmap_clusters(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count) { return -ENOSYS; }
uint64_t dp_image_map_bytes(struct dp *dp, uint64_t ino) { return 0; }
int dp_map_tables(struct dp *dp, uint64_t ino, unsigned table_bits, uint64_t first, uint64_t count,
                  const uint64_t *entries) { return -ENOSYS; }
int dp_image_backing(struct dp *dp, uint64_t ino, uint64_t backing_ino) { return -ENOSYS; }
int dp_image_reader(struct dp *dp, uint64_t ino, int fd, unsigned align) { return -ENOSYS; }
int dp_handle_publish(struct dp *dp, uint64_t fh, uint64_t ino, int fd, unsigned align, int fast_write,
                      int sync, int batch_fd) { return -ENOSYS; }
int dp_handle_unpublish(struct dp *dp, uint64_t fh) { return -ENOSYS; }
int dp_handle_counters(struct dp *dp, uint64_t fh, uint64_t *out, int n) { return -ENOSYS; }
int dp_plan_probe(struct dp *dp, uint64_t fh, int write, uint64_t off, uint32_t size, char *data,
                  uint64_t *out, uint32_t *reply_len) { return -ENOSYS; }
int dp_image_counters(struct dp *dp, uint64_t ino, uint64_t *out, int n) { return -ENOSYS; }
void dp_counters(struct dp *dp, uint64_t *out, int n) {}
int dp_notify_inval_inode(struct dp *dp, uint64_t ino, int64_t off, int64_t len) { return -ENOSYS; }
int dp_uring_want(struct dp *dp, int on) { return on ? -ENOSYS : 0; }
int dp_uring(struct dp *dp) { return 0; }
int dp_init_info(struct dp *dp, uint64_t *out, int n) { return 0; }
int dp_pyq_fd(struct dp *dp) { return -ENOSYS; }
int dp_pyq_take(struct dp *dp, struct dp_pyreq *out, int max) { return -ENOSYS; }
int dp_pyq_reply(struct dp *dp, uint64_t unique, int err, uint64_t offset) { return -ENOSYS; }
int dp_alloc_set(struct dp *dp, uint64_t ino, int on, uint32_t low_water) { return -ENOSYS; }
int dp_alloc_give(struct dp *dp, uint64_t ino, const uint64_t *hosts, uint32_t n) { return -ENOSYS; }
int dp_alloc_take_spares(struct dp *dp, uint64_t ino, uint64_t *out, uint32_t max) { return -ENOSYS; }
int dp_alloc_peek_log(struct dp *dp, uint64_t ino, uint64_t *out, uint32_t max) { return -ENOSYS; }
int dp_alloc_drop_log(struct dp *dp, uint64_t ino, uint32_t n) { return -ENOSYS; }
int dp_alloc_claim(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count) { return -ENOSYS; }
int dp_alloc_unclaim(struct dp *dp, uint64_t ino, int id) { return -ENOSYS; }
int dp_alloc_status(struct dp *dp, uint64_t ino, uint64_t *out) { return -ENOSYS; }
int dp_alloc_woken(struct dp *dp) { return 0; }
int dp_cow_inflight(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count) { return -ENOSYS; }
int dp_sync_woken(struct dp *dp) { return 0; }
uint64_t dp_sync_ticket(struct dp *dp, uint64_t ino) { return 0; }
int dp_sync_release(struct dp *dp, uint64_t ino, uint64_t ticket, int err) { return -ENOSYS; }
int dp_passthrough_want(struct dp *dp, int on) { return -ENOSYS; }
int dp_passthrough(struct dp *dp) { return 0; }
int dp_backing_open(struct dp *dp, int fd) { return -ENOSYS; }
int dp_backing_close(struct dp *dp, int backing_id) { return -ENOSYS; }
int dp_handle_passthrough(struct dp *dp, uint64_t fh, int backing_id, int served) { return -ENOSYS; }
int dp_cflush_setup(struct dp *dp, uint64_t ino, unsigned table_bits, uint64_t ntables) { return -ENOSYS; }
int dp_cflush_gate(struct dp *dp, uint64_t ino, int open, uint32_t min_spare) { return -ENOSYS; }
int dp_cflush_table(struct dp *dp, uint64_t ino, uint64_t index, uint64_t offset) { return -ENOSYS; }
int dp_cflush_status(struct dp *dp, uint64_t ino, uint64_t *out) { return -ENOSYS; }
int dp_cflush_fail(struct dp *dp, uint64_t ino, int err) { return -ENOSYS; }
int dp_cflush_testhook(struct dp *dp, uint64_t ino, int skip_sync) { return -ENOSYS; }
int dp_handle_cflush(struct dp *dp, uint64_t fh, int on) { return -ENOSYS; }
