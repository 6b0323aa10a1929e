#!/usr/bin/env bash
# Reference boot: run Debian's QEMU with KVM inside L1 (run-l1.sh) to boot the default guest
# (resources/guest/build.sh) as L2 the way a working VMM does: microvm machine, ACPI, PVH entry of
# the extracted vmlinux. Use it to compare Tidepool's own VMM against a known-good setup.
#
#   resources/nested/l2-reference.sh [--cpu L2_CPU] [--machine M] [--append ARGS] [--timeout S]
#                                    [-- QEMU_ARGS...]
#
# Defaults: --cpu host, --machine microvm,acpi=on, L2 RAM 512 MiB, the guest's own cmdline plus
# tidepool.workload=alloc:64 tidepool.end=poweroff. The exit status is L2 QEMU's (through L1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=resources/lib/debian-kernel.sh
. "$here/../lib/debian-kernel.sh"

l2_cpu=host
machine="microvm,acpi=on"
extra_append="tidepool.workload=alloc:64 tidepool.end=poweroff"
timeout_s=600
while [ $# -gt 0 ]; do
    case "$1" in
    --cpu) l2_cpu=${2:?}; shift ;;
    --machine) machine=${2:?}; shift ;;
    --append) extra_append=${2:?}; shift ;;
    --timeout) timeout_s=${2:?}; shift ;;
    --) shift; break ;;
    *) tp_die "unknown option '$1'" ;;
    esac
    shift
done

guest=$("$here/../guest/build.sh")
qemu=$(command -v qemu-system-x86_64) || tp_die "qemu-system-x86_64 not found (install qemu-system-x86)"
work=$(mktemp -d "${TMPDIR:-/tmp}/tidepool-l2ref.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Firmware QEMU looks for even with -kernel: qboot for microvm, SeaBIOS and option ROMs for pc.
mkdir -p "$work/qemu-data"
for f in /usr/share/qemu/bios-microvm.bin /usr/share/qemu/qboot.rom /usr/share/qemu/pvh.bin \
    /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/kvmvapic.bin /usr/share/seabios/bios-256k.bin; do
    [ ! -e "$f" ] || cp -L "$f" "$work/qemu-data/"
done

"$here/run-l1.sh" --timeout "$timeout_s" --binary "$qemu" --file "$work/qemu-data:qemu-data" \
    --file "$guest/vmlinux" --file "$guest/initramfs.cpio.gz" -- \
    ./qemu-system-x86_64 -L qemu-data -M "$machine" -accel kvm -cpu "$l2_cpu" -m 512 -smp 1 \
    -nographic -no-reboot -nodefaults -serial stdio -kernel vmlinux -initrd initramfs.cpio.gz \
    -append "$(cat "$guest/cmdline") $extra_append" "$@"
