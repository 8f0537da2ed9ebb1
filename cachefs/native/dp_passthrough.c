/* Kernel passthrough (issue 24; Linux 6.9+, CONFIG_FUSE_PASSTHROUGH): the kernel itself reads and
 * writes a handle's backing file, so those requests never reach /dev/fuse. Three pieces, all in
 * the replies this thread relays anyway (dp_forward.c):
 *
 *  - INIT: the kernel offers FUSE_PASSTHROUGH in INIT's flags2; libfuse 3.14 knows nothing of it,
 *    so the reply is patched here to take it (flags2 bit, max_stack_depth) when Python wants it
 *    (dp_passthrough_want) and the reply has no FUSE_WRITEBACK_CACHE, which the kernel refuses
 *    beside passthrough (fs/fuse/inode.c process_init_reply).
 *  - backing ids: FUSE_DEV_IOC_BACKING_OPEN on /dev/fuse names a descriptor of the image file; the
 *    kernel keeps a reference to that file under the id until FUSE_DEV_IOC_BACKING_CLOSE (and every
 *    passthrough open holds one of its own). Python keeps one id per inode: the kernel refuses a
 *    second backing file on an inode that has one (fs/fuse/iomode.c, -EBUSY).
 *  - OPEN and CREATE replies of a handle Python marked (dp_handle_passthrough): FOPEN_PASSTHROUGH and
 *    the backing id. FOPEN_DIRECT_IO beside it sends reads and writes to the daemon again (mmap alone
 *    passes through): what an open gets that must not pass through on an inode whose other opens do,
 *    since the kernel fails (EIO) any open without FOPEN_PASSTHROUGH while the inode has a backing file.
 *
 * What the kernel does with the backing descriptor: only its path and our credentials count. Each
 * passthrough open reopens that path with the *opener's* open flags (passthrough.c,
 * fuse_passthrough_open: backing_file_open(&file->f_path, file->f_flags, ...)), so O_DIRECT and
 * O_DSYNC are the client's, never the descriptor's. dataplane/handles.py decides with that in mind.
 */
#include "dp_internal.h"
#include <stddef.h>
#include <sys/ioctl.h>

/* include/uapi/linux/fuse.h 7.40 (Debian 12's header is 7.38). */
#define DP_FUSE_PASSTHROUGH_FLAGS2 (1u << (37 - 32))   /* FUSE_PASSTHROUGH (1ULL << 37), in flags2 */
#ifndef FUSE_INIT_EXT
#define FUSE_INIT_EXT (1u << 30)
#endif
#ifndef FUSE_HANDLE_KILLPRIV_V2
#define FUSE_HANDLE_KILLPRIV_V2 (1u << 28)
#endif
#ifndef FUSE_WRITEBACK_CACHE
#define FUSE_WRITEBACK_CACHE (1u << 16)
#endif
#define DP_FOPEN_PASSTHROUGH (1u << 7)
#define DP_MAX_STACK_DEPTH 2   /* FILESYSTEM_MAX_STACK_DEPTH: images on overlayfs (depth 1) pass through too */
struct dp_backing_map { int32_t fd; uint32_t flags; uint64_t padding; };
#define DP_FUSE_DEV_IOC_BACKING_OPEN _IOW(229, 1, struct dp_backing_map)
#define DP_FUSE_DEV_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)
_Static_assert(DP_FUSE_DEV_IOC_BACKING_OPEN == 0x4010E501, "FUSE_DEV_IOC_BACKING_OPEN (DATAPLANE.md)");

/* fuse_init_out's fields past flags2 (7.40), and fuse_open_out with backing_id for padding. */
struct dp_init_tail { uint32_t flags2, max_stack_depth; };
#define DP_INIT_TAIL_AT offsetof(struct fuse_init_out, flags2)
struct dp_open_out { uint64_t fh; uint32_t open_flags; int32_t backing_id; };
_Static_assert(sizeof(struct dp_open_out) == sizeof(struct fuse_open_out), "fuse_open_out");

int dp_passthrough_want(struct dp *dp, int on) {
    if (dp->started)
        return -EBUSY;  /* INIT may be under way */
    dp->pt_want = !!on;
    return 0;
}

int dp_passthrough(struct dp *dp) { return __atomic_load_n(&dp->pt_state, __ATOMIC_ACQUIRE); }

/* The loop, forwarding INIT: does the kernel offer passthrough? (flags2 counts only with FUSE_INIT_EXT.) */
void dp_passthrough_init_in(struct dp *dp, const struct dp_slot *s) {
    const struct fuse_init_in *in = (const void *)((const struct fuse_in_header *)s->hdr + 1);
    size_t need = sizeof(struct fuse_in_header) + offsetof(struct fuse_init_in, flags2) + 4;
    if (s->len >= need && (in->flags & FUSE_INIT_EXT) && (in->flags2 & DP_FUSE_PASSTHROUGH_FLAGS2))
        __atomic_fetch_or(&dp->pt_state, DP_PT_OFFERED, __ATOMIC_RELEASE);
    if (s->len >= need && (in->flags & FUSE_HANDLE_KILLPRIV_V2))
        __atomic_fetch_or(&dp->pt_state, DP_PT_NOSEC_OFFERED, __ATOMIC_RELEASE);
}

/* Every write to a FUSE file first runs file_remove_privs, whose capability check asks the daemon
 * for security.capability (a GETXATTR round trip, the inode lock held: passthrough writes serialize
 * on it) unless the inode is S_NOSEC. FUSE clears SB_NOSEC at mount, so S_NOSEC never latches, unless
 * the server takes FUSE_HANDLE_KILLPRIV_V2 (fs/fuse/inode.c process_init_reply sets SB_NOSEC; then
 * file_remove_privs latches S_NOSEC after the first write of a file without setuid/setgid). In
 * exchange the server clears setuid/setgid where a write, truncate or O_TRUNC open asks it to: an
 * image file never has them (fuse/operations.py refuses chmod +s on the mount); one made setuid on
 * the host keeps the bit through passthrough writes (fuse_setattr leaves ATTR_KILL_SUID to a
 * KILLPRIV_V2 server, which never sees them): docs/design.md says so. */
static void dp_take_killpriv_v2(struct dp *dp, struct fuse_init_out *o) {
    if (!(__atomic_load_n(&dp->pt_state, __ATOMIC_ACQUIRE) & DP_PT_NOSEC_OFFERED))
        return;
    o->flags |= FUSE_HANDLE_KILLPRIV_V2;
    __atomic_fetch_or(&dp->pt_state, DP_PT_NOSEC, __ATOMIC_RELEASE);
}

/* The loop, relaying libfuse's INIT reply: take passthrough if offered and wanted. */
void dp_passthrough_init_out(struct dp *dp, struct fuse_init_out *o, size_t len) {
    dp_take_killpriv_v2(dp, o);
    unsigned st = __atomic_load_n(&dp->pt_state, __ATOMIC_ACQUIRE);
    if (!(st & DP_PT_OFFERED) || !dp->pt_want || len < DP_INIT_TAIL_AT + sizeof(struct dp_init_tail))
        return;
    if (o->flags & FUSE_WRITEBACK_CACHE) {
        __atomic_fetch_or(&dp->pt_state, DP_PT_WBCACHE, __ATOMIC_RELEASE);
        return;
    }
    struct dp_init_tail *t = (void *)((char *)o + DP_INIT_TAIL_AT);
    o->flags |= FUSE_INIT_EXT;
    t->flags2 |= DP_FUSE_PASSTHROUGH_FLAGS2;
    t->max_stack_depth = DP_MAX_STACK_DEPTH;
    __atomic_fetch_or(&dp->pt_state, DP_PT_ON, __ATOMIC_RELEASE);
}

int dp_backing_open(struct dp *dp, int fd) {
    struct dp_backing_map map = { .fd = fd };
    if (dp->fuse_fd < 0)
        return -ENOTCONN;
    if (!(dp_passthrough(dp) & DP_PT_ON))
        return -EPERM;
    int id = ioctl(dp->fuse_fd, DP_FUSE_DEV_IOC_BACKING_OPEN, &map);
    return id < 0 ? -errno : id;
}

int dp_backing_close(struct dp *dp, int backing_id) {
    uint32_t id = (uint32_t)backing_id;
    if (dp->fuse_fd < 0)
        return -ENOTCONN;
    return ioctl(dp->fuse_fd, DP_FUSE_DEV_IOC_BACKING_CLOSE, &id) < 0 ? -errno : 0;
}

int dp_handle_passthrough(struct dp *dp, uint64_t fh, int backing_id, int served) {
    pthread_mutex_lock(&dp->lock);
    struct dp_handle *h = dp_map_get(&dp->handles, fh);
    if (h) {
        h->backing_id = backing_id;
        h->pt_served = !!served;
    }
    pthread_mutex_unlock(&dp->lock);
    return h ? 0 : -ENOENT;
}

/* The loop, relaying an OPEN or CREATE reply: a handle Python marked passes through. The flags the
 * kernel accepts beside FOPEN_PASSTHROUGH are DIRECT_IO, PARALLEL_DIRECT_WRITES and NOFLUSH
 * (FOPEN_PASSTHROUGH_MASK; any other fails the open with EIO): KEEP_CACHE and the rest are cleared. */
void dp_passthrough_open_out(struct dp *dp, struct fuse_open_out *out) {
    struct dp_open_out *o = (void *)out;
    pthread_mutex_lock(&dp->lock);
    struct dp_handle *h = dp_map_get(&dp->handles, o->fh);
    int id = h ? h->backing_id : 0, served = h && h->pt_served;
    pthread_mutex_unlock(&dp->lock);
    if (id <= 0)
        return;
    o->open_flags &= FOPEN_NOFLUSH;
    o->open_flags |= DP_FOPEN_PASSTHROUGH | (served ? FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES : 0);
    o->backing_id = id;
    dp_count(&dp->g[DP_G_PASSTHROUGH_OPENS], 1);
}
