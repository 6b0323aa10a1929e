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

if [ ${#missing[@]} -eq 0 ]; then
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
