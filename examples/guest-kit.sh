# The kernel and initramfs of a throwaway test guest, shared by boot-guest.sh and
# backup-running-guest.sh (sourced, from the repository's top directory; needs KIT, where the
# kernel is kept between runs). The guest is Debian's cloud kernel (ext4 built in, virtio as
# small modules), fetched with `apt-get download` (not installed) only when KIT has none, and a
# busybox initramfs.
#
#   guest_kernel            sets VMLINUZ and MODS
#   guest_initramfs ROOT    busybox and the six virtio modules in ROOT, and the first lines of
#                           ROOT/init (busybox, /proc, /sys, /dev, the modules); the caller appends
#                           the rest of /init (cat >> "$ROOT/init")
#   guest_pack ROOT OUT     ROOT as a gzipped cpio archive at OUT

guest_kernel() {
  if ! ls "$KIT"/k/boot/vmlinuz-* >/dev/null 2>&1; then
    local pkg
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image/ {print $2; exit}')
    (cd "$KIT" && apt-get download "$pkg" 2>/dev/null && dpkg-deb -x "$pkg"_*.deb k)
  fi
  VMLINUZ=$(ls "$KIT"/k/boot/vmlinuz-* | head -1)
  MODS=$(ls -d "$KIT"/k/lib/modules/*)/kernel
}

guest_initramfs() {
  local root=$1 m
  rm -rf "$root" && mkdir -p "$root"/{bin,dev,proc,sys,mnt,lib/modules}
  cp /bin/busybox "$root/bin/busybox"
  for m in virtio/virtio virtio/virtio_ring virtio/virtio_pci_legacy_dev virtio/virtio_pci_modern_dev \
           virtio/virtio_pci block/virtio_blk; do
    cp "$MODS/drivers/$m.ko" "$root/lib/modules/"
  done
  cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do  # dependency order
  insmod /lib/modules/$m.ko
done
INIT
}

guest_pack() {
  chmod +x "$1/init"
  (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) > "$2"
}
