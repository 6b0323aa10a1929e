//! Per-VM reclaim accounting: which guest pages are ballooned or reported (and so discarded on
//! the host), counters of what the guest did, per-kind counts of rejected guest input, and
//! refault estimation through a [`ResidencyProbe`].

use crate::backend::{RamMap, ReclaimBackend, ResidencyProbe};
use crate::error::BackendError;
pub use crate::pageset::PageSet;
use crate::{HUGE_PAGE_SIZE, MIB, PAGE_SIZE};
use serde::Serialize;

/// Cumulative counters of what the guest did through the balloon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Pages inflated (discarded) over the device's life.
    pub inflated_pages: u64,
    /// Pages deflated (given back to the guest) over the device's life.
    pub deflated_pages: u64,
    /// Pages the guest deflated below the target with DEFLATE_ON_OOM negotiated (its OOM
    /// notifier took them back without asking).
    pub oom_deflated_pages: u64,
    /// Pages deflated below the target without DEFLATE_ON_OOM (a protocol violation; accepted,
    /// since the memory is the guest's).
    pub unrequested_deflated_pages: u64,
    /// Free page reports (descriptor chains) processed.
    pub reports: u64,
    /// Valid ranges in those reports.
    pub reported_ranges: u64,
    /// Bytes discarded through reporting over the device's life.
    pub reported_bytes_total: u64,
    /// Reports returned without discarding because the guest poisons free pages.
    pub poison_skipped_reports: u64,
    /// Whole huge-page-sized (2 MiB) blocks discarded.
    pub whole_huge_blocks: u64,
    /// Huge-page-sized blocks only partially discarded (a huge backing page split).
    pub split_huge_blocks: u64,
    /// Bytes of reported pages found resident again by residency sampling (refault estimate).
    pub refaulted_bytes_total: u64,
    /// Calls into the backend's discard.
    pub discard_calls: u64,
    /// Discards the backend failed (those pages are not counted as reclaimed).
    pub discard_failures: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
    /// Residency samples taken.
    pub residency_samples: u64,
    /// Ranges the VMM told the balloon left the VM (virtio-mem unplug), over the device's life.
    pub unplugged_ranges: u64,
    /// Ballooned or reported bytes forgotten because their range was unplugged.
    pub unplug_cleared_bytes: u64,
}

/// Guest input that was ignored, counted per kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InputErrors {
    /// A PFN or range outside the VM's RAM.
    pub out_of_ram: u64,
    /// A reported range overlapping another range of the same report.
    pub overlap: u64,
    /// A range whose address or length is not 4 KiB aligned.
    pub misaligned: u64,
    /// A zero-length range or an empty buffer.
    pub zero_length: u64,
    /// A range whose end overflows the address space.
    pub overflow: u64,
    /// A descriptor with the wrong direction (device-writable PFN or stats buffers,
    /// device-readable report entries).
    pub wrong_direction: u64,
    /// Trailing bytes that do not form a whole entry (PFN array or stats array).
    pub trailing_bytes: u64,
    /// Buffers larger than the device accepts (the excess is ignored).
    pub oversized: u64,
    /// Descriptors whose memory could not be read.
    pub unreadable: u64,
    /// Inflates of pages already in the balloon.
    pub duplicate_inflate: u64,
    /// Deflates of pages not in the balloon.
    pub deflate_not_inflated: u64,
    /// Statistics entries with a tag this device does not know.
    pub unknown_stat_tags: u64,
    /// A second statistics buffer while one was held (the older one is returned).
    pub extra_stats_buffers: u64,
    /// A PFN or range in a part of RAM the VM does not hold now (an unplugged virtio-mem
    /// block).
    pub not_plugged: u64,
}

/// A point-in-time view of one VM's balloon accounting, in bytes (and MiB for reading).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AccountingSnapshot {
    /// Guest RAM the balloon covers and the VM holds now (unplugged virtio-mem blocks
    /// excluded).
    pub assigned_bytes: u64,
    /// Bytes currently in the balloon (inflated, discarded on the host).
    pub ballooned_bytes: u64,
    /// Bytes currently reported free and discarded (not ballooned, not seen refaulted).
    pub reported_bytes: u64,
    /// `assigned - ballooned - reported`: an upper bound on resident guest RAM.
    pub resident_estimate_bytes: u64,
    /// Host-resident guest RAM at the last residency sample, if one was taken.
    pub sampled_resident_bytes: Option<u64>,
    /// Reported bytes found resident again (cumulative refault estimate).
    pub refaulted_bytes: u64,
    /// The balloon target the host set.
    pub target_bytes: u64,
    /// The balloon size the guest reports in its config (`actual`).
    pub guest_actual_bytes: u64,
    /// `assigned` in MiB.
    pub assigned_mib: u64,
    /// `ballooned` in MiB.
    pub ballooned_mib: u64,
    /// `reported` in MiB.
    pub reported_mib: u64,
    /// `resident_estimate` in MiB.
    pub resident_estimate_mib: u64,
    /// Cumulative counters.
    pub counters: Counters,
    /// Ignored guest input per kind.
    pub input_errors: InputErrors,
}

/// What one residency sample found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ResidencySample {
    /// Reported bytes probed.
    pub probed_reported_bytes: u64,
    /// Reported bytes that became resident since they were reported (now counted refaulted and
    /// removed from the reported set).
    pub refaulted_bytes: u64,
    /// Host-resident bytes over all guest RAM.
    pub resident_bytes: u64,
    /// Ballooned bytes that are resident: the guest touched pages it gave away without
    /// deflating them first (or only read them: reads map the zero page).
    pub ballooned_resident_bytes: u64,
}

/// The balloon's host-side state: page sets and counters. Inflate, deflate and reporting
/// operations live in [`crate::inflate`] and [`crate::reporting`].
#[derive(Debug)]
pub struct Ledger {
    pub(crate) ram: RamMap,
    pub(crate) ballooned: PageSet,
    pub(crate) reported: PageSet,
    /// RAM of the map the VM does not hold now (unplugged virtio-mem blocks).
    pub(crate) absent: PageSet,
    pub(crate) counters: Counters,
    pub(crate) errors: InputErrors,
    pub(crate) sampled_resident: Option<u64>,
}

/// Pages probed per residency call.
const PROBE_CHUNK_PAGES: usize = 16 * 1024;

impl Ledger {
    /// An empty ledger over `ram`.
    pub fn new(ram: RamMap) -> Self {
        Ledger {
            ballooned: PageSet::new(&ram),
            reported: PageSet::new(&ram),
            absent: PageSet::new(&ram),
            ram,
            counters: Counters::default(),
            errors: InputErrors::default(),
            sampled_resident: None,
        }
    }

    /// The RAM covered.
    pub fn ram(&self) -> &RamMap {
        &self.ram
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Ignored input per kind.
    pub fn input_errors(&self) -> &InputErrors {
        &self.errors
    }

    /// Ballooned pages.
    pub fn ballooned(&self) -> &PageSet {
        &self.ballooned
    }

    /// Reported pages.
    pub fn reported(&self) -> &PageSet {
        &self.reported
    }

    /// Pages of the map the VM does not hold now.
    pub fn absent(&self) -> &PageSet {
        &self.absent
    }

    /// Whether `[gpa, gpa+len)` is RAM the VM holds now: inside the map and not unplugged.
    /// Guest input outside the map counts as `out_of_ram`, input in an unplugged part as
    /// `not_plugged` (both through `Ledger::check_present`).
    pub fn is_present(&self, gpa: u64, len: u64) -> bool {
        self.ram.contains(gpa, len) && self.absent.count_in(gpa, len) == 0
    }

    /// Like [`Ledger::is_present`], counting a miss in the input errors.
    pub(crate) fn check_present(&mut self, gpa: u64, len: u64) -> bool {
        if !self.ram.contains(gpa, len) {
            self.errors.out_of_ram += 1;
            false
        } else if self.absent.count_in(gpa, len) != 0 {
            self.errors.not_plugged += 1;
            false
        } else {
            true
        }
    }

    /// `[gpa, gpa+len)` left the VM (a virtio-mem unplug, or a region not plugged yet): its
    /// pages are forgotten from the balloon and the reported set (their host memory is gone
    /// with the block; a later plug brings fresh, unreported memory) and marked absent, so
    /// guest input there is refused and residency sampling skips it. Parts outside the map are
    /// ignored. Returns the ballooned and reported bytes forgotten.
    pub fn forget_range(&mut self, gpa: u64, len: u64) -> (u64, u64) {
        let ballooned = self.ballooned.remove(gpa, len) * PAGE_SIZE;
        let reported = self.reported.remove(gpa, len) * PAGE_SIZE;
        self.absent.insert(gpa, len);
        self.counters.unplugged_ranges += 1;
        self.counters.unplug_cleared_bytes += ballooned + reported;
        (ballooned, reported)
    }

    /// `[gpa, gpa+len)` is the VM's again (a virtio-mem plug). Returns the bytes that were
    /// absent.
    pub fn restore_range(&mut self, gpa: u64, len: u64) -> u64 {
        self.absent.remove(gpa, len) * PAGE_SIZE
    }

    /// The present parts of the map, as `(gpa, len)` runs.
    pub fn present_runs(&self) -> Vec<(u64, u64)> {
        let absent = self.absent.runs();
        let mut out = Vec::new();
        let mut a = absent.iter().peekable();
        for &(start, len) in self.ram.ranges() {
            let end = start + len;
            let mut cur = start;
            while let Some(&&(s, l)) = a.peek() {
                if s >= end {
                    break;
                }
                if s > cur {
                    out.push((cur, s - cur));
                }
                cur = cur.max(s + l);
                if s + l <= end {
                    a.next();
                } else {
                    break;
                }
            }
            if cur < end {
                out.push((cur, end - cur));
            }
        }
        out
    }

    pub(crate) fn count_stats_update(&mut self) {
        self.counters.stats_updates += 1;
    }

    /// Discard `[gpa, gpa+len)` (contained in RAM, 4 KiB aligned) through `backend`, counting
    /// huge-block effects. Returns false (and counts a failure) if the backend refused.
    pub(crate) fn discard(&mut self, backend: &mut dyn ReclaimBackend, gpa: u64, len: u64) -> bool {
        let mut ok = true;
        for (a, l) in self.ram.split(gpa, len) {
            self.counters.discard_calls += 1;
            if backend.discard(a, l).is_err() {
                self.counters.discard_failures += 1;
                ok = false;
            }
        }
        if ok {
            let huge = backend
                .huge_page_size()
                .unwrap_or(HUGE_PAGE_SIZE)
                .max(PAGE_SIZE);
            let (whole, split) = huge_blocks(gpa, len, huge);
            self.counters.whole_huge_blocks += whole;
            self.counters.split_huge_blocks += split;
        }
        ok
    }

    /// Probe the residency of reported pages (refault estimate) and of all guest RAM.
    pub fn sample_residency(
        &mut self,
        probe: &dyn ResidencyProbe,
    ) -> Result<ResidencySample, BackendError> {
        let mut sample = ResidencySample::default();
        let mut buf = vec![false; PROBE_CHUNK_PAGES];
        for (gpa, len) in self.reported.runs() {
            let mut off = 0;
            while off < len {
                let pages = ((len - off) / PAGE_SIZE).min(PROBE_CHUNK_PAGES as u64) as usize;
                let chunk = &mut buf[..pages];
                probe.residency(gpa + off, chunk)?;
                sample.probed_reported_bytes += pages as u64 * PAGE_SIZE;
                for (i, _) in chunk.iter().enumerate().filter(|(_, r)| **r) {
                    let removed = self
                        .reported
                        .remove(gpa + off + i as u64 * PAGE_SIZE, PAGE_SIZE);
                    sample.refaulted_bytes += removed * PAGE_SIZE;
                }
                off += pages as u64 * PAGE_SIZE;
            }
        }
        for (gpa, len) in self.present_runs() {
            sample.resident_bytes += resident_in(probe, gpa, len, &mut buf)?;
        }
        for (gpa, len) in self.ballooned.runs() {
            sample.ballooned_resident_bytes += resident_in(probe, gpa, len, &mut buf)?;
        }
        self.counters.refaulted_bytes_total += sample.refaulted_bytes;
        self.counters.residency_samples += 1;
        self.sampled_resident = Some(sample.resident_bytes);
        Ok(sample)
    }

    /// A snapshot, given the config-space target and actual (in pages).
    pub fn snapshot(&self, target_pages: u32, actual_pages: u32) -> AccountingSnapshot {
        let assigned = self.ram.total() - self.absent.bytes();
        let ballooned = self.ballooned.bytes();
        let reported = self.reported.bytes();
        let resident = assigned.saturating_sub(ballooned + reported);
        AccountingSnapshot {
            assigned_bytes: assigned,
            ballooned_bytes: ballooned,
            reported_bytes: reported,
            resident_estimate_bytes: resident,
            sampled_resident_bytes: self.sampled_resident,
            refaulted_bytes: self.counters.refaulted_bytes_total,
            target_bytes: u64::from(target_pages) * PAGE_SIZE,
            guest_actual_bytes: u64::from(actual_pages) * PAGE_SIZE,
            assigned_mib: assigned / MIB,
            ballooned_mib: ballooned / MIB,
            reported_mib: reported / MIB,
            resident_estimate_mib: resident / MIB,
            counters: self.counters,
            input_errors: self.errors,
        }
    }

    /// Forget the balloon (device reset: the driver starts over with an empty balloon).
    pub(crate) fn reset_balloon(&mut self) {
        self.ballooned = PageSet::new(&self.ram);
    }
}

/// Resident bytes of `[gpa, gpa+len)`, probed in chunks of `buf.len()` pages.
fn resident_in(
    probe: &dyn ResidencyProbe,
    gpa: u64,
    len: u64,
    buf: &mut [bool],
) -> Result<u64, BackendError> {
    let mut resident = 0;
    let mut off = 0;
    while off < len {
        let pages = ((len - off) / PAGE_SIZE).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..pages];
        probe.residency(gpa + off, chunk)?;
        resident += chunk.iter().filter(|r| **r).count() as u64 * PAGE_SIZE;
        off += pages as u64 * PAGE_SIZE;
    }
    Ok(resident)
}

/// Whole and partially covered `huge`-sized blocks of `[gpa, gpa+len)`.
pub fn huge_blocks(gpa: u64, len: u64, huge: u64) -> (u64, u64) {
    if len == 0 {
        return (0, 0);
    }
    let end = gpa + len;
    let first_whole = gpa.div_ceil(huge) * huge;
    let last_whole = end / huge * huge;
    if first_whole >= last_whole {
        // No whole block: one or two partial blocks.
        let partial = if (gpa / huge) == ((end - 1) / huge) {
            1
        } else {
            2
        };
        return (0, partial);
    }
    let whole = (last_whole - first_whole) / huge;
    let partial = u64::from(gpa % huge != 0) + u64::from(end % huge != 0);
    (whole, partial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_block_counting() {
        const H: u64 = HUGE_PAGE_SIZE;
        assert_eq!(huge_blocks(0, H, H), (1, 0));
        assert_eq!(huge_blocks(H, 2 * H, H), (2, 0));
        assert_eq!(huge_blocks(0x1000, 0x1000, H), (0, 1));
        assert_eq!(huge_blocks(H - 0x1000, 0x2000, H), (0, 2));
        assert_eq!(huge_blocks(0x1000, 2 * H, H), (1, 2));
        assert_eq!(huge_blocks(0, H + 0x1000, H), (1, 1));
        assert_eq!(huge_blocks(0, 0, H), (0, 0));
    }
}
