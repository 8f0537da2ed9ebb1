"""Fuzzing in CI (issue 19): every target of fuzz/ for its share of about 30 s, and the corpus replayed.

The long runs are `make fuzz` (a million executions, fuzz/main.py). Here:

- each target runs under atheris for SMOKE_SECONDS / len(TARGETS), starting
  from its seed corpus, in a subprocess (libFuzzer exits the process on a
  crash); a crash, a hang (-timeout) or a blown memory limit fails the test;
- every input of the corpus is replayed in-process through the targets that
  take it (the whole-image targets each take every image), including the
  crash-* inputs of bugs fuzzing found and that were fixed;
- for each of those bugs, the behaviour the fix promises, asserted directly.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cachefs.errors import CorruptImage, DamagedMetadata  # noqa: E402
from cachefs.qcow2 import snapshots  # noqa: E402
from cachefs.qcow2.check import check_image  # noqa: E402
from cachefs.qcow2.format import read_header  # noqa: E402
from cachefs.qcow2.engine import open_engine  # noqa: E402
from cachefs.qcow2.plan import ExtentKind, run_sync  # noqa: E402
from fuzz.harness import MemFile  # noqa: E402
from fuzz.main import TARGETS, load  # noqa: E402

CORPUS = REPO / "fuzz" / "corpus"
WHOLE_IMAGE = ("header", "check", "engine")
SMOKE_SECONDS = 24  # plus about 1.5 s of start-up per target: ~30 s in all


def corpus_of(target: str) -> list[pathlib.Path]:
    """The inputs a target takes: its own, and for a whole-image target every image of the others."""
    dirs = WHOLE_IMAGE if target in WHOLE_IMAGE else (target,)
    seen, out = set(), []
    for p in sorted(p for d in dirs for p in (CORPUS / d).iterdir()):
        data = p.read_bytes()
        if data not in seen:
            seen.add(data)
            out.append(p)
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays(target):
    one = load(target)
    inputs = corpus_of(target)
    assert inputs, f"fuzz/corpus/{target} is empty"
    for p in inputs:
        try:
            one(p.read_bytes())
        except Exception as exc:  # name the input that broke
            raise AssertionError(f"{target}: {p.relative_to(REPO)}: {type(exc).__name__}: {exc}") from exc


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_smoke(target, tmp_path):
    pytest.importorskip("atheris")
    seconds = SMOKE_SECONDS // len(TARGETS)
    r = subprocess.run(
        [sys.executable, "-m", "fuzz.main", target, f"-max_total_time={seconds}", "-timeout=10",
         "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/", str(tmp_path), str(CORPUS / target)],
        cwd=REPO, capture_output=True, text=True, timeout=seconds + 90)
    crashes = [p.name for p in tmp_path.iterdir() if p.name.split("-")[0] in ("crash", "timeout", "oom", "leak")]
    assert r.returncode == 0 and not crashes, f"{target}: {crashes}\n{r.stderr[-6000:]}"
    assert "Done" in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------- what the fixes promise

def open_crash(target: str, name: str, *, writable: bool):
    f = MemFile((CORPUS / target / name).read_bytes())
    return f, f.run(open_engine(len(f), writable=writable, cache_bytes=2048))


def test_l1_entry_at_refcount_block_is_damaged():
    """An L1 entry naming a cluster the refcount table also names (cluster.ClusterMap.l2_offset):
    its guest range is DAMAGED (EIO), writes there fail, the refcount block is left alone."""
    f, eng = open_crash("engine", "crash-l1-points-at-refblock", writable=True)
    reach = eng.cs * eng.cs // 8
    extents = f.run(eng.plan_read(0, min(reach, eng.size)))
    assert [e.kind for e in extents] == [ExtentKind.DAMAGED]
    with pytest.raises(DamagedMetadata, match="refcount block"):
        f.run(eng.plan_write(0, b"x" * 100))


def check_crash(name: str):
    f = MemFile((CORPUS / "check" / name).read_bytes())
    return f.run(check_image(len(f)))


def test_bitmap_directory_too_large_is_refused():
    """A bitmaps extension whose directory size is beyond QEMU's limit (check.walk_bitmaps): refused in
    one line, as QEMU refuses to open it, instead of a read of 2^48 bytes (MemoryError on a file)."""
    with pytest.raises(CorruptImage, match="bitmap directory size 281474976710688 exceeds the limit"):
        check_crash("crash-bitmap-directory-size")


def test_snapshot_l1_offset_past_int64_is_corruption():
    """A snapshot whose L1 table offset is past 2^63 (check.walk_snapshots): a corruption the check
    reports, as qcow2_validate_table does, instead of os.pread's OverflowError."""
    result = check_crash("crash-snapshot-l1-offset")
    assert any("L1 table offset invalid" in c for c in result.corruptions), result.corruptions


def test_snapshot_l1_past_eof_is_not_read():
    """Snapshots whose L1 tables claim 4M entries past the end of the file (check.walk_l1): only the
    part inside the file is read and walked (the rest reads as zeros), not 32 MiB per snapshot
    (0.7 s for this 6 KiB image before; a timeout under the fuzzer)."""
    data = (CORPUS / "check" / "slow-snapshot-l1-past-eof").read_bytes()
    asked = []

    def pread(offset, length):
        asked.append(length)
        return data[offset:offset + length]
    result = run_sync(check_image(len(data)), pread)
    assert result.corruptions and sum(asked) < 64 * len(data), sum(asked)


def test_snapshot_extra_data_over_qemus_limit_is_refused():
    """A snapshot table entry with 500 MB of extra data (snapshots.read_table, `cachefs info`):
    refused in one line, as QEMU refuses it, instead of a read that size."""
    f = MemFile((CORPUS / "header" / "crash-snapshot-extra-data").read_bytes())
    hdr = f.run(read_header(len(f)))
    with pytest.raises(CorruptImage, match="bytes of extra data, over 1024"):
        f.run(snapshots.read_table(hdr, len(f)))
