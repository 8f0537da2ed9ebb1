#!/usr/bin/env bash
# Boot a tiny Linux guest whose disk is a cachefs file, write data from
# inside it, boot it again and verify the data: the mission's "the final
# client is a guest". Once with QEMU's cache=none (O_DIRECT through the
# mount), once with cache=writeback. Between boots the mount goes away and
# `qemu-img check` judges the qcow2 under it.
#
# The guest is Debian's cloud kernel and a busybox initramfs, under software
# emulation (TCG): no KVM needed, a boot takes seconds. Its /init makes an
# ext2 filesystem on /dev/vda (first boot), writes random files and their
# sha256 sums, unmounts and powers off; the next boot mounts it, checks
# every sum and prints "cachefs-guest: verify OK".
#
# Usage (root): examples/boot-guest.sh [WORKDIR]   (tests/test_guest.py runs it)
# CACHES="none writeback" picks QEMU cache modes; KIT where the kernel is kept;
# FORMAT=raw gives the guest a raw image (its reads and writes done by the kernel itself with
# passthrough, the default where the kernel has it, else served by the data plane in C) instead
# of a qcow2; MOUNT_OPTS adds `cachefs mount` options (e.g. --dataplane off).
# TRIM=1: QEMU's discard=unmap,detect-zeroes=unmap, and a boot between the two that deletes
# half the data and runs fstrim: the image's actual-size must drop (issue 12).
# OVERLAY=1: the verifying boot is two guests at once, each on its own qcow2 overlay of the disk
# the first boot wrote (issue 22): both verify through the shared base, the overlays stay
# check-clean and the base's bytes do not change.
# Installs what is missing: qemu-system-x86, busybox-static, cpio, and
# downloads (does not install) the linux-image-*-cloud-amd64 package.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHEFS=${CACHEFS:-.venv/bin/cachefs}
WORK=${1:-/var/tmp/cachefs-guest}
KIT=${KIT:-/var/tmp/cachefs-guest-kit}  # kernel and initramfs, kept between runs
FORMAT=${FORMAT:-qcow2} MOUNT_OPTS=${MOUNT_OPTS:-}
mkdir -p "$KIT"

need=""
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx mke2fs || need="$need busybox-static"
command -v cpio >/dev/null || need="$need cpio"
if [ -n "$need" ]; then
  echo "installing:$need"
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need >/dev/null
fi

# --- kernel and initramfs (examples/guest-kit.sh).
. examples/guest-kit.sh
guest_kernel
# --- initramfs: busybox, six virtio modules, and /init.
ROOT=$KIT/initramfs
guest_initramfs "$ROOT"
cat >> "$ROOT/init" <<'INIT'
step=$(sed -n 's/.*cachefs_step=\([a-z]*\).*/\1/p' /proc/cmdline)
say() { echo "cachefs-guest: $*"; }
if [ "$step" = write ]; then
  mke2fs -q /dev/vda && mount -t ext4 /dev/vda /mnt || { dmesg | tail -15; say "write FAILED (mkfs/mount)"; poweroff -f; }
  i=0
  while [ $i -lt 8 ]; do  # 8 files of 1-4 MiB of random bytes, and their sums
    dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((16 + i * 6)) 2>/dev/null
    i=$((i + 1))
  done
  (cd /mnt && sha256sum f* > SUMS)
  sync; umount /mnt && sync && say "write done"
elif [ "$step" = trim ]; then  # delete the four largest files, give their blocks back (TRIM)
  mount -t ext4 /dev/vda /mnt || { say "trim FAILED (mount)"; poweroff -f; }
  rm /mnt/f4 /mnt/f5 /mnt/f6 /mnt/f7 && grep -v ' f[4-7]$' /mnt/SUMS > /mnt/S2 && mv /mnt/S2 /mnt/SUMS && sync
  if out=$(fstrim -v /mnt 2>&1); then say "trim done: $out"; else say "trim FAILED: $out"; fi
  umount /mnt
else
  files=$(sed -n 's/.*cachefs_files=\([0-9]*\).*/\1/p' /proc/cmdline)
  mount -t ext4 /dev/vda /mnt || { say "verify FAILED (mount)"; poweroff -f; }
  if (cd /mnt && sha256sum -c SUMS >/dev/null 2>&1) && [ "$(wc -l < /mnt/SUMS)" = "${files:-8}" ]; then
    say "verify OK"
  else
    say "verify FAILED"
  fi
  umount /mnt
fi
poweroff -f
INIT
INITRD=$KIT/initramfs.cpio.gz
guest_pack "$ROOT" "$INITRD"

# --- the image and the mount.
IMAGES=$WORK/images MNT=$WORK/mnt
mkdir -p "$IMAGES" "$MNT"
mountpoint -q "$MNT" && "$CACHEFS" umount "$MNT"
cleanup() { mountpoint -q "$MNT" && "$CACHEFS" umount "$MNT" || true; }
trap cleanup EXIT

boot() {  # boot CACHE STEP [FILES [DISK]]: one guest run against MNT/DISK (vm.raw); prints its verdict line
  local cache=$1 step=$2 files=${3:-8} disk=${4:-vm.raw} out
  out=$(timeout 300 qemu-system-x86_64 -machine q35,accel=tcg -m 256 -nographic -no-reboot \
        -kernel "$VMLINUZ" -initrd "$INITRD" \
        -append "console=ttyS0 quiet panic=-1 cachefs_step=$step cachefs_files=$files" \
        -drive "file=$MNT/$disk,format=raw,if=virtio,cache=$cache${TRIM:+,discard=unmap,detect-zeroes=unmap}" 2>&1) || true
  echo "$out" | grep -o "cachefs-guest: .*" || { echo "$out" | tail -20; echo "cachefs-guest: no verdict"; }
}

check_image() {
  if [ "$FORMAT" = qcow2 ]; then qemu-img check -q "$IMAGES/vm.qcow2" && echo "qemu-img check: clean"
  else echo "qemu-img check: clean (a raw image has no metadata to check)"; fi
}
actual_size() { qemu-img info -f "$FORMAT" --output=json "$IMAGES/vm.$FORMAT" | sed -n 's/.*"actual-size": \([0-9]*\).*/\1/p'; }

overlay_boots() {  # overlay_boots CACHE FILES: two guests at once on overlays of the disk boot 1 wrote
  local cache=$1 files=$2 sum v1 v2
  rm -f "$IMAGES"/ov1.qcow2 "$IMAGES"/ov2.qcow2
  for i in 1 2; do qemu-img create -q -f qcow2 -b "vm.$FORMAT" -F "$FORMAT" "$IMAGES/ov$i.qcow2"; done
  sum=$(sha256sum < "$IMAGES/vm.$FORMAT")
  echo "== QEMU cache=$cache: boot 2 is two guests at once, on overlays ov1 and ov2 of vm.$FORMAT"
  "$CACHEFS" mount --cache auto $MOUNT_OPTS "$IMAGES" "$MNT"
  boot "$cache" verify "$files" ov1.raw > "$WORK/ov1.out" & v1=$!
  boot "$cache" verify "$files" ov2.raw > "$WORK/ov2.out" & v2=$!
  wait $v1 $v2
  echo "ov1: $(cat "$WORK/ov1.out")"; echo "ov2: $(cat "$WORK/ov2.out")"
  "$CACHEFS" stats "$MNT" | grep -A3 '^vm.raw' | grep -E 'backing file of' || true
  "$CACHEFS" umount "$MNT"
  for i in 1 2; do qemu-img check -q "$IMAGES/ov$i.qcow2" && echo "qemu-img check ov$i: clean"; done
  [ "$(sha256sum < "$IMAGES/vm.$FORMAT")" = "$sum" ] && echo "base: unchanged" || echo "base: CHANGED"
  grep -q "verify OK" "$WORK/ov1.out" && grep -q "verify OK" "$WORK/ov2.out" && \
    [ "$(sha256sum < "$IMAGES/vm.$FORMAT")" = "$sum" ]
}

status=0
for cache in ${CACHES:-none writeback}; do
  rm -f "$IMAGES"/vm.qcow2 "$IMAGES"/vm.raw
  qemu-img create -q -f "$FORMAT" "$IMAGES/vm.$FORMAT" 256M
  echo "== QEMU cache=$cache: boot 1 writes"
  "$CACHEFS" mount --cache auto $MOUNT_OPTS "$IMAGES" "$MNT"  # QEMU's own open flags pick the mode
  boot "$cache" write
  "$CACHEFS" stats "$MNT" | grep -A9 '^vm.raw' | grep -E '^vm.raw|data plane:|passthrough:' || true
  "$CACHEFS" umount "$MNT"
  check_image
  files=8
  if [ -n "${TRIM:-}" ]; then
    before=$(actual_size)
    echo "== QEMU cache=$cache: boot 1b deletes half the data and runs fstrim (discard=unmap)"
    "$CACHEFS" mount --cache auto $MOUNT_OPTS "$IMAGES" "$MNT"
    boot "$cache" trim
    "$CACHEFS" stats "$MNT" | grep -A9 '^vm.raw' | grep -E 'discard:' || true
    "$CACHEFS" umount "$MNT"
    after=$(actual_size) files=4
    check_image
    echo "fstrim: actual-size before=$before after=$after"
  fi
  if [ -n "${OVERLAY:-}" ]; then
    overlay_boots "$cache" $files || status=1
    continue
  fi
  echo "== QEMU cache=$cache: boot 2 verifies (a fresh mount)"
  "$CACHEFS" mount --cache auto $MOUNT_OPTS "$IMAGES" "$MNT"  # QEMU's own open flags pick the mode
  verdict=$(boot "$cache" verify $files)
  echo "$verdict"
  "$CACHEFS" umount "$MNT"
  [[ $verdict == *"verify OK"* ]] || status=1
done
[ $status = 0 ] && echo "guest example: data written by the guest survived remounts in both cache modes"
exit $status
