//! [`WindowTarget`]: a [`ReclaimTarget`] over a real [`GuestWindow`].
//!
//! - **Residency and idleness**: every [`ReclaimTarget::sample`] runs `mincore` over each
//!   placed 2 MiB block. A block whose resident page count rose since the last sample, or that
//!   an optional [`AccessHook`] (e.g. the KVM dirty log) reports written, was *touched* in that
//!   interval. The working set is the resident memory of the blocks touched within the last N
//!   intervals; the other resident blocks are *cold*. Residency alone misses rewrites of pages
//!   that are already resident: give an access hook where that matters.
//! - **Phase 1 and 2** go through a [`BalloonHook`] (the VM's balloon device), when given.
//! - **Phases 3 and 4** go through a [`SwapHook`] (the VMM swap), when given, with the cold
//!   blocks as candidates.
//! - **Phase 5** reads every resident 4 KiB page of the cold resident blocks (all resident
//!   blocks when urgent) and discards the pages that are entirely zero through the window's
//!   backing (`madvise(MADV_DONTNEED)`, or punch-hole for memfd). They read back as zeros,
//!   so the guest sees no change; a THP backing the block is split by the kernel. The scan
//!   reads guest memory, so nothing may write the window meanwhile: give a quiesce hook that
//!   pauses the vCPUs around the scan ([`WindowTarget::with_quiesce`]), or state that the
//!   window has no concurrent writers ([`WindowTarget::assume_quiesced`]); otherwise the phase
//!   answers unsupported.

use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::target::{Idleness, PhaseOutcome, PhaseRequest, ReclaimTarget, TargetError};
use crate::memory::{GuestWindow, BLOCK_SIZE};

/// Host page size the scan works in.
const PAGE: u64 = 4096;
/// Pages in one 2 MiB block.
const BLOCK_PAGES: usize = (BLOCK_SIZE / PAGE) as usize;

/// The VM's balloon, as phases 1 and 2 use it.
pub trait BalloonHook: Send + Sync + std::fmt::Debug {
    /// Raise the balloon target by up to `bytes`; returns the bytes requested.
    fn inflate(&self, bytes: u64) -> Result<u64, TargetError>;
    /// Bytes the guest reported free (and the host discarded) since the last call.
    fn take_reported(&self) -> Result<u64, TargetError> {
        Err(TargetError::Unsupported("free page reporting".into()))
    }
    /// Start a free page hinting pass; returns bytes expected (0 when unknown).
    fn start_hinting(&self) -> Result<u64, TargetError> {
        Err(TargetError::Unsupported("free page hinting".into()))
    }
    /// Lower the balloon target by up to `bytes`, never below what was there before the
    /// engine inflated it; returns the bytes given back.
    fn deflate(&self, bytes: u64) -> Result<u64, TargetError> {
        let _ = bytes;
        Err(TargetError::Unsupported("balloon deflate".into()))
    }
}

/// The VMM swap, as phases 3 and 4 use it. Ranges are guest-physical, 2 MiB aligned, cold.
pub trait SwapHook: Send + Sync + std::fmt::Debug {
    /// Discard up to `max_bytes` of `cold` whose swap copy is current; returns bytes freed.
    fn drop_clean(&self, cold: &[Range<u64>], max_bytes: u64) -> Result<u64, TargetError>;
    /// Write up to `max_bytes` of `cold` to swap and discard it; returns bytes freed.
    fn swap_out(&self, cold: &[Range<u64>], max_bytes: u64) -> Result<u64, TargetError>;
}

/// Where writes come from besides first touches (e.g. the KVM dirty log).
pub trait AccessHook: Send + Sync + std::fmt::Debug {
    /// Guest-physical ranges written since the previous call.
    fn written_since_last(&self) -> Result<Vec<Range<u64>>, TargetError>;
}

/// Runs a closure with the VM's vCPUs paused.
pub type QuiesceFn = dyn Fn(&mut dyn FnMut()) -> Result<(), TargetError> + Send + Sync;

/// Figures of the zero-page split (phase 5), cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroSplitStats {
    /// Passes run.
    pub passes: u64,
    /// 2 MiB blocks scanned.
    pub blocks_scanned: u64,
    /// Resident 4 KiB pages read.
    pub pages_scanned: u64,
    /// Zero pages discarded.
    pub zero_pages: u64,
    /// `madvise` calls (one per run of adjacent zero pages).
    pub madvise_calls: u64,
    /// Time spent, nanoseconds.
    pub time_ns: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct BlockAccess {
    resident_pages: u32,
    /// Bit i set: touched i intervals ago (bit 0: the latest interval).
    history: u32,
}

#[derive(Debug, Default)]
struct Sampling {
    /// Per 2 MiB block of the window.
    blocks: Vec<BlockAccess>,
    samples: u64,
}

/// A reclaim target over one VM's guest window.
pub struct WindowTarget {
    id: String,
    window: Weak<GuestWindow>,
    balloon: Option<Arc<dyn BalloonHook>>,
    swap: Option<Arc<dyn SwapHook>>,
    access: Option<Arc<dyn AccessHook>>,
    quiesce: Option<Box<QuiesceFn>>,
    no_writers: bool,
    sampling: Mutex<Sampling>,
    split: Mutex<ZeroSplitStats>,
}

impl std::fmt::Debug for WindowTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowTarget")
            .field("id", &self.id)
            .field("balloon", &self.balloon.is_some())
            .field("swap", &self.swap.is_some())
            .field("access", &self.access.is_some())
            .field("quiesce", &self.quiesce.is_some())
            .field("no_writers", &self.no_writers)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn mem_err(e: impl std::fmt::Display) -> TargetError {
    TargetError::Failed(e.to_string())
}

/// Residency of the pages of `[addr, addr + len)` (host addresses inside a live mapping).
fn mincore_pages(addr: usize, len: usize, out: &mut Vec<u8>) -> Result<(), TargetError> {
    out.clear();
    out.resize(len / PAGE as usize, 0);
    // SAFETY: the caller passes a range inside a mapping it keeps alive (the window, held by
    // an upgraded Arc); `out` has one byte per page of it.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, out.as_mut_ptr()) };
    if rc != 0 {
        return Err(mem_err(std::io::Error::last_os_error()));
    }
    Ok(())
}

impl WindowTarget {
    /// A target named `id` over `window` (held weakly: once the VM drops its window, the
    /// target answers [`TargetError::Gone`]).
    pub fn new(id: impl Into<String>, window: &Arc<GuestWindow>) -> Self {
        WindowTarget {
            id: id.into(),
            window: Arc::downgrade(window),
            balloon: None,
            swap: None,
            access: None,
            quiesce: None,
            no_writers: false,
            sampling: Mutex::new(Sampling::default()),
            split: Mutex::new(ZeroSplitStats::default()),
        }
    }

    /// Use this balloon for phases 1 and 2.
    pub fn with_balloon(mut self, b: Arc<dyn BalloonHook>) -> Self {
        self.balloon = Some(b);
        self
    }

    /// Use this swap for phases 3 and 4.
    pub fn with_swap(mut self, s: Arc<dyn SwapHook>) -> Self {
        self.swap = Some(s);
        self
    }

    /// Also count writes this hook reports as accesses.
    pub fn with_access(mut self, a: Arc<dyn AccessHook>) -> Self {
        self.access = Some(a);
        self
    }

    /// Run the zero-page scan inside `q` (which pauses the vCPUs around it).
    pub fn with_quiesce(mut self, q: Box<QuiesceFn>) -> Self {
        self.quiesce = Some(q);
        self
    }

    /// Promise that nothing writes the window concurrently with the engine (no vCPUs run, no
    /// device writes): the zero-page scan then runs without pausing anything.
    pub fn assume_quiesced(mut self) -> Self {
        self.no_writers = true;
        self
    }

    /// Zero-page split figures so far.
    pub fn split_stats(&self) -> ZeroSplitStats {
        *lock(&self.split)
    }

    fn window(&self) -> Result<Arc<GuestWindow>, TargetError> {
        self.window.upgrade().ok_or(TargetError::Gone)
    }

    fn placed_blocks(w: &GuestWindow) -> impl Iterator<Item = u64> {
        w.placed_ranges()
            .into_iter()
            .flat_map(|r| (r.start / BLOCK_SIZE..r.end / BLOCK_SIZE).map(|b| b * BLOCK_SIZE))
    }

    /// Cold resident blocks (or every resident block when `all`), idlest first in address
    /// order, as guest-physical ranges, coalesced.
    fn candidates(&self, w: &GuestWindow, intervals: u32, all: bool) -> Vec<Range<u64>> {
        let mask = history_mask(intervals);
        let s = lock(&self.sampling);
        let mut out: Vec<Range<u64>> = Vec::new();
        for gpa in Self::placed_blocks(w) {
            let Some(b) = s.blocks.get((gpa / BLOCK_SIZE) as usize) else {
                continue;
            };
            if b.resident_pages == 0 || (!all && b.history & mask != 0) {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end == gpa => last.end = gpa + BLOCK_SIZE,
                _ => out.push(gpa..gpa + BLOCK_SIZE),
            }
        }
        out
    }

    /// Scan `blocks` and discard zero pages, up to `max_bytes`. The caller guarantees that
    /// nothing writes or unmaps the window meanwhile.
    fn zero_scan(&self, w: &GuestWindow, blocks: &[Range<u64>], max_bytes: u64) -> u64 {
        let t0 = Instant::now();
        let mut st = ZeroSplitStats {
            passes: 1,
            ..Default::default()
        };
        let mut freed = 0u64;
        let mut vec = Vec::with_capacity(BLOCK_PAGES);
        'outer: for r in blocks {
            for gpa in (r.start..r.end).step_by(BLOCK_SIZE as usize) {
                if freed >= max_bytes {
                    break 'outer;
                }
                if !w.is_range_placed(gpa, BLOCK_SIZE) {
                    continue;
                }
                let Some(base) = w.host_addr(gpa) else {
                    continue;
                };
                if mincore_pages(base, BLOCK_SIZE as usize, &mut vec).is_err() {
                    continue;
                }
                st.blocks_scanned += 1;
                let mut run: Option<(usize, usize)> = None;
                for (i, res) in vec.iter().enumerate() {
                    let zero = if res & 1 != 0 {
                        st.pages_scanned += 1;
                        page_is_zero(base + i * PAGE as usize)
                    } else {
                        false
                    };
                    if zero {
                        run = Some(run.map_or((i, i + 1), |(s, _)| (s, i + 1)));
                        continue;
                    }
                    if let Some((s, e)) = run.take() {
                        freed += discard(w, gpa, s, e, &mut st);
                    }
                }
                if let Some((s, e)) = run.take() {
                    freed += discard(w, gpa, s, e, &mut st);
                }
            }
        }
        st.time_ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut total = lock(&self.split);
        total.passes += st.passes;
        total.blocks_scanned += st.blocks_scanned;
        total.pages_scanned += st.pages_scanned;
        total.zero_pages += st.zero_pages;
        total.madvise_calls += st.madvise_calls;
        total.time_ns = total.time_ns.saturating_add(st.time_ns);
        freed
    }
}

fn history_mask(intervals: u32) -> u32 {
    if intervals >= 32 {
        u32::MAX
    } else {
        (1u32 << intervals) - 1
    }
}

/// Whether the 4 KiB page at host address `addr` (resident, inside a live, unwritten window)
/// holds only zeros.
fn page_is_zero(addr: usize) -> bool {
    let words = PAGE as usize / 8;
    (0..words).all(|i| {
        // SAFETY: `addr` is a page-aligned host address of a placed (readable) block of a
        // window kept alive by the caller; `i < 512` keeps the read inside that page. Volatile,
        // because guest memory is not a Rust object.
        unsafe { std::ptr::read_volatile((addr + i * 8) as *const u64) == 0 }
    })
}

/// Discard pages `[s, e)` of the block at `gpa`; returns bytes freed. The window's backing picks
/// the primitive (`MADV_DONTNEED` on anonymous memory, punch-hole in a memfd pool file; a
/// hugetlbfs window refuses, and nothing is freed). Every page in the range was just read as
/// zero and nothing writes the window meanwhile, and a discarded page reads back as zeros, so
/// no guest-visible byte changes.
fn discard(w: &GuestWindow, gpa: u64, s: usize, e: usize, st: &mut ZeroSplitStats) -> u64 {
    let start = gpa + s as u64 * PAGE;
    let len = (e - s) as u64 * PAGE;
    if w.discard(start, len).is_err() {
        return 0;
    }
    st.madvise_calls += 1;
    st.zero_pages += (e - s) as u64;
    len
}

impl ReclaimTarget for WindowTarget {
    fn id(&self) -> &str {
        &self.id
    }

    fn resident_bytes(&self) -> Result<u64, TargetError> {
        let w = self.window()?;
        let mut total = 0;
        for r in w.placed_ranges() {
            total += w
                .resident_bytes(r.start, r.end - r.start)
                .map_err(mem_err)?;
        }
        Ok(total)
    }

    fn sample(&self, intervals: u32) -> Result<Idleness, TargetError> {
        let w = self.window()?;
        let written = match &self.access {
            Some(a) => a.written_since_last()?,
            None => Vec::new(),
        };
        let nblocks = (w.layout().end() / BLOCK_SIZE) as usize;
        let mut placed = vec![false; nblocks];
        let mut resident = vec![0u32; nblocks];
        for gpa in Self::placed_blocks(&w) {
            let i = (gpa / BLOCK_SIZE) as usize;
            if let (Some(p), Some(r)) = (placed.get_mut(i), resident.get_mut(i)) {
                *p = true;
                let bytes = w.resident_bytes(gpa, BLOCK_SIZE).map_err(mem_err)?;
                *r = (bytes / PAGE) as u32;
            }
        }
        let mask = history_mask(intervals);
        let mut s = lock(&self.sampling);
        s.blocks.resize(nblocks, BlockAccess::default());
        s.samples += 1;
        let mut idle = Idleness::default();
        for (i, b) in s.blocks.iter_mut().enumerate() {
            if !placed[i] {
                *b = BlockAccess::default();
                continue;
            }
            let start = i as u64 * BLOCK_SIZE;
            let hit = written
                .iter()
                .any(|r| r.start < start + BLOCK_SIZE && start < r.end);
            let touched = resident[i] > b.resident_pages || hit;
            b.history = (b.history << 1) | u32::from(touched);
            b.resident_pages = resident[i];
            let bytes = u64::from(resident[i]) * PAGE;
            idle.resident_bytes += bytes;
            if b.history & mask != 0 {
                idle.working_set_bytes += bytes;
            }
        }
        Ok(idle)
    }

    fn take_reported(&self) -> Result<PhaseOutcome, TargetError> {
        let b = self
            .balloon
            .as_ref()
            .ok_or_else(|| TargetError::Unsupported("no balloon".into()))?;
        b.take_reported().map(PhaseOutcome::reclaimed)
    }

    fn start_hinting(&self) -> Result<PhaseOutcome, TargetError> {
        let b = self
            .balloon
            .as_ref()
            .ok_or_else(|| TargetError::Unsupported("no balloon".into()))?;
        b.start_hinting().map(PhaseOutcome::requested)
    }

    fn inflate_balloon(&self, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        let b = self
            .balloon
            .as_ref()
            .ok_or_else(|| TargetError::Unsupported("no balloon".into()))?;
        // Never ask for more than the idle memory (all of it when urgent).
        let idle = {
            let w = self.window()?;
            let cold = self.candidates(&w, req.cold_intervals, req.urgent);
            cold.iter().map(|r| r.end - r.start).sum::<u64>()
        };
        let ask = req.max_bytes.min(idle);
        if ask == 0 {
            return Ok(PhaseOutcome::default());
        }
        b.inflate(ask).map(PhaseOutcome::requested)
    }

    fn drop_clean(&self, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        let s = self
            .swap
            .as_ref()
            .ok_or_else(|| TargetError::Unsupported("no swap".into()))?;
        let w = self.window()?;
        let cold = self.candidates(&w, req.cold_intervals, req.urgent);
        s.drop_clean(&cold, req.max_bytes)
            .map(PhaseOutcome::reclaimed)
    }

    fn swap_out(&self, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        let s = self
            .swap
            .as_ref()
            .ok_or_else(|| TargetError::Unsupported("no swap".into()))?;
        let w = self.window()?;
        let cold = self.candidates(&w, req.cold_intervals, req.urgent);
        s.swap_out(&cold, req.max_bytes)
            .map(PhaseOutcome::reclaimed)
    }

    fn release(&self, max_bytes: u64) -> Result<u64, TargetError> {
        let b = self
            .balloon
            .as_ref()
            .ok_or_else(|| TargetError::Unsupported("no balloon".into()))?;
        self.window()?;
        b.deflate(max_bytes)
    }

    fn split_huge(&self, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        let w = self.window()?;
        let blocks = self.candidates(&w, req.cold_intervals, req.urgent);
        if blocks.is_empty() {
            return Ok(PhaseOutcome::default());
        }
        if self.no_writers {
            return Ok(PhaseOutcome::reclaimed(self.zero_scan(
                &w,
                &blocks,
                req.max_bytes,
            )));
        }
        let q = self.quiesce.as_ref().ok_or_else(|| {
            TargetError::Unsupported("zero-page split needs a way to pause the vCPUs".into())
        })?;
        let mut freed = 0;
        q(&mut || freed = self.zero_scan(&w, &blocks, req.max_bytes))?;
        Ok(PhaseOutcome::reclaimed(freed))
    }
}

/// Time per GiB scanned from split figures (for reports), `None` without scans.
pub fn split_cost_per_gib(s: &ZeroSplitStats) -> Option<Duration> {
    if s.pages_scanned == 0 {
        return None;
    }
    let per_page = s.time_ns as f64 / s.pages_scanned as f64;
    Some(Duration::from_nanos(
        (per_page * (1u64 << 18) as f64) as u64,
    ))
}

#[cfg(test)]
#[path = "window_tests.rs"]
mod tests;
