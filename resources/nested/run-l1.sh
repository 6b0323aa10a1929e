#!/usr/bin/env bash
# Nested-KVM harness: boot an L1 Debian cloud kernel under QEMU (TCG, emulated AMD SVM), load KVM in
# it, and run a command there, so a KVM user (Tidepool's VMM, a test binary) runs against a real,
# non-PVM /dev/kvm.
#
#   resources/nested/run-l1.sh [options] -- COMMAND [ARG...]
#
# Options:
#   -b, --binary PATH       copy PATH to /payload/<name> in L1, with the shared libraries ldd lists
#                           (libc.so.6, libgcc_s.so.1, ld-linux-x86-64.so.2, ...) at their own paths;
#                           repeatable
#   -f, --file SRC[:DEST]   copy a file or directory to /payload/DEST (default: its base name);
#                           repeatable (an L2 kernel, an initramfs, a config...)
#   -t, --timeout SECONDS   stop QEMU after this long (default 900); exit status 124 then
#   -l, --log FILE          where to save the serial log (default: <cache>/nested/last-serial.log)
#   -m, --mem MIB           L1 RAM (default 3072)
#       --numa MIB,MIB[,...]    give L1 one NUMA node per size (QEMU memory-backend-ram + -numa node;
#                           the vCPU on node 0); L1 RAM is their sum and --mem is ignored
#       --cpu MODEL         QEMU CPU (default EPYC,+svm; TCG drops +invtsc)
#       --append ARGS       extra L1 kernel command-line arguments
#       --gzip              gzip the per-run payload archive (smaller, slower to unpack under TCG)
#       --no-require-kvm    run COMMAND even when /dev/kvm did not appear in L1
#       --modules NAMES     extra L1 kernel modules (space-separated, dependencies added), loaded
#                           after KVM's (e.g. "virtio_pci virtio_net" for a -nic)
#       --qemu-arg ARG      one extra QEMU argument (repeatable; e.g. -nic user,model=virtio-net-pci)
#   -q, --quiet             do not copy the serial console to stderr
#
# COMMAND runs with /payload as its working directory (so ./name runs a --binary). The exit status is
# COMMAND's; 124 on timeout; 125 when L1 failed before COMMAND finished (no KVM, boot failure). A
# summary (L1 boot time to /init, total time) goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=resources/lib/debian-kernel.sh
. "$here/../lib/debian-kernel.sh"

binaries=()
files=()
timeout_s=900
log=""
mem=3072
cpu="EPYC,+svm"
append=""
payload_comp=none
require_kvm=1
quiet=0
extra_modules=""
qemu_args=()
numa=""
while [ $# -gt 0 ]; do
    case "$1" in
    -b | --binary) binaries+=("${2:?--binary needs a path}"); shift ;;
    -f | --file) files+=("${2:?--file needs SRC[:DEST]}"); shift ;;
    -t | --timeout) timeout_s=${2:?--timeout needs seconds}; shift ;;
    -l | --log) log=${2:?--log needs a file}; shift ;;
    -m | --mem) mem=${2:?--mem needs MiB}; shift ;;
    --cpu) cpu=${2:?--cpu needs a model}; shift ;;
    --numa) numa=${2:?--numa needs MIB,MIB}; shift ;;
    --append) append=${2:?--append needs arguments}; shift ;;
    --gzip) payload_comp=gzip ;;
    --no-require-kvm) require_kvm=0 ;;
    --modules) extra_modules=${2:?--modules needs module names}; shift ;;
    --qemu-arg) qemu_args+=("${2:?--qemu-arg needs an argument}"); shift ;;
    -q | --quiet) quiet=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'
        exit 0
        ;;
    --) shift; break ;;
    *) tp_die "unknown option '$1' (see --help; the command goes after --)" ;;
    esac
    shift
done
[ $# -gt 0 ] || tp_die "no command given (usage: run-l1.sh [options] -- COMMAND [ARG...])"
case "$timeout_s$mem" in *[!0-9]*) tp_die "--timeout and --mem take whole numbers" ;; esac
if [ -n "$numa" ]; then
    case "$numa" in *[!0-9,]* | ,* | *, | *,,*) tp_die "--numa takes sizes in MiB separated by commas" ;; esac
    mem=0
    node=0
    for size in ${numa//,/ }; do
        qemu_args+=(-object "memory-backend-ram,id=tp-node$node,size=${size}M")
        if [ "$node" -eq 0 ]; then
            qemu_args+=(-numa "node,nodeid=0,cpus=0,memdev=tp-node0")
        else
            qemu_args+=(-numa "node,nodeid=$node,memdev=tp-node$node")
        fi
        mem=$((mem + size))
        node=$((node + 1))
    done
fi
tp_need qemu-system-x86_64 qemu-system-x86
tp_need timeout coreutils

cache="$(tp_cache_root)/nested"
mkdir -p "$cache"
[ -n "$log" ] || log="$cache/last-serial.log"
mkdir -p "$(dirname "$log")"

tp_lock
tp_kernel_resolve
tp_busybox_fetch

# The base archive (busybox, KVM modules, /init) depends only on the kernel, busybox and our sources.
L1_MODULES="kvm-amd${extra_modules:+ $extra_modules}"
key=$(
    {
        printf '%s %s %s %s\n' "$TP_KPKG" "$TP_KPKG_VERSION" "$TP_BUSYBOX_VERSION" "$L1_MODULES"
        cat "$here/l1-init" "$here/../lib/debian-kernel.sh"
    } | sha256sum | cut -c1-16
)
base="$cache/l1-base-$TP_KVER-$key.cpio"
tp_kernel_fetch
if [ ! -f "$base" ]; then
    tp_log "packing the L1 base archive"
    bw=$(mktemp -d "${TMPDIR:-/tmp}/tidepool-l1base.XXXXXX")
    mkdir -p "$bw"/{bin,etc/tidepool,proc,sys,dev,tmp,run,payload}
    cp "$TP_BUSYBOX" "$bw/bin/busybox"
    chmod 755 "$bw/bin/busybox"
    for applet in $("$TP_BUSYBOX" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$bw/bin/$applet"
    done
    # shellcheck disable=SC2086 # a list of module names
    tp_install_modules "$TP_KDIR/root" "$TP_KVER" "$bw" "$bw/etc/tidepool/modules" $L1_MODULES
    install -m 755 "$here/l1-init" "$bw/init"
    tp_pack_cpio "$bw" "$base" none
    rm -rf "$bw"
fi

# The shared cache is ready; let other runs use it while this one boots.
exec 9>&-

work=$(mktemp -d "${TMPDIR:-/tmp}/tidepool-l1run.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
pw="$work/payload-root"
mkdir -p "$pw/payload" "$pw/etc/tidepool"
[ "$require_kvm" -eq 0 ] || : >"$pw/etc/tidepool/require-kvm"

# copy_libs BIN: pack the shared libraries ldd lists for BIN at their absolute paths.
copy_libs() {
    local bin=$1 out lib
    if ! out=$(ldd "$bin" 2>&1); then
        case "$out" in
        *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
        *) tp_die "ldd $bin failed: $out" ;;
        esac
    fi
    case "$out" in *"not found"*) tp_die "ldd $bin: missing libraries: $out" ;; esac
    while IFS= read -r lib; do
        [ -n "$lib" ] || continue
        mkdir -p "$pw$(dirname "$lib")"
        cp -L "$lib" "$pw$lib"
    done < <(printf '%s\n' "$out" | sed -n -e 's/.*=> \(\/[^ ]*\) (0x.*/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) (0x.*/\1/p' | sort -u)
}

for b in "${binaries[@]}"; do
    [ -f "$b" ] && [ -x "$b" ] || tp_die "--binary $b is not an executable file"
    cp -L "$b" "$pw/payload/$(basename "$b")"
    copy_libs "$b"
done
for spec in "${files[@]}"; do
    src=${spec%%:*}
    dest=$(basename "$src")
    [ "$src" = "$spec" ] || dest=${spec#*:}
    [ -e "$src" ] || tp_die "--file $src does not exist"
    case "$dest" in /* | *..*) tp_die "--file destination '$dest' must be relative, inside /payload" ;; esac
    mkdir -p "$(dirname "$pw/payload/$dest")"
    cp -rL "$src" "$pw/payload/$dest"
done

# The command, each argument single-quoted for busybox sh.
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
{
    for a in "$@"; do printf '%s ' "$(quote "$a")"; done
    printf '\n'
} >"$pw/payload/.cmd"

tp_pack_cpio "$pw" "$work/payload.cpio" "$payload_comp"
cat "$base" "$work/payload.cpio" >"$work/l1.cpio"
rm -f "$work/payload.cpio"

cmdline="console=ttyS0 panic=-1 quiet${append:+ $append}"
tp_log "booting L1: $TP_KVER, -cpu $cpu, -m $mem${numa:+ (NUMA nodes of $numa MiB)}, initrd $(($(stat -c %s "$work/l1.cpio") / 1048576)) MiB; log $log"
: >"$log"
t_init="$work/t_init"
t0=$(date +%s.%N)
set +e
{
    timeout --foreground -k 10 "$timeout_s" qemu-system-x86_64 -accel tcg -cpu "$cpu" -m "$mem" -smp 1 \
        -nographic -no-reboot -kernel "$TP_KDIR/vmlinuz" -initrd "$work/l1.cpio" \
        -append "$cmdline" ${qemu_args[@]+"${qemu_args[@]}"} </dev/null 2>&1
    echo "TIDEPOOL-HOST-QEMU-EXIT $?"
} | while IFS= read -r line || [ -n "$line" ]; do
    line=${line%$'\r'}
    case "$line" in
    *TIDEPOOL-L1-INIT*) [ -f "$t_init" ] || date +%s.%N >"$t_init" ;;
    esac
    printf '%s\n' "$line" >>"$log"
    [ "$quiet" -eq 1 ] || printf '%s\n' "$line" >&2
done
set -e
t1=$(date +%s.%N)

qemu_rc=$(sed -n 's/^TIDEPOOL-HOST-QEMU-EXIT \([0-9]*\)$/\1/p' "$log" | tail -n1)
end_line=$(grep -a 'TIDEPOOL-L1-CMD-END rc=' "$log" | tail -n1 || true)
guest_init=$(sed -n 's/.*TIDEPOOL-L1-INIT uptime=\([0-9.]*\).*/\1/p' "$log" | head -n1)
kvm_state=$(sed -n 's/.*TIDEPOOL-L1-KVM \([a-z]*\).*/\1/p' "$log" | head -n1)
boot_wall="?"
[ ! -f "$t_init" ] || boot_wall=$(awk -v a="$t0" -v b="$(cat "$t_init")" 'BEGIN { printf "%.2f", b - a }')
total=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
tp_log "L1 summary: init after ${boot_wall}s wall (guest uptime ${guest_init:-?}s), /dev/kvm ${kvm_state:-unknown}, total ${total}s, qemu exit ${qemu_rc:-?}"

if [ -n "$end_line" ]; then
    rc=$(printf '%s\n' "$end_line" | sed -n 's/.*rc=\([0-9]*\).*/\1/p')
    tp_log "command exit status $rc (serial log: $log)"
    exit "$rc"
fi
if [ "${qemu_rc:-}" = 124 ] || [ "${qemu_rc:-}" = 137 ]; then
    tp_log "timed out after ${timeout_s}s before the command finished (serial log: $log)"
    exit 124
fi
tp_log "L1 stopped before the command finished (serial log: $log)"
exit 125
