#!/usr/bin/env bash
# A backup while a guest runs (issue 23): a Linux guest under QEMU writes to its
# ext4 disk, a cachefs file; an internal snapshot is taken while it writes, and
# the snapshot's file is copied with `cp --sparse=always` while it goes on
# writing. The copy must be a consistent filesystem holding every file the guest
# synced before the snapshot, byte for byte.
#
#   host                                      guest (busybox /init, disk /dev/vda = MNT/vm.raw)
#   mkfs.ext4 MNT/vm.raw (journal)
#   boot QEMU, cache=none                     mount ext4; write before/f0..f5, each fsynced; sync
#                                             print their sha256 and "before synced"
#                                             then write without pause: an O_DIRECT stream
#                                             over after/stream, new files after/aN
#   setfattr user.cachefs.snapshot.create     ...
#   write "snap" to the control disk          overwrite before/* in place (the snapshot must not see it)
#   cp --sparse=always MNT/vm@backup.raw ...  ... still writing
#   write "stop" to the control disk          umount, poweroff
#
# The control disk (/dev/vdb) is a small raw file outside the mount that the
# guest polls with O_DIRECT reads: how the host tells the guest "snapshot taken"
# and "stop", without a network.
#
# Why e2fsck runs on a replayed scratch copy: the guest's filesystem was mounted
# and busy at the snapshot point, not frozen, so the copy is crash-consistent:
# its superblock says needs_recovery and committed metadata may still sit in the
# journal only. That is what a power cut leaves, and what every use of the backup
# sees first: mounting it replays the journal. So the checks are
#   1. `e2fsck -fn BACKUP` as is, for the record (it skips the replay read-only);
#   2. replay the journal on a scratch copy, and nothing else:
#      `e2fsck -y -E journal_only` (what a mount does; no repair of any kind);
#   3. `e2fsck -fn SCRATCH` must exit 0: a consistent filesystem with no repair;
#   4. every before/ file read with debugfs from SCRATCH (no mount) has the sum
#      the guest printed after syncing it, and the live disk has changed at
#      least one of them since (else the snapshot's isolation went untested);
# and after the guest has shut down and the mount is gone: `qemu-img check` of
# the qcow2 clean, `qemu-img snapshot -l` lists backup, `qemu-img convert -l
# snapshot.name=backup` equals the copy byte for byte, and the live disk (which
# the guest unmounted cleanly) passes `e2fsck -fn` too. Freezing the guest's fs
# (fsfreeze) around the snapshot would give an image with no journal to replay,
# but the guest would stop writing; the point here is that it need not.
#
# Usage (root): examples/backup-running-guest.sh [WORKDIR]   (tests/test_guest_backup.py runs it)
# KIT: where the kernel is kept (shared with boot-guest.sh, which fetches it the
# same way); MOUNT_OPTS adds `cachefs mount` options (e.g. --dataplane off);
# AIO: QEMU's aio= for the disk (default threads). Exits 0 only if every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHEFS=${CACHEFS:-.venv/bin/cachefs}
WORK=${1:-/var/tmp/cachefs-guest-backup}
KIT=${KIT:-/var/tmp/cachefs-guest-kit}  # the kernel, kept between runs
MOUNT_OPTS=${MOUNT_OPTS:-} AIO=${AIO:-threads}
mkdir -p "$KIT" "$WORK"

need=""
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
[ -x /bin/busybox ] || need="$need busybox-static"
command -v cpio >/dev/null || need="$need cpio"
command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || need="$need e2fsprogs"
command -v setfattr >/dev/null || need="$need attr"
if [ -n "$need" ]; then
  echo "installing:$need"
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need >/dev/null
fi

# --- kernel and initramfs (examples/guest-kit.sh).
. examples/guest-kit.sh
guest_kernel
# --- initramfs: busybox, the virtio modules, and /init. Built in WORK, not KIT: boot-guest.sh
# rebuilds KIT/initramfs on every run, and the two may run at once.
ROOT=$WORK/initramfs
guest_initramfs "$ROOT"
cat >> "$ROOT/init" <<'INIT'
say() { echo "cachefs-guest: $*"; }
ctl() { dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | tr -dc a-z; }  # the host's word, uncached
mount -t ext4 /dev/vda /mnt || { dmesg | tail -15; say "FAILED (mount)"; poweroff -f; }
mkdir -p /mnt/before /mnt/after /tmp
dd if=/dev/urandom of=/tmp/rand bs=64k count=32 2>/dev/null
cp /tmp/rand /mnt/after/stream  # 2 MiB the streamer below overwrites, again and again
i=0
while [ $i -lt 6 ]; do  # 6 files of 256 KiB-1.5 MiB, each written and fsynced (conv=fsync)
  dd if=/dev/urandom of=/mnt/before/f$i bs=64k count=$((4 + i * 4)) conv=fsync 2>/dev/null
  i=$((i + 1))
done
sync
for f in /mnt/before/f*; do say "sum $(sha256sum $f | sed 's| /mnt| |')"; done  # "sum HASH  /before/f0"
say "before synced"
while [ ! -e /tmp/stop ]; do  # a stream of O_DIRECT writes, never waiting for the host
  dd if=/tmp/rand of=/mnt/after/stream bs=64k oflag=direct conv=notrunc 2>/dev/null
done &
n=0 changed=0
while :; do  # new files too, and after the snapshot, in-place changes of what it holds
  word=$(ctl)
  [ "$word" = stop ] && break
  dd if=/dev/urandom of=/mnt/after/a$n bs=64k count=2 2>/dev/null
  if [ "$word" = snap ]; then
    dd if=/dev/urandom of=/mnt/before/f$((n % 6)) bs=4k count=8 seek=$((n % 8)) conv=notrunc 2>/dev/null
    changed=$((changed + 1))
  fi
  n=$((n + 1))
  [ $((n % 3)) = 0 ] && sync  # journal commits go on during the copy too
  say "after $n changed $changed"
done
touch /tmp/stop; wait
umount /mnt && sync && say "stopped: $n after files written, $changed overwrites of before files"
poweroff -f
INIT
INITRD=$WORK/initramfs.cpio.gz
guest_pack "$ROOT" "$INITRD"

# --- the image, its filesystem, the mount.
IMAGES=$WORK/images MNT=$WORK/mnt CTL=$WORK/control.img CONSOLE=$WORK/console.log
BACKUP=$WORK/backup.raw SCRATCH=$WORK/scratch.raw
mkdir -p "$IMAGES" "$MNT"
mountpoint -q "$MNT" && "$CACHEFS" umount "$MNT"
qemu_pid=""
cleanup() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then kill "$qemu_pid"; wait "$qemu_pid" || true; fi
  if mountpoint -q "$MNT"; then "$CACHEFS" umount "$MNT" || true; fi
}
trap cleanup EXIT
rm -f "$IMAGES"/vm.qcow2 "$BACKUP" "$SCRATCH" "$WORK"/snapshot.raw "$CONSOLE"
qemu-img create -q -f qcow2 "$IMAGES/vm.qcow2" 128M
dd if=/dev/zero of="$CTL" bs=4k count=1 status=none
"$CACHEFS" mount --cache auto --log "$WORK/cachefs.log" $MOUNT_OPTS "$IMAGES" "$MNT"
mkfs.ext4 -q -F -L guestdata "$MNT/vm.raw"  # through the mount: a 4 MiB journal, 1 KiB blocks
echo "== guest disk: $(dumpe2fs -h "$MNT/vm.raw" 2>/dev/null | grep -E '^Filesystem features' | sed 's/  */ /g')"

tell() { printf '%-8s' "$1" | dd of="$CTL" bs=512 count=1 conv=notrunc,fsync status=none; }  # to the guest
secs() { awk "BEGIN { printf \"%.1f\", $2 - $1 }"; }
writes() { "$CACHEFS" stats "$MNT" | awk '$1 == "vm.raw" {print $6}'; }  # guest writes served so far
last_after() { grep -o 'cachefs-guest: after [0-9]*' "$CONSOLE" | tail -1 | awk '{print $3}'; }
wait_for() {  # wait_for PATTERN SECONDS: until the console shows PATTERN (or QEMU is gone)
  local t=$(( $2 * 10 ))
  while ! grep -q "$1" "$CONSOLE" 2>/dev/null; do
    kill -0 "$qemu_pid" 2>/dev/null && [ $t -gt 0 ] || { tail -20 "$CONSOLE" 2>/dev/null; echo "timed out waiting for: $1"; return 1; }
    sleep 0.1; t=$((t - 1))
  done
}

start=$(date +%s.%N)
qemu-system-x86_64 -machine q35,accel=tcg -m 256 -display none -monitor none -no-reboot \
  -serial "file:$CONSOLE" -kernel "$VMLINUZ" -initrd "$INITRD" -append "console=ttyS0 quiet panic=-1" \
  -drive "file=$MNT/vm.raw,format=raw,if=virtio,cache=none,aio=$AIO" \
  -drive "file=$CTL,format=raw,if=virtio,cache=none" </dev/null >"$WORK/qemu.err" 2>&1 &
qemu_pid=$!
wait_for "cachefs-guest: before synced" 120
wait_for "cachefs-guest: after 2 " 60  # it is writing
n_snap=$(last_after) w0=$(writes) t0=$(date +%s.%N)
setfattr -n user.cachefs.snapshot.create -v backup "$MNT/vm.raw"
t1=$(date +%s.%N)
tell snap
echo "== snapshot backup taken while the guest wrote (setfattr returned in $(secs "$t0" "$t1") s)"
ls -ls "$MNT" | sed -n '/@backup/p'
getfattr --absolute-names --only-values -n user.cachefs.snapshot.list "$MNT/vm.raw"; echo
t2=$(date +%s.%N)
cp --sparse=always "$MNT/vm@backup.raw" "$BACKUP"
t3=$(date +%s.%N) w3=$(writes)
echo "== copied vm@backup.raw with cp --sparse=always in $(secs "$t2" "$t3") s: $(du -k --apparent-size "$BACKUP" | cut -f1) KiB," \
     "$(du -k "$BACKUP" | cut -f1) KiB allocated"
echo "== guest writes served from just before the snapshot to just after the copy: $((w3 - w0)) (cachefs stats)"
[ $((w3 - w0)) -gt 0 ] || { echo "FAILED: no guest write served during the snapshot and the copy"; exit 1; }
# The guest overwrites before/ files in place once told "snap" (the copy must not see that).
wait_for "cachefs-guest: after [0-9]* changed [1-9]" 60
tell stop
wait_for "cachefs-guest: stopped" 60
wait "$qemu_pid" || true; qemu_pid=""
end=$(date +%s.%N)
grep -o "cachefs-guest: stopped.*" "$CONSOLE"
echo "guest run: $(secs "$start" "$end") s"

# --- checks. status stays 0 only if every one passes.
status=0
ok() { echo "ok: $*"; }
bad() { echo "FAILED: $*"; status=1; }
# fsck_clean FILE OUT [EXTRA]: e2fsck -fn exits 0 and says nothing but its passes, its summary and
# EXTRA. A filesystem not unmounted has stale free counts in its superblock (ext4 keeps the true
# ones in the group descriptors, the superblock's totals only now and then; e2fsck does not count
# them as errors, and a mount sums the descriptors).
fsck_clean() {
  local rc=0
  e2fsck -fn "$1" >"$2" 2>&1 || rc=$?
  [ $rc = 0 ] && ! grep -vE "^(e2fsck [0-9.]+ \(.*\)|Pass [1-5]: .*|guestdata: [0-9]+/[0-9]+ files .*|${3:-NONE})\$" "$2" | grep -q .
}
STALE_COUNTS='Free (blocks|inodes) count wrong \([0-9]+, counted=[0-9]+\)\.|Fix\? no|'
rc=0; e2fsck -fn "$BACKUP" >"$WORK/e2fsck-raw.out" 2>&1 || rc=$?
echo "e2fsck -fn on the copy as taken: exit $rc, $(grep -c 'needs_recovery\|skipping journal recovery' "$WORK/e2fsck-raw.out" || true) journal warning (not replayed: a read-only check does not)"
cp --sparse=always "$BACKUP" "$SCRATCH"
if e2fsck -y -E journal_only "$SCRATCH" >"$WORK/e2fsck-replay.out" 2>&1; then
  ok "journal replayed on a scratch copy of the copy: e2fsck -y -E journal_only (what a mount does, no repair): $(grep -c 'recovering journal' "$WORK/e2fsck-replay.out" || true) replay"
else bad "journal replay: $(tail -3 "$WORK/e2fsck-replay.out")"; fi
if fsck_clean "$SCRATCH" "$WORK/e2fsck.out" "$STALE_COUNTS"; then
  ok "e2fsck -fn clean after the replay: exit 0, no error; $(grep -c 'count wrong' "$WORK/e2fsck.out" || true) stale free counts in the superblock (as in any ext4 not unmounted)"
else bad "e2fsck -fn after the replay:"; cat "$WORK/e2fsck.out"; fi
sums=$(grep -o 'cachefs-guest: sum [0-9a-f]*  /before/f[0-9]' "$CONSOLE" | awk '{print $3, $4}' || true)
nsums=0 good=0 moved=0
while read -r sum path; do
  [ -n "$sum" ] || continue
  nsums=$((nsums + 1))
  got=$(debugfs -R "cat $path" "$SCRATCH" 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [ "$got" = "$sum" ]; then good=$((good + 1)); else bad "$path in the copy: sha256 $got, synced as $sum"; fi
  now=$(debugfs -R "cat $path" "$MNT/vm.raw" 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$now" = "$sum" ] || moved=$((moved + 1))
done <<< "$sums"
if [ "$nsums" = 6 ] && [ "$good" = 6 ]; then
  ok "all 6 before/ files in the copy (debugfs cat), sha256 as synced; the live disk has since changed $moved of them"
else bad "before/ files: $good of $nsums (of 6) as synced"; fi
[ "$moved" -ge 1 ] || bad "the guest changed no before/ file after the snapshot: the test proved nothing"
in_copy=$(debugfs -R "ls /after" "$SCRATCH" 2>/dev/null | grep -cE '(^|[[:space:]])a[0-9]+' || true)
echo "after/ files in the copy: $in_copy (created and committed before the snapshot point)"
if fsck_clean "$MNT/vm.raw" "$WORK/e2fsck-live.out"; then ok "the live disk, which the guest unmounted: e2fsck -fn clean"
else bad "the live disk's e2fsck -fn:"; cat "$WORK/e2fsck-live.out"; fi
"$CACHEFS" umount "$MNT"
qemu-img check -q "$IMAGES/vm.qcow2" && ok "qemu-img check: clean" || bad "qemu-img check"
qemu-img snapshot -l "$IMAGES/vm.qcow2"
qemu-img snapshot -l "$IMAGES/vm.qcow2" | awk '{print $2}' | grep -qx backup && ok "qemu-img snapshot -l lists backup" \
  || bad "snapshot backup not listed"
qemu-img convert -f qcow2 -O raw -l snapshot.name=backup "$IMAGES/vm.qcow2" "$WORK/snapshot.raw"
cmp -s "$WORK/snapshot.raw" "$BACKUP" && ok "the copy equals qemu-img convert -l snapshot.name=backup, byte for byte" \
  || bad "the copy differs from the snapshot qemu-img reads"
rm -f "$WORK/snapshot.raw" "$SCRATCH"
[ $status = 0 ] && echo "backup example: the snapshot taken and copied while the guest wrote is a consistent filesystem with every synced file"
exit $status
