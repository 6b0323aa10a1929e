//! The reporting-path benchmark behind `tidepool bench reclaim` (feature `bench`).
//!
//! [`ReclaimBench`] builds a VM's guest memory (anonymous, optionally THP), a balloon with the
//! real [`MmapBackend`], and a guest-side driver. It measures free page reporting end to end —
//! descriptor chains of up to 32 blocks through the reporting queue, validation, discard and
//! accounting — against the baseline of raw `madvise(MADV_DONTNEED)` calls on the same blocks.
//! Each run first makes the data area resident again.

use crate::backend::{ReclaimBackend, ResidencyProbe};
use crate::config::BalloonConfig;
use crate::device::Balloon;
use crate::mmap_backend::MmapBackend;
use crate::testing::{Buf, CountingInterrupts, DriverQueue};
use crate::{HUGE_PAGE_SIZE, PAGE_SIZE, VIRTIO_BALLOON_F_REPORTING, VIRTIO_F_VERSION_1};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidepool_virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Benchmark errors.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up memory, the backend or the device failed.
    #[error("setup failed: {0}")]
    Setup(String),
    /// A run did not do what it should (a chain not returned, memory still resident).
    #[error("run failed: {0}")]
    Run(String),
}

/// What to measure.
#[derive(Clone, Copy, Debug)]
pub struct ReclaimBenchConfig {
    /// Bytes of guest RAM that are populated and then reported.
    pub data_bytes: u64,
    /// Size of each reported block (2 MiB: Linux's default order 9 on x86_64).
    pub block_bytes: u64,
    /// Blocks per report (Linux: 32).
    pub blocks_per_report: u16,
    /// Back guest RAM with transparent huge pages (`MADV_HUGEPAGE`).
    pub huge_pages: bool,
    /// Report blocks in a scattered order, as a guest's free lists would, so that adjacent
    /// blocks rarely merge into one discard.
    pub scatter: bool,
    /// Measured rounds (each: populate + reporting, populate + raw, alternating which goes
    /// first); [`ReclaimBench::compare`] keeps the median run of each.
    pub rounds: u32,
}

impl Default for ReclaimBenchConfig {
    fn default() -> Self {
        ReclaimBenchConfig {
            data_bytes: 1 << 30,
            block_bytes: HUGE_PAGE_SIZE,
            blocks_per_report: 32,
            huge_pages: true,
            scatter: true,
            rounds: 5,
        }
    }
}

/// One timed run.
#[derive(Clone, Copy, Debug, Default)]
pub struct BenchRun {
    /// Bytes given back.
    pub bytes: u64,
    /// Reports (or raw madvise calls for the baseline).
    pub operations: u64,
    /// Wall time of the whole run (for reporting: queue handling, validation, discards and
    /// accounting).
    pub elapsed: Duration,
    /// Of which inside the backend's discard calls (the kernel's part).
    pub in_discard: Duration,
    /// Resident bytes of the data area after the run (should be 0).
    pub resident_after: u64,
}

impl BenchRun {
    /// Throughput in GiB/s.
    pub fn gib_per_s(&self) -> f64 {
        self.bytes as f64 / (1u64 << 30) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Time outside the discard calls per GiB given back: the device's own cost.
    pub fn overhead_us_per_gib(&self) -> f64 {
        let outside = self.elapsed.saturating_sub(self.in_discard);
        outside.as_secs_f64() * 1e6 / (self.bytes as f64 / (1u64 << 30) as f64).max(1e-12)
    }
}

/// Wraps the real backend and adds up the time spent in `discard`.
#[derive(Debug)]
struct TimedBackend {
    inner: MmapBackend,
    nanos: Arc<AtomicU64>,
}

impl ReclaimBackend for TimedBackend {
    fn discard(&mut self, gpa: u64, len: u64) -> Result<(), crate::BackendError> {
        let t = Instant::now();
        let r = self.inner.discard(gpa, len);
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(ns, Ordering::Relaxed);
        r
    }

    fn guest_ram(&self) -> &[(u64, u64)] {
        self.inner.guest_ram()
    }

    fn huge_page_size(&self) -> Option<u64> {
        self.inner.huge_page_size()
    }
}

/// The full comparison [`ReclaimBench::compare`] produces (median runs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ReclaimFigures {
    /// Median time to make the data area resident.
    pub populate: Duration,
    /// Smallest resident size of the data area after populating (should be all of it).
    pub resident_before: u64,
    /// Free page reporting through the device.
    pub reporting: BenchRun,
    /// Raw madvise on the same blocks.
    pub raw: BenchRun,
    /// Whether guest RAM's host mapping is 2 MiB aligned (needed for whole huge pages).
    pub host_huge_aligned: bool,
}

/// Offset of the data area in guest memory (the first 2 MiB hold the rings).
const DATA_BASE: u64 = HUGE_PAGE_SIZE;
/// The reporting queue index when only REPORTING is negotiated.
const REPORTING_QUEUE: usize = 2;

/// A VM with a balloon over real memory, ready to be driven.
#[derive(Debug)]
pub struct ReclaimBench {
    cfg: ReclaimBenchConfig,
    mem: GuestMemoryMmap<()>,
    dev: Balloon,
    drv: DriverQueue,
    probe: MmapBackend,
    order: Vec<u64>,
    discard_nanos: Arc<AtomicU64>,
}

impl ReclaimBench {
    /// Map guest memory, build the balloon with the real backend and activate it.
    pub fn new(cfg: ReclaimBenchConfig) -> Result<Self, BenchError> {
        let setup = |e: String| BenchError::Setup(e);
        if cfg.block_bytes == 0
            || cfg.block_bytes % PAGE_SIZE != 0
            || cfg.block_bytes > u64::from(u32::MAX)
            || cfg.data_bytes % cfg.block_bytes != 0
            || cfg.blocks_per_report == 0
            || cfg.blocks_per_report > 256
        {
            return Err(setup(format!("invalid benchmark configuration {cfg:?}")));
        }
        let total =
            usize::try_from(DATA_BASE + cfg.data_bytes).map_err(|e| setup(e.to_string()))?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), total)])
            .map_err(|e| setup(e.to_string()))?;
        let mut backend = MmapBackend::from_guest_memory(&mem).map_err(|e| setup(e.to_string()))?;
        let mut probe = MmapBackend::from_guest_memory(&mem).map_err(|e| setup(e.to_string()))?;
        if cfg.huge_pages {
            backend.advise_huge().map_err(|e| setup(e.to_string()))?;
            probe.advise_huge().map_err(|e| setup(e.to_string()))?;
        }
        let bcfg = BalloonConfig {
            stats_interval_s: 0,
            ..Default::default()
        };
        let discard_nanos = Arc::new(AtomicU64::new(0));
        let timed = TimedBackend {
            inner: backend,
            nanos: Arc::clone(&discard_nanos),
        };
        let mut dev = Balloon::new(bcfg, Box::new(timed)).map_err(|e| setup(e.to_string()))?;
        let acked = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BALLOON_F_REPORTING);
        dev.set_acked_features(acked);
        let drvs: Vec<DriverQueue> = (0..dev.num_queues_for(acked))
            .map(|i| DriverQueue::new(0x1_0000 * (i as u64 + 1), bcfg.queue_size))
            .collect();
        let queues = drvs
            .iter()
            .map(|d| d.device_queue(&mem))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| setup(e.to_string()))?;
        dev.activate(
            GuestMemoryAtomic::new(mem.clone()),
            queues,
            Arc::new(CountingInterrupts::default()),
        )
        .map_err(|e| setup(e.to_string()))?;
        let drv = drvs
            .into_iter()
            .nth(REPORTING_QUEUE)
            .ok_or_else(|| setup("no reporting queue".into()))?;
        let blocks = cfg.data_bytes / cfg.block_bytes;
        let order = block_order(blocks, cfg.scatter)
            .into_iter()
            .map(|i| DATA_BASE + i * cfg.block_bytes)
            .collect();
        Ok(ReclaimBench {
            cfg,
            mem,
            dev,
            drv,
            probe,
            order,
            discard_nanos,
        })
    }

    /// The device (for its accounting).
    pub fn device(&self) -> &Balloon {
        &self.dev
    }

    /// Whether guest RAM's host mapping is 2 MiB aligned.
    pub fn host_huge_aligned(&self) -> bool {
        self.probe.host_huge_aligned()
    }

    /// Resident bytes of the data area (`mincore`).
    pub fn resident_bytes(&self) -> Result<u64, BenchError> {
        let mut out = vec![false; (self.cfg.data_bytes / PAGE_SIZE) as usize];
        self.probe
            .residency(DATA_BASE, &mut out)
            .map_err(|e| BenchError::Run(e.to_string()))?;
        Ok(out.iter().filter(|r| **r).count() as u64 * PAGE_SIZE)
    }

    /// Write one byte in every 4 KiB page of the data area, then let the device notice the
    /// refaults (so that its reported set is empty again). Returns the time spent writing.
    pub fn populate(&mut self) -> Result<Duration, BenchError> {
        let t = Instant::now();
        let mut gpa = DATA_BASE;
        while gpa < DATA_BASE + self.cfg.data_bytes {
            self.mem
                .write_obj(1u8, GuestAddress(gpa))
                .map_err(|e| BenchError::Run(e.to_string()))?;
            gpa += PAGE_SIZE;
        }
        let elapsed = t.elapsed();
        self.dev
            .sample_residency(&self.probe)
            .map_err(|e| BenchError::Run(e.to_string()))?;
        Ok(elapsed)
    }

    /// Report every block through the reporting queue, `blocks_per_report` per chain, one
    /// chain per notification (as Linux waits for each report to come back).
    pub fn run_reporting(&mut self) -> Result<BenchRun, BenchError> {
        let per = usize::from(self.cfg.blocks_per_report);
        let len = self.cfg.block_bytes as u32;
        let chains: Vec<Vec<Buf>> = self
            .order
            .chunks(per)
            .map(|c| c.iter().map(|&gpa| Buf::inb(gpa, len)).collect())
            .collect();
        let before = self.dev.accounting().counters.reported_bytes_total;
        self.discard_nanos.store(0, Ordering::Relaxed);
        let t = Instant::now();
        for chain in &chains {
            let used = self.drv.used_idx(&self.mem);
            self.drv
                .submit(&self.mem, chain)
                .map_err(|e| BenchError::Run(e.to_string()))?;
            self.dev
                .process_queue(REPORTING_QUEUE)
                .map_err(|e| BenchError::Run(e.to_string()))?;
            if self.drv.used_idx(&self.mem) != used.wrapping_add(1) {
                return Err(BenchError::Run("a report was not returned".into()));
            }
        }
        let elapsed = t.elapsed();
        let bytes = self.dev.accounting().counters.reported_bytes_total - before;
        if bytes != self.cfg.data_bytes {
            return Err(BenchError::Run(format!(
                "{bytes} bytes reported, {} expected",
                self.cfg.data_bytes
            )));
        }
        Ok(BenchRun {
            bytes,
            operations: chains.len() as u64,
            elapsed,
            in_discard: Duration::from_nanos(self.discard_nanos.load(Ordering::Relaxed)),
            resident_after: self.resident_bytes()?,
        })
    }

    /// The baseline: one `madvise(MADV_DONTNEED)` per block, same blocks, same order.
    pub fn run_raw_madvise(&mut self) -> Result<BenchRun, BenchError> {
        let t = Instant::now();
        for &gpa in &self.order {
            self.probe
                .discard(gpa, self.cfg.block_bytes)
                .map_err(|e| BenchError::Run(e.to_string()))?;
        }
        let elapsed = t.elapsed();
        Ok(BenchRun {
            bytes: self.cfg.data_bytes,
            operations: self.order.len() as u64,
            elapsed,
            in_discard: elapsed,
            resident_after: self.resident_bytes()?,
        })
    }

    /// One untimed warm-up round (the first touch of fresh memory and the first pass through
    /// the reporting path pay one-time costs: on this host the first THP populate of 1 GiB took
    /// 2 s against 0.05 s later), then `rounds` measured rounds of "populate, report
    /// everything" and "populate, discard everything raw", alternating which goes first so that
    /// neither always inherits the other's page-table state. Returns the median run of each.
    pub fn compare(cfg: ReclaimBenchConfig) -> Result<ReclaimFigures, BenchError> {
        let mut b = ReclaimBench::new(cfg)?;
        b.populate()?;
        b.run_reporting()?;
        b.populate()?;
        b.run_raw_madvise()?;
        let mut populate = Vec::new();
        let mut resident_before = u64::MAX;
        let mut reporting = Vec::new();
        let mut raw = Vec::new();
        for round in 0..cfg.rounds.max(1) {
            for step in 0..2 {
                populate.push(b.populate()?);
                resident_before = resident_before.min(b.resident_bytes()?);
                if (round + step) % 2 == 0 {
                    reporting.push(b.run_reporting()?);
                } else {
                    raw.push(b.run_raw_madvise()?);
                }
            }
        }
        populate.sort_unstable();
        Ok(ReclaimFigures {
            populate: populate[populate.len() / 2],
            resident_before,
            reporting: median(reporting),
            raw: median(raw),
            host_huge_aligned: b.host_huge_aligned(),
        })
    }
}

fn median(mut runs: Vec<BenchRun>) -> BenchRun {
    runs.sort_unstable_by_key(|r| r.elapsed);
    runs.get(runs.len() / 2).copied().unwrap_or_default()
}

/// Block indices in report order: sequential, or a deterministic scatter (a stride coprime
/// with the count).
fn block_order(blocks: u64, scatter: bool) -> Vec<u64> {
    if !scatter || blocks < 3 {
        return (0..blocks).collect();
    }
    let mut stride = (blocks / 2) | 1;
    while gcd(stride, blocks) != 1 {
        stride += 2;
    }
    (0..blocks).map(|i| (i * stride) % blocks).collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_is_a_permutation() {
        for n in [1u64, 2, 3, 4, 10, 512] {
            let mut v = block_order(n, true);
            v.sort_unstable();
            assert_eq!(v, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn small_comparison_runs_and_frees_everything() {
        let cfg = ReclaimBenchConfig {
            data_bytes: 64 << 20,
            rounds: 2,
            ..Default::default()
        };
        let f = ReclaimBench::compare(cfg).unwrap();
        assert_eq!(f.resident_before, 64 << 20);
        assert_eq!(f.reporting.bytes, 64 << 20);
        assert_eq!(f.reporting.operations, 1);
        assert_eq!(f.reporting.bytes, f.raw.bytes);
        assert_eq!(f.reporting.resident_after, 0);
        assert_eq!(f.raw.resident_after, 0);
        assert_eq!(f.raw.operations, 32);
        assert!(f.reporting.in_discard <= f.reporting.elapsed);
        assert!(f.reporting.in_discard > Duration::ZERO);
    }
}
