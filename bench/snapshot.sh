#!/usr/bin/env bash
# Issue 23's benchmark, in one run on one machine: live internal snapshots, cachefs beside
# qemu-storage-daemon 7.2 (the peer) serving the same images over FUSE, O_DIRECT fio.
#
#   stall        the guest's stall while a snapshot is taken: a 4k random-write QD1 fio job runs
#                STALL_RUNTIME s on the image; SNAP_AT s in, one snapshot (cachefs: setfattr
#                user.cachefs.snapshot.create; qsd: QMP blockdev-snapshot-internal-sync).
#                Reported per size: the call's wall time, and the longest I/O latency (fio lat
#                max, submission to completion: io_uring submits an O_DIRECT write to a FUSE
#                file inline, so a stall shows in slat, not clat) with the snapshot and in the
#                same job without one. Images of
#                STALL_GIB GiB, every 64 KiB cluster allocated (qemu-img preallocation=metadata:
#                normal COPIED L2 entries over a sparse file, so cheap to make).
#                Target: <= 1 s per 10 GiB allocated.
#   cow          first writes after a snapshot: a COW_MB image of random data with snapshot s1,
#                then one 4k write into every 64 KiB cluster (a random 4k slot, in random order,
#                replayed from one fio iolog: every write is the first into its cluster, so every
#                one copies on write), QD32 io_uring. cachefs serves the qemu-img-made snapshot
#                (private L2 copies at open) and one it took itself (setfattr); the same writes
#                without a snapshot (overwrite in place) for context, on both.
#                Target: cachefs >= 1.3x qsd.
#
# Usage: bench/snapshot.sh [WORKDIR]   (root; env: STALL_GIB="1 4 16" ROUNDS=2 STALL_RUNTIME=8
#        SNAP_AT=2 COW_MB=1024 PARTS="stall cow"; CACHEFS: the cachefs command). Every line of
#        results goes to WORKDIR/results.txt; the tables are printed at the end. WORKDIR's big
#        files are deleted at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHEFS=${CACHEFS:-$PWD/.venv/bin/cachefs}
W=$(realpath -m "${1:-/var/tmp/cachefs-bench-snapshot}")
STALL_GIB=${STALL_GIB:-"1 4 16"}; ROUNDS=${ROUNDS:-2}; STALL_RUNTIME=${STALL_RUNTIME:-8}
SNAP_AT=${SNAP_AT:-2}; COW_MB=${COW_MB:-1024}; PARTS=${PARTS:-"stall cow"}
rm -rf "$W"; mkdir -p "$W"/{img,mnt}; cd "$W"
pids=()
stop() {
  mountpoint -q "$W/mnt" && "$CACHEFS" umount "$W/mnt" || true
  for p in "${pids[@]:-}"; do [ -n "$p" ] && { kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; }; done
  pids=()
}
cleanup() { stop; rm -f "$W"/img/*.qcow2 "$W"/*.qcow2 "$W"/*.iolog; }
trap cleanup EXIT

now() { date +%s.%N; }
jq_fio() { # file expr: a number from fio's json (j = jobs[0]["write"])
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["write"]; print(eval(sys.argv[2]))' "$1" "$2"
}
cachefs_up() { "$CACHEFS" mount --cache none --aio io_uring img mnt; }
qsd_up() {  # the image in img/ exported at exp.raw, QMP on qmp.sock; same cache.direct on both nodes
  touch exp.raw; rm -f qmp.sock
  qemu-storage-daemon --chardev socket,path="$W/qmp.sock",server=on,wait=off,id=c0 --monitor chardev=c0 \
    --blockdev driver=file,filename=img/vm.qcow2,node-name=f0,cache.direct=on,aio=io_uring \
    --blockdev driver=qcow2,file=f0,node-name=n0,cache.direct=on \
    --export type=fuse,id=e,node-name=n0,mountpoint="$W/exp.raw",writable=on > qsd.log 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do grep -q " $W/exp.raw fuse" /proc/mounts && return 0; sleep 0.1; done
  echo "qsd did not export" >&2; cat qsd.log >&2; return 1
}
qmp_snapshot() {  # name: blockdev-snapshot-internal-sync on qsd's node, as a running VM would
  python3 - "$W/qmp.sock" "$1" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def cmd(c, **a):
    f.write(json.dumps({"execute": c, "arguments": a}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            if "error" in r:
                sys.exit(f"qmp {c}: {r['error']}")
            return r
json.loads(f.readline())
cmd("qmp_capabilities")
cmd("blockdev-snapshot-internal-sync", device="n0", name=sys.argv[2])
PY
}

# ---------------------------------------------------------------- the stall at a snapshot point

stall_fio() {  # out file: 4k random writes QD1 over the whole disk for STALL_RUNTIME s
  fio --name=stall --filename="$2" --output-format=json --direct=1 --ioengine=io_uring --bs=4k \
      --iodepth=1 --rw=randwrite --randrepeat=0 --runtime="$STALL_RUNTIME" --time_based > "$1"
}
stall_round() {  # target gib round
  local t=$1 g=$2 r=$3 f snap t0 t1
  rm -f img/vm.qcow2
  qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=64k img/vm.qcow2 "${g}G"
  if [ "$t" = cachefs ]; then cachefs_up; f=mnt/vm.raw; snap=(setfattr -n user.cachefs.snapshot.create -v s1 "$f")
  else qsd_up; f=exp.raw; snap=(qmp_snapshot s1); fi
  stall_fio "stall.$t.$g.$r.none.json" "$f"
  stall_fio "stall.$t.$g.$r.snap.json" "$f" & local fp=$!
  sleep "$SNAP_AT"; t0=$(now); "${snap[@]}"; t1=$(now)
  wait $fp
  stop
  qemu-img snapshot -l img/vm.qcow2 | grep -q ' s1 ' || { echo "$t: no snapshot s1 in the image" >&2; exit 1; }
  qemu-img check -q img/vm.qcow2 || { echo "$t: qemu-img check failed after the snapshot" >&2; exit 1; }
  local call base with ios
  call=$(python3 -c "print(f'{$t1 - $t0:.3f}')")
  base=$(jq_fio "stall.$t.$g.$r.none.json" 'round(j["lat_ns"]["max"] / 1e9, 3)')
  with=$(jq_fio "stall.$t.$g.$r.snap.json" 'round(j["lat_ns"]["max"] / 1e9, 3)')
  ios=$(jq_fio "stall.$t.$g.$r.snap.json" 'j["total_ios"]')
  echo "stall $t ${g}G round$r call_s=$call lat_max_s=$with lat_max_nosnap_s=$base ios=$ios" | tee -a results.txt
  rm -f img/vm.qcow2
}

# ---------------------------------------------------------------- first writes after a snapshot

cow_iolog() {  # file iolog: one 4k write into every cluster, random slot, random order (fixed seed)
  python3 - "$1" "$2" "$COW_MB" <<'PY'
import random, sys
path, log, mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(23)
clusters = list(range(mb * 16)); rng.shuffle(clusters)
with open(log, "w") as o:
    o.write(f"fio version 2 iolog\n{path} add\n{path} open\n")
    for c in clusters:
        o.write(f"{path} write {c * 65536 + rng.randrange(16) * 4096} 4096\n")
    o.write(f"{path} close\n")
PY
}
cow_job() {  # tag iolog
  fio --name=cow --read_iolog="$2" --replay_no_stall=1 --output-format=json --direct=1 \
      --ioengine=io_uring --iodepth=32 > "cow.$1.json"
  echo "cow $1 iops=$(jq_fio "cow.$1.json" 'round(j["iops"])') ios=$(jq_fio "cow.$1.json" 'j["total_ios"]') \
secs=$(jq_fio "cow.$1.json" 'round(j["runtime"] / 1000, 2)')" | tee -a results.txt
}
cow_image() {  # snap(none|qemu-img): img/vm.qcow2 from the data image
  rm -f img/vm.qcow2; cp data.qcow2 img/vm.qcow2
  [ "$1" = qemu-img ] && qemu-img snapshot -c s1 img/vm.qcow2
  sync img/vm.qcow2  # no dirty page cache left for the O_DIRECT writes to flush first
}
cow_round() {  # round
  local r=$1
  cow_image none; cachefs_up; cow_job "cachefs-overwrite.$r" cachefs.iolog; stop
  cow_image qemu-img; cachefs_up; cow_job "cachefs-qemuimg-snap.$r" cachefs.iolog; stop
  qemu-img check -q img/vm.qcow2 || { echo "cachefs: qemu-img check failed" >&2; exit 1; }
  cow_image none; cachefs_up; setfattr -n user.cachefs.snapshot.create -v s1 mnt/vm.raw
  cow_job "cachefs-setfattr-snap.$r" cachefs.iolog; stop
  qemu-img check -q img/vm.qcow2 || { echo "cachefs: qemu-img check failed" >&2; exit 1; }
  cow_image none; qsd_up; cow_job "qsd-overwrite.$r" qsd.iolog; stop
  cow_image qemu-img; qsd_up; cow_job "qsd-qemuimg-snap.$r" qsd.iolog; stop
}

echo "# snapshots: stall at ${STALL_GIB// /,} GiB, first writes on ${COW_MB} MiB, $ROUNDS rounds, \
$(date -u +%FT%TZ), $(nproc) cpus, $(git -C "$OLDPWD" rev-parse --short HEAD 2>/dev/null || echo '?')" | tee results.txt
if [[ " $PARTS " == *" stall "* ]]; then
  for r in $(seq "$ROUNDS"); do for g in $STALL_GIB; do for t in cachefs qsd; do stall_round $t "$g" "$r"; done; done; done
fi
if [[ " $PARTS " == *" cow "* ]]; then
  head -c $((COW_MB << 20)) /dev/urandom > src.raw
  qemu-img convert -O qcow2 -o cluster_size=64k src.raw data.qcow2 && rm src.raw
  cow_iolog mnt/vm.raw cachefs.iolog; cow_iolog exp.raw qsd.iolog
  for r in $(seq "$ROUNDS"); do cow_round "$r"; done
fi

python3 - results.txt <<'PY'
import re, sys
from collections import defaultdict
stall, cow = defaultdict(list), defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    if f[0] == "stall":
        kv = dict(x.split("=") for x in f[4:])
        stall[f[2], f[1]].append(kv)
    elif f[0] == "cow":
        tag, r = f[1].rsplit(".", 1)
        cow[tag].append(int(f[2].split("=")[1]))
def rng(vals, fmt="{:.3f}"):
    lo, hi = min(vals), max(vals)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"
if stall:
    print("\n| allocated | target | cachefs setfattr, s | cachefs max latency, s | without snapshot | "
          "qsd QMP snapshot, s | qsd max latency, s | without snapshot |")
    print("|---|---|---|---|---|---|---|---|")
    for g in sorted({g for g, _ in stall}, key=lambda s: int(s[:-1])):
        row = [g.replace("G", " GiB"), f"<= {int(g[:-1]) / 10:.1f} s"]
        for t in ("cachefs", "qsd"):
            runs = stall.get((g, t), [])
            for k in ("call_s", "lat_max_s", "lat_max_nosnap_s"):
                row.append(rng([float(x[k]) for x in runs]) if runs else "")
        print("| " + " | ".join(row) + " |")
if cow:
    print("\n| 4k first writes QD32, IOPS (runs) | " + " | ".join(cow) + " |")
    print("|---|" + "---|" * len(cow))
    print("| IOPS | " + " | ".join(" / ".join(f"{v / 1000:.1f}k" for v in cow[t]) for t in cow) + " |")
    q = cow.get("qsd-qemuimg-snap")
    for t in ("cachefs-qemuimg-snap", "cachefs-setfattr-snap", "cachefs-overwrite"):
        if q and t in cow:
            ratios = [a / b for a, b in zip(cow[t], q)]
            print(f"{t} / qsd-qemuimg-snap: {rng(ratios, '{:.2f}')}x" + (" (target >= 1.3)" if "snap" in t else ""))
PY
