#!/bin/busybox sh
# Tier-3 checks of the default guest (stock Debian kernel) on a real KVM, run INSIDE the nested
# L1 (resources/nested/run-l1.sh) with /payload holding ./tidepool, vmlinux and
# initramfs.cpio.gz. One L1 boot serves every check (tests/tests/nested_boot.rs parses the
# markers):
#
# 1. boot: `tidepool run` of a 512 MiB guest to /init and ACPI power-off (the runner's own
#    TIDEPOOL-RUN lines and the guest's console go to the L1 console);
# 2. a daemon (`tidepool serve`) with one Linux VM: 1 GiB boot RAM, a 1 GiB virtio-mem region,
#    a balloon with free page reporting and 1 s statistics. The guest allocates, touches and
#    frees 512 MiB (tidepool.workload); host-side resident memory is sampled every second until
#    it has dropped by RECLAIM_MIB from its peak (30 s budget from the last sample in which the
#    guest still held the memory);
# 3. virtio-mem: resize +512 MiB and back down; the guest's MemTotal (the balloon statistics'
#    total memory, which is the guest's totalram, i.e. /proc/meminfo MemTotal) must follow and
#    the daemon's pool counters must move by 512 MiB and come back;
# 4. delete the VM: the pool is whole again;
# 5. free page hinting by the stock driver: a second daemon with a swap file (write tracking)
#    and `--reclaim-phases reported` over a 300 MiB budget; a 512 MiB VM with hinting on and
#    reporting off allocates, touches and frees 256 MiB; the engine's hint passes must make
#    the host discard at least 200 MiB and resident fall by as much;
# 6. NUMA (L1 has two nodes, run-l1.sh --numa): `tidepool numa-check` boots a 512 MiB guest
#    under `interleave:0,1` twice, on the anonymous and on the memfd backing. Each guest gets
#    two guest nodes (SRAT, 256 MiB each, backed by host nodes 0 and 1), touches 300 (240)
#    MiB so that guest node 1 is used, and numa-check asks L1's kernel where every page of
#    every boot block is (move_pages): all must sit on their pool block's node, and node 1
#    must hold some. Its NUMA-CHECK lines (numa_maps summary included) go to the console.
#    Then once more on hugetlbfs, with 136 huge pages reserved on each L1 node.
#
# Markers (one line each, `TIER3 <what> key=value ...`; times in centiseconds of L1 uptime):
#   TIER3 boot rc= cs=
#   TIER3 l2-ready cs= total_mib= free_mib=          (create -> driver ready + first statistics)
#   TIER3-SAMPLE cs= resident= reported= free= total= (every poll)
#   TIER3 reclaim ok=0|1 peak= low= drop= cs=        (cs from the guest's free to the drop)
#   TIER3 grow|shrink rc= plug_cs= memtotal_cs= total_before= total_after= plugged= requested=
#                     pool_free_before= pool_free_after= assigned_before= assigned_after=
#   TIER3 delete pool_total= pool_free=
#   TIER3-SAMPLE hint cs= resident= free= phase=     (every poll of step 5)
#   TIER3 hint ok= ready_cs= base= peak= low= drop= cs= passes= hinted_mib= discarded_mib=
#              credited_mib= runs= reported_mib= ballooned_mib= swapped_mib= step_cs=
#   TIER3 numa-anonymous|numa-memfd|numa-hugetlbfs rc= ok= host_nodes= guest_nodes= memtotal_kb= misplaced=
#                     node0_pages= node1_pages=            (resident pages on their right node)
#   TIER3 done failures=N
set -u
TP=./tidepool
SOCK=/tmp/tidepool-tier3.sock
VM=vm1
BOOT_MIB=1024
REGION_MIB=1024
GROW_MIB=512
ALLOC_MIB=512
RECLAIM_MIB=400
RECLAIM_BUDGET_CS=3000
POOL_MIB=2048
failures=0

up_cs() {
    read -r u _ </proc/uptime
    echo "${u%.*}${u#*.}"
}
# json_field NAME: the first integer value of "NAME" in the JSON on stdin (pretty-printed).
json_field() { sed -n "s/.*\"$1\": *\([0-9][0-9]*\).*/\1/p" | head -n1; }
fail() {
    echo "TIER3-FAIL $*"
    failures=$((failures + 1))
}

# 1. The plain runner.
t=$(up_cs)
$TP run --kernel vmlinux --initrd initramfs.cpio.gz --memory-mib 512 --timeout-s 150 \
    --cmdline tidepool.end=poweroff --mark TIDEPOOL-INIT-START --mark TIDEPOOL-MEMTOTAL-KB
rc=$?
echo "TIER3 boot rc=$rc cs=$(($(up_cs) - t))"
[ "$rc" -eq 0 ] || fail "tidepool run exited $rc"

# 2. The daemon and one VM with both memory devices.
$TP serve --socket "$SOCK" --pool-mib "$POOL_MIB" >/tmp/serve.log 2>&1 &
serve_pid=$!
i=0
while [ ! -S "$SOCK" ] && [ $i -lt 100 ]; do
    usleep 100000
    i=$((i + 1))
done
if [ ! -S "$SOCK" ]; then
    fail "tidepool serve did not create its socket"
    cat /tmp/serve.log
    echo "TIER3 done failures=$failures"
    exit 1
fi
host_free() { $TP host --socket "$SOCK" --json | json_field free_mib; }
host_assigned() { $TP host --socket "$SOCK" --json | json_field assigned_mib; }
mem_json() { $TP vm memory --socket "$SOCK" --json "$VM"; }
stats_json() { $TP balloon stats --socket "$SOCK" --json "$VM"; }
pool_total=$($TP host --socket "$SOCK" --json | json_field total_mib)

t_create=$(up_cs)
if ! $TP vm create --socket "$SOCK" --memory "${BOOT_MIB}M" --hotplug "${REGION_MIB}M" \
    --free-page-reporting --stats-interval 1 --kernel vmlinux --initrd initramfs.cpio.gz \
    --cmdline "tidepool.workload=sleep:4,alloc:${ALLOC_MIB}:3000 tidepool.watch=5"; then
    fail "vm create"
    cat /tmp/serve.log
    echo "TIER3 done failures=$failures"
    exit 1
fi

# Poll until ready, then follow the allocation and the reclaim.
phase=boot # boot -> ready -> held -> freed -> finished
first_free=0
min_free=999999
peak=0
low=999999
last_low_cs=0
base_total=0
deadline=$(($(up_cs) + 18000))
while [ "$phase" != finished ] && [ "$(up_cs)" -lt "$deadline" ]; do
    now=$(up_cs)
    mem=$(mem_json)
    st=$(stats_json)
    res=$(echo "$mem" | json_field resident_mib)
    rep=$(echo "$mem" | json_field reported_mib)
    free=$(echo "$st" | json_field free_mib)
    total=$(echo "$st" | json_field total_mib)
    echo "TIER3-SAMPLE cs=$now resident=${res:-?} reported=${rep:-?} free=${free:-?} total=${total:-?} phase=$phase"
    if [ -z "$res" ]; then
        usleep 500000
        continue
    fi
    case "$phase" in
    boot)
        if echo "$mem" | grep -q '"driver_ready": true' && [ -n "$free" ] && [ -n "$total" ]; then
            echo "TIER3 l2-ready cs=$((now - t_create)) total_mib=$total free_mib=$free"
            base_total=$total
            first_free=$free
            phase=ready
        fi
        ;;
    ready | held)
        [ "$res" -le "$peak" ] || peak=$res
        [ -z "$free" ] || [ "$free" -ge "$min_free" ] || min_free=$free
        if [ -n "$free" ] && [ "$free" -le $((first_free - ALLOC_MIB + 112)) ]; then
            phase=held
            last_low_cs=$now
        elif [ "$phase" = held ] && [ -n "$free" ] && [ "$free" -ge $((min_free + ALLOC_MIB - 112)) ]; then
            phase=freed
            echo "TIER3 guest-freed cs=$now held_until_cs=$last_low_cs peak=$peak"
        fi
        ;;
    freed)
        [ "$res" -ge "$low" ] || low=$res
        if [ $((peak - res)) -ge "$RECLAIM_MIB" ]; then
            echo "TIER3 reclaim ok=1 peak=$peak low=$res drop=$((peak - res)) cs=$((now - last_low_cs))"
            phase=finished
        elif [ $((now - last_low_cs)) -gt "$RECLAIM_BUDGET_CS" ]; then
            echo "TIER3 reclaim ok=0 peak=$peak low=$low drop=$((peak - low)) cs=$((now - last_low_cs))"
            fail "resident dropped only $((peak - low)) MiB from $peak MiB within $((RECLAIM_BUDGET_CS / 100)) s"
            phase=finished
        fi
        ;;
    esac
    [ "$phase" = finished ] || sleep 1
done
[ "$phase" = finished ] || fail "reclaim phase stuck in '$phase' (free never fell by ${ALLOC_MIB} MiB, or the guest never freed)"
[ "$base_total" -gt 0 ] || base_total=$(stats_json | json_field total_mib)

# 3. virtio-mem: grow by GROW_MIB and back.
# resize WHAT TARGET_MIB: resize to TARGET_MIB total, then wait for the guest's MemTotal.
resize() {
    what=$1
    target=$2
    before_total=$(stats_json | json_field total_mib)
    pf0=$(host_free)
    as0=$(host_assigned)
    t=$(up_cs)
    $TP vm resize --socket "$SOCK" --timeout 120 "$VM" "${target}M" >/tmp/resize.out 2>&1
    rc=$?
    plug_cs=$(($(up_cs) - t))
    [ "$rc" -eq 0 ] || {
        fail "$what: vm resize exited $rc"
        tail -c 600 /tmp/resize.out
    }
    mem=$(mem_json)
    plugged=$(echo "$mem" | json_field plugged_mib)
    requested=$(echo "$mem" | json_field requested_mib)
    # The guest's MemTotal must move by the resize (within 16 MiB; it counts pages, and
    # onlining takes memmap from the plugged memory on some configurations).
    want=$((base_total + target - BOOT_MIB))
    total=$before_total
    mt_cs=-1
    while [ $(($(up_cs) - t)) -lt 9000 ]; do
        total=$(stats_json | json_field total_mib)
        d=$((total - want))
        [ "$d" -ge 0 ] || d=$((-d))
        if [ "$d" -le 16 ]; then
            mt_cs=$(($(up_cs) - t))
            break
        fi
        usleep 250000
    done
    [ "$mt_cs" -ge 0 ] || fail "$what: guest MemTotal stayed at $total MiB (want $want)"
    # The pool's free count is live; the per-VM assignment in `host` is what the VM's thread
    # last published (every 2 s), so read it after one more publication.
    sleep 3
    pf1=$(host_free)
    as1=$(host_assigned)
    echo "TIER3 $what rc=$rc plug_cs=$plug_cs memtotal_cs=$mt_cs total_before=$before_total total_after=$total want_total=$want plugged=$plugged requested=$requested pool_free_before=$pf0 pool_free_after=$pf1 assigned_before=$as0 assigned_after=$as1"
}
resize grow $((BOOT_MIB + GROW_MIB))
resize shrink "$BOOT_MIB"

# 4. Delete: every frame back in the pool.
$TP vm delete --socket "$SOCK" "$VM" >/dev/null 2>&1 || fail "vm delete"
echo "TIER3 delete pool_total=$pool_total pool_free=$(host_free)"
kill "$serve_pid" 2>/dev/null
wait "$serve_pid" 2>/dev/null
echo "TIER3-SERVE-LOG-BEGIN"
sed 's/\x1b\[[0-9;]*m//g' /tmp/serve.log | tail -n 40
echo "TIER3-SERVE-LOG-END"

# 5. Free page hinting by the stock driver (docs/balloon.md, "Free page hinting"): a second
#    daemon with a swap file (its userfaultfd write tracking is what lets the host discard
#    hinted pages) whose reclaim engine runs phase 1 only (count reported pages, start hint
#    passes) over a 300 MiB resident budget. The VM offers hinting and NOT free page
#    reporting, so only hinting can return memory. Its guest allocates, touches and frees
#    256 MiB: resident memory rises above the budget's low watermark (95%), the engine starts
#    a pass every run, and once the guest has freed its memory a pass hints it and the host
#    discards it, so resident must fall by HINT_DROP_MIB from its peak.
HSOCK=/tmp/tidepool-tier3-hint.sock
HINT_BOOT_MIB=512
HINT_ALLOC_MIB=256
HINT_BUDGET_MIB=300
HINT_DROP_MIB=200
# Debian's kernel zeroes every page it allocates (CONFIG_INIT_ON_ALLOC_DEFAULT_ON=y), and the
# hinting driver allocates the blocks it hints: with that on, the guest writes each hinted
# page before hinting it, so nothing stays write-protected to discard (docs/balloon.md).
HINT_CMDLINE=${HINT_CMDLINE-init_on_alloc=0}
hint_t0=$(up_cs)
mkdir -p /tmp/tier3-hint
rm -f "$HSOCK"
# Debug for the balloon hook: one "hinted pages discarded" line per pass (discarded, kept).
RUST_LOG=info,tidepool_vmm::reclaim::balloon=debug \
    $TP serve --socket "$HSOCK" --pool-mib 1024 --swap-path /tmp/tier3-hint/swap --swap-max-mib 64 \
    --reclaim-budget-mib "$HINT_BUDGET_MIB" --reclaim-phases reported >/tmp/serve-hint.log 2>&1 &
hint_pid=$!
i=0
while [ ! -S "$HSOCK" ] && [ $i -lt 100 ]; do
    usleep 100000
    i=$((i + 1))
done
hmem() { $TP vm memory --socket "$HSOCK" --json vm1; }
hstats() { $TP balloon stats --socket "$HSOCK" --json vm1; }
# hmetric TEXT EVENT: the VM's virtio-balloon counter EVENT in the /metrics TEXT.
hmetric() {
    echo "$1" | sed -n "s/^tidepool_device_events_total{vm=\"vm1\",device=\"virtio-balloon\",event=\"$2\"} \([0-9]*\).*/\1/p" | head -n1
}
hphase=boot # boot -> ready -> held -> freed -> finished
if [ ! -S "$HSOCK" ]; then
    fail "hint: tidepool serve did not create its socket"
    hphase=finished
elif ! $TP vm create --socket "$HSOCK" --memory "${HINT_BOOT_MIB}M" --free-page-hinting \
    --stats-interval 1 --kernel vmlinux --initrd initramfs.cpio.gz \
    --cmdline "$HINT_CMDLINE tidepool.workload=sleep:2,alloc:${HINT_ALLOC_MIB}:2000" >/dev/null; then
    fail "hint: vm create"
    hphase=finished
fi
hbase=0
hfirst_free=0
hpeak=0
hlow=999999
hheld_cs=0
hready_cs=-1
hcs=-1
hdeadline=$(($(up_cs) + 12000))
while [ "$hphase" != finished ] && [ "$(up_cs)" -lt "$hdeadline" ]; do
    now=$(up_cs)
    mem=$(hmem)
    st=$(hstats)
    res=$(echo "$mem" | json_field resident_mib)
    free=$(echo "$st" | json_field free_mib)
    echo "TIER3-SAMPLE hint cs=$now resident=${res:-?} free=${free:-?} phase=$hphase"
    if [ -z "$res" ]; then
        usleep 500000
        continue
    fi
    [ "$res" -le "$hpeak" ] || hpeak=$res
    case "$hphase" in
    boot)
        if [ -n "$free" ]; then
            hready_cs=$((now - hint_t0))
            hbase=$res
            hfirst_free=$free
            hphase=ready
        fi
        ;;
    ready)
        # The host sees the guest's touches: 3/4 of the allocation is resident.
        [ "$res" -lt $((hbase + HINT_ALLOC_MIB * 3 / 4)) ] || hphase=held
        ;;
    held)
        # Free memory back near its level before the allocation: the guest has freed. (A
        # running pass lowers the guest's free memory, it never raises it.)
        if [ -n "$free" ] && [ "$free" -ge $((hfirst_free - 80)) ]; then
            hphase=freed
        else
            hheld_cs=$now
        fi
        ;;
    esac
    if [ "$hphase" = freed ] || [ "$hphase" = held ]; then
        [ "$res" -ge "$hlow" ] || hlow=$res
        if [ $((hpeak - res)) -ge "$HINT_DROP_MIB" ]; then
            hcs=$((now - hheld_cs))
            hphase=finished
        elif [ "$hphase" = freed ] && [ $((now - hheld_cs)) -gt 3000 ]; then
            hphase=finished
        fi
    fi
    [ "$hphase" = finished ] || sleep 1
done
m=$($TP metrics --socket "$HSOCK")
mem=$(hmem)
passes=$(hmetric "$m" hint_passes_completed)
hinted=$(hmetric "$m" hinted_bytes)
discarded=$(hmetric "$m" hint_discarded_bytes)
credited=$(echo "$m" | sed -n 's/^tidepool_reclaim_phase_bytes_total{phase="reported",kind="reclaimed"} \([0-9]*\).*/\1/p')
runs=$(echo "$m" | sed -n 's/^tidepool_reclaim_runs_total{trigger="watermark"} \([0-9]*\).*/\1/p')
hrep=$(echo "$mem" | json_field reported_mib)
hbal=$(echo "$mem" | json_field ballooned_mib)
hswp=$(echo "$mem" | json_field swapped_mib)
$TP vm delete --socket "$HSOCK" vm1 >/dev/null 2>&1 || fail "hint: vm delete"
kill "$hint_pid" 2>/dev/null
wait "$hint_pid" 2>/dev/null
hdrop=$((hpeak - hlow))
hok=0
[ "$hcs" -lt 0 ] || hok=1
echo "TIER3 hint ok=$hok ready_cs=$hready_cs base=$hbase peak=$hpeak low=$hlow drop=$hdrop cs=$hcs passes=${passes:-0} hinted_mib=$((${hinted:-0} >> 20)) discarded_mib=$((${discarded:-0} >> 20)) credited_mib=$((${credited:-0} >> 20)) runs=${runs:-0} reported_mib=${hrep:-?} ballooned_mib=${hbal:-?} swapped_mib=${hswp:-?} step_cs=$(($(up_cs) - hint_t0))"
[ "$hok" -eq 1 ] || fail "hint: resident dropped only $hdrop MiB from $hpeak MiB (phase $hphase; want $HINT_DROP_MIB)"
[ "${passes:-0}" -ge 1 ] || fail "hint: no hinting pass completed"
[ $((${hinted:-0} >> 20)) -ge "$HINT_DROP_MIB" ] || fail "hint: the guest hinted only $((${hinted:-0} >> 20)) MiB"
[ $((${discarded:-0} >> 20)) -ge "$HINT_DROP_MIB" ] || fail "hint: the host discarded only $((${discarded:-0} >> 20)) MiB of hints"
[ "${hrep:-1}" = 0 ] || fail "hint: reported_mib=${hrep:-?}: free page reporting must be off"
echo "TIER3-HINT-LOG-BEGIN"
sed 's/\x1b\[[0-9;]*m//g' /tmp/serve-hint.log | grep -i -E 'hint|phase|swap|warn|error' | tail -n 30
echo "TIER3-HINT-LOG-END"

# 6. NUMA placement on a 2-node L1.
# numa_check BACKING ALLOC_MIB [OPTION]
numa_check() {
    out=/tmp/numa-$1.out
    $TP numa-check --kernel vmlinux --initrd initramfs.cpio.gz --memory-mib 512 \
        --numa interleave:0,1 --backing "$1" --timeout-s 120 ${3:-} \
        --cmdline "tidepool.workload=alloc:$2:200" >"$out" 2>&1
    rc=$?
    grep -v -E 'guest\| TIDEPOOL-(MODULE|VIRTIO|STEP|MEMORY-BLOCKS|MEMFREE)' "$out"
    res=$(grep 'NUMA-CHECK result' "$out" | tail -n1)
    f() { echo "$res" | sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
    on() { sed -n "s/.*NUMA-CHECK node pool_node=$1 .* on_node=\([0-9]*\) .*/\1/p" "$out" | tail -n1; }
    echo "TIER3 numa-$1 rc=$rc ok=$(f ok) host_nodes=$(f host_nodes) guest_nodes=$(f guest_nodes) memtotal_kb=$(f memtotal_kb) misplaced=$(f misplaced) node0_pages=$(on 0) node1_pages=$(on 1)"
    [ "$rc" -eq 0 ] || fail "numa-check on $1 exited $rc: $(f why)"
}
if [ "$(cat /sys/devices/system/node/online 2>/dev/null)" = 0-1 ]; then
    numa_check anonymous 300
    numa_check memfd 240
    # hugetlbfs: 128 huge pages per guest node, reserved on each L1 node (and given back).
    hp=/sys/devices/system/node/node%s/hugepages/hugepages-2048kB/nr_hugepages
    for n in 0 1; do echo 136 >"$(printf "$hp" $n)"; done
    echo "TIER3 hugepages node0=$(cat "$(printf "$hp" 0)") node1=$(cat "$(printf "$hp" 1)")"
    numa_check hugetlbfs 240 --no-thp
    for n in 0 1; do echo 0 >"$(printf "$hp" $n)"; done
else
    echo "TIER3 numa-skipped online=$(cat /sys/devices/system/node/online 2>/dev/null)"
fi
echo "TIER3 done failures=$failures"
[ "$failures" -eq 0 ]
