#!/usr/bin/env bash
# Install, only when missing, the Debian packages Tidepool's resource scripts need
# (resources/guest/build.sh, resources/nested/run-l1.sh). Non-interactive; returns at once when
# everything is present. Set TIDEPOOL_SKIP_DEPS=1 to skip entirely.
set -euo pipefail

[ "${TIDEPOOL_SKIP_DEPS:-0}" = 1 ] && exit 0

# "command package" pairs: the package is wanted when the command is missing.
wanted=(
    "cpio cpio"
    "lz4 lz4"
    "readelf binutils"
    "depmod kmod"
    "gcc gcc"
    "qemu-system-x86_64 qemu-system-x86"
    "xz xz-utils"
    "zstd zstd"
    "gzip gzip"
    "dpkg-deb dpkg"
    "apt-get apt"
)
missing=()
for pair in "${wanted[@]}"; do
    cmd=${pair%% *}
    pkg=${pair#* }
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || [ -x "/sbin/$cmd" ] ||
        missing+=("$pkg")
done
# Static glibc for the guest's tp-mem helper.
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
# A TrueType font for the labels of benchmark plots (`tidepool bench density`).
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)

# The guest build (resources/guest/build.sh) downloads the kernel and busybox with apt: fresh
# CI images often ship without package lists, so refresh them when apt does not know those.
lists_ok() { apt-cache show linux-image-cloud-amd64 busybox-static >/dev/null 2>&1; }
refresh_lists() {
    local s=""
    [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && s="sudo -n"; } || return 0
    echo "install-deps: refreshing apt package lists (for the guest build)" >&2
    $s env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null ||
        echo "install-deps: apt-get update failed; the guest build will fall back to its cache" >&2
}

if [ ${#missing[@]} -eq 0 ]; then
    command -v apt-cache >/dev/null 2>&1 && ! lists_ok && refresh_lists
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: missing ${missing[*]} and there is no apt-get; install them by hand" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 ||
        { echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo -n"
fi

echo "install-deps: installing ${missing[*]}" >&2
# Refresh the package lists only when the install fails on stale or absent lists.
apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
if ! $sudo "${apt[@]}" install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
    $sudo "${apt[@]}" update -q >/dev/null
    $sudo "${apt[@]}" install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
lists_ok || refresh_lists
