//! Free page hinting with write tracking: arm a hint epoch, then discard hinted pages that
//! were not written since it began.
//!
//! A guest's hint ("this block is free") is only good until the guest writes the block again,
//! and Linux may give hinted blocks back to its allocator at any time without telling the
//! host. [`VmSwap::hint_arm`] starts a hint epoch: under the state lock it write-protects every
//! resident page of the range (userfaultfd-wp, the same protection that makes clean pages
//! droppable) and sets the page's *armed* bit; clean and swapped pages are armed as they are
//! (already protected, or not mapped). Every path by which a page can be written clears the
//! bit under the same lock: the write-protect fault, the missing fault (any first touch), a
//! swap-in for write, and every move to a writable state (`PageTable::set` clears it).
//!
//! [`VmSwap::hint_discard`] then discards, under the ops lock (no swap-out in flight) and the
//! state lock (no fault being resolved), only armed pages: their content is what it was when
//! the epoch began, i.e. untouched since before the hinting pass started, so the guest has
//! not reused them since it hinted them. A guest write racing with the discard stops in the
//! fault handler, which waits for the state lock; it then finds the page discarded and lets
//! the write through onto a fresh zero page, so the write is never lost. Swapped-out pages
//! lose their slot too, so they read as zeros afterwards, never as the stale slot copy.
//!
//! Hinted pages that are no longer armed but hold only zeros are discarded too, checked under
//! write protection ([`VmSwap::hint_discard`]): Linux with `init_on_alloc` (Debian's default)
//! zeroes each block it allocates for hinting, so it writes every page it hints.
//!
//! The caller must start the hinting pass *after* `hint_arm` returns and offer only the hints
//! of that pass (or of later passes) with the epoch it got: a hint of a pass that began
//! before the epoch may describe a page the guest wrote before it was armed.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::pages::{Page, BLOCK};
use super::vm::{bump, runs, VmSwap};
use super::{SwapError, PAGE};

/// A hint epoch, from [`VmSwap::hint_arm`]; hints are discarded only under the current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HintEpoch(pub u64);

/// What [`VmSwap::hint_arm`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HintArmStats {
    /// The epoch that began.
    pub epoch: HintEpoch,
    /// Pages armed (resident, clean or swapped, in registered blocks).
    pub armed_pages: u64,
    /// Blocks skipped because nothing in them was ever populated (no hint there can free
    /// anything, and registering them would cost their first touches a userfaultfd round).
    pub skipped_blocks: u64,
}

/// What [`VmSwap::hint_discard`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HintDiscardStats {
    /// Pages that were in memory and were discarded (host memory released), `zero_pages`
    /// included.
    pub discarded_pages: u64,
    /// Of those, pages written since the epoch began (or never armed) that held only zeros
    /// when checked under write protection: a guest that zeroes the blocks it allocates
    /// for hinting (Linux with `init_on_alloc`) writes every hinted page.
    pub zero_pages: u64,
    /// Swapped-out pages whose slot was freed (they now read as zero).
    pub freed_slots: u64,
    /// Hinted pages kept: written since the epoch began and not all zero, or not in memory.
    pub kept_pages: u64,
}

impl HintDiscardStats {
    /// Host memory released.
    pub fn discarded_bytes(&self) -> u64 {
        self.discarded_pages * PAGE
    }
}

impl VmSwap {
    /// The whole window (boot and hot-pluggable RAM), as guest-physical addresses: the range
    /// to arm before a pass (unplaced and never-touched blocks are skipped cheaply).
    pub fn hint_range(&self) -> Range<u64> {
        0..self.inner.size
    }

    /// Begin a new hint epoch over `range` (guest-physical, 4 KiB aligned): write-protect and
    /// arm its pages. Ends the previous epoch (its token no longer discards anything).
    pub fn hint_arm(&self, range: Range<u64>) -> Result<HintArmStats, SwapError> {
        let inner = &self.inner;
        inner.check_range(&range)?;
        let _ops = inner.ops.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = {
            let mut st = inner.lock();
            st.disarm_all();
            st.hint_epoch += 1;
            st.hint_epoch
        };
        let mut stats = HintArmStats {
            epoch: HintEpoch(epoch),
            armed_pages: 0,
            skipped_blocks: 0,
        };
        let mut b = range.start / BLOCK;
        while b * BLOCK < range.end {
            let block = b;
            b += 1;
            if inner.closed.load(Ordering::Acquire) {
                return Err(SwapError::Closed);
            }
            let bstart = block * BLOCK;
            if !inner.window.is_placed(bstart) {
                continue;
            }
            let sub = range.start.max(bstart) / PAGE..range.end.min(bstart + BLOCK) / PAGE;
            let present = inner.mincore(sub.clone())?;
            let mut st = inner.lock();
            if !st.has_block(block) && !present.iter().any(|p| *p) {
                stats.skipped_blocks += 1;
                continue;
            }
            inner.ensure_block(&mut st, block)?;
            let resident: Vec<u64> = sub
                .clone()
                .filter(|p| st.get(*p) == Some(Page::Resident))
                .collect();
            // Protect before arming, both under the state lock: a write that faults now waits
            // for the lock and then disarms the page.
            for r in runs(&resident) {
                inner
                    .uffd
                    .write_protect(inner.host(r.start), (r.end - r.start) * PAGE, true)
                    .map_err(|e| SwapError::host("UFFDIO_WRITEPROTECT", e))?;
            }
            for p in sub {
                if matches!(
                    st.get(p),
                    Some(Page::Resident | Page::Clean(_) | Page::Swapped(_))
                ) {
                    st.arm(p);
                    stats.armed_pages += 1;
                }
            }
        }
        Ok(stats)
    }

    /// Discard the pages of the hinted `ranges` (guest-physical; shrunk inward to 4 KiB) that
    /// are still armed under `epoch`: not written since it began. Pages in memory are
    /// discarded (`MADV_DONTNEED`; they read as zero afterwards), swapped-out pages lose their
    /// slot. Hinted pages in memory that are not armed are discarded if they hold only zeros
    /// (`discard_zero_locked`). Refused with [`SwapError::StaleHintEpoch`] if `epoch` is not the current one.
    pub fn hint_discard(
        &self,
        epoch: HintEpoch,
        ranges: &[Range<u64>],
    ) -> Result<HintDiscardStats, SwapError> {
        let inner = &self.inner;
        let _ops = inner.ops.lock().unwrap_or_else(|e| e.into_inner());
        let mut stats = HintDiscardStats::default();
        let mut result = Ok(());
        for r in ranges {
            let r = r.start.next_multiple_of(PAGE)..r.end / PAGE * PAGE;
            if r.start >= r.end {
                continue;
            }
            inner.check_range(&r)?;
            let pages = r.start / PAGE..r.end / PAGE;
            let present = inner.mincore(pages.clone())?;
            let mut st = inner.lock();
            if st.hint_epoch != epoch.0 {
                return Err(SwapError::StaleHintEpoch {
                    given: epoch.0,
                    current: st.hint_epoch,
                });
            }
            let mut discard = Vec::new();
            let mut written = Vec::new();
            for p in pages.clone() {
                if !st.is_armed(p) {
                    // Written since the epoch began, or never armed: kept unless it holds
                    // only zeros (checked below).
                    if present[(p - pages.start) as usize] {
                        written.push(p);
                    } else {
                        stats.kept_pages += 1;
                    }
                    continue;
                }
                match st.get(p) {
                    Some(Page::Resident | Page::Clean(_)) => discard.push(p),
                    Some(Page::Swapped(s)) => {
                        st.set(p, Page::Resident);
                        inner.file.free([s]);
                        stats.freed_slots += 1;
                    }
                    // Busy pages cannot exist here (the ops lock excludes swap-out).
                    _ => stats.kept_pages += 1,
                }
            }
            for run in runs(&discard) {
                // Under the state lock: a writer blocked on the protection waits for the
                // handler, which waits for this lock and then finds the page gone.
                if let Err(e) = inner.madvise(run.clone(), libc::MADV_DONTNEED) {
                    // Nothing changed for these pages: still protected and armed.
                    stats.kept_pages += run.end - run.start;
                    result = Err(e);
                    continue;
                }
                for p in run {
                    if present[(p - pages.start) as usize] {
                        stats.discarded_pages += 1;
                    }
                    // Resident (unpopulated): the next touch is a missing fault, zero-filled.
                    if let Some(Page::Clean(s)) = st.set(p, Page::Resident) {
                        inner.file.free([s]);
                    }
                }
            }
            if let Err(e) = self.discard_zero_locked(&mut st, &written, &mut stats) {
                result = Err(e);
            }
        }
        bump(&inner.c.hint_discarded_pages, stats.discarded_pages);
        result.map(|()| stats)
    }

    /// Discard the hinted pages of `written` (in memory, not armed) that hold only zeros;
    /// count the others as kept. Called under the ops and state locks.
    ///
    /// Each run is write-protected first (registering its block with userfaultfd if the
    /// swap does not track it yet), so from then on a write faults and waits for the state
    /// lock held here: the content checked is the content discarded, and a discarded zero
    /// page reads back as zero, so no guest-visible byte changes whoever wrote the page and
    /// when. The protection is lifted again afterwards (a write that faulted meanwhile finds
    /// a resident page and goes on, or a discarded one and gets a fresh zero page).
    ///
    /// Nothing else discards window pages meanwhile: the caller holds the balloon device's
    /// lock (reports and inflations wait), and swap-outs and drops wait for the ops lock. A
    /// page is read only if `mincore` shows it present after the protection, so the check
    /// never faults (a fault here would wait for the handler, which waits for this lock).
    fn discard_zero_locked(
        &self,
        st: &mut super::pages::PageTable,
        written: &[u64],
        stats: &mut HintDiscardStats,
    ) -> Result<(), SwapError> {
        let inner = &self.inner;
        let mut result = Ok(());
        for run in runs(written) {
            let mut block = u64::MAX;
            let mut tracked = true;
            for p in run.clone() {
                if p * PAGE / BLOCK != block {
                    block = p * PAGE / BLOCK;
                    if let Err(e) = inner.ensure_block(st, block) {
                        tracked = false;
                        result = Err(e);
                    }
                }
            }
            // Only plain resident pages: a clean page is protected already and its slot copy
            // is current, so it is no hint discard's business.
            let cand: Vec<u64> = run
                .clone()
                .filter(|p| tracked && st.get(*p) == Some(Page::Resident))
                .collect();
            stats.kept_pages += (run.end - run.start) - cand.len() as u64;
            for r in runs(&cand) {
                let (host, len) = (inner.host(r.start), (r.end - r.start) * PAGE);
                if let Err(e) = inner.uffd.write_protect(host, len, true) {
                    stats.kept_pages += r.end - r.start;
                    result = Err(SwapError::host("UFFDIO_WRITEPROTECT", e));
                    continue;
                }
                let present = match inner.mincore(r.clone()) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = inner.uffd.write_protect(host, len, false);
                        stats.kept_pages += r.end - r.start;
                        result = Err(e);
                        continue;
                    }
                };
                let zeros: Vec<u64> = r
                    .clone()
                    .filter(|p| present[(p - r.start) as usize] && page_is_zero(inner.host(*p)))
                    .collect();
                let mut freed = 0;
                for z in runs(&zeros) {
                    match inner.madvise(z.clone(), libc::MADV_DONTNEED) {
                        Ok(()) => freed += z.end - z.start,
                        Err(e) => result = Err(e),
                    }
                }
                stats.discarded_pages += freed;
                stats.zero_pages += freed;
                stats.kept_pages += (r.end - r.start) - freed;
                // Pages left resident are writable again; discarded ones have no mapping.
                let _ = inner.uffd.write_protect(host, len, false);
            }
        }
        result
    }
}

/// Whether the 4 KiB page at host address `addr` holds only zeros.
fn page_is_zero(addr: u64) -> bool {
    (0..PAGE / 8).all(|i| {
        // SAFETY: `addr` is the host address of a page of the swap's window, which the VmSwap
        // keeps mapped; the caller saw it present (mincore) under write protection and the
        // state lock, so the read neither faults nor races a write; `i < 512` stays inside the
        // page. Volatile, because guest memory is not a Rust object.
        unsafe { std::ptr::read_volatile((addr + i * 8) as *const u64) == 0 }
    })
}
