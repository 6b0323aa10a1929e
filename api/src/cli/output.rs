//! Human-readable rendering of API results (tables and key/value lists).

use crate::types::*;
use std::fmt::Write as _;

/// A simple left-aligned table with a header row.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn kv(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let _ = writeln!(out, "{k:<w$}  {v}");
    }
    out
}

/// `1536` -> `1536 MiB`.
pub fn mib(v: u64) -> String {
    format!("{v} MiB")
}

fn boot(vm: &VmInfo) -> String {
    match vm.boot_source {
        BootSource::DefaultGuest => "default guest".into(),
        BootSource::Kernel => vm.kernel.clone().unwrap_or_else(|| "kernel".into()),
        BootSource::RawImage => "raw image".into(),
    }
}

/// `vm list`.
pub fn vm_list(vms: &[VmInfo]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.id.clone(),
                v.state.as_str().to_string(),
                v.vcpus.to_string(),
                mib(v.memory_mib),
                v.hotplug.map_or("-".into(), |h| mib(h.region_mib)),
                if v.balloon.is_some() { "yes" } else { "no" }.into(),
                boot(v),
            ]
        })
        .collect();
    table(
        &[
            "ID", "STATE", "VCPUS", "MEMORY", "HOTPLUG", "BALLOON", "BOOT",
        ],
        &rows,
    )
}

/// `vm show`.
pub fn vm_show(v: &VmInfo) -> String {
    let mut pairs = vec![
        ("id", v.id.clone()),
        ("state", v.state.as_str().to_string()),
        ("vcpus", v.vcpus.to_string()),
        ("memory", mib(v.memory_mib)),
        ("boot", boot(v)),
        (
            "backing",
            format!(
                "{:?}{}",
                v.backing.kind,
                if v.backing.thp { " + THP" } else { "" }
            )
            .to_lowercase(),
        ),
    ];
    if let Some(h) = v.hotplug {
        pairs.push((
            "hotplug",
            format!("{} region, {} blocks", mib(h.region_mib), mib(h.block_mib)),
        ));
    }
    if let Some(b) = v.balloon {
        pairs.push((
            "balloon",
            format!(
                "free page reporting {}, free page hinting {}, deflate on OOM {}, stats every {} s",
                b.free_page_reporting, b.free_page_hinting, b.deflate_on_oom, b.stats_interval_s
            ),
        ));
    }
    if let Some(n) = &v.numa {
        pairs.push((
            "numa",
            format!("{:?} {:?}", n.policy, n.nodes).to_lowercase(),
        ));
    }
    kv(&pairs)
}

/// `vm memory` and the end of `vm resize`.
pub fn memory(m: &MemoryInfo) -> String {
    let mut pairs = vec![
        ("boot", mib(m.boot_mib)),
        ("region", mib(m.region_mib)),
        ("plugged", mib(m.plugged_mib)),
        ("requested", mib(m.requested_mib)),
        ("resident", mib(m.resident_mib)),
        ("reported", mib(m.reported_mib)),
        ("ballooned", mib(m.ballooned_mib)),
        ("refaulted", mib(m.refaulted_mib)),
        (
            "resize",
            format!("{:?} (from {})", m.resize.phase, mib(m.resize.from_mib)).to_lowercase(),
        ),
        ("driver ready", m.resize.driver_ready.to_string()),
    ];
    if let Some(e) = &m.resize.error {
        pairs.push(("resize error", e.clone()));
    }
    kv(&pairs)
}

/// `balloon set`.
pub fn balloon(b: &BalloonInfo) -> String {
    kv(&[("target", mib(b.target_mib)), ("actual", mib(b.actual_mib))])
}

/// How a balloon statistic is shown.
#[derive(Clone, Copy)]
enum Unit {
    Mib,
    Bytes,
    Count,
}

/// Bytes with a binary unit (`512 B`, `3.5 MiB`).
fn bytes(v: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if v < 1024 {
        return format!("{v} B");
    }
    let mut x = v as f64 / 1024.0;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < UNITS.len() {
        x /= 1024.0;
        i += 1;
    }
    format!("{x:.1} {}", UNITS[i])
}

/// `balloon stats`.
pub fn balloon_stats(s: &BalloonStats) -> String {
    let mut pairs = vec![("target", mib(s.target_mib)), ("actual", mib(s.actual_mib))];
    let opt = [
        ("swap in", s.swap_in_bytes, Unit::Bytes),
        ("swap out", s.swap_out_bytes, Unit::Bytes),
        ("major faults", s.major_faults, Unit::Count),
        ("minor faults", s.minor_faults, Unit::Count),
        ("free", s.free_mib, Unit::Mib),
        ("total", s.total_mib, Unit::Mib),
        ("available", s.available_mib, Unit::Mib),
        ("disk caches", s.disk_caches_mib, Unit::Mib),
        ("hugetlb allocations", s.hugetlb_allocations, Unit::Count),
        ("hugetlb failures", s.hugetlb_failures, Unit::Count),
        ("oom kills", s.oom_kills, Unit::Count),
        ("allocation stalls", s.alloc_stalls, Unit::Count),
        ("scanned (kswapd)", s.async_scan_bytes, Unit::Bytes),
        ("scanned (direct)", s.direct_scan_bytes, Unit::Bytes),
        ("reclaimed (kswapd)", s.async_reclaim_bytes, Unit::Bytes),
        ("reclaimed (direct)", s.direct_reclaim_bytes, Unit::Bytes),
        (
            "unknown tags",
            s.unknown_tags.filter(|n| *n > 0),
            Unit::Count,
        ),
    ];
    for (k, v, unit) in opt {
        if let Some(v) = v {
            let text = match unit {
                Unit::Mib => mib(v),
                Unit::Bytes => bytes(v),
                Unit::Count => v.to_string(),
            };
            pairs.push((k, text));
        }
    }
    kv(&pairs)
}

/// `host`.
pub fn host(h: &HostInfo) -> String {
    let rows: Vec<Vec<String>> = h
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node.to_string(),
                mib(n.total_mib),
                mib(n.free_mib),
                mib(n.assigned_mib),
                format!(
                    "{}/{}/{}",
                    n.resident_mib.unmovable_mib,
                    n.resident_mib.movable_mib,
                    n.resident_mib.reclaimable_mib
                ),
                format!("{:.2}", n.fragmentation_index),
                format!("{:.0}%", n.thp_share * 100.0),
                format!("{:.2}", n.overcommit_ratio),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "NODE",
            "TOTAL",
            "FREE",
            "ASSIGNED",
            "RESIDENT U/M/R (MiB)",
            "FRAG",
            "THP",
            "OVERCOMMIT",
        ],
        &rows,
    );
    let _ = writeln!(
        out,
        "total {}, free {}, assigned {}, overcommit {:.2}, {} VMs",
        mib(h.total_mib),
        mib(h.free_mib),
        mib(h.assigned_mib),
        h.overcommit_ratio,
        h.vm_count
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["ID", "STATE"],
            &[
                vec!["vm-1".into(), "running".into()],
                vec!["vm-10".into(), "paused".into()],
            ],
        );
        assert_eq!(t, "ID     STATE\nvm-1   running\nvm-10  paused\n");
    }

    #[test]
    fn vm_list_shows_every_vm() {
        let vm = VmInfo {
            id: "vm-1".into(),
            state: VmState::Running,
            vcpus: 2,
            memory_mib: 512,
            boot_source: BootSource::DefaultGuest,
            kernel: None,
            hotplug: Some(HotplugConfig {
                region_mib: 1024,
                block_mib: 2,
                memslots: Default::default(),
            }),
            balloon: None,
            numa: None,
            backing: BackingConfig::default(),
            stop_reason: None,
        };
        let t = vm_list(std::slice::from_ref(&vm));
        assert!(t.contains("vm-1"), "{t}");
        assert!(t.contains("1024 MiB"), "{t}");
        let s = vm_show(&vm);
        assert!(s.contains("anonymous + thp"), "{s}");
    }
}
