"""An LD_PRELOAD shim: the first N large sendmsg(2) calls of a process fail with ENOBUFS (plain helper module).

The data plane forwards a request to libfuse as one SOCK_SEQPACKET message
(cachefs/native/dp_forward.c). The kernel allocates a unix datagram as one
skb whose linear part is all of it but MAX_SKB_FRAGS pages, so a forwarded
1 MiB WRITE needs a ~1 MiB physically contiguous allocation, which fails
with ENOBUFS when memory is fragmented (a long CI run). CI kernels have no
fault injection (CONFIG_FAULT_INJECTION is off), so a test makes the daemon
meet that ENOBUFS through this shim:

- :func:`build`: compile the shim (``cc``, which built the native module) into a directory.
- :func:`env`: the variables that load it into a process and arm it.

Only messages of at least ``MIN_BYTES`` fail, and only the first ``fails``
of them: libfuse's writev, Python's small sendmsg and every later message go
through untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

#: Messages this long or longer are the ones that fail (a forwarded 1 MiB WRITE is).
MIN_BYTES = 256 << 10

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>

static int left;  /* failures still to give */

__attribute__((constructor)) static void arm(void) {
    const char *n = getenv("CACHEFS_TEST_SENDMSG_ENOBUFS");
    left = n ? atoi(n) : 0;
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    static ssize_t (*real)(int, const struct msghdr *, int);
    size_t len = 0;
    if (!real)
        real = (ssize_t (*)(int, const struct msghdr *, int))dlsym(RTLD_NEXT, "sendmsg");
    for (size_t i = 0; i < msg->msg_iovlen; i++)
        len += msg->msg_iov[i].iov_len;
    for (int n = __atomic_load_n(&left, __ATOMIC_ACQUIRE); len >= MIN_BYTES && n > 0;)
        if (__atomic_compare_exchange_n(&left, &n, n - 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            errno = ENOBUFS;
            return -1;
        }
    return real(fd, msg, flags);
}
"""


def build(directory) -> Path:
    """Compile the shim into ``directory``; returns the shared object's path."""
    cc = os.environ.get("CC", "cc").split()
    assert shutil.which(cc[0]), f"{cc[0]} not found: it builds the native module too"
    src, so = Path(directory) / "sendfail.c", Path(directory) / "sendfail.so"
    src.write_text(SOURCE)
    subprocess.run([*cc, "-shared", "-fPIC", "-O2", f"-DMIN_BYTES={MIN_BYTES}u", "-o", so, src, "-ldl"],
                   check=True, capture_output=True, text=True)
    return so


def env(so: Path, fails: int) -> dict[str, str]:
    """The environment entries that load ``so`` and fail the first ``fails`` large sendmsg calls."""
    preload = " ".join(p for p in (str(so), os.environ.get("LD_PRELOAD", "")) if p)
    return {"LD_PRELOAD": preload, "CACHEFS_TEST_SENDMSG_ENOBUFS": str(fails)}
