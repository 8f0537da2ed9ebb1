#!/usr/bin/env bash
# Reads of backing-chain data (issue 22, "Data plane"): 4k random reads at QD32, O_DIRECT, of data
# that lives in the base, through an overlay and through the base itself, one mount, side by side:
#   base.raw    a raw base filled with random bytes, served alone (the target to match)
#   vm.raw      vm.qcow2, an empty qcow2 overlay on base.raw
#   base2.raw   base2.qcow2, the same bytes as a qcow2 image (64 KiB clusters)
#   vm2.raw     vm2.qcow2, an empty qcow2 overlay on base2.qcow2
# The issue's target: overlay >= 0.9x its base. Each target gets a 3 s warm-up first (a qcow2
# base's L2 tables are published once Python has loaded them).
# Usage (root): bench/backing.sh [WORKDIR] [SIZE_MB] [RUNTIME_S]
# CACHEFS="python -m cachefs.cli.main" (with PYTHONPATH) runs another tree's cachefs.
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(realpath -m "${1:-/var/tmp/cachefs-dpback}"); SZ=${2:-1024}; RT=${3:-15}
CACHEFS=${CACHEFS:-.venv/bin/cachefs}
mkdir -p "$W/img" "$W/mnt"
cleanup() { mountpoint -q "$W/mnt" && $CACHEFS umount "$W/mnt" || true; }
trap cleanup EXIT
if [ ! -f "$W/img/base.raw" ] || [ "$(stat -c %s "$W/img/base.raw")" != $((SZ << 20)) ]; then
  rm -f "$W/img/"*
  dd if=/dev/urandom of="$W/img/base.raw" bs=1M count="$SZ" status=none
  qemu-img convert -O qcow2 "$W/img/base.raw" "$W/img/base2.qcow2"
fi
# Fresh overlays every run: nothing allocated in them, every read goes to the base.
rm -f "$W/img/vm.qcow2" "$W/img/vm2.qcow2"
qemu-img create -q -f qcow2 -b base.raw -F raw "$W/img/vm.qcow2"
qemu-img create -q -f qcow2 -b base2.qcow2 -F qcow2 "$W/img/vm2.qcow2"

job() { # file runtime -> IOPS
  fio --name=r --filename="$1" --direct=1 --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring \
      --runtime="$2" --time_based --size=${SZ}M --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))'
}
$CACHEFS mount "$W/img" "$W/mnt" --cache none --dataplane on --log "$W/cachefs.log" 2>/dev/null
echo "# $(date -u +%FT%TZ) $(nproc) cpus, ${SZ} MiB base, ${RT}s per job, 4k randread QD32 O_DIRECT io_uring, IOPS"
for t in base vm base2 vm2; do
  job "$W/mnt/$t.raw" 3 >/dev/null
  printf '%-6s %8s   %s\n' "$t" "$(job "$W/mnt/$t.raw" "$RT")" \
    "$(getfattr --only-values -n user.cachefs.stats.fast_reads "$W/mnt/$t.raw" 2>/dev/null) fast reads"
done
