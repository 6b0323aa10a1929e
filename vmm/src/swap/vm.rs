//! [`VmSwap`]: one VM's swap state, swap-out, clean drop, and shutdown.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::file::SwapFile;
use super::pages::{Page, PageTable, BLOCK};
use super::uffd::Uffd;
use super::{SwapError, PAGE};
use crate::memory::{BackingKind, BlockObserver, GuestWindow};

/// What one [`VmSwap::swap_out`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SwapOutStats {
    /// Pages written to the swap file.
    pub written_pages: u64,
    /// Clusters (one write each) those pages went out in.
    pub clusters: u64,
    /// Pages written and then discarded from memory.
    pub swapped_pages: u64,
    /// Pages whose slot copy was current, discarded without I/O.
    pub dropped_clean_pages: u64,
    /// Pages written to while their write-out was in flight: kept in memory, slot freed.
    pub redirtied_pages: u64,
    /// Pages never populated (they read as zero): nothing to reclaim.
    pub unpopulated_pages: u64,
    /// The swap file ran out of slots before the budget was met.
    pub full: bool,
}

impl SwapOutStats {
    /// Host memory released by the call.
    pub fn reclaimed_bytes(&self) -> u64 {
        (self.swapped_pages + self.dropped_clean_pages) * PAGE
    }
}

/// A VM's swap counters (cumulative since [`VmSwap::new`], except the "now" fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VmSwapCounters {
    /// Bytes swapped out now (content only in the swap file).
    pub swapped_bytes: u64,
    /// Bytes resident with a current slot copy now (droppable without I/O).
    pub clean_bytes: u64,
    /// Bytes being written out now.
    pub writing_bytes: u64,
    /// Pages written to the swap file.
    pub written_pages: u64,
    /// Pages discarded after write-out.
    pub swapped_out_pages: u64,
    /// Pages discarded without I/O (clean drop).
    pub dropped_clean_pages: u64,
    /// Pages written during their write-out (kept).
    pub redirtied_pages: u64,
    /// Pages read back from the swap file.
    pub swapped_in_pages: u64,
    /// Swap-in reads (each covers a run of contiguous slots).
    pub swap_in_reads: u64,
    /// Missing-page faults handled.
    pub missing_faults: u64,
    /// Write-protect faults handled (first write to a clean page).
    pub wp_faults: u64,
    /// Faults resolved with zeros (pages never populated).
    pub zero_fills: u64,
    /// Swap-ins that failed.
    pub swap_in_errors: u64,
    /// Pages made inaccessible after a failed swap-in or at shutdown.
    pub poisoned_pages: u64,
    /// Pages discarded because a guest hinted them free (see [`VmSwap::hint_discard`]).
    pub hint_discarded_pages: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub written_pages: AtomicU64,
    pub swapped_out_pages: AtomicU64,
    pub dropped_clean_pages: AtomicU64,
    pub redirtied_pages: AtomicU64,
    pub swapped_in_pages: AtomicU64,
    pub swap_in_reads: AtomicU64,
    pub missing_faults: AtomicU64,
    pub wp_faults: AtomicU64,
    pub zero_fills: AtomicU64,
    pub swap_in_errors: AtomicU64,
    pub poisoned_pages: AtomicU64,
    pub hint_discarded_pages: AtomicU64,
}

pub(super) fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// A failed swap-in: the VM cannot continue (the page was made inaccessible).
#[derive(Clone, Debug)]
pub struct SwapInFailure {
    /// Guest-physical address of the faulting page.
    pub gpa: u64,
    /// What failed.
    pub error: Arc<SwapError>,
}

type FailureHook = Box<dyn Fn(&SwapInFailure) + Send + Sync>;

/// State shared with the fault handler thread.
pub(super) struct Inner {
    pub window: Arc<GuestWindow>,
    pub file: Arc<SwapFile>,
    pub uffd: Uffd,
    pub base: u64,
    pub size: u64,
    pub st: Mutex<PageTable>,
    /// Serialises swap-out / clean-drop / swap-in-all calls of this VM.
    pub ops: Mutex<()>,
    pub c: Counters,
    pub failure: Mutex<Option<SwapInFailure>>,
    pub hook: Mutex<Option<FailureHook>>,
    pub stop: AtomicBool,
    pub paused: AtomicBool,
    pub closed: AtomicBool,
    pub stop_evt: EventFd,
    /// This VM's id in the fault guard (`super::guard`).
    pub owner: u64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSwapInner")
            .field("base", &self.base)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Contiguous runs of sorted page numbers.
pub(super) fn runs(pages: &[u64]) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = Vec::new();
    for &p in pages {
        match v.last_mut() {
            Some(r) if r.end == p => r.end = p + 1,
            _ => v.push(p..p + 1),
        }
    }
    v
}

impl Inner {
    pub fn lock(&self) -> MutexGuard<'_, PageTable> {
        lock(&self.st)
    }

    /// Host address of guest page `p`.
    pub fn host(&self, p: u64) -> u64 {
        self.base + p * PAGE
    }

    pub(super) fn madvise(&self, pages: Range<u64>, advice: i32) -> Result<(), SwapError> {
        let len = (pages.end - pages.start) * PAGE;
        // SAFETY: the pages lie inside the window mapping, which `self.window` keeps alive; no
        // Rust reference points into guest memory.
        let rc = unsafe {
            libc::madvise(
                self.host(pages.start) as *mut libc::c_void,
                len as usize,
                advice,
            )
        };
        if rc != 0 {
            return Err(SwapError::host("madvise", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Make pages inaccessible (after a failed swap-in, or at shutdown).
    pub fn poison(&self, pages: Range<u64>) {
        let len = (pages.end - pages.start) * PAGE;
        // SAFETY: as in `madvise`; PROT_NONE only makes later accesses fail.
        let rc = unsafe {
            libc::mprotect(
                self.host(pages.start) as *mut libc::c_void,
                len as usize,
                libc::PROT_NONE,
            )
        };
        if rc == 0 {
            bump(&self.c.poisoned_pages, pages.end - pages.start);
        }
    }

    /// Residency of each page of `pages` (mincore).
    pub(super) fn mincore(&self, pages: Range<u64>) -> Result<Vec<bool>, SwapError> {
        let n = (pages.end - pages.start) as usize;
        let mut v = vec![0u8; n];
        // SAFETY: the range lies inside the window mapping; `v` has one byte per page.
        let rc = unsafe {
            libc::mincore(
                self.host(pages.start) as *mut libc::c_void,
                n * PAGE as usize,
                v.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(SwapError::host("mincore", std::io::Error::last_os_error()));
        }
        Ok(v.into_iter().map(|b| b & 1 != 0).collect())
    }

    pub(super) fn check_range(&self, r: &Range<u64>) -> Result<(), SwapError> {
        if r.start % PAGE != 0 || r.end % PAGE != 0 || r.start > r.end || r.end > self.size {
            return Err(SwapError::Range {
                start: r.start,
                end: r.end,
            });
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(SwapError::Closed);
        }
        if lock(&self.failure).is_some() {
            // The VM failed (a swap-in failed): it is stopped, nothing more to reclaim.
            return Err(SwapError::Closed);
        }
        Ok(())
    }

    pub(super) fn ensure_block(&self, st: &mut PageTable, b: u64) -> Result<u64, SwapError> {
        if let Some(e) = st.epoch(b) {
            return Ok(e);
        }
        self.uffd
            .register(self.base + b * BLOCK, BLOCK)
            .map_err(|e| SwapError::host("UFFDIO_REGISTER", e))?;
        Ok(st.add_block(b))
    }

    /// Discard up to `max` clean pages of `pages` (under the state lock): they become
    /// swapped.
    fn drop_clean_locked(
        &self,
        st: &mut PageTable,
        pages: Range<u64>,
        max: u64,
    ) -> Result<u64, SwapError> {
        let clean: Vec<u64> = pages
            .filter(|p| matches!(st.get(*p), Some(Page::Clean(_))))
            .take(usize::try_from(max).unwrap_or(usize::MAX))
            .collect();
        for r in runs(&clean) {
            // Discard first: if it fails, nothing changed.
            self.madvise(r.clone(), libc::MADV_DONTNEED)?;
            for p in r {
                if let Some(Page::Clean(s)) = st.get(p) {
                    st.set(p, Page::Swapped(s));
                }
            }
        }
        bump(&self.c.dropped_clean_pages, clean.len() as u64);
        Ok(clean.len() as u64)
    }

    /// Return pages of an unfinished write-out to resident and lift their write protection.
    fn abandon(&self, pages: Range<u64>, epoch: u64) {
        let mut st = self.lock();
        if st.epoch(pages.start / super::pages::PAGES_PER_BLOCK as u64) != Some(epoch) {
            return;
        }
        for p in pages.clone() {
            if matches!(st.get(p), Some(Page::Busy | Page::BusyDirty)) {
                st.set(p, Page::Resident);
            }
        }
        // Under the lock, so no other write-out can have protected these pages meanwhile.
        let _ = self.uffd.write_protect(
            self.host(pages.start),
            (pages.end - pages.start) * PAGE,
            false,
        );
    }

    /// After pages `p..p+n` were written to slots `slot..slot+n`: discard those not written
    /// since, keep (and free the slot of) those that were.
    fn commit(
        &self,
        p: u64,
        n: u32,
        slot: u32,
        epoch: u64,
        stats: &mut SwapOutStats,
    ) -> Result<(), SwapError> {
        let mut st = self.lock();
        if st.epoch(p / super::pages::PAGES_PER_BLOCK as u64) != Some(epoch) {
            // The block was removed meanwhile: its pages are gone, so are these copies.
            self.file.free(slot..slot + n);
            return Ok(());
        }
        let mut discard = Vec::new();
        let mut free = Vec::new();
        let mut redirtied = 0;
        for i in 0..u64::from(n) {
            let s = slot + i as u32;
            match st.get(p + i) {
                Some(Page::Busy) => {
                    st.set(p + i, Page::Swapped(s));
                    discard.push(p + i);
                }
                Some(Page::BusyDirty) => {
                    st.set(p + i, Page::Resident);
                    free.push(s);
                    redirtied += 1;
                }
                _ => free.push(s),
            }
        }
        self.file.free(free);
        let mut result = Ok(());
        for r in runs(&discard) {
            // Still under the lock: a writer blocked on the write protection waits for the
            // handler, which waits for this lock and then finds the page swapped.
            if let Err(e) = self.madvise(r.clone(), libc::MADV_DONTNEED) {
                // Not discarded: the pages are still in memory and write-protected, and the
                // slot holds their current content, so they are clean.
                for q in r {
                    if let Some(Page::Swapped(s)) = st.get(q) {
                        st.set(q, Page::Clean(s));
                    }
                }
                result = Err(e);
                continue;
            }
            stats.swapped_pages += r.end - r.start;
            bump(&self.c.swapped_out_pages, r.end - r.start);
        }
        stats.redirtied_pages += redirtied;
        bump(&self.c.redirtied_pages, redirtied);
        result
    }

    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // The VM's threads are stopped (or parked for good): its window may be unmapped
        // after this, so a later fault there is no longer ours.
        super::guard::forget(self.owner);
        let mut st = self.lock();
        let blocks: Vec<u64> = st.blocks().collect();
        for b in blocks {
            let first = b * super::pages::PAGES_PER_BLOCK as u64;
            if st.block_needs_poison(b) {
                self.poison(first..first + super::pages::PAGES_PER_BLOCK as u64);
            }
            let slots = st.remove_block(b);
            self.file.free(slots);
            // Wakes threads blocked on faults here: they retry and find either their page or
            // PROT_NONE (EFAULT for a vCPU), never a silently zero-filled page.
            let _ = self.uffd.unregister(self.base + b * BLOCK, BLOCK);
        }
    }
}

impl BlockObserver for Inner {
    fn before_remove(&self, gpa: u64, len: u64) {
        let mut st = self.lock();
        let mut b = gpa / BLOCK;
        while b * BLOCK < gpa + len {
            if st.has_block(b) {
                let slots = st.remove_block(b);
                self.file.free(slots);
                let _ = self.uffd.unregister(self.base + b * BLOCK, BLOCK);
            }
            b += 1;
        }
    }
}

/// One VM's swap: page states over its window, the fault handler thread, swap-out and clean
/// drop. Dropping it (or [`VmSwap::shutdown`]) is terminal: pages still swapped out become
/// inaccessible, so call [`VmSwap::swap_in_all`] first if the VM is to keep running.
#[derive(Debug)]
pub struct VmSwap {
    pub(super) inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl VmSwap {
    /// Swap for the VM whose RAM is `window`, writing to `file`. Starts the fault handler
    /// thread and subscribes to block removals of the window. Needs the anonymous backing
    /// (`MADV_DONTNEED` frees pages and the next touch is a missing-page fault); a memfd or
    /// hugetlbfs window is refused with [`SwapError::Unsupported`].
    pub fn new(window: Arc<GuestWindow>, file: Arc<SwapFile>) -> Result<VmSwap, SwapError> {
        let kind = window.backing().spec().kind;
        if kind != BackingKind::Anonymous {
            return Err(SwapError::Unsupported(kind.name()));
        }
        if let Err(e) = super::guard::install() {
            tracing::error!(error = %e, "fault guard not installed: a VMM thread touching a page whose swap-in failed would end the process");
        }
        let uffd = Uffd::new().map_err(|e| SwapError::host("userfaultfd", e))?;
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| SwapError::host("eventfd", e))?;
        let hr = window.host_range();
        let inner = Arc::new(Inner {
            base: hr.start as u64,
            size: (hr.end - hr.start) as u64,
            window,
            file,
            uffd,
            st: Mutex::new(PageTable::default()),
            ops: Mutex::new(()),
            c: Counters::default(),
            failure: Mutex::new(None),
            hook: Mutex::new(None),
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stop_evt,
            owner: super::guard::new_owner(),
        });
        let weak: Weak<dyn BlockObserver> = Arc::downgrade(&(Arc::clone(&inner) as Arc<_>));
        inner.window.add_observer(weak);
        let h = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("swap-uffd".into())
            .spawn(move || {
                // Often created from an API thread: the fault handler is daemon work at the
                // daemon's priority, but with the kernel's default slice, not the API's.
                crate::latency::reset_thread_slice();
                super::handler::run(&h)
            })
            .map_err(|e| SwapError::host("spawn", e))?;
        Ok(VmSwap {
            inner,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The swap file.
    pub fn file(&self) -> &Arc<SwapFile> {
        &self.inner.file
    }

    /// Write the resident pages of `range` (guest-physical, 4 KiB aligned) to the swap file
    /// in clusters and discard them, until `max_bytes` of host memory were released. Pages with
    /// a current slot copy are discarded without I/O first. Unplaced blocks and never-populated
    /// pages are skipped. Writes are paced by the file's congestion back-off.
    pub fn swap_out(&self, range: Range<u64>, max_bytes: u64) -> Result<SwapOutStats, SwapError> {
        let inner = &self.inner;
        inner.check_range(&range)?;
        let _ops = lock(&inner.ops);
        let mut stats = SwapOutStats::default();
        let mut b = range.start / BLOCK;
        while b * BLOCK < range.end {
            let block = b;
            b += 1;
            if stats.reclaimed_bytes() >= max_bytes || inner.closed.load(Ordering::Acquire) {
                break;
            }
            let bstart = block * BLOCK;
            if !inner.window.is_placed(bstart) {
                continue;
            }
            let sub = range.start.max(bstart) / PAGE..range.end.min(bstart + BLOCK) / PAGE;
            let present = inner.mincore(sub.clone())?;
            let (epoch, chosen) = {
                let mut st = inner.lock();
                if !st.has_block(block) && !present.iter().any(|p| *p) {
                    // Nothing populated and nothing swapped: leave the block unregistered, so
                    // its first touches stay plain (THP) faults.
                    stats.unpopulated_pages += present.len() as u64;
                    continue;
                }
                let epoch = inner.ensure_block(&mut st, block)?;
                let left = max_bytes
                    .saturating_sub(stats.reclaimed_bytes())
                    .div_ceil(PAGE);
                stats.dropped_clean_pages += inner.drop_clean_locked(&mut st, sub.clone(), left)?;
                let left = max_bytes
                    .saturating_sub(stats.reclaimed_bytes())
                    .div_ceil(PAGE);
                let mut chosen = Vec::new();
                for (i, p) in sub.clone().enumerate() {
                    if st.get(p) != Some(Page::Resident) {
                        continue;
                    }
                    if !present[i] {
                        stats.unpopulated_pages += 1;
                        continue;
                    }
                    if (chosen.len() as u64) < left {
                        st.set(p, Page::Busy);
                        chosen.push(p);
                    }
                }
                (epoch, chosen)
            };
            let runs = runs(&chosen);
            // Protect before reading: from here on every write to these pages stops in the
            // handler, which marks the page BusyDirty before letting the write through.
            for (i, r) in runs.iter().enumerate() {
                let len = (r.end - r.start) * PAGE;
                if let Err(e) = inner.uffd.write_protect(inner.host(r.start), len, true) {
                    for r in &runs[i..] {
                        inner.abandon(r.clone(), epoch);
                    }
                    for r in &runs[..i] {
                        inner.abandon(r.clone(), epoch);
                    }
                    return Err(SwapError::host("UFFDIO_WRITEPROTECT", e));
                }
            }
            for (ri, r) in runs.iter().enumerate() {
                let mut p = r.start;
                while p < r.end {
                    let advice = inner.file.pace();
                    let want = (r.end - p).min(u64::from(advice.batch_pages.max(1))) as u32;
                    let (slot, n) = match inner.file.alloc(want) {
                        Ok(x) => x,
                        Err(e) => {
                            inner.abandon(p..r.end, epoch);
                            for r in &runs[ri + 1..] {
                                inner.abandon(r.clone(), epoch);
                            }
                            if matches!(e, SwapError::Full) {
                                stats.full = true;
                                return Ok(stats);
                            }
                            return Err(e);
                        }
                    };
                    // SAFETY: the pages lie in a placed block of the window (a concurrent
                    // removal leaves the mapping in place, PROT_NONE, and the write then
                    // fails); they are 4 KiB aligned.
                    let w = unsafe { inner.file.write_raw(slot, inner.host(p) as *const u8, n) };
                    if let Err(e) = w {
                        inner.file.free(slot..slot + n);
                        inner.abandon(p..r.end, epoch);
                        for r in &runs[ri + 1..] {
                            inner.abandon(r.clone(), epoch);
                        }
                        return Err(e);
                    }
                    stats.written_pages += u64::from(n);
                    stats.clusters += 1;
                    bump(&inner.c.written_pages, u64::from(n));
                    if let Err(e) = inner.commit(p, n, slot, epoch, &mut stats) {
                        inner.abandon(p + u64::from(n)..r.end, epoch);
                        for r in &runs[ri + 1..] {
                            inner.abandon(r.clone(), epoch);
                        }
                        return Err(e);
                    }
                    p += u64::from(n);
                }
            }
        }
        Ok(stats)
    }

    /// Discard the pages of `range` whose slot copy is current (swapped in and not written
    /// since), without I/O. Returns the bytes released.
    pub fn drop_clean(&self, range: Range<u64>) -> Result<u64, SwapError> {
        self.drop_clean_max(range, u64::MAX)
    }

    /// [`VmSwap::drop_clean`], releasing at most `max_bytes` (rounded up to a page).
    pub fn drop_clean_max(&self, range: Range<u64>, max_bytes: u64) -> Result<u64, SwapError> {
        let inner = &self.inner;
        inner.check_range(&range)?;
        let _ops = lock(&inner.ops);
        let mut st = inner.lock();
        let mut total = 0;
        let mut b = range.start / BLOCK;
        while b * BLOCK < range.end {
            let bstart = b * BLOCK;
            b += 1;
            if !st.has_block(b - 1) {
                continue;
            }
            let sub = range.start.max(bstart) / PAGE..range.end.min(bstart + BLOCK) / PAGE;
            let left = max_bytes.div_ceil(PAGE).saturating_sub(total);
            if left == 0 {
                break;
            }
            total += inner.drop_clean_locked(&mut st, sub, left)?;
        }
        Ok(total * PAGE)
    }

    /// Read every swapped-out page back (write-protected, clean). Returns the pages read.
    pub fn swap_in_all(&self) -> Result<u64, SwapError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(SwapError::Closed);
        }
        let _ops = lock(&inner.ops);
        let mut buf = super::file::AlignedBuf::new(super::handler::READ_AROUND as usize);
        let mut st = inner.lock();
        let blocks: Vec<u64> = st.blocks().collect();
        let mut total = 0;
        for b in blocks {
            let first = b * super::pages::PAGES_PER_BLOCK as u64;
            for p in first..first + super::pages::PAGES_PER_BLOCK as u64 {
                if matches!(st.get(p), Some(Page::Swapped(_))) {
                    total += super::handler::swap_in(inner, &mut st, p, false, &mut buf)?;
                }
            }
        }
        Ok(total)
    }

    /// Bytes swapped out now.
    pub fn swapped_bytes(&self) -> u64 {
        self.inner.lock().swapped() * PAGE
    }

    /// Bytes resident with a current slot copy now (what [`VmSwap::drop_clean`] could free).
    pub fn clean_bytes(&self) -> u64 {
        self.inner.lock().clean() * PAGE
    }

    /// Counters.
    pub fn counters(&self) -> VmSwapCounters {
        let (swapped, clean, busy) = {
            let st = self.inner.lock();
            (st.swapped(), st.clean(), st.busy())
        };
        let c = &self.inner.c;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VmSwapCounters {
            swapped_bytes: swapped * PAGE,
            clean_bytes: clean * PAGE,
            writing_bytes: busy * PAGE,
            written_pages: l(&c.written_pages),
            swapped_out_pages: l(&c.swapped_out_pages),
            dropped_clean_pages: l(&c.dropped_clean_pages),
            redirtied_pages: l(&c.redirtied_pages),
            swapped_in_pages: l(&c.swapped_in_pages),
            swap_in_reads: l(&c.swap_in_reads),
            missing_faults: l(&c.missing_faults),
            wp_faults: l(&c.wp_faults),
            zero_fills: l(&c.zero_fills),
            swap_in_errors: l(&c.swap_in_errors),
            poisoned_pages: l(&c.poisoned_pages),
            hint_discarded_pages: l(&c.hint_discarded_pages),
        }
    }

    /// The first failed swap-in, if any: the VM must be stopped (its vCPU got `EFAULT`).
    pub fn failure(&self) -> Option<SwapInFailure> {
        lock(&self.inner.failure).clone()
    }

    /// Call `hook` (from the handler thread, before the faulting thread is woken) when a
    /// swap-in fails, e.g. to stop the VM with a guest-failed reason. It must not block on the
    /// VM's memory.
    pub fn set_failure_hook(&self, hook: impl Fn(&SwapInFailure) + Send + Sync + 'static) {
        *lock(&self.inner.hook) = Some(Box::new(hook));
    }

    /// VMM threads parked by the fault guard after touching this VM's memory whose swap-in
    /// failed (see `docs/swap.md`).
    pub fn parked_threads(&self) -> u64 {
        super::guard::parked_for(self.inner.owner)
    }

    /// Stop handling faults (test hook: makes faults stay pending).
    #[doc(hidden)]
    pub fn pause_handler(&self, paused: bool) {
        self.inner.paused.store(paused, Ordering::Release);
    }

    /// Terminal: make swapped-out pages inaccessible, free this VM's slots, unregister from
    /// userfaultfd (waking every thread blocked on a fault: a vCPU then fails with `EFAULT`
    /// instead of hanging) and stop the handler thread. Idempotent.
    pub fn shutdown(&self) {
        self.inner.shutdown();
        self.inner.stop.store(true, Ordering::Release);
        let _ = self.inner.stop_evt.write(1);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for VmSwap {
    fn drop(&mut self) {
        self.shutdown();
    }
}
