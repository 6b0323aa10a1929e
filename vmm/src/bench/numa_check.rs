//! `tidepool numa-check` (hidden): boot one Linux VM under a NUMA policy in this process and
//! report where its memory really is, for the nested tier-3 test on a 2-node L1.
//!
//! It builds the daemon's manager over the host's topology (as `tidepool serve` does), creates
//! the VM (policy, backing, workload from the command line), follows its console until the
//! guest's workload is done (printing the guest's `TIDEPOOL-` markers, among them
//! `TIDEPOOL-NUMA-NODES`), and then asks the kernel, page by page, where the pages behind each
//! boot RAM block are (`move_pages` query, [`crate::memory::numa::nodes_of_pages`]) against
//! the host node the block came from. It also prints this process's `numa_maps` lines over the
//! VM's window (the kernel's own view: policy and `N<node>=pages`). Output lines:
//!
//! ```text
//! NUMA-CHECK guest| <guest console marker>
//! NUMA-CHECK node pool_node=<n> blocks=<n> resident_pages=<n> on_node=<n> misplaced=<n> misplaced_on=<list>
//! NUMA-CHECK numa_maps <line>
//! NUMA-CHECK result ok=0|1 host_nodes=<n> guest_nodes=<n> memtotal_kb=<n> misplaced=<n> why=<...>
//! ```
//!
//! The exit status is 0 when every resident page sits on its block's node and each node of
//! the policy holds resident pages.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use guest_mm::frame::NodeId;
use tidepool_api::types::{BackingConfig, BackingKind, CreateVmRequest, VmState};
use tidepool_api::ApiBackend;

use crate::hostpool::POOL_BLOCK_BYTES;
use crate::manager::{DaemonReclaimConfig, VmManager};
use crate::memory::numa::{nodes_of_pages, HostNuma, PageNode};
use crate::memory::GuestWindow;
use crate::up::direct::console_delta;

/// Arguments of `tidepool numa-check`.
#[derive(Debug, Args)]
pub struct NumaCheckArgs {
    /// Guest kernel (ELF vmlinux).
    #[arg(long)]
    pub kernel: String,
    /// Guest initramfs.
    #[arg(long)]
    pub initrd: String,
    /// Kernel command-line options (Tidepool's defaults come first).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Boot RAM in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u64,
    /// NUMA policy: local, preferred:N, interleave:N,M or bind:N,M.
    #[arg(long, default_value = "interleave:0,1")]
    pub numa: String,
    /// Backing: anonymous, memfd or hugetlbfs.
    #[arg(long, default_value = "anonymous")]
    pub backing: String,
    /// No transparent huge pages.
    #[arg(long)]
    pub no_thp: bool,
    /// Pool memory per host node, in MiB (default: each node's memory).
    #[arg(long)]
    pub pool_mib: Option<u64>,
    /// Console marker after which the placement is checked.
    #[arg(long, default_value = "TIDEPOOL-WORKLOAD-DONE")]
    pub until: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
}

/// Resident pages of one pool node's blocks, by the node they really are on.
#[derive(Debug, Default)]
struct NodeTally {
    blocks: u64,
    on: BTreeMap<u16, u64>,
    absent: u64,
    other: u64,
}

fn tally(window: &GuestWindow, blocks: &[(u64, NodeId)]) -> BTreeMap<u16, NodeTally> {
    let mut out: BTreeMap<u16, NodeTally> = BTreeMap::new();
    for &(gpa, node) in blocks {
        let t = out.entry(node.0).or_default();
        t.blocks += 1;
        let Some(base) = window.host_addr(gpa) else {
            t.other += POOL_BLOCK_BYTES / 4096;
            continue;
        };
        let pages: Vec<usize> = (0..POOL_BLOCK_BYTES as usize)
            .step_by(4096)
            .map(|o| base + o)
            .collect();
        match nodes_of_pages(&pages) {
            Ok(v) => {
                for p in v {
                    match p {
                        PageNode::On(n) => *t.on.entry(n.0).or_default() += 1,
                        PageNode::Absent => t.absent += 1,
                        PageNode::Other(_) => t.other += 1,
                    }
                }
            }
            Err(e) => {
                println!("NUMA-CHECK query-failed gpa={gpa:#x} error={e}");
                t.other += pages.len() as u64;
            }
        }
    }
    out
}

/// `numa_maps` lines of this process that overlap `[start, end)`.
fn numa_maps_over(start: usize, end: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string("/proc/self/numa_maps") else {
        return vec!["(numa_maps unreadable)".into()];
    };
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    // numa_maps gives start addresses only; take each VMA's end from maps.
    let ends: BTreeMap<usize, usize> = maps
        .lines()
        .filter_map(|l| {
            let range = l.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect();
    text.lines()
        .filter(|l| {
            let Some(a) = l
                .split_whitespace()
                .next()
                .and_then(|a| usize::from_str_radix(a, 16).ok())
            else {
                return false;
            };
            let b = ends.get(&a).copied().unwrap_or(a + 1);
            a < end && b > start
        })
        .map(str::to_string)
        .collect()
}

/// VMAs, `N<node>=` page sums and the first line of one (policy, file) group.
type MapsGroup = (u64, BTreeMap<String, u64>, String);

/// Group `numa_maps` lines by policy and file: one `numa_maps_sum` line per group (VMAs and
/// the `N<node>=` page counts added up) and its first `numa_maps` line as a sample.
fn summarize_numa_maps(lines: &[String]) -> Vec<String> {
    let mut groups: BTreeMap<(String, String), MapsGroup> = BTreeMap::new();
    for l in lines {
        let mut words = l.split_whitespace().skip(1);
        let policy = words.next().unwrap_or("?").to_string();
        let mut file = "anon".to_string();
        let mut counts: Vec<(String, u64)> = Vec::new();
        for w in words {
            if let Some(f) = w.strip_prefix("file=") {
                file = f.to_string();
            } else if let Some((k, v)) = w.split_once('=') {
                if k.starts_with('N') && k[1..].chars().all(|c| c.is_ascii_digit()) {
                    counts.push((k.to_string(), v.parse().unwrap_or(0)));
                }
            }
        }
        let g = groups
            .entry((policy, file))
            .or_insert_with(|| (0, BTreeMap::new(), l.clone()));
        g.0 += 1;
        for (k, v) in counts {
            *g.1.entry(k).or_default() += v;
        }
    }
    let mut out = Vec::new();
    for ((policy, file), (vmas, counts, sample)) in groups {
        let n: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push(format!(
            "numa_maps_sum policy={policy} file={file} vmas={vmas} pages={}",
            if n.is_empty() {
                "-".into()
            } else {
                n.join(",")
            }
        ));
        out.push(format!("numa_maps {sample}"));
    }
    out
}

fn parse_backing(s: &str, thp: bool) -> Result<BackingConfig, String> {
    let kind = match s {
        "anonymous" => BackingKind::Anonymous,
        "memfd" => BackingKind::Memfd,
        "hugetlbfs" => BackingKind::Hugetlbfs,
        other => return Err(format!("unknown backing {other:?}")),
    };
    Ok(BackingConfig {
        kind,
        thp: thp && kind != BackingKind::Hugetlbfs,
    })
}

/// Run the check; returns the process exit status.
pub fn run(a: &NumaCheckArgs) -> Result<bool, String> {
    let host = HostNuma::get();
    println!(
        "NUMA-CHECK host online_nodes={:?} multi_node={}",
        host.online(),
        host.is_multi_node()
    );
    let numa = tidepool_api::cli::args::parse_numa(&a.numa).map_err(|e| e.to_string())?;
    let policy_nodes: Vec<u16> = numa
        .nodes
        .iter()
        .filter_map(|&n| u16::try_from(n).ok())
        .collect();
    let mut reclaim = DaemonReclaimConfig::default();
    reclaim.swap.enabled = false;
    let manager = crate::up::daemon::build_manager_with(
        a.pool_mib.map(|m| m << 20),
        Duration::from_secs(20),
        reclaim,
    )?;
    let result = check(a, &manager, numa, &policy_nodes);
    manager.shutdown();
    result
}

fn check(
    a: &NumaCheckArgs,
    manager: &Arc<VmManager>,
    numa: tidepool_api::types::NumaConfig,
    policy_nodes: &[u16],
) -> Result<bool, String> {
    let mut req = CreateVmRequest::with_memory(a.memory_mib);
    req.kernel = Some(a.kernel.clone());
    req.initrd = Some(a.initrd.clone());
    req.cmdline = Some(a.cmdline.clone());
    req.numa = Some(numa);
    req.backing = Some(parse_backing(&a.backing, !a.no_thp)?);
    let t0 = Instant::now();
    let info = manager
        .create_vm(req)
        .map_err(|e| format!("creating the VM: {e}"))?;
    let id = info.id.clone();
    println!(
        "NUMA-CHECK created vm={id} backing={} policy={} in_ms={}",
        a.backing,
        a.numa,
        t0.elapsed().as_millis()
    );
    // Follow the console until the marker.
    let mut tail = String::new();
    let mut partial = String::new();
    let mut guest_nodes: Option<u64> = None;
    let mut memtotal_kb: Option<u64> = None;
    let mut reached = false;
    let deadline = t0 + Duration::from_secs(a.timeout_s);
    while !reached && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        if let Ok(Some(text)) = manager.call(&id, |vm| vm.console()) {
            let delta = console_delta(&tail, &text).to_string();
            tail = text
                .char_indices()
                .rev()
                .nth(255)
                .map(|(i, _)| text[i..].to_string())
                .unwrap_or_else(|| text.clone());
            partial.push_str(&delta);
            while let Some(nl) = partial.find('\n') {
                let line: String = partial.drain(..=nl).collect();
                let line = line.trim_end();
                if !line.contains("TIDEPOOL-") {
                    continue;
                }
                println!("NUMA-CHECK guest| {line}");
                if let Some(v) = line.split("TIDEPOOL-NUMA-NODES n=").nth(1) {
                    guest_nodes = v.trim().parse().ok();
                }
                if let Some(v) = line.split("TIDEPOOL-MEMTOTAL-KB ").nth(1) {
                    memtotal_kb = v.trim().parse().ok();
                }
                if line.contains(&a.until) {
                    reached = true;
                }
            }
        }
        if !matches!(manager.get_vm(&id), Ok(v) if v.state != VmState::Stopped) {
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "NUMA-CHECK console until={} reached={} after_s={secs:.1}",
        a.until,
        u8::from(reached)
    );
    let snapshot = manager
        .call(&id, |vm| {
            let window = vm.vm().map(|v| Arc::clone(v.window()));
            (window, vm.boot_blocks().to_vec())
        })
        .map_err(|e| format!("reading the VM: {e}"))?;
    let (Some(window), boot) = snapshot else {
        let _ = manager.delete_vm(&id);
        return Err("the VM has no window".into());
    };
    let gpas = window
        .layout()
        .boot_ram_ranges()
        .into_iter()
        .flat_map(|r| r.step_by(POOL_BLOCK_BYTES as usize));
    let blocks: Vec<(u64, NodeId)> = gpas.zip(boot.iter().map(|b| b.1)).collect();
    let tallies = tally(&window, &blocks);
    let mut misplaced = 0u64;
    let mut empty_nodes = Vec::new();
    for (node, t) in &tallies {
        let on = t.on.get(node).copied().unwrap_or(0);
        let wrong: u64 =
            t.on.iter()
                .filter(|(n, _)| *n != node)
                .map(|(_, c)| c)
                .sum();
        let resident = on + wrong;
        misplaced += wrong;
        let wrong_on: Vec<String> =
            t.on.iter()
                .filter(|(n, _)| *n != node)
                .map(|(n, c)| format!("{n}:{c}"))
                .collect();
        println!(
            "NUMA-CHECK node pool_node={node} blocks={} resident_pages={resident} on_node={on} misplaced={wrong} misplaced_on={} absent={} other={}",
            t.blocks,
            if wrong_on.is_empty() { "-".into() } else { wrong_on.join(",") },
            t.absent,
            t.other
        );
        if resident == 0 {
            empty_nodes.push(*node);
        }
    }
    let r = window.host_range();
    for l in summarize_numa_maps(&numa_maps_over(r.start, r.end)) {
        println!("NUMA-CHECK {l}");
    }
    let mut why = Vec::new();
    if !reached {
        why.push(format!("marker {} not seen", a.until));
    }
    if misplaced > 0 {
        why.push(format!("{misplaced} pages off their block's node"));
    }
    for n in policy_nodes {
        if !tallies.contains_key(n) {
            why.push(format!("no boot block from node {n}"));
        }
    }
    if !empty_nodes.is_empty() {
        why.push(format!("no resident page on node(s) {empty_nodes:?}"));
    }
    let ok = why.is_empty();
    println!(
        "NUMA-CHECK result ok={} host_nodes={} guest_nodes={} memtotal_kb={} misplaced={misplaced} why={}",
        u8::from(ok),
        HostNuma::get().online().len(),
        guest_nodes.map_or("?".into(), |n| n.to_string()),
        memtotal_kb.map_or("?".into(), |n| n.to_string()),
        if ok { "-".into() } else { why.join(";").replace(' ', "_") }
    );
    drop(window);
    if let Err(e) = manager.delete_vm(&id) {
        println!("NUMA-CHECK delete failed: {e}");
    }
    Ok(ok)
}
