/* Python reading the data plane's counters (DATAPLANE.md "Counters"): per image (DP_C_*), per
 * handle (DP_H_*, counted at dispatch under dp->lock) and for the whole connection (DP_G_*).
 * The loop thread writes the image and connection counters with relaxed atomic adds (dp_count)
 * and these read them with relaxed atomic loads. Their names, in the same order, are
 * dp_names.c's.
 */
#include "dp_internal.h"

/* A handle's counters (DP_H_*) since it was first published, or -ENOENT. */
int dp_handle_counters(struct dp *dp, uint64_t fh, uint64_t *out, int n) {
    pthread_mutex_lock(&dp->lock);
    struct dp_handle *h = dp_map_get(&dp->handles, fh);
    for (int i = 0; h && i < n && i < DP_H_N; i++)
        out[i] = h->c[i];
    pthread_mutex_unlock(&dp->lock);
    return h ? 0 : -ENOENT;
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
