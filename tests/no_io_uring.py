"""Run a command with io_uring denied, as Docker's default seccomp profile does.

    python tests/no_io_uring.py CMD [ARGS...]

Installs a seccomp filter that makes io_uring_setup(2) fail with EPERM (the
errno kernel.io_uring_disabled=2 gives too), then execs CMD. The filter is
inherited across fork and exec, so a `cachefs mount` daemon started under
it meets a kernel that refuses rings, while the rest of the machine is
untouched (flipping the sysctl would be global, and other jobs may be
using io_uring). Plain ctypes and classic BPF: no libseccomp needed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
NR_IO_URING_SETUP = 425  # the same on every architecture's table since Linux 5.1
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def deny_io_uring() -> None:
    """Make io_uring_setup fail with EPERM in this process and its children."""
    arch = AUDIT_ARCH[platform.machine()]
    prog = b"".join([
        _insn(BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        _insn(BPF_JEQ_K, 0, 3, arch),  # another ABI (x32, compat): allow
        _insn(BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        _insn(BPF_JEQ_K, 0, 1, NR_IO_URING_SETUP),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ])
    filters = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(filters))
    libc = ctypes.CDLL(None, use_errno=True)
    for args in ((PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                 (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0)):
        if libc.prctl(*[ctypes.c_ulong(a) for a in args]) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl{args[:2]}: {os.strerror(err)}")


if __name__ == "__main__":
    deny_io_uring()
    os.execvp(sys.argv[1], sys.argv[1:])
