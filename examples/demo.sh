#!/usr/bin/env bash
# The newcomer's tour: create a qcow2 image, serve it as a raw file, write and
# read it with dd, look at it with ordinary tools, unmount, and let qemu-img
# judge the result. Run by `make demo` (which puts the venv's cachefs on PATH).
set -euo pipefail
work=$(mktemp -d /var/tmp/cachefs-demo.XXXXXX)
mnt="$work/mnt"; imgs="$work/images"
mkdir -p "$mnt" "$imgs"
cleanup() { mountpoint -q "$mnt" && cachefs umount "$mnt" || true; rm -rf "$work"; }
trap cleanup EXIT
show() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

show cachefs create "$imgs/vm1.qcow2" 4G
show cachefs mount "$imgs" "$mnt" --cache writeback
show ls -ls "$mnt"
head -c 8M /dev/urandom > "$work/payload"
show dd if="$work/payload" of="$mnt/vm1.raw" bs=1M seek=100 conv=notrunc,fsync status=none
show dd if="$mnt/vm1.raw" of="$work/readback" bs=1M skip=100 count=8 status=none
show cmp "$work/payload" "$work/readback"
echo "read back 8 MiB identical"
show ls -ls "$mnt"
show getfattr -d -m user.cachefs "$mnt/vm1.raw"
show cachefs stats "$mnt"
show cachefs umount "$mnt"
show qemu-img check "$imgs/vm1.qcow2"
show cachefs check "$imgs/vm1.qcow2"
echo
echo "demo finished: image served, written, read, unmounted clean"
