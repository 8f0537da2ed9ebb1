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

/* Add [host, host+len) at buffer offset `buf`, merging with the previous piece when the host
 * run continues. Returns 0, or 1 when the request needs more pieces than a slot holds. */
static int dp_add_piece(struct dp_slot *s, uint64_t host, uint32_t buf, uint32_t len) {
    struct dp_piece *last = s->npieces ? &s->piece[s->npieces - 1] : NULL;
    if (last && last->host + last->len == host && last->buf + last->len == buf) {
        last->len += len;
        return 0;
    }
    if (s->npieces == DP_MAXPIECE)
        return 1;
    s->piece[s->npieces++] = (struct dp_piece){ host, buf, len };
    return 0;
}

/* A mapped (non-identity) image: one piece per host run; zero clusters of a READ are zeroed in
 * the buffer now. A WRITE needs every cluster writable in place, or allocatable with a lent
 * cluster (dp_alloc.c: planned here, taken by dp_alloc_commit once the whole request is
 * planned); a full-cluster write of zeros goes to Python, so discard-by-zeroes keeps working
 * (DATAPLANE.md "Zero writes"). */
static int dp_plan_mapped(const struct dp_image *im, const struct dp_handle *h, int write, uint64_t off,
                          uint32_t len, const char *data, struct dp_slot *s) {
    uint64_t csize = 1ull << im->cluster_bits;
    for (uint32_t done = 0; done < len;) {
        uint64_t pos = off + done, in = pos & (csize - 1), host;
        uint32_t n = (uint32_t)(csize - in < len - done ? csize - in : len - done);
        uint64_t e = dp_entry(im, pos >> im->cluster_bits);
        unsigned st = DP_MAP_STATE(e);
        if (write && n == csize && st != DP_MAP_READONLY && dp_all_zero(data + done, n))
            return 1;
        if (write && st != DP_MAP_WRITABLE) {
            if (!DP_MAP_CAN_ALLOC(e) || !dp_alloc_may(im, h, pos >> im->cluster_bits, s, &host))
                return 1;
            e = host | DP_MAP_WRITABLE | DP_MAP_UNSYNCED;
        } else if (st == DP_MAP_ABSENT) {
            return 1;
        }
        s->unsynced |= write && (e & DP_MAP_UNSYNCED);
        if (DP_MAP_STATE(e) == DP_MAP_ZERO)
            memset(s->data + done, 0, n);
        else if (dp_add_piece(s, DP_MAP_HOST(e) + in, done, n))
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
    s->unsynced = 0;
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
        s->piece[0] = (struct dp_piece){ off, 0, h->align > 1 ? size : want };
        s->npieces = 1;
        return 0;
    }
    if (h->align > 1 && want != size)
        return 1;  /* a mapped direct read across the guest's end: rare, Python pads it */
    return dp_plan_mapped(im, h, write, off, want, data, s);
}
