#!/usr/bin/env bash
# A compressed backup of a guest disk onto a compress-on-write image (issue 13, seed 003).
#
#   examples/backup-target.sh GUEST_DISK [BACKUP_DIR]
#
# GUEST_DISK: any image qemu-img reads (raw, qcow2, ...). BACKUP_DIR (default:
# a new directory under /var/tmp) gets backup.qcow2, a qcow2 that QEMU and
# qemu-img read like any other. The copy goes through a cachefs mount with
# --cache none, so nothing of it enters the host page cache, and the
# compress-on-write image packs the compressed clusters in memory so the
# O_DIRECT writes stay whole clusters. Environment:
#   COPY=dd|qemu-img   how to copy (default dd: dd oflag=direct bs=1M, raw disks only;
#                      qemu-img: qemu-img convert -n -t none, any format)
#   ALGORITHM=zlib|zstd (default zlib)
# Then qemu-img check and compare the backup, and print the compression ratio.
set -euo pipefail
src=${1:?usage: backup-target.sh GUEST_DISK [BACKUP_DIR]}
dir=${2:-$(mktemp -d /var/tmp/cachefs-backup.XXXXXX)}
copy=${COPY:-dd}; algorithm=${ALGORITHM:-zlib}
command -v cachefs >/dev/null || { echo "cachefs is not on PATH (make venv; . .venv/bin/activate)" >&2; exit 1; }
[ ! -e "$dir/backup.qcow2" ] || { echo "$dir/backup.qcow2 exists; give another BACKUP_DIR" >&2; exit 1; }
mkdir -p "$dir/images" "$dir/mnt"
mnt="$dir/mnt"; img="$dir/images/backup.qcow2"
cleanup() { if mountpoint -q "$mnt"; then cachefs umount "$mnt" || true; fi; }
trap cleanup EXIT

size=$(qemu-img info --output=json "$src" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
cachefs create --compress "$algorithm" "$img" "$size"
cachefs mount "$dir/images" "$mnt" --cache none --log "$dir/cachefs.log"
start=$(date +%s.%N)
fmt=$(qemu-img info --output=json "$src" | python3 -c 'import json,sys; print(json.load(sys.stdin)["format"])')
case $copy in
  dd) [ "$fmt" = raw ] || { echo "COPY=dd needs a raw GUEST_DISK ($src is $fmt); use COPY=qemu-img" >&2; exit 1; }
      dd if="$src" of="$mnt/backup.raw" bs=1M oflag=direct conv=notrunc,fsync status=none ;;
  qemu-img) qemu-img convert -n -t none -f "$fmt" -O raw "$src" "$mnt/backup.raw" ;;
  *) echo "COPY must be dd or qemu-img" >&2; exit 1 ;;
esac
end=$(date +%s.%N)
echo "copied in $(python3 -c "print(f'{$end - $start:.2f}')") s; image in the host page cache: $(fincore --bytes --noheadings --output RES "$img") bytes"
st() { getfattr --absolute-names --only-values -n "user.cachefs.stats.$1" "$mnt/backup.raw"; }
echo "compressed clusters: $(st compressed_clusters) in $(st compress_host_clusters) host clusters" \
     "($(st compress_full_writes) written full, $(st compress_flush_writes) at a flush);" \
     "stored normally: $(st stored_normally); zero clusters: $(st compress_zero_clusters)"
cachefs umount "$mnt"
trap - EXIT

qemu-img check "$img"
qemu-img compare "$src" "$img"
python3 - "$src" "$img" <<'PY'
import json, os, subprocess, sys
src, img = sys.argv[1:]
info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", src], capture_output=True, text=True,
                                 check=True).stdout)
stored = os.path.getsize(img)
print(f"compression ratio: {info['virtual-size'] / stored:.2f}:1 "
      f"({info['virtual-size']} guest bytes in {stored} bytes; the source file takes {info['actual-size']})")
PY
echo "backup: $img"
