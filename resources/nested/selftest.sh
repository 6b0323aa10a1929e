#!/usr/bin/env bash
# End-to-end check of the nested harness: build kvm-smoke.c (dynamically linked, so the ldd library
# packing is exercised too), run it in L1 through run-l1.sh, and require its PASS line.
#
#   resources/nested/selftest.sh [run-l1.sh options...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=resources/lib/debian-kernel.sh
. "$here/../lib/debian-kernel.sh"
tp_need gcc gcc

work=$(mktemp -d "${TMPDIR:-/tmp}/tidepool-selftest.XXXXXX")
trap 'rm -rf "$work"' EXIT
gcc -O2 -Wall -Wextra -Werror -o "$work/kvm-smoke" "$here/kvm-smoke.c" || tp_die "compiling kvm-smoke.c failed"

log="$work/serial.log"
set +e
"$here/run-l1.sh" --log "$log" --timeout 300 "$@" --binary "$work/kvm-smoke" -- ./kvm-smoke
rc=$?
set -e
grep -a '^KVM-SMOKE ' "$log" >&2 || true
if [ "$rc" -ne 0 ] || ! grep -aq '^KVM-SMOKE result=PASS' "$log"; then
    kept="$(tp_cache_root)/nested/selftest-failed.log"
    cp "$log" "$kept"
    tp_die "nested self-test failed (exit status $rc); serial log kept at $kept"
fi
tp_log "nested self-test passed"
