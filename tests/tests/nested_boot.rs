//! Tier 3: the stock Debian cloud kernel (the default guest) on Tidepool's own VMM and a real
//! KVM, inside a nested L1 (QEMU TCG with emulated SVM, `resources/nested/run-l1.sh`).
//!
//! One L1 boot serves every stock-Linux check: the test builds the guest image
//! (`resources/guest/build.sh`) if it is missing, finds or builds the release `tidepool`
//! binary, and runs `resources/nested/tier3-memory.sh` in L1, which
//! 1. boots the guest with `tidepool run --memory-mib 512` to its `/init` and ACPI power-off
//!    (MemTotal printed and plausible for 512 MiB);
//! 2. starts `tidepool serve` and creates a Linux VM (1 GiB boot RAM, 1 GiB virtio-mem region,
//!    balloon with free page reporting and statistics) whose `/init` allocates, touches and
//!    frees 512 MiB: host-side resident memory of the VM must drop by at least 400 MiB within
//!    30 s of the guest freeing it;
//! 3. resizes the VM up by 512 MiB and back down: the guest's MemTotal follows and the
//!    daemon's pool counters move by 512 MiB and come back;
//! 4. deletes the VM: the pool is whole again;
//! 5. free page hinting by the stock driver: a second daemon with a swap file and
//!    `--reclaim-phases reported` over a 300 MiB resident budget runs a 512 MiB VM with
//!    hinting on and reporting off, whose `/init` allocates, touches and frees 256 MiB. The
//!    engine's passes (started because resident memory is over the budget) must complete, the
//!    guest must hint, the host must discard at least 200 MiB of hinted pages and the VM's
//!    resident memory must fall by at least 200 MiB from its peak (nothing reported, ballooned
//!    or swapped);
//! 6. NUMA: L1 has two nodes (2 GiB + 1 GiB, `run-l1.sh --numa`). `tidepool numa-check` boots
//!    a 512 MiB guest under `interleave:0,1` on the anonymous, memfd and hugetlbfs backings: the
//!    guest sees two NUMA nodes, reaches `/init` with a plausible MemTotal, and every resident
//!    page of every boot block sits on the L1 node its pool block came from (node 1 holding
//!    some), as L1's kernel reports it (`move_pages`).
//!
//! It prints the timings (L1 boot, L2 to `/init`, resize durations, reclaim drop and time). It
//! skips (printing why) when qemu-system-x86_64 is missing or the guest image cannot be built
//! here.

use std::process::Command;
use std::time::Instant;
use tidepool_tests::{guest_image, on_path, tidepool_binary, workspace_root};

/// The value after `key` in the first line containing it, up to whitespace.
fn value_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v))
        .and_then(|v| v.split_whitespace().next())
}

/// The `key=value` fields of the first `TIER3 <what> ...` marker line.
fn marker<'a>(text: &'a str, what: &str) -> Option<Vec<(&'a str, &'a str)>> {
    let head = format!("TIER3 {what} ");
    text.lines().find_map(|l| {
        l.find(&head).map(|i| {
            l[i + head.len()..]
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .collect()
        })
    })
}

/// Field `key` of marker `what` as an integer; panics with the serial tail when missing.
fn field(text: &str, what: &str, key: &str, tail: &str) -> i64 {
    marker(text, what)
        .and_then(|f| f.iter().find(|(k, _)| *k == key).map(|(_, v)| *v))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `TIER3 {what}` marker with {key}=<n>:\n{tail}"))
}

#[test]
fn stock_debian_kernel_boots_to_init_in_nested_kvm() {
    let root = workspace_root();
    if !on_path("qemu-system-x86_64") {
        eprintln!("SKIP nested_boot: qemu-system-x86_64 is not installed (resources/ci/install-deps.sh installs it)");
        return;
    }
    // The image must carry the current /init (its NUMA markers): build.sh is a no-op when the
    // cached image is up to date. If it cannot run, the cached image is used as it is.
    let build = root.join("resources/guest/build.sh");
    match Command::new(&build).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "nested_boot: {} failed ({}); using the cached guest image",
            build.display(),
            o.status
        ),
        Err(e) => eprintln!("nested_boot: cannot run {}: {e}", build.display()),
    }
    let guest = match guest_image(&root) {
        Ok(g) => g,
        Err(why) => {
            eprintln!("SKIP nested_boot: no guest image: {why}");
            return;
        }
    };
    let bin = tidepool_binary(&root);
    let log = std::env::temp_dir().join(format!("tidepool-nested-boot-{}.log", std::process::id()));
    let t0 = Instant::now();
    let out = Command::new(root.join("resources/nested/run-l1.sh"))
        .args(["-q", "-t", "660", "--numa", "2048,1024", "--log"])
        .arg(&log)
        .arg("--binary")
        .arg(&bin)
        .arg("--file")
        .arg(guest.join("vmlinux"))
        .arg("--file")
        .arg(guest.join("initramfs.cpio.gz"))
        .arg("--file")
        .arg(root.join("resources/nested/tier3-memory.sh"))
        .args(["--", "sh", "tier3-memory.sh"])
        .output()
        .expect("run resources/nested/run-l1.sh");
    let wall = t0.elapsed();
    let serial = std::fs::read(&log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let harness = String::from_utf8_lossy(&out.stderr).into_owned();
    let tail: String = serial
        .lines()
        .rev()
        .take(80)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    let failures: Vec<&str> = serial
        .lines()
        .filter(|l| l.contains("TIER3-FAIL"))
        .collect();
    assert!(
        out.status.success() && failures.is_empty(),
        "nested run failed ({}); failures: {failures:?}\nharness: {harness}\nserial tail:\n{tail}",
        out.status
    );
    let _ = std::fs::remove_file(&log);

    // 1. The plain runner: /init reached, MemTotal plausible, ACPI power-off.
    assert!(
        serial.contains("TIDEPOOL-INIT-START"),
        "the L2 guest never reached /init:\n{tail}"
    );
    let mem_kb: u64 = value_after(&serial, "TIDEPOOL-MEMTOTAL-KB ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal line:\n{tail}"));
    // 512 MiB of boot RAM minus the kernel image and reservations: a stock 6.1 kernel reports
    // about 470-490 MiB. More than 512 MiB, or less than 400 MiB, means the e820 map is wrong.
    assert!(
        (400 * 1024..=512 * 1024).contains(&mem_kb),
        "MemTotal {mem_kb} kB is not plausible for 512 MiB"
    );
    assert!(
        serial.contains("TIDEPOOL-RUN end=PowerOff"),
        "the guest did not power off through ACPI S5:\n{tail}"
    );
    assert_eq!(field(&serial, "boot", "rc", &tail), 0);

    // 2. Free page reporting: resident memory drops by >= 400 MiB within 30 s.
    let ready_cs = field(&serial, "l2-ready", "cs", &tail);
    let base_total = field(&serial, "l2-ready", "total_mib", &tail);
    assert!(
        (900..=1024).contains(&base_total),
        "MemTotal {base_total} MiB is not plausible for 1 GiB of boot RAM"
    );
    assert_eq!(field(&serial, "reclaim", "ok", &tail), 1);
    let peak = field(&serial, "reclaim", "peak", &tail);
    let drop = field(&serial, "reclaim", "drop", &tail);
    let reclaim_cs = field(&serial, "reclaim", "cs", &tail);
    assert!(drop >= 400, "resident dropped by {drop} MiB only");
    assert!(
        reclaim_cs <= 3000,
        "the drop took {reclaim_cs} cs, more than 30 s"
    );

    // 3. virtio-mem: +512 MiB and back; MemTotal follows, the pool counters match.
    for (what, delta) in [("grow", 512), ("shrink", -512)] {
        assert_eq!(
            field(&serial, what, "rc", &tail),
            0,
            "{what}: resize failed"
        );
        let before = field(&serial, what, "total_before", &tail);
        let after = field(&serial, what, "total_after", &tail);
        assert!(
            (after - before - delta).abs() <= 16,
            "{what}: guest MemTotal went {before} -> {after} MiB, want a change of {delta}"
        );
        assert!(field(&serial, what, "memtotal_cs", &tail) >= 0);
        let plugged = field(&serial, what, "plugged", &tail);
        let requested = field(&serial, what, "requested", &tail);
        let want_plugged = if delta > 0 { 1024 + 512 } else { 1024 };
        assert_eq!(plugged, want_plugged, "{what}: plugged");
        assert_eq!(requested, want_plugged, "{what}: requested");
        let pf0 = field(&serial, what, "pool_free_before", &tail);
        let pf1 = field(&serial, what, "pool_free_after", &tail);
        let as0 = field(&serial, what, "assigned_before", &tail);
        let as1 = field(&serial, what, "assigned_after", &tail);
        assert_eq!(pf0 - pf1, delta, "{what}: pool free {pf0} -> {pf1} MiB");
        assert_eq!(as1 - as0, delta, "{what}: pool assigned {as0} -> {as1} MiB");
    }
    assert_eq!(
        field(&serial, "delete", "pool_free", &tail),
        field(&serial, "delete", "pool_total", &tail),
        "the pool is not whole after deleting the VM"
    );

    // 5. Free page hinting by the stock Linux driver returned the freed memory.
    let hint = |key: &str| field(&serial, "hint", key, &tail);
    assert_eq!(
        hint("ok"),
        1,
        "hinting: resident memory did not fall by 200 MiB:\n{tail}"
    );
    assert!(hint("passes") >= 1, "hinting: no pass completed");
    assert!(
        hint("hinted_mib") >= 200,
        "hinting: the guest hinted too little"
    );
    assert!(
        hint("discarded_mib") >= 200,
        "hinting: the host discarded too little"
    );
    assert!(hint("drop") >= 200, "hinting: resident fell too little");
    for only_hinting in ["reported_mib", "ballooned_mib", "swapped_mib"] {
        assert_eq!(hint(only_hinting), 0, "hinting: {only_hinting} is not 0");
    }

    // 6. NUMA placement on the 2-node L1, anonymous, memfd and hugetlbfs backings.
    for backing in ["anonymous", "memfd", "hugetlbfs"] {
        let what = format!("numa-{backing}");
        let f = |key: &str| field(&serial, &what, key, &tail);
        assert_eq!(f("rc"), 0, "{what}: numa-check failed:\n{tail}");
        assert_eq!(f("ok"), 1, "{what}: placement check failed");
        assert_eq!(
            f("host_nodes"),
            2,
            "{what}: L1 does not have two NUMA nodes"
        );
        assert_eq!(
            f("guest_nodes"),
            2,
            "{what}: the guest does not see two NUMA nodes"
        );
        let mt = f("memtotal_kb");
        assert!(
            (400 * 1024..=512 * 1024).contains(&mt),
            "{what}: MemTotal {mt} kB is not plausible for 512 MiB"
        );
        assert_eq!(f("misplaced"), 0, "{what}: pages off their block's node");
        assert!(f("node0_pages") > 0, "{what}: nothing resident on node 0");
        assert!(f("node1_pages") > 0, "{what}: nothing resident on node 1");
    }

    let l2_uptime = value_after(&serial, "TIDEPOOL-INIT-START uptime=").unwrap_or("?");
    let l2_wall = value_after(&serial, "TIDEPOOL-RUN-MARK TIDEPOOL-INIT-START ").unwrap_or("?");
    let l1_uptime = value_after(&serial, "TIDEPOOL-L1-INIT uptime=").unwrap_or("?");
    let l1_wall = value_after(&harness, "init after ").unwrap_or("?");
    let setup_ms = value_after(&serial, "setup_ms=").unwrap_or("?");
    let cs = |v: i64| format!("{:.2}s", v as f64 / 100.0);
    eprintln!(
        "nested_boot: L1 boot to /init {l1_wall} wall ({l1_uptime}s L1 uptime); \
         L2 (tidepool run, PVH vmlinux, 512 MiB) to /init {l2_wall}s from `tidepool run` start \
         ({l2_uptime}s L2 uptime, VM set-up {setup_ms} ms); MemTotal {mem_kb} kB; \
         whole test {:.1}s",
        wall.as_secs_f64()
    );
    eprintln!(
        "nested_boot: served VM (1 GiB + 1 GiB virtio-mem, balloon FPR): create to driver ready \
         and first stats {}; MemTotal {base_total} MiB",
        cs(ready_cs)
    );
    eprintln!(
        "nested_boot: free page reporting: resident peak {peak} MiB, dropped by {drop} MiB \
         {} after the guest freed 512 MiB",
        cs(reclaim_cs)
    );
    eprintln!(
        "nested_boot: free page hinting (512 MiB VM, 256 MiB freed, 300 MiB budget, phase 1 \
         only): create to first statistics {}; resident {} -> peak {} -> {} MiB (drop {} MiB) \
         {} after the last sample holding the memory; {} passes, {} MiB hinted, {} MiB \
         discarded, {} MiB credited to phase 1; step {}",
        cs(hint("ready_cs")),
        hint("base"),
        hint("peak"),
        hint("low"),
        hint("drop"),
        cs(hint("cs")),
        hint("passes"),
        hint("hinted_mib"),
        hint("discarded_mib"),
        hint("credited_mib"),
        cs(hint("step_cs")),
    );
    for backing in ["anonymous", "memfd", "hugetlbfs"] {
        let what = format!("numa-{backing}");
        eprintln!(
            "nested_boot: NUMA ({backing}, interleave:0,1 on a 2-node L1): guest nodes {}, \
             MemTotal {} kB, resident pages on node 0: {}, on node 1: {}, misplaced {}",
            field(&serial, &what, "guest_nodes", &tail),
            field(&serial, &what, "memtotal_kb", &tail),
            field(&serial, &what, "node0_pages", &tail),
            field(&serial, &what, "node1_pages", &tail),
            field(&serial, &what, "misplaced", &tail),
        );
    }
    for what in ["grow", "shrink"] {
        eprintln!(
            "nested_boot: virtio-mem {what}: plugged {} MiB in {} (vm resize), guest MemTotal \
             {} -> {} MiB after {}; pool free {} -> {} MiB",
            field(&serial, what, "plugged", &tail),
            cs(field(&serial, what, "plug_cs", &tail)),
            field(&serial, what, "total_before", &tail),
            field(&serial, what, "total_after", &tail),
            cs(field(&serial, what, "memtotal_cs", &tail)),
            field(&serial, what, "pool_free_before", &tail),
            field(&serial, what, "pool_free_after", &tail),
        );
    }
}
