//! `tidepool bench hotplug`: virtio-mem plug and unplug through the real device.
//!
//! A Rust driver plays the guest ([`tidepool_hotplug::virtio_mem::test_utils::Guest`]): it
//! sends PLUG/UNPLUG requests over a real split ring and virtio-mmio transport to a
//! [`VirtioMem`](tidepool_hotplug::VirtioMem) whose backend is the VMM's own
//! [`PoolMemoryBackend`] over a real KVM [`Vm`] (1 GiB hot-plug region) and a guest-mm pool.
//! Each figure is the host time from the notify of the request to the ACK in the used ring.
//!
//! Unplug is measured on touched memory (every 4 KiB page written through the window mapping
//! before each run, untimed) and compared with a plain `madvise(MADV_DONTNEED)` of the same
//! amount of touched, THP-advised anonymous memory, timed back to back with each unplug.
//!
//! Both memslot strategies ([`HotplugMemslots`]) are measured, on two VMs whose runs are
//! interleaved: eager gives the headline figures, lazy the `lazy_` ones.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mm::frame::{MigrateType, NodeId};
use guest_mm::policy::NumaPolicy;
use guest_mm::slab::TypedSlab;
use guest_mm::topology::Topology;
use tidepool_hotplug::virtio_mem::test_utils::{plug, unplug, Guest};
use tidepool_hotplug::virtio_mem::ResponseType;
use tidepool_hotplug::VirtioMemConfig;

use super::{progress, BenchError, BenchOptions, Report};
use crate::devices::mem_backend::{PoolMemoryBackend, VmMemoryHandle};
use crate::hostpool::{build_pool, FramePool, POOL_BLOCK_BYTES};
use crate::kvm::{kvm_available, HotplugMemslots, Vm, VmConfig};
use crate::memory::layout::LayoutConfig;
use crate::memory::window::GuestWindow;

const GIB: u64 = 1 << 30;
const PAGE: usize = 4096;

fn failed(e: impl ToString) -> BenchError {
    BenchError::Failed {
        suite: "hotplug",
        reason: e.to_string(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Write one byte in every 4 KiB page of `[addr, addr+len)`.
///
/// # Safety
/// The range must be mapped read-write and owned by the caller for the duration.
unsafe fn touch(addr: usize, len: usize) {
    for off in (0..len).step_by(PAGE) {
        // SAFETY: the caller guarantees the range is mapped read-write.
        unsafe { std::ptr::write_volatile((addr + off) as *mut u8, 1) };
    }
}

/// Touch the placed guest range `[gpa, gpa+len)` through the window mapping.
fn touch_guest(window: &GuestWindow, gpa: u64, len: u64) -> Result<(), BenchError> {
    if !window.is_range_placed(gpa, len) {
        return Err(failed(format!("[{gpa:#x}, +{len:#x}) is not placed")));
    }
    let host = window
        .host_addr(gpa)
        .ok_or_else(|| failed(format!("{gpa:#x} outside the window")))?;
    let len = usize::try_from(len).map_err(failed)?;
    // SAFETY: the range is placed (read-write) in the window, and only this thread changes
    // placement (through the device it drives) while the touch runs.
    unsafe { touch(host, len) };
    Ok(())
}

/// Anonymous THP-advised memory for the raw discard baseline, unmapped on drop.
struct RawArea {
    base: usize,
    len: usize,
    reserve: usize,
    raw: usize,
}

impl RawArea {
    fn new(len: usize) -> Result<RawArea, BenchError> {
        let align = POOL_BLOCK_BYTES as usize;
        let reserve = len + align;
        // SAFETY: a fresh anonymous private mapping at an address the kernel chooses.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(failed(std::io::Error::last_os_error()));
        }
        let raw = raw as usize;
        let base = (raw + align - 1) & !(align - 1);
        let area = RawArea {
            base,
            len,
            reserve,
            raw,
        };
        area.advise(libc::MADV_HUGEPAGE)?;
        Ok(area)
    }

    fn advise(&self, advice: libc::c_int) -> Result<(), BenchError> {
        // SAFETY: [base, base+len) lies inside the mapping this object owns.
        let rc = unsafe { libc::madvise(self.base as *mut libc::c_void, self.len, advice) };
        if rc != 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for RawArea {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` and nothing refers to it after drop.
        unsafe { libc::munmap(self.raw as *mut libc::c_void, self.reserve) };
    }
}

/// The device under test with its VM.
struct Rig {
    guest: Guest<PoolMemoryBackend>,
    vm: Arc<Vm>,
    _vcpu: crate::kvm::vcpu::Vcpu,
    pool: Arc<dyn FramePool>,
    base: u64,
}

impl Rig {
    fn new(region: u64, memslots: HotplugMemslots) -> Result<Rig, BenchError> {
        let vm = Arc::new(
            Vm::new(VmConfig {
                layout: LayoutConfig {
                    boot_ram: 64 << 20,
                    hotplug_size: region,
                },
                platform: false,
                hotplug_memslots: memslots,
            })
            .map_err(failed)?,
        );
        // A VM has vCPUs; KVM's memslot updates touch per-vCPU state, so hold one.
        let vcpu = vm.create_vcpu(0).map_err(failed)?;
        let base = vm
            .window()
            .layout()
            .hotplug()
            .ok_or_else(|| failed("layout has no hot-plug region"))?
            .start;
        let pool: Arc<dyn FramePool> = Arc::new(
            build_pool(Topology::single(2 * region), Some(region + (64 << 20))).map_err(failed)?,
        );
        let handle = VmMemoryHandle::new(Arc::clone(&vm)).map_err(failed)?;
        let slab = TypedSlab::new("bench-hotplug-blocks").map_err(failed)?;
        let backend = PoolMemoryBackend::new(
            handle,
            Arc::clone(&pool),
            NumaPolicy::default(),
            Some(NodeId(0)),
            slab,
            1,
        );
        let mut guest = Guest::booted_with(VirtioMemConfig::new(base, region, 64 << 20), backend);
        guest.dev_mut().request_size(region).map_err(failed)?;
        Ok(Rig {
            guest,
            vm,
            _vcpu: vcpu,
            pool,
            base,
        })
    }

    /// PLUG or UNPLUG `len` bytes at `gpa`; the time from request to ACK.
    fn op(&mut self, plugging: bool, gpa: u64, len: u64) -> Result<Duration, BenchError> {
        let nb = u16::try_from(len / POOL_BLOCK_BYTES).map_err(failed)?;
        let req = if plugging {
            plug(gpa, nb)
        } else {
            unplug(gpa, nb)
        };
        let t = Instant::now();
        let resp = self.guest.request(req);
        let d = t.elapsed();
        if resp.resp_type != ResponseType::Ack {
            return Err(failed(format!(
                "{} of {len:#x} at {gpa:#x} answered {:?}",
                if plugging { "plug" } else { "unplug" },
                resp.resp_type
            )));
        }
        Ok(d)
    }
}

/// Time to take and give back `n` blocks from a fresh pool like the rig's.
fn pool_split(region: u64) -> Result<Duration, BenchError> {
    let pool =
        build_pool(Topology::single(2 * region), Some(region + (64 << 20))).map_err(failed)?;
    let n = region / POOL_BLOCK_BYTES;
    let policy = NumaPolicy::default();
    let t = Instant::now();
    let mut taken = Vec::new();
    for _ in 0..n {
        taken.push(
            pool.alloc_block(MigrateType::Movable, &policy, NodeId(0))
                .map_err(failed)?,
        );
    }
    let d = t.elapsed();
    for (f, _) in taken {
        pool.free_block(f).map_err(failed)?;
    }
    Ok(d)
}

/// The figures of one memslot strategy.
struct Figures {
    /// Median over runs of (unplug / raw discard) measured back to back.
    ratio: f64,
    /// Fastest unplug over fastest raw discard (the least noisy estimate of the overhead).
    min_ratio: f64,
    plug: f64,
    unplug: f64,
    raw: f64,
    pool: f64,
    window: f64,
    vm_place: f64,
    window_remove: f64,
    vm_remove: f64,
    cycles_per_s: f64,
}

/// One strategy's rig and its plug/unplug samples.
struct Series {
    name: &'static str,
    rig: Rig,
    plug_ms: Vec<f64>,
    unplug_ms: Vec<f64>,
    raw_ms: Vec<f64>,
    ratios: Vec<f64>,
}

impl Series {
    fn new(memslots: HotplugMemslots) -> Result<Series, BenchError> {
        let name = match memslots {
            HotplugMemslots::Eager => "eager",
            HotplugMemslots::Lazy => "lazy",
        };
        Ok(Series {
            name,
            rig: Rig::new(GIB, memslots)?,
            plug_ms: Vec::new(),
            unplug_ms: Vec::new(),
            raw_ms: Vec::new(),
            ratios: Vec::new(),
        })
    }

    /// Run `i`: plug 1 GiB, touch it and the raw area, then unplug and raw discard back to
    /// back, in alternating order, so that both see the same host load.
    fn step(&mut self, i: usize, raw: &RawArea) -> Result<(), BenchError> {
        let (base, region) = (self.rig.base, GIB);
        self.plug_ms.push(ms(self.rig.op(true, base, region)?));
        touch_guest(self.rig.vm.window(), base, region)?;
        // SAFETY: the area is mapped read-write and owned by the caller.
        unsafe { touch(raw.base, raw.len) };
        let raw_discard = |out: &mut Vec<f64>| -> Result<(), BenchError> {
            let t = Instant::now();
            raw.advise(libc::MADV_DONTNEED)?;
            out.push(ms(t.elapsed()));
            Ok(())
        };
        if i % 2 == 0 {
            self.unplug_ms.push(ms(self.rig.op(false, base, region)?));
            raw_discard(&mut self.raw_ms)?;
        } else {
            raw_discard(&mut self.raw_ms)?;
            self.unplug_ms.push(ms(self.rig.op(false, base, region)?));
        }
        let n = self.unplug_ms.len() - 1;
        self.ratios.push(self.unplug_ms[n] / self.raw_ms[n]);
        progress(&format!(
            "{} run {i}: plug {:.3} ms, unplug {:.3} ms, raw discard {:.3} ms",
            self.name, self.plug_ms[n], self.unplug_ms[n], self.raw_ms[n]
        ));
        Ok(())
    }
}

/// After the interleaved runs: the split of plug and unplug, and the 2 MiB cycle rate.
fn finish(series: Series, runs: usize, cycles: u64) -> Result<Figures, BenchError> {
    let Series {
        name,
        mut rig,
        plug_ms,
        unplug_ms,
        raw_ms,
        ratios,
    } = series;
    let (base, region) = (rig.base, GIB);
    // Split of a plug: the pool alone, the window alone (mprotect + madvise), and the window
    // with KVM memslots (Vm::place_block); the rest is device and driver bookkeeping.
    let (mut pool_ms, mut window_ms, mut vm_ms) = (Vec::new(), Vec::new(), Vec::new());
    let (mut wrm_ms, mut vrm_ms) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        pool_ms.push(ms(pool_split(region)?));
        let w = rig.vm.window();
        let t = Instant::now();
        w.place_block(base, region).map_err(failed)?;
        window_ms.push(ms(t.elapsed()));
        touch_guest(w, base, region)?;
        let t = Instant::now();
        w.remove_block(base, region).map_err(failed)?;
        wrm_ms.push(ms(t.elapsed()));
        let t = Instant::now();
        rig.vm.place_block(base, region).map_err(failed)?;
        vm_ms.push(ms(t.elapsed()));
        touch_guest(w, base, region)?;
        let t = Instant::now();
        rig.vm.remove_block(base, region).map_err(failed)?;
        vrm_ms.push(ms(t.elapsed()));
    }

    progress(&format!("{name}: {cycles} cycles of 2 MiB plug + unplug"));
    let t = Instant::now();
    for _ in 0..cycles {
        rig.op(true, base, POOL_BLOCK_BYTES)?;
        rig.op(false, base, POOL_BLOCK_BYTES)?;
    }
    let cycles_per_s = cycles as f64 / t.elapsed().as_secs_f64();
    let figures = rig.pool.figures().map_err(failed)?;
    if !figures.is_whole() {
        return Err(failed("pool not whole after the runs"));
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Figures {
        ratio: median(ratios),
        min_ratio: min(&unplug_ms) / min(&raw_ms),
        plug: median(plug_ms),
        unplug: median(unplug_ms),
        raw: median(raw_ms),
        pool: median(pool_ms),
        window: median(window_ms),
        vm_place: median(vm_ms),
        window_remove: median(wrm_ms),
        vm_remove: median(vrm_ms),
        cycles_per_s,
    })
}

/// `VmallocUsed` from /proc/meminfo, in KiB (KVM allocates its per-slot arrays there).
fn vmalloc_used_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmallocUsed:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Host kernel memory (KiB, from `VmallocUsed`) that registering a 16 GiB hot-plug region's
/// slots eagerly costs, per GiB of region: the median over `runs` VMs of (eager VM - lazy VM).
/// A host-wide figure, so other processes add noise; the median damps it.
fn eager_kernel_kib_per_gib(runs: usize) -> Result<f64, BenchError> {
    const REGION: u64 = 16 * GIB;
    let mut deltas = Vec::new();
    for _ in 0..runs {
        let mut used = [0f64; 2];
        for (i, memslots) in [HotplugMemslots::Lazy, HotplugMemslots::Eager]
            .into_iter()
            .enumerate()
        {
            let before = vmalloc_used_kib().ok_or_else(|| failed("no VmallocUsed"))?;
            let vm = Vm::new(VmConfig {
                layout: LayoutConfig {
                    boot_ram: 64 << 20,
                    hotplug_size: REGION,
                },
                platform: false,
                hotplug_memslots: memslots,
            })
            .map_err(failed)?;
            let after = vmalloc_used_kib().ok_or_else(|| failed("no VmallocUsed"))?;
            drop(vm);
            used[i] = after as f64 - before as f64;
        }
        deltas.push((used[1] - used[0]) / (REGION / GIB) as f64);
    }
    Ok(median(deltas))
}

/// Run the suite: the default (eager) strategy gives the headline figures; the lazy strategy's
/// are reported beside them with a `lazy_` prefix.
pub fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    kvm_available().map_err(|e| failed(format!("/dev/kvm unusable: {e}")))?;
    let runs = if opts.quick { 5 } else { 15 };
    let cycles: u64 = if opts.quick { 200 } else { 1000 };
    let mut r = Report::default();
    progress(&format!(
        "two VMs (eager and lazy memslots), each with a 1 GiB hot-plug region; {runs} interleaved \
         runs of 1 GiB plug/unplug"
    ));
    let mut eager = Series::new(HotplugMemslots::Eager)?;
    let mut lazy = Series::new(HotplugMemslots::Lazy)?;
    let raw = RawArea::new(usize::try_from(GIB).map_err(failed)?)?;
    // Interleaved, with the first strategy alternating, so that host load phases hit both.
    for i in 0..runs {
        if i % 2 == 0 {
            eager.step(i, &raw)?;
            lazy.step(i, &raw)?;
        } else {
            lazy.step(i, &raw)?;
            eager.step(i, &raw)?;
        }
    }
    drop(raw);
    let eager = finish(eager, runs, cycles)?;
    let lazy = finish(lazy, runs, cycles)?;
    for (prefix, f, what) in [("", &eager, "eager"), ("lazy_", &lazy, "lazy")] {
        let n = |s: &str| format!("{prefix}{s}");
        r.add(
            &n("plug_1g_ms"),
            f.plug,
            &format!("ms, PLUG 1 GiB request to ACK, {what} memslots (target <= 1)"),
        );
        r.add(
            &n("plug_1g_pool_ms"),
            f.pool,
            "ms of it: 512 blocks from the pool",
        );
        r.add(
            &n("plug_1g_window_ms"),
            f.window,
            "ms of it: window mprotect + madvise",
        );
        r.add(
            &n("plug_1g_memslot_ms"),
            (f.vm_place - f.window).max(0.0),
            &format!("ms of it: KVM memslot work in Vm::place_block ({what})"),
        );
        r.add(
            &n("unplug_1g_ms"),
            f.unplug,
            "ms, UNPLUG 1 GiB touched to ACK (discard included)",
        );
        r.add(
            &n("raw_discard_1g_ms"),
            f.raw,
            "ms, madvise(DONTNEED) of 1 GiB touched THP memory, same loop",
        );
        r.add(
            &n("unplug_vs_raw_ratio"),
            f.ratio,
            "median of per-run unplug / raw, measured back to back (target <= 1.2)",
        );
        r.add(
            &n("unplug_vs_raw_min_ratio"),
            f.min_ratio,
            "fastest unplug / fastest raw discard",
        );
        r.add(
            &n("unplug_1g_window_ms"),
            f.window_remove,
            "ms of it: window mprotect(PROT_NONE) + madvise(DONTNEED), touched",
        );
        r.add(
            &n("unplug_1g_memslot_ms"),
            (f.vm_remove - f.window_remove).max(0.0),
            &format!("ms of it: KVM memslot work in Vm::remove_block ({what})"),
        );
        r.add(
            &n("plug_unplug_cycles_per_s"),
            f.cycles_per_s,
            "2 MiB plug + unplug cycles per second",
        );
    }
    progress("kernel memory of eager slots (16 GiB region, VmallocUsed)");
    r.add(
        "eager_slot_kernel_kib_per_gib",
        eager_kernel_kib_per_gib(if opts.quick { 3 } else { 7 })?,
        "KiB of host kernel memory (VmallocUsed) per GiB of region that eager slots hold \
         with no block plugged (host-wide, noisy)",
    );
    Ok(r)
}
