#!/usr/bin/env bash
# Compress-on-write (issue 13, seed 003) beside qemu-storage-daemon's compress filter.
#
#   bench/compress.sh [WORKDIR] [SIZE_MB]        (default /var/tmp/cachefs-compress-bench, 1000)
#
# The seed's workload: SIZE_MB of 0x01 bytes written with dd oflag=direct into
# the exported file, bs=64k and again bs=1M, then a realistic corpus (an ext4
# image of real files: /usr/share/doc, /usr/lib/python3.*, /usr/share/locale,
# made with mke2fs -d) with bs=1M. Each job on a fresh image:
#   qsd      qemu-storage-daemon: file (cache.direct=on, aio=native) -> qcow2 -> compress filter,
#            exported over FUSE (as ../shared/bench/anchors.sh runs it);
#   cachefs  cachefs create --compress, mounted with --cache none.
# Per job: dd's wall time (conv=fsync, so the data is durable), the image
# file's bytes in the host page cache right after (fincore), the image's size,
# qemu-img check. CORPUS_MB and CORPUS_SRC change the corpus (512, those
# directories). The corpus is also converted with qemu-img convert -c, the
# ratio reference. Every job runs for each of ALGORITHMS (default "zlib zstd":
# qsd's image made with -o compression_type=, cachefs's with --compress).
# Not a test: run it on a quiet machine.
set -euo pipefail
W=$(realpath -m "${1:-/var/tmp/cachefs-compress-bench}"); SZ=${2:-1000}
REPO=$(dirname "$(dirname "$(realpath "$0")")")
CACHEFS=${CACHEFS:-$REPO/.venv/bin/cachefs}
mkdir -p "$W"; cd "$W"
pids=()
cleanup() {
  local p
  for p in "${pids[@]:-}"; do [ -n "$p" ] && { kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; }; done
  pids=()
  if mountpoint -q "$W/mnt"; then "$CACHEFS" umount "$W/mnt" || true; fi
}
trap cleanup EXIT
wait_mount() { for _ in $(seq 100); do grep -q " $1 fuse" /proc/mounts && return 0; sleep 0.1; done; echo "no mount at $1" >&2; return 1; }

# ---- inputs
[ -f ones.raw ] && [ "$(stat -c %s ones.raw)" = $((SZ << 20)) ] || head -c "${SZ}M" /dev/zero | tr '\0' '\1' > ones.raw
if [ ! -f corpus.raw ]; then
  rm -rf corpus.d; mkdir corpus.d
  cp -a ${CORPUS_SRC:-/usr/share/doc /usr/lib/python3.* /usr/share/locale} corpus.d/ 2>/dev/null || true
  truncate -s "${CORPUS_MB:-512}M" corpus.raw; mke2fs -q -t ext4 -d corpus.d -F corpus.raw; rm -rf corpus.d
fi
cat ones.raw corpus.raw > /dev/null  # the source reads come from the page cache in every job
CORPUS_MB=$(( $(stat -c %s corpus.raw) >> 20 ))

timed_dd() { # src dst bs count
  local t0 t1
  t0=$(date +%s.%N)
  dd if="$1" of="$2" bs="$3" count="$4" iflag=fullblock oflag=direct conv=notrunc,fsync status=none
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.2f}')"
}
drop() { python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)" "$1"; }
res() { fincore --bytes --noheadings --output RES "$1" | tr -d ' '; }
checked() { qemu-img check "$1" >/dev/null 2>&1 && echo clean || echo "NOT CLEAN"; }

run_qsd() { # src bs count_mb size_mb
  rm -f q.qcow2 exp.raw; qemu-img create -q -f qcow2 -o compression_type="$ALG" q.qcow2 "$4M"; touch exp.raw
  drop q.qcow2  # qemu-img create writes through the page cache; cachefs create drops what it wrote
  qemu-storage-daemon \
    --blockdev driver=file,filename=q.qcow2,node-name=f0,cache.direct=on,aio=native \
    --blockdev driver=qcow2,file=f0,node-name=n0 \
    --blockdev driver=compress,file=n0,node-name=c0 \
    --export type=fuse,id=e,node-name=c0,mountpoint="$W/exp.raw",writable=on > qsd.log 2>&1 &
  pids+=($!); wait_mount "$W/exp.raw"
  local t; t=$(timed_dd "$1" exp.raw "$2" $(( $3 * (1 << 20) / $(numfmt --from=iec "${2^^}") )))
  local r; r=$(res q.qcow2)
  cleanup
  echo "$t $r $(stat -c %s q.qcow2) $(checked q.qcow2)"
}

run_cachefs() { # src bs count_mb size_mb
  rm -rf imgs mnt; mkdir -p imgs mnt
  "$CACHEFS" create --compress "$ALG" imgs/c.qcow2 "$4M" >/dev/null
  "$CACHEFS" mount imgs mnt --cache none --log "$W/cachefs.log" 2>/dev/null
  local t; t=$(timed_dd "$1" mnt/c.raw "$2" $(( $3 * (1 << 20) / $(numfmt --from=iec "${2^^}") )))
  local r; r=$(res imgs/c.qcow2)
  "$CACHEFS" umount mnt
  echo "$t $r $(stat -c %s imgs/c.qcow2) $(checked imgs/c.qcow2)"
}

echo "# bench/compress.sh  $(date -u +%FT%TZ)  $(nproc) cpus  load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $(qemu-storage-daemon --version | head -1); cachefs $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"
printf '%-30s %-8s %9s %12s %12s %6s  %s\n' job target seconds page_cache image_bytes x_qsd check
job() { # name src bs mb
  local q c
  q=($(run_qsd "$2" "$3" "$4" "$4")); c=($(run_cachefs "$2" "$3" "$4" "$4"))
  printf '%-30s %-8s %9s %12s %12s %6s  %s\n' "$ALG $1" qsd "${q[0]}" "${q[1]}" "${q[2]}" "" "${q[3]} ${q[4]:-}"
  printf '%-30s %-8s %9s %12s %12s %6s  %s\n' "$ALG $1" cachefs "${c[0]}" "${c[1]}" "${c[2]}" \
    "$(python3 -c "print(f'{${c[0]} / ${q[0]}:.2f}')")" "${c[3]} ${c[4]:-}"
  [ "$1" != corpus-bs1M ] || cp imgs/c.qcow2 corpus-cachefs.qcow2
}
ratio() {
t0=$(date +%s.%N); rm -f ref.qcow2; qemu-img convert -c -o compression_type="$ALG" -O qcow2 corpus.raw ref.qcow2; t1=$(date +%s.%N)
ours=$(stat -c %s corpus-cachefs.qcow2); ref=$(stat -c %s ref.qcow2)
qemu-img compare -q corpus-cachefs.qcow2 corpus.raw && same=identical || same=DIFFERENT
python3 - "$ours" "$ref" "$(( CORPUS_MB << 20 ))" "$t0" "$t1" "$same" "$ALG" <<'PY'
import sys
ours, ref, guest, t0, t1, same = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
print(f"{sys.argv[7]} corpus ratio: cachefs {guest / ours:.3f}:1 ({ours} bytes), qemu-img convert -c {guest / ref:.3f}:1 "
      f"({ref} bytes, {t1 - t0:.2f} s); cachefs image {100 * (ours - ref) / ref:+.2f}% vs qemu-img; content {same}")
PY
}
for ALG in ${ALGORITHMS:-zlib zstd}; do
  job "ones-${SZ}M-bs64k" ones.raw 64k "$SZ"
  job "ones-${SZ}M-bs1M" ones.raw 1M "$SZ"
  job corpus-bs1M corpus.raw 1M "$CORPUS_MB"
  ratio
done
