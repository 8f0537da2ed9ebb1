/* The data plane's tables: what Python publishes, and how a request is planned against it.
 *
 * Python owns the mapping; C only reads it (DATAPLANE.md, "The mapping contract"). Per image:
 * its virtual size, its cluster size, and per guest cluster a host offset with one of
 * {writable in place, read-only, reads as zeros}, or nothing (the request is forwarded). A raw
 * image is one identity mapping. Per handle (fh): the image, the descriptor of the handle's
 * concrete cache mode, its O_DIRECT alignment, whether its writes may be fast, and whether
 * that descriptor is O_DSYNC.
 *
 * Every function that takes `struct dp *` here is called by Python (the trio thread or a
 * worker) and takes `lock`; the loop thread takes it for each dispatch (dp_loop.c), so a
 * change is in force for the next request as soon as the call returns. What a change must
 * also wait for, the requests already dispatched, is the drain: dp_ticket() after the change,
 * then dp_drained(ticket) (DATAPLANE.md, the invariant's step 2).
 */
#include <stdlib.h>
#include "dp.h"

/* ------------------------------------------------------------ u64 -> pointer map */

int dp_map_init(struct dp_u64map *m) {
    m->cap = 64;
    m->count = 0;
    m->keys = calloc(m->cap, sizeof *m->keys);
    m->vals = calloc(m->cap, sizeof *m->vals);
    return m->keys && m->vals ? 0 : -ENOMEM;
}

void dp_map_free(struct dp_u64map *m) {
    free(m->keys);
    free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
}

static uint32_t dp_hash(uint64_t key, uint32_t cap) {
    key *= 0x9E3779B97F4A7C15ull;  /* fh and inode numbers are sequential: spread them */
    return (uint32_t)(key >> 32) & (cap - 1);
}

void *dp_map_get(const struct dp_u64map *m, uint64_t key) {
    for (uint32_t i = dp_hash(key, m->cap);; i = (i + 1) & (m->cap - 1)) {
        if (m->keys[i] == key)
            return m->vals[i];
        if (m->keys[i] == 0)
            return NULL;
    }
}

static int dp_map_grow(struct dp_u64map *m) {
    struct dp_u64map bigger = { calloc(m->cap * 2, sizeof(uint64_t)), calloc(m->cap * 2, sizeof(void *)),
                                m->cap * 2, 0 };
    if (!bigger.keys || !bigger.vals) {
        dp_map_free(&bigger);
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < m->cap; i++)
        if (m->keys[i])
            dp_map_put(&bigger, m->keys[i], m->vals[i]);
    dp_map_free(m);
    *m = bigger;
    return 0;
}

int dp_map_put(struct dp_u64map *m, uint64_t key, void *val) {
    if (key == 0)
        return -EINVAL;
    if ((m->count + 1) * 2 > m->cap && dp_map_grow(m) < 0)  /* keep it at most half full */
        return -ENOMEM;
    uint32_t i = dp_hash(key, m->cap);
    while (m->keys[i] != 0 && m->keys[i] != key)
        i = (i + 1) & (m->cap - 1);
    if (m->keys[i] == 0)
        m->count++;
    m->keys[i] = key;
    m->vals[i] = val;
    return 0;
}

/* Backward-shift deletion: no tombstones, so a lookup never scans a dead run. */
void *dp_map_del(struct dp_u64map *m, uint64_t key) {
    uint32_t mask = m->cap - 1, i = dp_hash(key, m->cap);
    while (m->keys[i] != key) {
        if (m->keys[i] == 0)
            return NULL;
        i = (i + 1) & mask;
    }
    void *val = m->vals[i];
    for (uint32_t j = (i + 1) & mask; m->keys[j] != 0; j = (j + 1) & mask) {
        uint32_t home = dp_hash(m->keys[j], m->cap);
        /* Move j into the hole at i unless its home lies cyclically in (i, j]. */
        if (((j - home) & mask) >= ((j - i) & mask)) {
            m->keys[i] = m->keys[j];
            m->vals[i] = m->vals[j];
            i = j;
        }
    }
    m->keys[i] = 0;
    m->vals[i] = NULL;
    m->count--;
    return val;
}

/* ------------------------------------------------------------ planning a request */

uint64_t dp_entry(const struct dp_image *im, uint64_t cluster) {
    uint64_t chunk = cluster >> DP_CHUNK_BITS;
    if (chunk >= im->nchunks || !im->chunks[chunk])
        return DP_MAP_ABSENT;
    return im->chunks[chunk][cluster & ((1u << DP_CHUNK_BITS) - 1)];
}

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

static int dp_resize_chunks(struct dp_image *im, uint64_t n);

/* Set one entry, creating its chunk (Python's mapping said so, or C allocated the cluster). */
int dp_set_entry(struct dp_image *im, uint64_t cl, uint64_t e) {
    uint64_t chunk = cl >> DP_CHUNK_BITS;
    if (chunk >= im->nchunks && dp_resize_chunks(im, chunk + 1) < 0)
        return -ENOMEM;
    if (!im->chunks[chunk] && !(im->chunks[chunk] = calloc(1u << DP_CHUNK_BITS, sizeof(uint64_t))))
        return -ENOMEM;
    im->chunks[chunk][cl & ((1u << DP_CHUNK_BITS) - 1)] = e;
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

void dp_image_free_chunks(struct dp_image *im) {
    for (uint64_t i = 0; i < im->nchunks; i++)
        free(im->chunks[i]);
    free(im->chunks);
    im->chunks = NULL;
    im->nchunks = 0;
}

/* ------------------------------------------------------------ Python's side */

uint64_t dp_ticket(struct dp *dp) {
    pthread_mutex_lock(&dp->lock);
    uint64_t t = dp->seq;
    pthread_mutex_unlock(&dp->lock);
    return t;
}

/* 1 when no fast request dispatched at or before `ticket` is still in flight. */
int dp_drained(struct dp *dp, uint64_t ticket) {
    int busy = 0;
    pthread_mutex_lock(&dp->lock);
    for (int i = 0; i < DP_NSLOT && !busy; i++)
        busy = __atomic_load_n(&dp->slots[i].active, __ATOMIC_ACQUIRE) && dp->slots[i].seq <= ticket;
    pthread_mutex_unlock(&dp->lock);
    return !busy;
}

static uint64_t dp_chunks_for(const struct dp_image *im, uint64_t vsize) {
    uint64_t clusters = (vsize + (1ull << im->cluster_bits) - 1) >> im->cluster_bits;
    return (clusters + (1u << DP_CHUNK_BITS) - 1) >> DP_CHUNK_BITS;
}

/* The chunk array covers what was mapped so far: it grows with dp_map_clusters, up to the
 * guest's size, so an image with nothing published costs nothing. */
static int dp_resize_chunks(struct dp_image *im, uint64_t n) {
    for (uint64_t i = n; i < im->nchunks; i++) {  /* shrinking: Python drained first */
        free(im->chunks[i]);
        im->chunks[i] = NULL;
    }
    if (n > im->nchunks) {
        uint64_t **c = realloc(im->chunks, n * sizeof *c);
        if (!c)
            return -ENOMEM;
        memset(c + im->nchunks, 0, (n - im->nchunks) * sizeof *c);
        im->chunks = c;
    }
    im->nchunks = n;
    return 0;
}

/* Publish an image, or change its size (a grow needs no drain; a shrink needs one first). */
int dp_image_publish(struct dp *dp, uint64_t ino, uint64_t vsize, unsigned cluster_bits, int identity) {
    if (cluster_bits < 9 || cluster_bits > 30)
        return -EINVAL;
    int rc = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    if (!im) {
        im = calloc(1, sizeof *im);
        if (!im || (rc = dp_map_put(&dp->images, ino, im)) < 0) {
            free(im);
            pthread_mutex_unlock(&dp->lock);
            return rc < 0 ? rc : -ENOMEM;
        }
        im->ino = ino;
    }
    im->cluster_bits = cluster_bits;
    im->identity = identity;
    rc = identity || dp_chunks_for(im, vsize) >= im->nchunks ? 0 : dp_resize_chunks(im, dp_chunks_for(im, vsize));
    if (rc == 0)
        im->vsize = vsize;
    pthread_mutex_unlock(&dp->lock);
    return rc;
}

/* Forward every request of the image (1) or serve it again (0). */
int dp_image_pause(struct dp *dp, uint64_t ino, int paused) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    if (im)
        im->paused = paused;
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

/* The image is closed: drop it and every handle on it. Its struct stays until dp_destroy, as
 * a request dispatched before this call may still count into it; the caller drains anyway. */
int dp_image_remove(struct dp *dp, uint64_t ino) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_del(&dp->images, ino);
    if (im) {
        for (uint32_t i = 0; i < dp->handles.cap;) {
            struct dp_handle *h = dp->handles.vals[i];
            if (dp->handles.keys[i] && h->img == im)
                free(dp_map_del(&dp->handles, dp->handles.keys[i]));  /* may shift another into i */
            else
                i++;
        }
        dp_image_free_chunks(im);
        dp_alloc_free(im);
        im->next_dead = dp->dead_images;
        dp->dead_images = im;
    }
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

/* Publish `count` entries from guest cluster `first` (stage 2: from the L2 table cache). A
 * cluster C allocated and Python has not adopted yet keeps C's entry (dp_alloc_restore):
 * Python's table still says unallocated there. A range past the guest's last cluster changes
 * nothing (it used to publish the entries before the first bad one without restoring, so a
 * cluster C had allocated became allocatable again, and C allocated it twice). */
int dp_map_clusters(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count, const uint64_t *entries) {
    int rc = 0;
    uint64_t i = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    uint64_t nclusters = im ? (im->vsize + (1ull << im->cluster_bits) - 1) >> im->cluster_bits : 0;
    if (count && (first >= nclusters || count > nclusters - first))
        rc = -ERANGE;  /* past the guest's last cluster */
    for (; im && !im->identity && rc == 0 && i < count; i++) {
        uint64_t cl = first + i, chunk = cl >> DP_CHUNK_BITS;
        if (DP_MAP_STATE(entries[i]) != DP_MAP_ABSENT || (chunk < im->nchunks && im->chunks[chunk]))
            rc = dp_set_entry(im, cl, entries[i]);
    }
    if (im && !im->identity)
        dp_alloc_restore(im, first, i);  /* what was published, even if an allocation then failed */
    pthread_mutex_unlock(&dp->lock);
    return !im ? -ENOENT : im->identity ? -EINVAL : rc;
}

/* 1 when no entry of the chunk is published any more. */
static int dp_chunk_empty(const uint64_t *c) {
    for (uint32_t i = 0; i < (1u << DP_CHUNK_BITS); i++)
        if (DP_MAP_STATE(c[i]) != DP_MAP_ABSENT)
            return 0;
    return 1;
}

/* Take clusters back (before a free, a COW, a discard, or as their L2 table leaves Python's
 * cache); a change of mapping then drains. A chunk left empty is freed at once, so C's
 * memory follows the L2 cache's bound: a dispatch copies what it needs into its slot under
 * the lock, and nothing refers to a chunk after that. */
int dp_unmap_clusters(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count) {
    const uint64_t mask = (1u << DP_CHUNK_BITS) - 1, end = first + count;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    for (uint64_t cl = first; im && !im->identity && cl < end;) {
        uint64_t chunk = cl >> DP_CHUNK_BITS, stop = (chunk + 1) << DP_CHUNK_BITS;
        uint64_t *c = chunk < im->nchunks ? im->chunks[chunk] : NULL;
        stop = stop < end ? stop : end;
        if (c) {
            for (uint64_t x = cl; x < stop; x++)
                c[x & mask] = DP_MAP_ABSENT;
            if (dp_chunk_empty(c)) {
                free(c);
                im->chunks[chunk] = NULL;
            }
        }
        cl = stop;
    }
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

/* Memory the mapping chunks of an image take, in bytes (for stats and the bound's test). */
uint64_t dp_image_map_bytes(struct dp *dp, uint64_t ino) {
    uint64_t n = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    for (uint64_t i = 0; im && i < im->nchunks; i++)
        n += im->chunks[i] ? sizeof(uint64_t) << DP_CHUNK_BITS : 0;
    pthread_mutex_unlock(&dp->lock);
    return n;
}

/* Publish (or update) a handle: its requests may be served here from now on. */
int dp_handle_publish(struct dp *dp, uint64_t fh, uint64_t ino, int fd, unsigned align, int fast_write,
                      int sync, int batch_fd) {
    if (fd < 0 || align == 0 || (align & (align - 1)) || align > 4096)
        return -EINVAL;  /* the slot buffers are page aligned: nothing stricter can be served */
    int rc = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    struct dp_handle *h = dp_map_get(&dp->handles, fh);
    if (!im) {
        rc = -ENOENT;
    } else if (!h && (!(h = calloc(1, sizeof *h)) || (rc = dp_map_put(&dp->handles, fh, h)) < 0)) {
        free(h);
        rc = rc < 0 ? rc : -ENOMEM;
    } else {
        struct dp_handle was = *h;
        *h = (struct dp_handle){ .img = im, .fd = fd, .align = align, .fast_write = fast_write, .sync = sync,
                                 .batch_fd = batch_fd };
        memcpy(h->c, was.c, sizeof h->c);
    }
    pthread_mutex_unlock(&dp->lock);
    return rc;
}

/* Withdraw a handle: its next request is forwarded. Then drain before closing its descriptor. */
int dp_handle_unpublish(struct dp *dp, uint64_t fh) {
    pthread_mutex_lock(&dp->lock);
    struct dp_handle *h = dp_map_del(&dp->handles, fh);
    pthread_mutex_unlock(&dp->lock);
    free(h);
    return h ? 0 : -ENOENT;
}

/* A handle's counters (DP_H_*) since it was first published, or -ENOENT. */
int dp_handle_counters(struct dp *dp, uint64_t fh, uint64_t *out, int n) {
    pthread_mutex_lock(&dp->lock);
    struct dp_handle *h = dp_map_get(&dp->handles, fh);
    for (int i = 0; h && i < n && i < DP_H_N; i++)
        out[i] = h->c[i];
    pthread_mutex_unlock(&dp->lock);
    return h ? 0 : -ENOENT;
}

/* For tests (and stage 2's): plan a request of handle `fh` as the loop would, into `data`
 * (size bytes; zero clusters are zeroed there). Returns the number of pieces, written to
 * `out` as (host offset, buffer offset, length) triples, with the reply length in
 * `*reply_len`; -1 when the request would be forwarded; -ENOENT without such a handle. */
int dp_plan_probe(struct dp *dp, uint64_t fh, int write, uint64_t off, uint32_t size, char *data,
                  uint64_t *out, uint32_t *reply_len) {
    struct dp_slot s = { .data = data };
    pthread_mutex_lock(&dp->lock);
    struct dp_handle *h = dp_map_get(&dp->handles, fh);
    int rc = !h ? -ENOENT : h->img->paused || dp_plan(h->img, h, write, off, size, data, &s) ? -1 : s.npieces;
    pthread_mutex_unlock(&dp->lock);
    for (int i = 0; i < rc; i++) {
        out[3 * i] = s.piece[i].host;
        out[3 * i + 1] = s.piece[i].buf;
        out[3 * i + 2] = s.piece[i].len;
    }
    *reply_len = s.reply_len;
    return rc;
}

/* An image's counters (DP_C_*), or -ENOENT. */
int dp_image_counters(struct dp *dp, uint64_t ino, uint64_t *out, int n) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    for (int i = 0; im && i < n && i < DP_C_NIMAGE; i++)
        out[i] = __atomic_load_n(&im->c[i], __ATOMIC_RELAXED);
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
}

void dp_counters(struct dp *dp, uint64_t *out, int n) {
    for (int i = 0; i < n && i < DP_G_N; i++)
        out[i] = __atomic_load_n(&dp->g[i], __ATOMIC_RELAXED);
}
