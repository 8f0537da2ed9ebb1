/* Python's side of the mapping contract: publishing and withdrawing images, mappings and handles.
 *
 * Python owns the mapping; C only reads it (DATAPLANE.md, "The mapping contract"). What it
 * publishes is kept by dp_map.c and read by dp_plan.c. Per handle (fh): the image, the
 * descriptor of the handle's concrete cache mode, its O_DIRECT alignment, whether its writes may
 * be fast, and whether that descriptor is O_DSYNC.
 *
 * Every function that takes `struct dp *` here is called by Python (the trio thread or a
 * worker) and takes `lock`; the loop thread takes it for each dispatch (dp_loop.c), so a
 * change is in force for the next request as soon as the call returns. What a change must
 * also wait for, the requests already dispatched, is the drain: dp_ticket() after the change,
 * then dp_drained(ticket) (DATAPLANE.md, the invariant's step 2).
 */
#include "dp_internal.h"

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
        im->read_fd = -1;
        im->cflush.fd = -1;
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
        for (uint32_t i = 0; i < dp->images.cap; i++) {  /* an overlay of it forwards what it read from it */
            struct dp_image *o = dp->images.vals[i];
            if (dp->images.keys[i] && o->backing == im)
                o->backing = NULL;
        }
        im->backing = NULL;
        im->read_fd = -1;
        dp_image_free_chunks(im);
        free(im->tables);
        im->tables = NULL;
        im->ntables = 0;
        dp_alloc_free(im);
        dp_cflush_free(im);
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
        if (entries[i] || (chunk < im->nchunks && im->chunks[chunk]))  /* DP_MAP_BACKING is absent, and published */
            rc = dp_set_entry(im, cl, entries[i]);
    }
    if (im && !im->identity)
        dp_alloc_restore(im, first, i);  /* what was published, even if an allocation then failed */
    pthread_mutex_unlock(&dp->lock);
    return !im ? -ENOENT : im->identity ? -EINVAL : rc;
}

/* Take clusters back (before a free, a COW, a discard, or as their L2 table leaves Python's
 * cache); a change of mapping then drains. Chunks left empty are freed (dp_clear_entries). */
int dp_unmap_clusters(struct dp *dp, uint64_t ino, uint64_t first, uint64_t count) {
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    if (im && !im->identity)
        dp_clear_entries(im, first, count);
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

/* The entries of whole L2 tables whose L1 entry points at no table (dp_abi.h). Python clears a
 * table's (0) before it publishes the table's own entries, so the two never disagree. */
int dp_map_tables(struct dp *dp, uint64_t ino, unsigned table_bits, uint64_t first, uint64_t count,
                  const uint64_t *entries) {
    int rc = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    if (!im || im->identity) {
        rc = !im ? -ENOENT : -EINVAL;
    } else if (table_bits > 40 || (im->tables && table_bits != im->table_bits)) {
        rc = -EINVAL;
    } else if (count && first + count > im->ntables) {
        uint64_t *t = realloc(im->tables, (first + count) * sizeof *t);
        if (!t) {
            rc = -ENOMEM;
        } else {
            memset(t + im->ntables, 0, (first + count - im->ntables) * sizeof *t);
            im->tables = t;
            im->ntables = first + count;
        }
    }
    if (rc == 0 && count) {
        im->table_bits = table_bits;
        memcpy(im->tables + first, entries, count * sizeof *entries);
    }
    pthread_mutex_unlock(&dp->lock);
    return rc;
}

/* Image `ino` reads its DP_MAP_BACKING clusters from image `backing_ino` (0: from none). A request
 * dispatched before this call may still read the old one: the caller drains if that matters. */
int dp_image_backing(struct dp *dp, uint64_t ino, uint64_t backing_ino) {
    int rc = 0;
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    struct dp_image *b = backing_ino ? dp_map_get(&dp->images, backing_ino) : NULL;
    if (!im || (backing_ino && !b))
        rc = -ENOENT;
    else if (b == im)
        rc = -ELOOP;
    else
        im->backing = b;
    pthread_mutex_unlock(&dp->lock);
    return rc;
}

/* The descriptor image `ino` is read through when it is someone's backing image, and its O_DIRECT
 * alignment (1: none); -1 stops those reads (then drain before closing the old one). */
int dp_image_reader(struct dp *dp, uint64_t ino, int fd, unsigned align) {
    if (align == 0 || (align & (align - 1)) || align > 4096)
        return -EINVAL;  /* the slot buffers are page aligned: nothing stricter can be served */
    pthread_mutex_lock(&dp->lock);
    struct dp_image *im = dp_map_get(&dp->images, ino);
    if (im) {
        im->read_fd = fd < 0 ? -1 : fd;
        im->read_align = align;
    }
    pthread_mutex_unlock(&dp->lock);
    return im ? 0 : -ENOENT;
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
        h->backing_id = was.backing_id;
        h->pt_served = was.pt_served;
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
