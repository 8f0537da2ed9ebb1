#!/usr/bin/env bash
# The data plane side by side (issue 11): 4k random read and write, O_DIRECT, on one raw file,
# through every server in one run, each as IOPS:
#   host       the raw file itself (the limit)
#   probe      ../shared/bench/fuse-ceiling (the fastest FUSE server here: the ceiling)
#   qsd        qemu-storage-daemon exporting the raw file over FUSE (driver=raw, cache.direct=on,
#              aio=native: the peer)
#   pt         cachefs --cache none (kernel passthrough, issue 24: the kernel serves the raw image)
#   dp-on      cachefs --cache none --dataplane on --passthrough off (the C data plane serves it)
#   dp-off     cachefs --cache none --dataplane off (pyfuse3 serves everything, as before)
#   dev        dp-on over /dev/fuse (--transport dev)
#   uring      dp-on over FUSE-over-io_uring (--transport uring: as root it sets enable_uring to Y)
#   qdev       dev on a qcow2 copy of the raw file (every cluster allocated), served as q.raw
#   quring     uring on that qcow2
# Usage (root): bench/dataplane.sh [WORKDIR] [SIZE_MB] [RUNTIME_S] [ROUNDS]
# JOBS="randread-qd32 randwrite-qd32 randread-qd1 randwrite-qd1" picks jobs (all O_DIRECT, 4k;
# a job named like read64k-qd1 uses that block size); TARGETS="host pt dp-on" picks targets.
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(realpath -m "${1:-/var/tmp/cachefs-dpbench}"); SZ=${2:-1024}; RT=${3:-6}; ROUNDS=${4:-2}
JOBS=${JOBS:-randread-qd32 randwrite-qd32 randread-qd1 randwrite-qd1}
TARGETS=${TARGETS:-host probe qsd pt dp-on dp-off}
CACHEFS=${CACHEFS:-.venv/bin/cachefs}
PROBE=${PROBE:-$(realpath -m ../shared/bench/fuse-ceiling/mount.sh)}
mkdir -p "$W/img" "$W/qimg" "$W/mnt" "$W/probe"
qsd_pid=""
cleanup() {
  mountpoint -q "$W/mnt" && "$CACHEFS" umount "$W/mnt" || true
  mountpoint -q "$W/probe" && umount "$W/probe" || true
  if [ -n "$qsd_pid" ]; then kill "$qsd_pid" 2>/dev/null || true; wait "$qsd_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT
[ -f "$W/img/t.raw" ] && [ "$(stat -c %s "$W/img/t.raw")" = $((SZ << 20)) ] ||
  dd if=/dev/urandom of="$W/img/t.raw" bs=1M count="$SZ" status=none  # written: no sparse reads

run() { # target file job
  local rw=${3%-qd*} qd=${3##*-qd} engine=libaio bs=4k
  [ "$qd" = 1 ] && engine=psync
  if [[ $rw =~ ^([a-z]+)([0-9]+k)$ ]]; then rw=${BASH_REMATCH[1]}; bs=${BASH_REMATCH[2]}; fi
  fio --name="$3" --filename="$2" --ioengine=$engine --iodepth="$qd" --rw="$rw" --bs=$bs --direct=1 \
      --size=${SZ}M --runtime="$RT" --time_based --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))'
}
target_up() { # target -> F, the file to test (run in this shell: it keeps qsd's pid)
  case $1 in
    host) F="$W/img/t.raw" ;;
    probe) "$PROBE" "$W/img/t.raw" "$W/probe" >"$W/probe.log" 2>&1; F="$W/probe/f" ;;
    qsd) touch "$W/exp.raw"
         qemu-storage-daemon --blockdev driver=file,filename="$W/img/t.raw",node-name=f0,cache.direct=on,aio=native \
           --blockdev driver=raw,file=f0,node-name=n0 \
           --export type=fuse,id=e,node-name=n0,mountpoint="$W/exp.raw",writable=on >"$W/qsd.log" 2>&1 &
         qsd_pid=$!
         for _ in $(seq 100); do grep -q " $W/exp.raw fuse" /proc/mounts && break; sleep 0.1; done
         F="$W/exp.raw" ;;
    dp-on|dp-off) "$CACHEFS" mount "$W/img" "$W/mnt" --cache none --dataplane "${1#dp-}" --passthrough off \
                    --log "$W/cachefs.log" 2>/dev/null; F="$W/mnt/t.raw" ;;
    dev|uring|qdev|quring)
        d="$W/img" F="$W/mnt/t.raw"
        if [ "${1#q}" != "$1" ]; then
          [ -f "$W/qimg/q.qcow2" ] || qemu-img convert -O qcow2 "$W/img/t.raw" "$W/qimg/q.qcow2"
          d="$W/qimg" F="$W/mnt/q.raw"
        fi
        "$CACHEFS" mount "$d" "$W/mnt" --cache none --passthrough off --transport "${1#q}" \
          --log "$W/cachefs.log" 2>/dev/null
        case "$(getfattr --absolute-names --only-values -n user.cachefs.transport "$W/mnt")" in
          "${1#q}"*) ;;
          *) echo "$1: transport is $(getfattr --absolute-names --only-values -n user.cachefs.transport "$W/mnt")" >&2; exit 1 ;;
        esac ;;
    pt) "$CACHEFS" mount "$W/img" "$W/mnt" --cache none --passthrough on --log "$W/cachefs.log" 2>/dev/null
        [ "$(getfattr --only-values -n user.cachefs.passthrough "$W/mnt")" = on ] ||
          { echo "pt: passthrough is off here: $(getfattr --only-values -n user.cachefs.passthrough "$W/mnt")" >&2; exit 1; }
        F="$W/mnt/t.raw" ;;
  esac
}
target_down() {
  case $1 in
    probe) umount "$W/probe" ;;
    qsd) kill "$qsd_pid"; wait "$qsd_pid" 2>/dev/null || true; qsd_pid="" ;;
    dp-*|pt|dev|uring|qdev|quring) "$CACHEFS" umount "$W/mnt" ;;
  esac
}

echo "# $(date -u +%FT%TZ) $(nproc) cpus, ${SZ} MiB raw file, ${RT}s per job, $ROUNDS rounds, IOPS"
printf '%-10s' target; for j in $JOBS; do printf ' %15s' "$j"; done; echo
for round in $(seq "$ROUNDS"); do
  for t in $TARGETS; do
    target_up "$t"
    printf '%-10s' "$t"
    for j in $JOBS; do printf ' %15s' "$(run "$t" "$F" "$j")"; done; echo
    target_down "$t"
  done
done
