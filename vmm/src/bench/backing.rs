//! `tidepool bench backing`: what each window backing costs here. For every kind, a fresh
//! window gets a hot-plug range of `size` placed from pool blocks (as a virtio-mem plug does),
//! the host thread writes one byte per 4 KiB page (the first touch), the range is discarded
//! while placed (what balloon / free page reporting do), touched again, and removed (what
//! unplug and VM deletion do). Figures are medians over the rounds, in GiB/s of `size`.
//!
//! Kinds: anonymous with THP (the default), anonymous with 4 KiB pages, memfd with 4 KiB pages
//! (`shmem_enabled` = `never`, this host's setting), memfd with shmem THP, and hugetlbfs. The
//! last two change host-wide settings, so they only run with `--allow-host-tuning` as root:
//! `shmem_enabled` is set to `advise` and `vm.nr_hugepages` raised for the run, and both are
//! put back afterwards (on error too: [`crate::memory::tuning::HostSetting`] restores on drop).
//! Without that flag they are skipped with the reason on stderr.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mm::frame::{FrameId, NodeId};

use super::{progress, BenchError, BenchOptions, Report};
use crate::memory::tuning::{self, HostSetting};
use crate::memory::{
    BackingKind, BackingSpec, GuestWindow, Layout, LayoutConfig, PoolBlock, PoolFiles, BLOCK_SIZE,
    MIB,
};

const PAGE: usize = 4096;

fn failed(e: impl ToString) -> BenchError {
    BenchError::Failed {
        suite: "backing",
        reason: e.to_string(),
    }
}

/// One round's timings.
#[derive(Debug, Default, Clone, Copy)]
struct Round {
    place: Duration,
    touch: Duration,
    discard: Option<Duration>,
    retouch: Duration,
    remove: Duration,
    huge_share: f64,
}

/// Bytes of `[addr, addr+len)` mapped by huge PMDs in this process (`AnonHugePages` plus
/// `ShmemPmdMapped` of the VMAs inside the range, from /proc/self/smaps).
fn pmd_mapped_bytes(addr: usize, len: usize) -> u64 {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut inside = false;
    let mut kib = 0u64;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = a >= addr && b <= addr + len;
                continue;
            }
        }
        if inside && (line.starts_with("AnonHugePages:") || line.starts_with("ShmemPmdMapped:")) {
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib * 1024
}

/// Write one byte in every 4 KiB page of `[addr, addr+len)`.
fn touch(addr: usize, len: usize) {
    let mut off = 0;
    while off < len {
        // SAFETY: [addr, addr+len) is a placed (read-write) range of a window this benchmark
        // owns; no Rust reference points into it and nothing else uses it concurrently.
        unsafe { std::ptr::write_volatile((addr + off) as *mut u8, 1) };
        off += PAGE;
    }
}

fn round(files: &Arc<PoolFiles>, spec: BackingSpec, size: u64) -> Result<Round, BenchError> {
    let layout = Layout::new(LayoutConfig {
        boot_ram: BLOCK_SIZE,
        hotplug_size: size.div_ceil(128 * MIB) * 128 * MIB,
    })
    .map_err(failed)?;
    let hp = layout
        .hotplug()
        .ok_or_else(|| failed("no hot-plug region"))?;
    let backing = files.backing(spec).map_err(failed)?;
    let file = backing.needs_pool_blocks();
    let frames_per_block = BLOCK_SIZE / guest_mm::FRAME_SIZE;
    let block = |i: u64| PoolBlock {
        frame: FrameId(i * frames_per_block),
        node: NodeId(0),
    };
    let boot: Vec<PoolBlock> = if file { vec![block(0)] } else { Vec::new() };
    let window = GuestWindow::with_backing(layout, backing, &boot).map_err(failed)?;
    let n = size / BLOCK_SIZE;
    let blocks: Vec<PoolBlock> = if file {
        (1..=n).map(block).collect()
    } else {
        Vec::new()
    };
    let addr = window
        .host_addr(hp.start)
        .ok_or_else(|| failed("no address"))?;
    let len = size as usize;

    let t = Instant::now();
    window.place(hp.start, size, &blocks).map_err(failed)?;
    let place = t.elapsed();
    let t = Instant::now();
    touch(addr, len);
    let touch_time = t.elapsed();
    let huge_share = if spec.kind == BackingKind::Hugetlbfs {
        // hugetlbfs pages are 2 MiB by construction.
        1.0
    } else {
        (pmd_mapped_bytes(addr, len) as f64 / size as f64).min(1.0)
    };
    let t = Instant::now();
    let discard = match window.discard(hp.start, size) {
        Ok(()) => Some(t.elapsed()),
        Err(crate::memory::MemoryError::Unsupported(_)) => None,
        Err(e) => return Err(failed(e)),
    };
    let resident = window.resident_bytes(hp.start, size).map_err(failed)?;
    if discard.is_some() && resident != 0 {
        return Err(failed(format!(
            "{spec:?}: {resident} bytes still resident after discard"
        )));
    }
    // Touch again after the discard (only meaningful when something was discarded).
    let t = Instant::now();
    touch(addr, len);
    let retouch = t.elapsed();
    let t = Instant::now();
    window.remove_block(hp.start, size).map_err(failed)?;
    let remove = t.elapsed();
    Ok(Round {
        place,
        touch: touch_time,
        discard,
        retouch,
        remove,
        huge_share,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn measure(
    r: &mut Report,
    name: &str,
    files: &Arc<PoolFiles>,
    spec: BackingSpec,
    size: u64,
    rounds: usize,
) -> Result<(), BenchError> {
    progress(&format!("{name}: {} MiB, {rounds} rounds", size >> 20));
    let gib = size as f64 / (1u64 << 30) as f64;
    let mut rs = Vec::new();
    for _ in 0..rounds {
        rs.push(round(files, spec, size)?);
    }
    let rate = |f: &dyn Fn(&Round) -> Duration| {
        median(rs.iter().map(|x| gib / f(x).as_secs_f64()).collect())
    };
    r.add(
        &format!("{name}_touch_gib_s"),
        rate(&|x| x.place + x.touch),
        "GiB/s, place + first touch (one write per 4 KiB page)",
    );
    if rs.iter().all(|x| x.discard.is_some()) {
        r.add(
            &format!("{name}_discard_gib_s"),
            rate(&|x| x.discard.unwrap_or_default()),
            "GiB/s, discard while placed (balloon / reporting)",
        );
        r.add(
            &format!("{name}_retouch_gib_s"),
            rate(&|x| x.retouch),
            "GiB/s, touch after the discard",
        );
    } else {
        progress(&format!(
            "{name}: the backing refuses discards (none measured)"
        ));
    }
    r.add(
        &format!("{name}_remove_gib_s"),
        rate(&|x| x.remove),
        "GiB/s, remove from the window (unplug / VM delete)",
    );
    r.add(
        &format!("{name}_huge_share"),
        median(rs.iter().map(|x| x.huge_share).collect()),
        "share of the range mapped by 2 MiB pages after the first touch (smaps)",
    );
    Ok(())
}

/// Run the suite.
pub fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    let size: u64 = if opts.quick { 256 * MIB } else { 1024 * MIB };
    let rounds = if opts.quick { 3 } else { 5 };
    let mut r = Report::default();
    let files = PoolFiles::new();
    let spec = |kind, thp| BackingSpec { kind, thp };
    measure(
        &mut r,
        "anon_thp",
        &files,
        spec(BackingKind::Anonymous, true),
        size,
        rounds,
    )?;
    measure(
        &mut r,
        "anon_4k",
        &files,
        spec(BackingKind::Anonymous, false),
        size,
        rounds,
    )?;
    let shmem_now = std::fs::read_to_string(crate::memory::backing::SHMEM_ENABLED)
        .ok()
        .and_then(|s| tuning::selected(&s).map(str::to_owned))
        .unwrap_or_default();
    progress(&format!("host shmem_enabled = {shmem_now}"));
    // memfd without THP: only meaningful (and only so named) while shmem THP is off.
    if !crate::memory::backing::shmem_thp_enabled() {
        measure(
            &mut r,
            "memfd_4k",
            &files,
            spec(BackingKind::Memfd, false),
            size,
            rounds,
        )?;
    } else {
        progress("memfd_4k: skipped, the host's shmem_enabled gives memfd huge pages");
    }
    if opts.allow_host_tuning {
        let guard: Option<HostSetting> = if crate::memory::backing::shmem_thp_enabled() {
            None
        } else {
            match tuning::shmem_thp_advise() {
                Ok(g) => {
                    progress(&format!(
                        "shmem_enabled set to advise for this run (was {}); it is put back after",
                        g.previous()
                    ));
                    Some(g)
                }
                Err(e) => {
                    progress(&format!(
                        "memfd_thp: skipped, cannot set shmem_enabled: {e}"
                    ));
                    None
                }
            }
        };
        if crate::memory::backing::shmem_thp_enabled() {
            let res = measure(
                &mut r,
                "memfd_thp",
                &files,
                spec(BackingKind::Memfd, true),
                size,
                rounds,
            );
            if let Some(g) = guard {
                g.restore()
                    .map_err(|e| failed(format!("restoring shmem_enabled: {e}")))?;
            }
            res?;
        }
        let pages = size / BLOCK_SIZE + 1;
        let have = tuning::free_hugepages();
        let reserved = if have >= pages {
            None
        } else {
            match tuning::reserve_hugepages(pages - have) {
                Ok((g, free)) if free >= pages => Some(g),
                Ok((_g, free)) => {
                    progress(&format!(
                        "hugetlbfs: skipped, only {free} of {pages} huge pages could be reserved"
                    ));
                    return Ok(r);
                }
                Err(e) => {
                    progress(&format!(
                        "hugetlbfs: skipped, cannot raise vm.nr_hugepages: {e}"
                    ));
                    return Ok(r);
                }
            }
        };
        let res = measure(
            &mut r,
            "hugetlbfs",
            &files,
            spec(BackingKind::Hugetlbfs, false),
            size,
            rounds,
        );
        if let Some(g) = reserved {
            g.restore()
                .map_err(|e| failed(format!("restoring vm.nr_hugepages: {e}")))?;
        }
        res?;
    } else {
        progress("memfd_thp and hugetlbfs: skipped; they change host-wide settings (shmem_enabled, vm.nr_hugepages) and need --allow-host-tuning as root");
    }
    Ok(r)
}
