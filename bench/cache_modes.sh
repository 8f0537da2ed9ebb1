#!/usr/bin/env bash
# Seed 001's claim, measured: "unsafe is about 25% faster than writeback for
# a flush-heavy workload". One fio job -- 4k random writes, psync, iodepth 1,
# an fdatasync every 8 writes, time based, over the first REGION of a fresh
# 1 GiB image -- in every cache mode, on three targets:
#   host     a plain file in the work dir (the limit)
#   qsd      qemu-storage-daemon exporting a fresh qcow2 over FUSE, with the
#            mode's cache options (the peer). Its fdatasync/fsync calls are
#            counted in a separate pass (round "C", COUNT=0 skips it) under
#            strace -f -c --seccomp-bpf: a tracer slows qsd (measured here: plain
#            strace -f ~8x in writeback; even --seccomp-bpf 1.6-9x in unsafe, where
#            qsd makes no fdatasync at all), so traced runs give no IOPS.
#   cachefs  a fresh qcow2 mounted with `cachefs mount --cache MODE`; counts
#            from its user.cachefs.stats.* xattrs, read before unmount
# Within a round, each mode runs host, qsd and cachefs back to back, and the
# order of the three rotates from round to round, so drift hits all equally.
#
# Mode -> job and options (direct=1 where the guest of such a drive opens O_DIRECT;
# qsd's cache.* options go on both the file and the qcow2 node, as -drive cache= does):
#   writeback    direct=0 | qsd cache.direct=off,cache.no-flush=off,aio=threads
#   unsafe       direct=0 | qsd cache.direct=off,cache.no-flush=on,aio=threads
#   writethrough direct=0 | qsd has no writethrough export: emulated by fio sync=dsync
#                           (O_DSYNC opens on the export, also on host); cachefs plain job
#   none         direct=1 | qsd cache.direct=on,aio=native
#   directsync   direct=1 | qsd cache.direct=on,aio=native + fio sync=dsync (also on host);
#                           cachefs plain direct job
#
# Environment (defaults): WORK=/var/tmp/cachefs-modes  RUNTIME=15 (s)  REGION=256M
#   IMG_SIZE=1024M  FSYNC_EVERY=8  ROUNDS=3  COUNT=1
#   MODES="writeback unsafe writethrough none directsync"  RESULTS=$WORK/results.md
#   CACHEFS="env PYTHONPATH=WORK/src REPO/.venv/bin/python -m cachefs.cli" (WORK/src:
#   a copy of REPO/cachefs taken at the start)
# Quick run: RUNTIME=3 ROUNDS=1 bench/cache_modes.sh
# Needs root, fio, qemu-img, qemu-storage-daemon, strace, getfattr, fusermount3.
# The host file is fresh and sparse, like the images: its first writes allocate.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); REPO=$(dirname "$HERE")
WORK=$(realpath -m "${WORK:-/var/tmp/cachefs-modes}")
RUNTIME=${RUNTIME:-15}; REGION=${REGION:-256M}; IMG_SIZE=${IMG_SIZE:-1024M}
FSYNC_EVERY=${FSYNC_EVERY:-8}; ROUNDS=${ROUNDS:-3}
MODES=${MODES:-"writeback unsafe writethrough none directsync"}
RESULTS=${RESULTS:-$WORK/results.md}
# cachefs runs from a copy of the package taken at the start, so edits to the
# tree during the run cannot mix two versions of cachefs into one table.
SRC=$WORK/src
# (-P: without it `python -m` puts the working directory -- the repo, under make -- first on sys.path)
CACHEFS=${CACHEFS:-"env PYTHONPATH=$SRC $REPO/.venv/bin/python -P -m cachefs.cli"}
read -ra CFS <<< "$CACHEFS"
HELPER=(python3 "$HERE/cache_modes_report.py")
DEADLINE=$((RUNTIME * 2 + 60))  # a fio job still running after this is a hang

OUT=$WORK/out; HOSTF=$WORK/host.raw; QDIR=$WORK/qsd; QEXP=$WORK/qsd/exp.raw
CIMGS=$WORK/cachefs/imgs; CMNT=$WORK/cachefs/mnt
TSV=$OUT/results.tsv; CMDS=$OUT/commands.txt

die() { echo "cache_modes.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (strace, FUSE mounts)"
for t in fio qemu-img qemu-storage-daemon strace getfattr fusermount3 python3; do
  command -v "$t" >/dev/null || die "missing $t"
done
mounted() { grep -q " $1 fuse" /proc/mounts; }
alive() { # PID -> 0 while it runs (a zombie waiting for its reaper does not count)
  [ -n "$1" ] && [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}
mounted "$CMNT" && die "$CMNT is still mounted (an earlier run?); unmount it first"
mounted "$QEXP" && die "$QEXP is still mounted (an earlier run?); unmount it first"
mkdir -p "$WORK" "$QDIR" "$CIMGS" "$CMNT" "$OUT"
rm -f "$OUT"/* "$HOSTF" "$QDIR"/*.qcow2 "$CIMGS"/*
rm -rf "$SRC"; mkdir -p "$SRC"
( cd "$REPO" && tar cf - --exclude=__pycache__ cachefs ) | tar xf - -C "$SRC" || die "cannot copy $REPO/cachefs"
# What was copied: the commit, and a hash of any uncommitted change to cachefs/.
SRC_ID=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "?")
if ! git -C "$REPO" diff --quiet HEAD -- cachefs 2>/dev/null; then
  SRC_ID="$SRC_ID + uncommitted changes to $(git -C "$REPO" diff --name-only HEAD -- cachefs | tr '\n' ' ')(diff sha1 $(git -C "$REPO" diff HEAD -- cachefs | sha1sum | cut -c1-12))"
fi
[ -n "$(git -C "$REPO" ls-files --others --exclude-standard -- cachefs 2>/dev/null)" ] && SRC_ID="$SRC_ID + untracked: $(git -C "$REPO" ls-files --others --exclude-standard -- cachefs | tr '\n' ' ')"

# ---------------------------------------------------------------- cleanup
QSD_PID=; QSD_JOB=; CFS_PID=; TAG="- - -"
stop_qsd() { # SIGTERM to qsd; its wrapper (strace, or qsd itself) exits after it
  if [ -n "$QSD_JOB" ]; then
    [ -n "$QSD_PID" ] && kill "$QSD_PID" 2>/dev/null
    local i; for i in $(seq 100); do alive "$QSD_JOB" || break; sleep 0.1; done
    if alive "$QSD_JOB"; then
      [ -n "$QSD_PID" ] && kill -KILL "$QSD_PID" 2>/dev/null; sleep 0.5; kill "$QSD_JOB" 2>/dev/null
    fi
    wait "$QSD_JOB" 2>/dev/null
  fi
  mounted "$QEXP" && { fusermount3 -u "$QEXP" 2>/dev/null || fusermount3 -u -z "$QEXP"; }
  QSD_PID=; QSD_JOB=
}
stop_cachefs() { # -> 0 when the clean unmount worked
  local rc=0
  if mounted "$CMNT"; then
    timeout 200 "${CFS[@]}" umount "$CMNT" --timeout 150 >>"$OUT/umount.log" 2>&1 || rc=$?
  fi
  if mounted "$CMNT" || alive "$CFS_PID"; then
    [ "$rc" = 0 ] && rc=1
    [ -n "$CFS_PID" ] && kill -KILL "$CFS_PID" 2>/dev/null
    sleep 0.5
    mounted "$CMNT" && { fusermount3 -u "$CMNT" 2>/dev/null || fusermount3 -u -z "$CMNT"; }
  fi
  CFS_PID=
  return "$rc"
}
cleanup() { stop_qsd; stop_cachefs >/dev/null 2>&1; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helpers
wait_mount() { local i; for i in $(seq 150); do mounted "$1" && return 0; sleep 0.1; done; return 1; }
logcmd() { printf '%s\t%s\n' "$TAG" "$*" >> "$CMDS"; }  # TAG: "round mode target"
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" "$(cut -d' ' -f1 /proc/loadavg)" >> "$TSV"; }
settle() { sync; sleep 1; }

# fio_args MODE TARGET FILE -> the job, in FIO (an array)
fio_args() {
  local mode=$1 target=$2 file=$3 direct=0 dsync=0
  case $mode in none|directsync) direct=1 ;; esac
  case $mode in writethrough|directsync) [ "$target" != cachefs ] && dsync=1 ;; esac
  FIO=(fio --name="randwrite4k-fdatasync$FSYNC_EVERY" --filename="$file" --ioengine=psync --iodepth=1
       --rw=randwrite --bs=4k --size="$REGION" --fdatasync="$FSYNC_EVERY" --time_based
       --runtime="$RUNTIME" --direct=$direct --output-format=json)
  [ $dsync = 1 ] && FIO+=(--sync=dsync)
  return 0
}

# run_fio JSON VICTIM_PID -> 0 ok, 124 hang (VICTIM, the server, is killed
# first so a fio stuck in a FUSE request can return), else fio's status.
run_fio() {
  local json=$1 victim=$2 t=0 p
  logcmd "${FIO[*]}"
  "${FIO[@]}" > "$json" 2> "$json.err" & p=$!
  while kill -0 "$p" 2>/dev/null; do
    if [ $t -ge $((DEADLINE * 10)) ]; then
      echo "  fio still running after ${DEADLINE}s: treating as a hang" >&2
      if [ -n "$victim" ]; then
        { echo "# threads of server $victim at the deadline (comm wchan)"
          for d in /proc/"$victim"/task/*; do echo "$(cat "$d/comm" 2>/dev/null) $(cat "$d/wchan" 2>/dev/null)"; done
        } > "$json.hang" 2>&1
        kill -KILL "$victim" 2>/dev/null
      fi
      sleep 1; kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null
      return 124
    fi
    sleep 0.1; t=$((t + 1))
  done
  wait "$p"
}

check_image() { # image -> "clean" or "qemu-img check rc=N"
  local rc=0
  qemu-img check -q "$1" > "$2" 2>&1 || rc=$?
  if [ $rc = 0 ]; then echo clean; else echo "qemu-img check rc=$rc"; fi
}

# ---------------------------------------------------------------- targets
run_host() { # round mode
  local r=$1 m=$2 tag="r$1.$2.host" iops writes status note=-
  rm -f "$HOSTF"; truncate -s "$IMG_SIZE" "$HOSTF"; logcmd "truncate -s $IMG_SIZE $HOSTF"
  fio_args "$m" host "$HOSTF"
  if run_fio "$OUT/$tag.json" "" && read -r iops writes < <("${HELPER[@]}" fio "$OUT/$tag.json"); then
    row "$r" "$m" host ok "$iops" "$writes" $((writes / FSYNC_EVERY)) - - "$note"
  else
    status="fio failed: $(tail -1 "$OUT/$tag.json.err" 2>/dev/null)"
    row "$r" "$m" host "$status" - - - - - "$note"
  fi
  rm -f "$HOSTF"
  echo "  host    $(tail -1 "$TSV" | cut -f4,5 | tr '\t' ' ') IOPS"
}

# run_qsd ROUND MODE [count]: the IOPS run is untraced; with "count" (a
# separate pass) qsd runs under strace to count its fdatasync/fsync calls.
run_qsd() {
  local r=$1 m=$2 what=${3:-qsd} s direct=off noflush=off aio=threads note=- iops writes syncs=- check rc
  local tag="r$1.$2.$what"
  case $m in none|directsync) direct=on; aio=native ;; unsafe) noflush=on ;; esac
  case $m in writethrough) note="qsd has no writethrough export: host and qsd get fio sync=dsync (O_DSYNC opens), cachefs the plain job; cachefs writes through an O_DSYNC backend, so 0 fdatasyncs is by design" ;;
             directsync) note="host and qsd get fio sync=dsync (O_DSYNC opens), cachefs the plain job; cachefs writes through an O_DIRECT|O_DSYNC backend, so 0 fdatasyncs is by design" ;;
             unsafe) note="host: same job as writeback (a plain file cannot ignore flushes)" ;; esac
  rm -f "$QDIR/t.qcow2"; touch "$QEXP"
  qemu-img create -q -f qcow2 "$QDIR/t.qcow2" "$IMG_SIZE"; logcmd "qemu-img create -q -f qcow2 $QDIR/t.qcow2 $IMG_SIZE"
  local cmd=(qemu-storage-daemon
             --blockdev "driver=file,filename=$QDIR/t.qcow2,node-name=f0,cache.direct=$direct,cache.no-flush=$noflush,aio=$aio"
             --blockdev "driver=qcow2,file=f0,node-name=n0,cache.direct=$direct,cache.no-flush=$noflush"
             --export "type=fuse,id=e,node-name=n0,mountpoint=$QEXP,writable=on")
  [ "$what" = qsdcount ] && cmd=(strace -f -qq -c --seccomp-bpf -e trace=fdatasync,fsync -o "$OUT/$tag.strace" "${cmd[@]}")
  logcmd "${cmd[*]}"
  "${cmd[@]}" > "$OUT/$tag.log" 2>&1 & QSD_JOB=$!
  if ! wait_mount "$QEXP"; then
    stop_qsd; row "$r" "$m" "$what" "qsd did not start: $(tail -1 "$OUT/$tag.log")" - - - - - "$note"; return
  fi
  if [ "$what" = qsdcount ]; then QSD_PID=$(pgrep -P "$QSD_JOB" | head -1); else QSD_PID=$QSD_JOB; fi
  fio_args "$m" qsd "$QEXP"
  run_fio "$OUT/$tag.json" "$QSD_PID"; rc=$?
  stop_qsd
  check=$(check_image "$QDIR/t.qcow2" "$OUT/$tag.check")
  [ "$what" = qsdcount ] && syncs=$("${HELPER[@]}" strace "$OUT/$tag.strace" 2>/dev/null || echo -)
  if [ $rc = 0 ] && read -r iops writes < <("${HELPER[@]}" fio "$OUT/$tag.json"); then
    row "$r" "$m" "$what" ok "$iops" "$writes" $((writes / FSYNC_EVERY)) "$syncs" "$check" "$note"
  else
    [ $rc = 124 ] && s="HANG (fio > ${DEADLINE}s)" || s="fio failed rc=$rc: $(tail -1 "$OUT/$tag.json.err" 2>/dev/null)"
    row "$r" "$m" "$what" "$s" - - - "$syncs" "$check" "$note"
  fi
  rm -f "$QDIR/t.qcow2"
  printf '  %-7s %s IOPS, %s fdatasyncs, image %s\n' "$what" "$(tail -1 "$TSV" | cut -f4,5 | tr '\t' ' ')" "$syncs" "$check"
}
run_qsdcount() { run_qsd "$1" "$2" qsdcount; }

run_cachefs() { # round mode
  local r=$1 m=$2 tag="r$1.$2.cachefs" s rc iops writes flushes syncs gw check status=ok err
  rm -f "$CIMGS"/*
  logcmd "${CFS[*]} create $CIMGS/t.qcow2 $IMG_SIZE"
  if ! "${CFS[@]}" create "$CIMGS/t.qcow2" "$IMG_SIZE" > "$OUT/$tag.create" 2>&1; then
    row "$r" "$m" cachefs "create failed: $(tail -1 "$OUT/$tag.create")" - - - - - -; return
  fi
  logcmd "${CFS[*]} mount $CIMGS $CMNT --cache $m --log $OUT/$tag.log"
  if ! timeout 60 "${CFS[@]}" mount "$CIMGS" "$CMNT" --cache "$m" --log "$OUT/$tag.log" > "$OUT/$tag.mount" 2>&1 \
     || ! wait_mount "$CMNT"; then
    err=$(tail -1 "$OUT/$tag.mount")
    stop_cachefs
    row "$r" "$m" cachefs "mount failed: ${err:-no mount}" - - - - - -; return
  fi
  CFS_PID=$(timeout 10 getfattr --only-values -n user.cachefs.pid "$CMNT" 2>/dev/null)
  fio_args "$m" cachefs "$CMNT/t.raw"
  run_fio "$OUT/$tag.json" "$CFS_PID"; rc=$?
  if [ $rc = 0 ]; then
    timeout 10 getfattr -d -m user.cachefs "$CMNT/t.raw" > "$OUT/$tag.xattrs" 2>&1
    read -r flushes syncs gw < <("${HELPER[@]}" xattrs "$OUT/$tag.xattrs")
  fi
  if ! stop_cachefs; then
    status="unmount failed (daemon killed): $(tail -1 "$OUT/umount.log")"
  fi
  check=$(check_image "$CIMGS/t.qcow2" "$OUT/$tag.check")
  if [ $rc = 0 ] && read -r iops writes < <("${HELPER[@]}" fio "$OUT/$tag.json"); then
    [ "$gw" != "$writes" ] && echo "  note: cachefs counted $gw guest writes, fio $writes" >&2
    row "$r" "$m" cachefs "$status" "$iops" "$writes" "$flushes" "$syncs" "$check" -
  else
    [ $rc = 124 ] && s="HANG (fio > ${DEADLINE}s; daemon killed)" || s="fio failed rc=$rc: $(tail -1 "$OUT/$tag.json.err" 2>/dev/null)"
    row "$r" "$m" cachefs "$s" - - - - "$check" -
  fi
  rm -f "$CIMGS"/*
  echo "  cachefs $(tail -1 "$TSV" | cut -f4,5 | tr '\t' ' ') IOPS, $(tail -1 "$TSV" | cut -f7) flushes, $(tail -1 "$TSV" | cut -f8) fdatasyncs, image $check"
}

# ---------------------------------------------------------------- run
START=$(date +%s); LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
facts() {
  echo "- date: $(date -u +%FT%TZ)"
  echo "- kernel: $(uname -r); CPUs: $(nproc) ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)); RAM: $(free -g | awk '/^Mem:/{print $2}') GiB"
  echo "- work dir: $WORK on $(findmnt -n -o FSTYPE,SOURCE -T "$WORK" | tr -s ' ')"
  echo "- fio: $(fio --version); qemu-storage-daemon: $(qemu-storage-daemon --version | head -1 | sed 's/^qemu-storage-daemon version //')"
  echo "- cachefs: $SRC_ID, run from a copy in $SRC"
  echo "- settings: RUNTIME=${RUNTIME}s REGION=$REGION IMG_SIZE=$IMG_SIZE FSYNC_EVERY=$FSYNC_EVERY ROUNDS=$ROUNDS MODES=\"$MODES\""
  echo "- command: RUNTIME=$RUNTIME REGION=$REGION IMG_SIZE=$IMG_SIZE FSYNC_EVERY=$FSYNC_EVERY ROUNDS=$ROUNDS MODES=\"$MODES\" WORK=$WORK bash bench/cache_modes.sh"
}
FACTS=$(facts)
echo "# cache modes (seed 001)"; echo "$FACTS"; echo
printf 'round\tmode\ttarget\tstatus\tiops\twrites\tflushes\tsyncs\tcheck\tnote\tload1\n' > "$TSV"
orders=("host qsd cachefs" "qsd cachefs host" "cachefs host qsd")
for r in $(seq 1 "$ROUNDS"); do
  order=${orders[$(((r - 1) % 3))]}
  for m in $MODES; do
    echo "round $r, $m ($order)"
    for t in $order; do settle; TAG="$r $m $t"; "run_$t" "$r" "$m"; done
  done
done
if [ "${COUNT:-1}" = 1 ]; then
  for m in $MODES; do
    echo "count pass, $m (qsd under strace --seccomp-bpf)"
    settle; TAG="C $m qsdcount"; run_qsdcount C "$m"
  done
fi
ELAPSED=$(( $(date +%s) - START ))

{
  echo "## Cache modes (seed 001): 4k random writes, fdatasync every $FSYNC_EVERY, psync qd1"
  echo
  echo "$FACTS"
  echo "- wall time of the run: ${ELAPSED}s; load average at start: $LOAD0, at end: $(cut -d' ' -f1-3 /proc/loadavg) (anything else running shares the $(nproc) CPUs and the disk)"
  echo
  "${HELPER[@]}" table "$TSV" "$FSYNC_EVERY"
  echo
  echo "The exact commands of round 1 (every round runs the same ones) and of the count pass C:"
  echo
  echo '```'
  awk -F'\t' '{split($1, k, " ")} k[1] == 1 || k[1] == "C" {if ($1 != last) print "# " k[2] ", " k[3]; last = $1; print $2}' "$CMDS"
  echo '```'
} > "$RESULTS"
echo; cat "$RESULTS"
echo; echo "results: $RESULTS (raw: $OUT)"
