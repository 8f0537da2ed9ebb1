/* Planning a request against what Python published (DATAPLANE.md, "The mapping contract"): per
 * image its virtual size, its cluster size, and per guest cluster a host offset with one of
 * {writable in place, read-only, reads as zeros}, or nothing (the request is forwarded); a raw
 * image is one identity mapping. Per handle: the descriptor of its concrete cache mode, its
 * O_DIRECT alignment, whether its writes may be fast. A plan is the backend pieces of one READ or
 * WRITE, or "forward it". Called under dp->lock, by the loop (dp_take_fast), and by Python's
 * dp_plan_probe and the test hooks, so all three plan with this very code.
 */
#include "dp_internal.h"

static int dp_all_zero(const char *p, uint32_t n) {
    const uint64_t *w = (const uint64_t *)p;  /* the payload is page aligned */
    for (uint32_t i = 0; i < n / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

/* Add [host, host+len) of descriptor `fd` (-1: the handle's) at buffer offset `buf`, merging with
 * the previous piece when the host run continues. Returns 0, or 1 when the request needs more
 * pieces than a slot holds. */
static int dp_add_piece(struct dp_slot *s, uint64_t host, uint32_t buf, uint32_t len, int fd) {
    struct dp_piece *last = s->npieces ? &s->piece[s->npieces - 1] : NULL;
    if (last && last->fd == fd && last->host + last->len == host && last->buf + last->len == buf) {
        last->len += len;
        return 0;
    }
    if (s->npieces == DP_MAXPIECE)
        return 1;
    s->piece[s->npieces++] = (struct dp_piece){ host, buf, len, fd };
    return 0;
}

/* A piece read from backing image `b`, through its own read descriptor (dp_image_reader), which
 * an O_DIRECT one needs aligned. 1: forward the request. */
static int dp_backing_piece(const struct dp_image *b, struct dp_slot *s, uint64_t host, uint32_t buf,
                            uint32_t len) {
    if (b->read_fd < 0 || ((host | buf | len) & (b->read_align - 1)))
        return 1;
    return dp_add_piece(s, host, buf, len, b->read_fd);
}

/* Guest bytes [pos, pos+n) of backing image `b` (the image below an overlay's DP_MAP_BACKING
 * clusters, issue 22) into the buffer at `buf`: the same guest offset, zeros past its end (spec
 * "Header", backing_file_offset), through b's own published entries, split by b's clusters (a
 * layer's cluster size is its own). Its DP_MAP_BACKING clusters go one image down, up to
 * DP_MAXCHAIN deep. Anything b has not published (absent: not cached, compressed, damaged; paused;
 * no read descriptor) forwards the whole request, as an overlay's own absent cluster does.
 * Python keeps these entries true as it keeps b's own (dataplane/mapping.py, the invariant in
 * docs/design.md "Backing chains (issue 22)"). Returns 0, or 1: forward. */
static int dp_plan_backing(const struct dp_image *b, uint64_t pos, uint32_t n, uint32_t buf,
                           struct dp_slot *s, int depth) {
    if (!b || b->paused || depth > DP_MAXCHAIN)
        return 1;
    if (pos >= b->vsize) {
        memset(s->data + buf, 0, n);
        return 0;
    }
    if (b->vsize - pos < n) {
        uint32_t m = (uint32_t)(b->vsize - pos);
        memset(s->data + buf + m, 0, n - m);
        n = m;
    }
    if (b->identity)
        return dp_backing_piece(b, s, pos, buf, n);
    uint64_t csize = 1ull << b->cluster_bits;
    for (uint32_t done = 0; done < n;) {
        uint64_t p = pos + done, in = p & (csize - 1);
        uint32_t k = (uint32_t)(csize - in < n - done ? csize - in : n - done);
        uint64_t e = dp_entry(b, p >> b->cluster_bits);
        unsigned st = DP_MAP_STATE(e);
        int rc = 1;
        if (st == DP_MAP_WRITABLE || st == DP_MAP_READONLY)
            rc = dp_backing_piece(b, s, DP_MAP_HOST(e) + in, buf + done, k);
        else if (st == DP_MAP_ZERO)
            memset(s->data + buf + done, 0, k), rc = 0;
        else if (e & DP_MAP_BACKING)
            rc = dp_plan_backing(b->backing, p, k, buf + done, s, depth + 1);
        if (rc)
            return 1;
        done += k;
    }
    return 0;
}

/* A mapped (non-identity) image: one piece per host run; zero clusters of a READ are zeroed in
 * the buffer now, and its clusters from the backing chain planned there (dp_plan_backing). A WRITE needs every cluster writable in place, or allocatable with a lent
 * cluster (dp_alloc.c: planned here, taken by dp_alloc_commit once the whole request is
 * planned), or copied on write into one when it is shared (DP_MAP_COW, dp_cow.c); a
 * full-cluster write of zeros goes to Python, so discard-by-zeroes keeps working
 * (DATAPLANE.md "Zero writes"). */
static int dp_plan_mapped(const struct dp_image *im, const struct dp_handle *h, int write, uint64_t off,
                          uint32_t len, const char *data, struct dp_slot *s) {
    uint64_t csize = 1ull << im->cluster_bits;
    for (uint32_t done = 0; done < len;) {
        uint64_t pos = off + done, in = pos & (csize - 1), host;
        uint32_t n = (uint32_t)(csize - in < len - done ? csize - in : len - done);
        uint64_t e = dp_entry(im, pos >> im->cluster_bits);
        unsigned st = DP_MAP_STATE(e);
        if (!write && st == DP_MAP_ABSENT && (e & DP_MAP_BACKING)) {
            if (dp_plan_backing(im->backing, pos, n, done, s, 1))
                return 1;
            s->backing = 1;
            done += n;
            continue;
        }
        if (write && n == csize && (st != DP_MAP_READONLY || DP_MAP_CAN_COW(e)) && dp_all_zero(data + done, n))
            return 1;
        if (write && st != DP_MAP_WRITABLE) {
            uint64_t cl = pos >> im->cluster_bits;
            if (DP_MAP_CAN_COW(e)) {  /* shared: copy on write into a lent cluster (dp_cow.c) */
                if (!dp_cow_may(im, h, cl, e, (uint32_t)in, n, done, len, s, &host))
                    return 1;
                s->unsynced = 1;
                if (n < csize) {  /* its piece, the whole new cluster, is dp_cow_may's */
                    done += n;
                    continue;
                }
            } else if (!DP_MAP_CAN_ALLOC(e) || !dp_alloc_may(im, h, cl, s, &host)) {
                return 1;
            }
            e = host | DP_MAP_WRITABLE | DP_MAP_UNSYNCED;
        } else if (st == DP_MAP_ABSENT) {
            return 1;
        }
        s->unsynced |= write && (e & DP_MAP_UNSYNCED);
        if (DP_MAP_STATE(e) == DP_MAP_ZERO)
            memset(s->data + done, 0, n);
        else if (dp_add_piece(s, DP_MAP_HOST(e) + in, done, n, -1))
            return 1;
        done += n;
    }
    return 0;
}

/* Fill the slot's pieces for a READ or WRITE of [off, off+size) through handle `h`.
 * Returns 0 (served here), 1 (forward it to Python). Called under lock. */
int dp_plan(const struct dp_image *im, const struct dp_handle *h, int write, uint64_t off,
            uint32_t size, const char *data, struct dp_slot *s) {
    s->npieces = 0;
    s->nalloc = 0;
    s->cow_mask = 0;
    s->cow_piece = -1;
    s->unsynced = 0;
    s->backing = 0;
    if (size == 0 || size > DP_DATA - 4096 || (write && !h->fast_write))
        return 1;
    /* O_DIRECT needs the offset, the length and the memory aligned; the memory is (the slot's
     * page-aligned buffer). A client's direct_io request need not be: forward those. */
    if ((off | size) & (h->align - 1))
        return 1;
    if (write && off + size > im->vsize)
        return 1;  /* Python decides: cut short at the end, ENOSPC, or a grow (-o growable) */
    if (!write && off >= im->vsize) {
        s->reply_len = 0;  /* past the guest's end: answered short, as today */
        return 0;
    }
    uint32_t want = !write && off + size > im->vsize ? (uint32_t)(im->vsize - off) : size;
    s->reply_len = want;
    if (im->identity) {
        /* A direct read keeps its aligned length: the file's EOF makes it short. */
        s->piece[0] = (struct dp_piece){ off, 0, h->align > 1 ? size : want, -1 };
        s->npieces = 1;
        return 0;
    }
    if (h->align > 1 && want != size)
        return 1;  /* a mapped direct read across the guest's end: rare, Python pads it */
    return dp_plan_mapped(im, h, write, off, want, data, s);
}
