"""fio jobs through a mount, verified (plain helper module; the qemu-img check after is interop.check_clean).

- :func:`fio`: one fio job with crc32c verification; fails the test on any
  error or verify failure; prints the throughput lines (pytest -s shows them).
- :data:`FIO_DIRECT`: the options of a QD32 O_DIRECT job (libaio).
- :func:`switch_modes_under_fio`: live cache-mode switches while such a job runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

from conftest import run


def fio(filename, *args) -> str:
    # fio may drop a verify-state file into its working directory: keep it in the test dir.
    r = run("fio", "--name=job", f"--filename={filename}", "--ioengine=psync", "--verify=crc32c",
            "--verify_state_save=0", "--output-format=normal", *args, check=False, timeout=120,
            cwd=os.path.dirname(os.path.dirname(filename)))  # the mountpoint's parent
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"fio exited {r.returncode}:\n{out}"
    assert not re.search(r"verify.*(fail|bad|error)|bad (magic|header)", out, re.IGNORECASE), out
    assert re.search(r"err= *0", out), out
    for line in out.splitlines():
        if re.match(r"\s+(read|write): IOPS=", line):
            print(f"fio {' '.join(args)}:{line}")
    return out




FIO_DIRECT = ("--ioengine=libaio", "--direct=1", "--iodepth=32")


def switch_modes_under_fio(m, f, *, number_ios: int, extra: tuple[str, ...] = ()) -> None:
    """Switch the cache mode of ``f`` every 50 ms while fio writes and verifies at QD32 (``extra``:
    more fio options, e.g. --sync=1)."""
    job = subprocess.Popen(
        ["fio", "--name=job", f"--filename={f}", *FIO_DIRECT, *extra, "--rw=randwrite", "--bs=4k", "--size=64M",
         f"--number_ios={number_ios}", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=m.path.parent)
    switches = 0
    modes = ["none", "writethrough", "directsync", "unsafe", "writeback"]
    try:
        while job.poll() is None:
            os.setxattr(f, "user.cachefs.cache", modes[switches % len(modes)].encode())
            switches += 1
            time.sleep(0.05)
    finally:
        out = job.communicate(timeout=120)[0]
    assert job.returncode == 0 and "err= 0" in out and "verify" not in out.lower().replace("verify=", ""), out
    assert switches >= 3, f"fio ended before the switches ({switches}):\n{out}"
