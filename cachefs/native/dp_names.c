/* The counters' names: the one list of them, compiled into both builds (the stub's too), so
 * Python takes its tuples of names from here (cachefs/native/__init__.py, counter_names) and
 * nothing is kept in step by hand. Each name sits at its enum's index (dp_abi.h); the
 * _Static_asserts keep each table as long as its count, and a gap would be a NULL that Python's
 * check at import refuses. The names are what stats and the xattrs call them. */
#include <stddef.h>
#include "dp_abi.h"

static const char *const image_names[] = {
    [DP_C_FAST_READS] = "fast_reads",
    [DP_C_FAST_WRITES] = "fast_writes",
    [DP_C_BYTES_READ] = "fast_bytes_read",
    [DP_C_BYTES_WRITTEN] = "fast_bytes_written",
    [DP_C_FORWARDED] = "forwarded",
    [DP_C_ERRORS] = "fast_errors",
    [DP_C_UNSYNCED_WRITES] = "fast_unsynced_writes",
    [DP_C_ALLOCATIONS] = "fast_allocations",
    [DP_C_BACKING_READS] = "fast_backing_reads",
    [DP_C_COWS] = "fast_cows",
    [DP_C_COW_READS] = "fast_cow_reads",
    [DP_C_CFLUSHES] = "fast_flushes",
    [DP_C_CFSYNCS] = "fast_fdatasyncs",
    [DP_C_CFLUSH_ENTRIES] = "fast_flush_entries",
    [DP_C_CFLUSH_FORWARDED] = "fast_flushes_forwarded",
    [DP_C_CFLUSH_WRITES] = "fast_flush_writes",
};
static const char *const handle_names[] = {
    [DP_H_READS] = "reads",
    [DP_H_WRITES] = "writes",
    [DP_H_BYTES_READ] = "bytes_read",
    [DP_H_BYTES_WRITTEN] = "bytes_written",
    [DP_H_FLUSHES] = "flushes",
    [DP_H_FDATASYNCS] = "fdatasyncs",
    [DP_H_WRITES_FLUSHED] = "writes_flushed",
};
static const char *const connection_names[] = {
    [DP_G_REQUESTS] = "requests",
    [DP_G_FAST] = "fast",
    [DP_G_FORWARDED] = "forwarded",
    [DP_G_REPLIES] = "replies",
    [DP_G_NOTIFICATIONS] = "notifications",
    [DP_G_FORWARD_ERRORS] = "forward_errors",
    [DP_G_REPLY_ERRORS] = "reply_errors",
    [DP_G_PEAK_ACTIVE] = "peak_active",
    [DP_G_SEND_QUEUED] = "send_queued",
    [DP_G_SEND_RETRIES] = "send_retries",
    [DP_G_PASSTHROUGH_OPENS] = "passthrough_opens",
    [DP_G_URING_REQUESTS] = "uring_requests",
    [DP_G_URING_FORWARDED] = "uring_forwarded",
    [DP_G_URING_LOST] = "uring_lost",
    [DP_G_INTERRUPTS] = "interrupts",
};

#define DP_COUNT_OF(a) (sizeof(a) / sizeof *(a))
_Static_assert(DP_COUNT_OF(image_names) == DP_C_NIMAGE, "a DP_C_* counter without its name in dp_names.c");
_Static_assert(DP_COUNT_OF(handle_names) == DP_H_N, "a DP_H_* counter without its name in dp_names.c");
_Static_assert(DP_COUNT_OF(connection_names) == DP_G_N, "a DP_G_* counter without its name in dp_names.c");

const char *dp_counter_name(int table, int i) {
    const char *const *names = table == DP_COUNTERS_IMAGE ? image_names
                               : table == DP_COUNTERS_HANDLE ? handle_names
                               : table == DP_COUNTERS_CONNECTION ? connection_names : NULL;
    int n = table == DP_COUNTERS_IMAGE ? DP_C_NIMAGE : table == DP_COUNTERS_HANDLE ? DP_H_N : DP_G_N;
    return names && i >= 0 && i < n ? names[i] : NULL;
}
