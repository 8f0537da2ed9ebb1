#!/usr/bin/env bash
# Issue 22's benchmark, in one run on one machine: a qemu-img-made chain (data in the base, the
# overlay fresh) served by cachefs and by qemu-storage-daemon (the peer), O_DIRECT fio:
#
#   randread-base-qd32   4k random reads QD32 of data that lives in the base, through the overlay
#                        (target: >= 0.9x the same reads on the base served alone by cachefs,
#                        and >= 1.3x qsd)
#   cow-write-qd32       first 4k writes into base clusters (copy on write), QD32, on a fresh
#                        overlay each time (target: >= 1.0x qsd)
#
# Usage: bench/backing.sh [WORKDIR] [SIZE_MB]   (root; RUNTIME=15 seconds per read job)
# CACHEFS: the cachefs command (default .venv/bin/cachefs). Prints one line per job and target,
# then the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHEFS=${CACHEFS:-$PWD/.venv/bin/cachefs}
W=$(realpath -m "${1:-/var/tmp/cachefs-bench-backing}"); SZ=${2:-1024}; RUNTIME=${RUNTIME:-15}
rm -rf "$W"; mkdir -p "$W"/{chain,alone,mnt,mnt-alone}; cd "$W"
pids=()
cleanup() {
  for m in "$W/mnt" "$W/mnt-alone"; do mountpoint -q "$m" && "$CACHEFS" umount "$m" || true; done
  for p in "${pids[@]:-}"; do [ -n "$p" ] && { kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; }; done
  pids=()
}
trap cleanup EXIT

iops() { python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))' "$1"; }
fio_job() { # tag file name fio-args...: prints "tag name IOPS"
  local tag=$1 f=$2 name=$3; shift 3
  fio --name="$name" --filename="$f" --output-format=json --direct=1 --ioengine=io_uring --bs=4k \
      --iodepth=32 "$@" > "$tag.$name.json"
  echo "$tag $name $(iops "$tag.$name.json")" | tee -a results.txt
}
read_job() {  # a 3 s warm-up first: a qcow2 base's L2 tables are published to C once Python loaded them
  fio --name=warm --filename="$2" --direct=1 --ioengine=io_uring --bs=4k --iodepth=32 --rw=randread \
      --size=${SZ}M --runtime=3 --time_based --output-format=json > /dev/null
  fio_job "$1" "$2" randread-base-qd32 --rw=randread --size=${SZ}M --runtime=$RUNTIME --time_based
}
cow_job() { fio_job "$1" "$2" cow-write-qd32 --rw=randwrite --size=${SZ}M --number_ios=20000 --randrepeat=1; }
fresh_overlay() { rm -f chain/vm.qcow2; qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 chain/vm.qcow2; }

echo "# backing chains: ${SZ} MiB base of data, $(date -u +%FT%TZ), $(nproc) cpus" | tee results.txt
head -c $((SZ << 20)) /dev/urandom > src.raw
qemu-img convert -O qcow2 src.raw chain/base.qcow2 && rm src.raw
ln chain/base.qcow2 alone/base.qcow2  # the same file, served alone by a second mount

# cachefs: the base alone, then the chain.
"$CACHEFS" mount --cache none --aio io_uring alone mnt-alone
read_job cachefs-base-alone mnt-alone/base.raw
"$CACHEFS" umount mnt-alone
fresh_overlay
"$CACHEFS" mount --cache none --aio io_uring chain mnt
read_job cachefs mnt/vm.raw
"$CACHEFS" umount mnt
fresh_overlay
"$CACHEFS" mount --cache none --aio io_uring chain mnt
cow_job cachefs mnt/vm.raw
"$CACHEFS" umount mnt
qemu-img check -q chain/vm.qcow2 && echo "cachefs overlay: qemu-img check clean"

# qemu-storage-daemon exporting the same chain over FUSE (it opens the backing file itself).
qsd() {
  touch exp.raw
  qemu-storage-daemon --blockdev driver=file,filename=chain/vm.qcow2,node-name=f0,cache.direct=on,aio=io_uring \
    --blockdev driver=qcow2,file=f0,node-name=n0,cache.direct=on \
    --export type=fuse,id=e,node-name=n0,mountpoint="$W/exp.raw",writable=on > qsd.log 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do grep -q " $W/exp.raw fuse" /proc/mounts && return 0; sleep 0.1; done
  echo "qsd did not export" >&2; cat qsd.log >&2; return 1
}
fresh_overlay; qsd; read_job qsd exp.raw; cleanup
fresh_overlay; qsd; cow_job qsd exp.raw; cleanup

python3 - results.txt <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    if not line.startswith("#"):
        tag, job, iops = line.split()
        r[tag, job] = int(iops)
read, cow = "randread-base-qd32", "cow-write-qd32"
print(f"randread of base data, overlay / base alone (cachefs): {r['cachefs', read] / r['cachefs-base-alone', read]:.2f}x (target >= 0.9)")
print(f"randread of base data, cachefs / qsd: {r['cachefs', read] / r['qsd', read]:.2f}x (target >= 1.3)")
print(f"copy-on-write first writes, cachefs / qsd: {r['cachefs', cow] / r['qsd', cow]:.2f}x (target >= 1.0)")
PY
