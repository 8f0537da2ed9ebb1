/* Tables the data plane looks things up in: the u64 -> pointer map (images by inode, handles by
 * fh; dp_map_get, the lookup every request makes, is inline in dp_internal.h), and an image's
 * mapping, guest cluster -> entry (host offset | DP_MAP_*), in chunks of 4096 entries allocated
 * as Python publishes them, so C's memory follows Python's L2 table cache (dp_publish.c).
 *
 * Nothing here locks: the callers hold dp->lock.
 */
#include "dp_internal.h"

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

/* ------------------------------------------------------------ an image's chunked mapping */

uint64_t dp_chunks_for(const struct dp_image *im, uint64_t vsize) {
    uint64_t clusters = (vsize + (1ull << im->cluster_bits) - 1) >> im->cluster_bits;
    return (clusters + (1u << DP_CHUNK_BITS) - 1) >> DP_CHUNK_BITS;
}

/* The chunk array covers what was mapped so far: it grows with dp_map_clusters, up to the
 * guest's size, so an image with nothing published costs nothing. */
int dp_resize_chunks(struct dp_image *im, uint64_t n) {
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

/* 1 when no entry of the chunk is published any more. */
static int dp_chunk_empty(const uint64_t *c) {
    for (uint32_t i = 0; i < (1u << DP_CHUNK_BITS); i++)
        if (c[i])  /* an absent entry may still say "from backing" (DP_MAP_BACKING) */
            return 0;
    return 1;
}

/* Unpublish entries [first, first+count): a chunk left empty is freed at once, so C's memory
 * follows the L2 cache's bound (a dispatch copies what it needs into its slot under the lock,
 * and nothing refers to a chunk after that). */
void dp_clear_entries(struct dp_image *im, uint64_t first, uint64_t count) {
    const uint64_t mask = (1u << DP_CHUNK_BITS) - 1, end = first + count;
    for (uint64_t cl = first; cl < end;) {
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
}

void dp_image_free_chunks(struct dp_image *im) {
    for (uint64_t i = 0; i < im->nchunks; i++)
        free(im->chunks[i]);
    free(im->chunks);
    im->chunks = NULL;
    im->nchunks = 0;
}
