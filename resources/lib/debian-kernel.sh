# shellcheck shell=bash
# Shared helpers for Tidepool's image scripts: resolve, fetch and unpack the Debian cloud kernel,
# extract a vmlinux from its bzImage, resolve module dependencies, and pack cpio archives.
# Source this file from a script that already runs with `set -euo pipefail`.

TP_META_PKG="${TIDEPOOL_KERNEL_META:-linux-image-cloud-amd64}"

tp_log() { printf '[tidepool] %s\n' "$*" >&2; }
tp_die() { printf '[tidepool] error: %s\n' "$*" >&2; exit 1; }

# The cache root: ${XDG_CACHE_HOME:-$HOME/.cache}/tidepool
tp_cache_root() { printf '%s/tidepool' "${XDG_CACHE_HOME:-$HOME/.cache}"; }

# tp_lock: hold an exclusive lock on the cache for the rest of the script, so that two builds
# (CI and a developer, two worktrees) do not unpack or replace the same directory at once.
tp_lock() {
    local root
    root=$(tp_cache_root)
    mkdir -p "$root"
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>"$root/.lock"
    flock -w 900 9 || tp_die "timed out waiting for the cache lock $root/.lock"
}

# tp_need CMD PACKAGE: fail clearly when a host tool is missing.
tp_need() {
    command -v "$1" >/dev/null 2>&1 ||
        tp_die "'$1' not found; install the Debian package '$2' (resources/ci/install-deps.sh does)"
}

# tp_sha256 FILE...: print the sha256 of each file's content (hash only).
tp_sha256() { sha256sum "$@" | cut -d' ' -f1; }

# tp_pkg_version PKG: the candidate version apt would install, or nothing.
tp_pkg_version() {
    { apt-cache show --no-all-versions "$1" 2>/dev/null || true; } | sed -n 's/^Version: //p' | head -n1
}

# tp_kernel_resolve: set TP_KPKG (the -unsigned package), TP_KPKG_VERSION and TP_KVER (the module
# directory name, e.g. 6.1.0-56-cloud-amd64). The package is found through the metapackage at run time,
# because old ABI versions leave the mirror. TIDEPOOL_KERNEL_PKG overrides the choice. Without apt
# metadata, fall back to the newest kernel already unpacked in the cache.
tp_kernel_resolve() {
    local dep=""
    TP_KPKG="${TIDEPOOL_KERNEL_PKG:-}"
    if [ -z "$TP_KPKG" ] && command -v apt-cache >/dev/null 2>&1; then
        dep=$({ apt-cache depends --important "$TP_META_PKG" 2>/dev/null || true; } |
            sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\(-unsigned\)\?\)$/\1/p' | head -n1)
        if [ -n "$dep" ]; then
            case "$dep" in
            *-unsigned) TP_KPKG="$dep" ;;
            *) TP_KPKG="$dep-unsigned" ;;
            esac
        fi
    fi
    if [ -n "$TP_KPKG" ]; then
        TP_KPKG_VERSION=$(tp_pkg_version "$TP_KPKG")
        [ -n "$TP_KPKG_VERSION" ] ||
            tp_die "apt does not know '$TP_KPKG' (run 'apt-get update'?)"
        TP_KVER=${TP_KPKG#linux-image-}
        TP_KVER=${TP_KVER%-unsigned}
        return 0
    fi
    # Offline fallback: the newest complete kernel in the cache.
    local root stamp
    root="$(tp_cache_root)/kernel"
    stamp=$(ls -1d "$root"/*/.complete 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$stamp" ] ||
        tp_die "cannot resolve '$TP_META_PKG' through apt (run 'apt-get update') and no kernel is cached"
    TP_KVER=$(basename "$(dirname "$stamp")")
    TP_KPKG="linux-image-$TP_KVER-unsigned"
    TP_KPKG_VERSION=$(cat "$stamp")
    tp_log "warning: apt cannot resolve $TP_META_PKG; using cached kernel $TP_KVER ($TP_KPKG_VERSION)"
}

# tp_deb_fetch PKG VERSION DEST_DIR: download PKG=VERSION with apt-get and unpack it into DEST_DIR.
tp_deb_fetch() {
    local pkg=$1 ver=$2 dest=$3 dl deb
    tp_need apt-get apt
    tp_need dpkg-deb dpkg
    dl=$(mktemp -d "${TMPDIR:-/tmp}/tidepool-deb.XXXXXX")
    # apt-get download as root warns that the _apt user cannot write here; that is harmless.
    chmod 755 "$dl"
    if ! (cd "$dl" && apt-get download -q "$pkg=$ver" >"$dl/apt.log" 2>&1); then
        cat "$dl/apt.log" >&2
        rm -rf "$dl"
        tp_die "apt-get download $pkg=$ver failed (run 'apt-get update'?)"
    fi
    deb=$(ls -1 "$dl"/*.deb | head -n1)
    mkdir -p "$dest"
    dpkg-deb -x "$deb" "$dest"
    rm -rf "$dl"
}

# tp_kernel_fetch: make sure $TP_KDIR (the cache's kernel directory for $TP_KVER) holds:
#   root/        the unpacked package (boot/ and lib/modules/$TP_KVER/ with a generated modules.dep)
#   vmlinuz      the bzImage
#   vmlinux      the decompressed ELF kernel, checked for its PVH (Xen PHYS32_ENTRY) note
#   .complete    the package version; present only when all of the above are done
tp_kernel_fetch() {
    TP_KDIR="$(tp_cache_root)/kernel/$TP_KVER"
    if [ -f "$TP_KDIR/.complete" ] && [ "$(cat "$TP_KDIR/.complete")" = "$TP_KPKG_VERSION" ]; then
        return 0
    fi
    tp_log "fetching $TP_KPKG=$TP_KPKG_VERSION"
    rm -rf "$TP_KDIR"
    mkdir -p "$TP_KDIR"
    tp_deb_fetch "$TP_KPKG" "$TP_KPKG_VERSION" "$TP_KDIR/root"
    local vmlinuz="$TP_KDIR/root/boot/vmlinuz-$TP_KVER"
    [ -f "$vmlinuz" ] || tp_die "$TP_KPKG has no boot/vmlinuz-$TP_KVER"
    [ -d "$TP_KDIR/root/lib/modules/$TP_KVER" ] || tp_die "$TP_KPKG has no lib/modules/$TP_KVER"
    cp "$vmlinuz" "$TP_KDIR/vmlinuz"
    tp_extract_vmlinux "$TP_KDIR/vmlinuz" "$TP_KDIR/vmlinux"
    tp_check_pvh "$TP_KDIR/vmlinux"
    tp_gen_modules_dep "$TP_KDIR/root" "$TP_KVER"
    printf '%s\n' "$TP_KPKG_VERSION" >"$TP_KDIR/.complete"
}

_tp_u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' \n'; }
_tp_u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' \n'; }
_tp_hex() { od -An -tx1 -j "$2" -N"$3" "$1" | tr -d ' \n'; }

# tp_extract_vmlinux BZIMAGE OUT: decompress the bzImage payload into an ELF vmlinux.
# The payload's place comes from the boot header: it starts at (setup_sects + 1) * 512 +
# payload_offset (0x248) and is payload_length (0x24c) bytes long, the last 4 of which are the
# decompressed size. Debian 6.1 uses LZ4 (legacy frame, magic 02 21 4c 18); gzip, xz and zstd are
# handled too.
tp_extract_vmlinux() {
    local bz=$1 out=$2 magic ss po pl start body want got
    [ "$(_tp_hex "$bz" $((0x202)) 4)" = "48647253" ] || tp_die "$bz is not a bzImage (no HdrS)"
    ss=$(_tp_u8 "$bz" $((0x1f1)))
    [ "$ss" -ne 0 ] || ss=4
    po=$(_tp_u32 "$bz" $((0x248)))
    pl=$(_tp_u32 "$bz" $((0x24c)))
    start=$(((ss + 1) * 512 + po))
    body=$((pl - 4))
    want=$(_tp_u32 "$bz" $((start + pl - 4)))
    magic=$(_tp_hex "$bz" "$start" 6)
    local dec
    case "$magic" in
    02214c18*) tp_need lz4 lz4; dec="lz4 -dc" ;;
    1f8b*) dec="gzip -dc" ;;
    fd377a585a00) tp_need xz xz-utils; dec="xz -dc" ;;
    28b52ffd*) tp_need zstd zstd; dec="zstd -dc" ;;
    *) tp_die "unknown bzImage payload compression (magic $magic at offset $start)" ;;
    esac
    # shellcheck disable=SC2086 # $dec is a command and its flags
    dd if="$bz" iflag=skip_bytes,count_bytes skip="$start" count="$body" bs=1M status=none |
        $dec >"$out.tmp" ||
        tp_die "decompressing the kernel payload with '$dec' failed"
    got=$(stat -c %s "$out.tmp")
    [ "$got" = "$want" ] || tp_die "vmlinux is $got bytes, the bzImage says $want"
    [ "$(_tp_hex "$out.tmp" 0 4)" = "7f454c46" ] || tp_die "the decompressed payload is not an ELF"
    mv "$out.tmp" "$out"
}

# tp_check_pvh VMLINUX: the PVH entry note (Xen note type 0x12, PHYS32_ENTRY) must be present.
tp_check_pvh() {
    tp_need readelf binutils
    readelf -nW "$1" | grep -A0 -E 'Xen[[:space:]].*\(0x00000012\)' >/dev/null ||
        tp_die "$1 has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
}

# tp_gen_modules_dep ROOT KVER: Debian's package does not ship modules.dep (depmod makes it when the
# package is installed), so generate it: with depmod -b when kmod is present, otherwise from each
# module's .modinfo `depends=` field (direct dependencies only, which tp_module_closure follows).
tp_gen_modules_dep() {
    local root=$1 kver=$2 mdir f rel deps d out
    mdir="$root/lib/modules/$kver"
    [ -f "$mdir/modules.dep" ] && return 0
    if command -v depmod >/dev/null 2>&1; then
        depmod -b "$root" "$kver" || tp_die "depmod -b $root $kver failed"
        return 0
    fi
    tp_log "depmod not found; building modules.dep from .modinfo depends="
    declare -A path_of=()
    while IFS= read -r rel; do
        f=${rel##*/}
        f=${f%%.ko*}
        path_of[${f//-/_}]=$rel
    done < <(cd "$mdir" && find kernel -name '*.ko*' | sort)
    out="$mdir/modules.dep.tmp"
    : >"$out"
    for rel in "${path_of[@]}"; do
        deps=$(_tp_ko_cat "$mdir/$rel" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
        local line="$rel:"
        for d in ${deps//,/ }; do
            [ -n "${path_of[${d//-/_}]:-}" ] || tp_die "$rel depends on unknown module $d"
            line="$line ${path_of[${d//-/_}]}"
        done
        printf '%s\n' "$line" >>"$out"
    done
    mv "$out" "$mdir/modules.dep"
}

# _tp_ko_cat FILE: print a module, decompressing .ko.xz / .ko.zst / .ko.gz.
_tp_ko_cat() {
    case "$1" in
    *.ko) cat "$1" ;;
    *.ko.xz) tp_need xz xz-utils; xz -dc "$1" ;;
    *.ko.zst) tp_need zstd zstd; zstd -dc "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) tp_die "unknown module file type: $1" ;;
    esac
}

# tp_module_closure ROOT KVER NAME...: print the modules.dep paths needed for NAMEs, dependencies
# first, each once, in an order insmod can follow.
tp_module_closure() {
    local root=$1 kver=$2 mdir
    shift 2
    mdir="$root/lib/modules/$kver"
    [ -f "$mdir/modules.dep" ] || tp_die "no modules.dep in $mdir"
    declare -A deps_of=() by_name=() seen=()
    local rel rest n
    while IFS= read -r line; do
        rel=${line%%:*}
        rest=${line#*:}
        deps_of[$rel]=$rest
        n=${rel##*/}
        n=${n%%.ko*}
        by_name[${n//-/_}]=$rel
    done <"$mdir/modules.dep"
    _tp_visit() {
        local r=$1 d
        [ -z "${seen[$r]:-}" ] || return 0
        seen[$r]=1
        for d in ${deps_of[$r]}; do _tp_visit "$d"; done
        printf '%s\n' "$r"
    }
    for n in "$@"; do
        rel=${by_name[${n//-/_}]:-}
        [ -n "$rel" ] || tp_die "module '$n' is not in $TP_KPKG (built in, or renamed?)"
        _tp_visit "$rel"
    done
}

# tp_install_modules ROOT KVER DEST LIST_FILE NAME...: copy the closure of NAMEs into
# DEST/lib/modules/KVER/ as plain .ko files (busybox insmod does not read every compression), and
# write their in-root paths, in load order, to LIST_FILE.
tp_install_modules() {
    local root=$1 kver=$2 dest=$3 list=$4 rel plain
    shift 4
    : >"$list"
    while IFS= read -r rel; do
        plain=${rel%.xz}
        plain=${plain%.zst}
        plain=${plain%.gz}
        mkdir -p "$dest/lib/modules/$kver/$(dirname "$plain")"
        _tp_ko_cat "$root/lib/modules/$kver/$rel" >"$dest/lib/modules/$kver/$plain"
        printf '/lib/modules/%s/%s\n' "$kver" "$plain" >>"$list"
    done < <(tp_module_closure "$root" "$kver" "$@")
}

# tp_busybox_fetch: set TP_BUSYBOX to a cached static busybox from Debian's busybox-static package,
# and TP_BUSYBOX_VERSION to its version.
tp_busybox_fetch() {
    TP_BUSYBOX_VERSION=$(tp_pkg_version busybox-static)
    local root dir
    root="$(tp_cache_root)/busybox"
    if [ -z "$TP_BUSYBOX_VERSION" ]; then
        dir=$(ls -1d "$root"/*/ 2>/dev/null | sort -V | tail -n1 || true)
        [ -n "$dir" ] && [ -x "$dir/busybox" ] ||
            tp_die "apt does not know busybox-static and none is cached (run 'apt-get update')"
        TP_BUSYBOX="${dir%/}/busybox"
        TP_BUSYBOX_VERSION=$(basename "$dir")
        return 0
    fi
    dir="$root/$TP_BUSYBOX_VERSION"
    TP_BUSYBOX="$dir/busybox"
    [ -x "$TP_BUSYBOX" ] && return 0
    tp_log "fetching busybox-static=$TP_BUSYBOX_VERSION"
    local tmp
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/tidepool-bb.XXXXXX")
    tp_deb_fetch busybox-static "$TP_BUSYBOX_VERSION" "$tmp"
    [ -x "$tmp/bin/busybox" ] || tp_die "busybox-static has no /bin/busybox"
    mkdir -p "$dir"
    cp "$tmp/bin/busybox" "$TP_BUSYBOX.tmp"
    mv "$TP_BUSYBOX.tmp" "$TP_BUSYBOX"
    rm -rf "$tmp"
}

# tp_pack_cpio DIR OUT [gzip|none]: pack DIR as a newc cpio archive owned by root, with sorted names
# and fixed timestamps so the same input gives the same bytes.
tp_pack_cpio() {
    local dir=$1 out=$2 comp=${3:-gzip}
    tp_need cpio cpio
    find "$dir" -exec touch -h -d @0 {} +
    (
        cd "$dir" || exit 1
        find . -mindepth 1 | LC_ALL=C sort |
            cpio --quiet -o -H newc -R 0:0 --reproducible
    ) >"$out.cpio.tmp"
    case "$comp" in
    gzip) gzip -n -9 -c "$out.cpio.tmp" >"$out.tmp" && rm -f "$out.cpio.tmp" ;;
    none) mv "$out.cpio.tmp" "$out.tmp" ;;
    *) tp_die "unknown compression '$comp'" ;;
    esac
    mv "$out.tmp" "$out"
}
