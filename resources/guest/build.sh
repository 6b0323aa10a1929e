#!/usr/bin/env bash
# Build Tidepool's default guest from Debian packages only.
#
#   resources/guest/build.sh [--force] [OUT_DIR]
#
# Produces, in ${XDG_CACHE_HOME:-$HOME/.cache}/tidepool/guest/<kver>-<hash>/ (and copies into OUT_DIR
# when given):
#   vmlinuz             the Debian cloud kernel's bzImage
#   vmlinux             the same kernel decompressed (ELF with a PVH note), for direct ELF/PVH boot
#   initramfs.cpio.gz   busybox, virtio modules, tp-mem, and /init (resources/guest/init)
#   cmdline             the kernel command line this guest expects
#   manifest.env        KEY=value lines (versions, file names, sha256s); manifest.json the same as JSON
# and points ${cache}/tidepool/guest/current at that directory. Re-running with everything present
# does nothing but print the directory. The kernel is the package that linux-image-cloud-amd64
# depends on today (its -unsigned variant); TIDEPOOL_KERNEL_PKG overrides it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=resources/lib/debian-kernel.sh
. "$here/../lib/debian-kernel.sh"

force=0
out_dir=""
while [ $# -gt 0 ]; do
    case "$1" in
    --force) force=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'
        exit 0
        ;;
    -*) tp_die "unknown option '$1' (see --help)" ;;
    *)
        [ -z "$out_dir" ] || tp_die "only one OUT_DIR may be given"
        out_dir=$1
        ;;
    esac
    shift
done

# Modules the guest loads, by name; their dependencies are added from modules.dep.
GUEST_MODULES="virtio_mmio virtio_pci virtio_mem virtio_balloon"
GUEST_CMDLINE="console=ttyS0 reboot=k panic=-1 memhp_default_state=online_movable"

tp_lock
tp_kernel_resolve
tp_busybox_fetch
tp_need gcc gcc
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || [ -f /usr/lib/libc.a ] ||
    tp_die "static glibc (libc.a) not found; install the Debian package 'libc6-dev'"

# The cache key covers everything that decides the image's bytes: package versions and our sources.
gcc_ver=$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)
key=$(
    {
        printf 'kernel %s %s\nbusybox %s\ngcc %s\nmodules %s\ncmdline %s\n' \
            "$TP_KPKG" "$TP_KPKG_VERSION" "$TP_BUSYBOX_VERSION" "$gcc_ver" "$GUEST_MODULES" "$GUEST_CMDLINE"
        cat "$here/build.sh" "$here/init" "$here/tp-mem.c" "$here/../lib/debian-kernel.sh"
    } | sha256sum | cut -c1-16
)
guest_root="$(tp_cache_root)/guest"
dir="$guest_root/$TP_KVER-$key"

publish() {
    ln -sfn "$(basename "$dir")" "$guest_root/current.tmp"
    mv -T "$guest_root/current.tmp" "$guest_root/current"
    if [ -n "$out_dir" ]; then
        mkdir -p "$out_dir"
        local f
        for f in vmlinuz vmlinux initramfs.cpio.gz cmdline manifest.env manifest.json; do
            # Hard links when the cache shares the file system, copies otherwise.
            rm -f "$out_dir/$f"
            ln "$dir/$f" "$out_dir/$f" 2>/dev/null || cp "$dir/$f" "$out_dir/$f"
        done
    fi
    printf '%s\n' "$dir"
}

if [ "$force" -eq 0 ] && [ -f "$dir/manifest.env" ]; then
    ok=1
    for f in vmlinuz vmlinux initramfs.cpio.gz cmdline manifest.json; do
        [ -f "$dir/$f" ] || ok=0
    done
    if [ "$ok" -eq 1 ]; then
        tp_log "guest is up to date: $dir"
        publish
        exit 0
    fi
fi

tp_kernel_fetch
mdir="$TP_KDIR/root/lib/modules/$TP_KVER"

work=$(mktemp -d "${TMPDIR:-/tmp}/tidepool-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,sbin,etc/tidepool,proc,sys,dev,tmp,run,lib/modules/"$TP_KVER"}

# busybox and its applet links
cp "$TP_BUSYBOX" "$rootfs/bin/busybox"
chmod 755 "$rootfs/bin/busybox"
for applet in $("$TP_BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done

# modules, decompressed, and the list /init loads in order
# shellcheck disable=SC2086 # a list of module names
tp_install_modules "$TP_KDIR/root" "$TP_KVER" "$rootfs" "$rootfs/etc/tidepool/modules" $GUEST_MODULES
cp "$mdir/modules.dep" "$rootfs/lib/modules/$TP_KVER/modules.dep"
for f in modules.builtin modules.order; do
    [ -f "$mdir/$f" ] && cp "$mdir/$f" "$rootfs/lib/modules/$TP_KVER/$f"
done

# the workload helper
gcc -O2 -static -s -Wall -Wextra -Werror -o "$rootfs/bin/tp-mem" "$here/tp-mem.c" ||
    tp_die "compiling tp-mem.c failed"

install -m 755 "$here/init" "$rootfs/init"
printf '%s\n' "$GUEST_CMDLINE" >"$rootfs/etc/tidepool/cmdline"

stage="$work/out"
mkdir -p "$stage"
tp_pack_cpio "$rootfs" "$stage/initramfs.cpio.gz" gzip
cp "$TP_KDIR/vmlinuz" "$stage/vmlinuz"
cp "$TP_KDIR/vmlinux" "$stage/vmlinux"
printf '%s\n' "$GUEST_CMDLINE" >"$stage/cmdline"

sum_vmlinuz=$(tp_sha256 "$stage/vmlinuz")
sum_vmlinux=$(tp_sha256 "$stage/vmlinux")
sum_initrd=$(tp_sha256 "$stage/initramfs.cpio.gz")
modules=$(tr '\n' ' ' <"$rootfs/etc/tidepool/modules" | sed 's/ $//')
{
    printf 'TIDEPOOL_GUEST_KEY=%s\n' "$key"
    printf 'KERNEL_PACKAGE=%s\nKERNEL_PACKAGE_VERSION=%s\nKERNEL_RELEASE=%s\n' \
        "$TP_KPKG" "$TP_KPKG_VERSION" "$TP_KVER"
    printf 'BUSYBOX_VERSION=%s\n' "$TP_BUSYBOX_VERSION"
    printf 'VMLINUZ=vmlinuz\nVMLINUZ_SHA256=%s\n' "$sum_vmlinuz"
    printf 'VMLINUX=vmlinux\nVMLINUX_SHA256=%s\n' "$sum_vmlinux"
    printf 'INITRAMFS=initramfs.cpio.gz\nINITRAMFS_SHA256=%s\n' "$sum_initrd"
    printf "CMDLINE='%s'\n" "$GUEST_CMDLINE"
    printf "MODULES='%s'\n" "$modules"
} >"$stage/manifest.env"
json_modules=$(sed 's/.*/"&"/' "$rootfs/etc/tidepool/modules" | paste -sd, -)
cat >"$stage/manifest.json" <<EOF
{
  "key": "$key",
  "kernel": { "package": "$TP_KPKG", "version": "$TP_KPKG_VERSION", "release": "$TP_KVER" },
  "busybox_version": "$TP_BUSYBOX_VERSION",
  "files": {
    "vmlinuz": { "name": "vmlinuz", "sha256": "$sum_vmlinuz" },
    "vmlinux": { "name": "vmlinux", "sha256": "$sum_vmlinux" },
    "initramfs": { "name": "initramfs.cpio.gz", "sha256": "$sum_initrd" }
  },
  "cmdline": "$GUEST_CMDLINE",
  "modules": [$json_modules]
}
EOF

mkdir -p "$guest_root"
rm -rf "$dir.tmp" "$dir"
mv "$stage" "$dir.tmp"
mv -T "$dir.tmp" "$dir"
tp_log "built guest $TP_KVER ($TP_KPKG_VERSION): $dir"
publish
# Keep the three newest builds; older ones only take space.
ls -1dt "$guest_root"/*-*/ 2>/dev/null | tail -n +4 | while IFS= read -r old; do
    [ "${old%/}" = "$dir" ] || rm -rf "${old%/}"
done
