//! A microVM: one KVM VM with its memory window, boot RAM taken from the host pool, its
//! virtio-mmio devices (virtio-mem over the pool, virtio-balloon over the window), its
//! pausable vCPU threads, and a lifecycle state machine ([`lifecycle`]).
//!
//! A guest that crashes (triple fault, emulation failure) only moves its VM to
//! [`VmLifecycle::Stopped`] with [`StopCause::GuestFailed`]; the process lives on. Dropping a
//! `Microvm` stops its threads, unplugs hot-plugged blocks, drops the VM (and so its window)
//! and returns every boot block to the pool.

#[cfg(test)]
mod backing_tests;
#[cfg(test)]
mod balloon_tests;
#[cfg(test)]
mod driver_tests;
pub mod exits;
mod guest_numa;
pub mod lifecycle;
pub mod linux;
pub mod reports;
pub mod resize;
mod setup;
#[cfg(test)]
pub(crate) mod test_rig;
#[cfg(test)]
mod tests;
pub mod vcpus;

pub use exits::{ExitCounters, GuestWake, ReportLog, VmExitHandler, MAX_GUEST_WAIT};
pub use lifecycle::{LifecycleOp, StopCause, TransitionError, VmLifecycle};
pub use reports::{ReportRing, REPORT_LOG_CAPACITY};
pub use resize::ResizeHandle;
pub use setup::{BalloonSpec, BootImage, HotplugSpec, MicrovmConfig};
pub use vcpus::{VcpuEvent, VcpuStuck, VcpuThread};

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_mm::frame::{FrameId, NodeId};
use tidepool_balloon::{Balloon, BalloonError, GuestStats};
use tidepool_hotplug::{MemStatus, ResizeError, VirtioMem};
use tidepool_virtio::MmioTransport;

use crate::devices::{
    lock, DeviceSetupError, MmioBus, NotifyThread, PoolMemoryBackend, VmMemoryHandle, WindowReclaim,
};
use crate::hostpool::{FramePool, PoolError, POOL_BLOCK_BYTES};
use crate::kvm::{KvmError, StopReason, Vcpu, VcpuError, Vm};
use crate::memory::MemoryError;
use crate::tiny_guest::GuestReport;

/// How long a vCPU gets to park or end when asked.
pub const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The virtio-mem transport with its typed device.
pub type MemTransport = Arc<Mutex<MmioTransport<VirtioMem<PoolMemoryBackend>>>>;
/// The balloon transport with its typed device.
pub type BalloonTransport = Arc<Mutex<MmioTransport<Balloon>>>;

/// Errors of microVM operations.
#[derive(Debug, thiserror::Error)]
pub enum MicrovmError {
    /// The configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// The configuration asks for something Tidepool does not do (yet).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The host pool could not provide memory.
    #[error("host memory pool: {0}")]
    Pool(#[from] PoolError),
    /// KVM failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The memory window failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Device setup failed.
    #[error(transparent)]
    Devices(#[from] DeviceSetupError),
    /// A vCPU could not be set up or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A forbidden lifecycle transition.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// A vCPU did not react in time.
    #[error(transparent)]
    Stuck(#[from] VcpuStuck),
    /// The VM has no virtio-mem device.
    #[error("the VM has no hotplug (virtio-mem) device")]
    NoHotplug,
    /// The VM has no balloon device.
    #[error("the VM has no balloon device")]
    NoBalloon,
    /// virtio-mem refused the resize.
    #[error("resize refused: {0}")]
    Resize(#[from] ResizeError),
    /// The balloon refused.
    #[error("balloon: {0}")]
    Balloon(#[from] BalloonError),
    /// The VM failed for good (a swap-in failed) and the device is held by a thread that
    /// will never release it.
    #[error("the VM failed; its {0} device is unavailable")]
    Failed(&'static str),
}

/// Memory figures of a VM, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryFigures {
    /// Boot RAM.
    pub boot: u64,
    /// Hot-plug region size (0 without virtio-mem).
    pub region: u64,
    /// Boot RAM plus plugged blocks.
    pub plugged: u64,
    /// Boot RAM plus requested hot-plugged memory.
    pub requested: u64,
    /// Host memory resident behind the window (mincore).
    pub resident: u64,
    /// Reported free by the guest and discarded.
    pub reported: u64,
    /// Held by the balloon.
    pub ballooned: u64,
    /// Discarded memory touched again.
    pub refaulted: u64,
    /// Whether the guest's virtio-mem driver is up.
    pub driver_ready: bool,
    /// Plugged total when the last resize was asked for.
    pub resize_from: u64,
}

/// Balloon figures, in MiB, with the guest's last statistics.
#[derive(Debug, Clone)]
pub struct BalloonFigures {
    /// Target.
    pub target_mib: u64,
    /// What the guest inflated to.
    pub actual_mib: u64,
    /// The guest's last statistics, if any.
    pub stats: Option<GuestStats>,
}

/// One microVM.
#[derive(Debug)]
pub struct Microvm {
    id: String,
    config: MicrovmConfig,
    state: VmLifecycle,
    threads: Vec<VcpuThread>,
    pending: Vec<Vcpu>,
    events_tx: Sender<VcpuEvent>,
    events_rx: Receiver<VcpuEvent>,
    notifier: Option<NotifyThread>,
    mem_dev: Option<MemTransport>,
    /// Resizes without the device's lock (present with `mem_dev`).
    resize: Option<ResizeHandle>,
    balloon_dev: Option<BalloonTransport>,
    probe: Option<WindowReclaim>,
    bus: Arc<MmioBus>,
    reports: ReportLog,
    exit_counters: Arc<ExitCounters>,
    /// Wakes vCPUs blocked in a guest wait request when the host has news for the guest.
    wake: Arc<GuestWake>,
    handle: Option<VmMemoryHandle>,
    legacy: Option<Arc<Mutex<crate::legacy::LegacyDevices>>>,
    console: Option<linux::ConsoleLog>,
    boot_info: Option<crate::boot::BootInfo>,
    vm: Option<Arc<Vm>>,
    /// Shared with the pool's block mover, which repoints entries under this lock.
    boot_blocks: BootBlocks,
    pool: Arc<dyn FramePool>,
}

/// The pool blocks behind a VM's boot RAM, in guest-physical order, with their nodes. Shared
/// by the VM and the pool's block mover (compaction, NUMA rebalancing), which repoints an
/// entry when it moves the block; the VM drains it under the same lock when it is deleted.
pub type BootBlocks = Arc<Mutex<Vec<(FrameId, NodeId)>>>;

/// Host memory resident for a VM on one node, by migration type of the pool blocks behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeResidency {
    /// The node.
    pub node: NodeId,
    /// Resident boot RAM (UNMOVABLE blocks).
    pub unmovable: u64,
    /// Resident hot-plugged RAM (MOVABLE blocks).
    pub movable: u64,
    /// Pool memory assigned to the VM on this node (resident or not).
    pub assigned: u64,
}

impl Microvm {
    /// The VM id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &MicrovmConfig {
        &self.config
    }

    /// The lifecycle state (after taking in what the vCPUs reported).
    pub fn state(&mut self) -> &VmLifecycle {
        self.poll_events();
        &self.state
    }

    /// The KVM VM (None only while dropping).
    pub fn vm(&self) -> Option<&Arc<Vm>> {
        self.vm.as_ref()
    }

    /// The device bus.
    pub fn bus(&self) -> &Arc<MmioBus> {
        &self.bus
    }

    /// The serial console output of a Linux guest (the most recent 64 KiB).
    pub fn console(&self) -> Option<String> {
        self.console.as_ref().map(|c| c.text())
    }

    /// What the Linux loader did (None for raw images).
    pub fn boot_info(&self) -> Option<&crate::boot::BootInfo> {
        self.boot_info.as_ref()
    }

    /// The reports the guest wrote, oldest first: the most recent [`REPORT_LOG_CAPACITY`].
    pub fn reports(&self) -> Vec<GuestReport> {
        lock(&self.reports).to_vec()
    }

    /// Reports dropped from the log to keep it bounded.
    pub fn reports_dropped(&self) -> u64 {
        lock(&self.reports).dropped()
    }

    /// Exit counters.
    pub fn exit_counters(&self) -> &ExitCounters {
        &self.exit_counters
    }

    /// Run `work` on the VM's device thread ([`NotifyThread::post`]); `Err` gives it back
    /// when the VM has no device thread.
    pub fn post_device_work(
        &self,
        work: crate::devices::DeviceWork,
    ) -> Result<(), crate::devices::DeviceWork> {
        match &self.notifier {
            Some(n) => n.post(work),
            None => Err(work),
        }
    }

    /// Counters of the device thread serving the ioeventfds (None without devices).
    pub fn notifier_stats(&self) -> Option<&crate::devices::NotifierStats> {
        self.notifier.as_ref().map(|n| n.stats())
    }

    /// The virtio-mem transport, if the VM has one.
    pub fn mem_device(&self) -> Option<&MemTransport> {
        self.mem_dev.as_ref()
    }

    /// The handle that resizes this VM from any thread, if it has virtio-mem.
    pub fn resize_handle(&self) -> Option<&ResizeHandle> {
        self.resize.as_ref()
    }

    /// The balloon transport, if the VM has one.
    pub fn balloon_device(&self) -> Option<&BalloonTransport> {
        self.balloon_dev.as_ref()
    }

    /// The pool blocks behind boot RAM, in guest-physical order, with their nodes (a copy:
    /// the block mover may repoint them at any time).
    pub fn boot_blocks(&self) -> Vec<(FrameId, NodeId)> {
        lock(&self.boot_blocks).clone()
    }

    /// The shared record of the boot blocks (for the pool's block mover).
    pub fn boot_block_cell(&self) -> &BootBlocks {
        &self.boot_blocks
    }

    /// Resident host memory per node and migration type: every 2 MiB block of boot RAM and
    /// every plugged block is probed with mincore and counted on its pool block's node.
    pub fn residency_by_node(&self) -> Result<Vec<NodeResidency>, MicrovmError> {
        let vm = self
            .vm
            .as_ref()
            .ok_or(MicrovmError::Config("VM is gone".into()))?;
        let window = vm.window();
        let mut out: Vec<NodeResidency> = Vec::new();
        let mut add = |node: NodeId, unmovable: u64, movable: u64| {
            let i = match out.iter().position(|n| n.node == node) {
                Some(i) => i,
                None => {
                    out.push(NodeResidency {
                        node,
                        ..NodeResidency::default()
                    });
                    out.len() - 1
                }
            };
            out[i].unmovable += unmovable;
            out[i].movable += movable;
            out[i].assigned += POOL_BLOCK_BYTES;
        };
        let boot_gpas = window
            .layout()
            .boot_ram_ranges()
            .into_iter()
            .flat_map(|r| r.step_by(POOL_BLOCK_BYTES as usize));
        let boot = self.boot_blocks();
        for (gpa, (_, node)) in boot_gpas.zip(boot.iter()) {
            add(*node, window.resident_bytes(gpa, POOL_BLOCK_BYTES)?, 0);
        }
        let hot = self
            .with_memory_backend(|b| b.records())
            .unwrap_or_default();
        for r in hot {
            add(r.node, 0, window.resident_bytes(r.gpa, POOL_BLOCK_BYTES)?);
        }
        out.sort_by_key(|n| n.node);
        Ok(out)
    }

    /// Lock a device transport of this VM; [`MicrovmError::Failed`] when the VM failed and
    /// the lock is held (possibly by a thread parked for good, see `swap::guard`).
    fn dev<'a, T: ?Sized>(
        &self,
        dev: &'a Mutex<T>,
        name: &'static str,
    ) -> Result<std::sync::MutexGuard<'a, T>, MicrovmError> {
        self.bus.lock_live(dev).ok_or(MicrovmError::Failed(name))
    }

    /// The VM cannot go on (its memory could not be read back: a swap-in failed): mark its
    /// devices failed (nobody waits for their locks any more), stop its vCPUs and move it to
    /// [`VmLifecycle::Stopped`] with [`StopCause::GuestFailed`]`(reason)`. A VM already
    /// stopped keeps its cause. Logged with the VM id.
    pub fn fail(&mut self, reason: &str) {
        self.bus.mark_failed();
        self.poll_events();
        if self.state.is_stopped() {
            tracing::error!(vm = %self.id, state = %self.state, reason, "VM failure reported after it stopped");
            return;
        }
        self.end_threads();
        self.state = VmLifecycle::Stopped(StopCause::GuestFailed(reason.to_string()));
        tracing::error!(vm = %self.id, reason, "VM failed: stopped");
    }

    /// Take in vCPU events: a vCPU that ended on its own stops the VM (all other vCPUs are
    /// stopped too). Returns whether the state changed.
    pub fn poll_events(&mut self) -> bool {
        let mut changed = false;
        while let Ok(ev) = self.events_rx.try_recv() {
            let VcpuEvent::Ended { id, outcome } = ev;
            if self.state.is_stopped() {
                continue;
            }
            let cause = match outcome {
                Ok(StopReason::Handler | StopReason::Halted) => StopCause::GuestFinished,
                Ok(StopReason::Kicked) => continue,
                Err(e) => {
                    tracing::warn!(vm = %self.id, vcpu = id, error = %e, "guest failed");
                    StopCause::GuestFailed(e.to_string())
                }
            };
            tracing::info!(vm = %self.id, vcpu = id, cause = ?cause, "VM stopped by its guest");
            self.end_threads();
            self.state = VmLifecycle::Stopped(cause);
            changed = true;
        }
        changed
    }

    fn end_threads(&mut self) {
        for t in self.threads.drain(..) {
            let id = t.id();
            if let Err(e) = t.stop(VCPU_STOP_TIMEOUT) {
                tracing::error!(vcpu = id, error = %e, "vCPU thread left detached");
            }
        }
    }

    /// Apply a lifecycle operation.
    pub fn apply(&mut self, op: LifecycleOp) -> Result<&VmLifecycle, MicrovmError> {
        self.poll_events();
        let next = self.state.next(op)?;
        match op {
            LifecycleOp::Start => {
                for vcpu in self.pending.drain(..).collect::<Vec<_>>() {
                    let handler = VmExitHandler::new(
                        Arc::clone(&self.bus),
                        Arc::clone(&self.reports),
                        Arc::clone(&self.exit_counters),
                        Arc::clone(&self.wake),
                    );
                    let tx = self.events_tx.clone();
                    let mut t = match &self.legacy {
                        Some(dev) => VcpuThread::spawn(
                            vcpu,
                            crate::legacy::LegacyExitHandler::new(Arc::clone(dev), handler),
                            tx,
                            &self.id,
                        )?,
                        None => VcpuThread::spawn(vcpu, handler, tx, &self.id)?,
                    };
                    t.set_guest_wake(Arc::clone(&self.wake));
                    self.threads.push(t);
                }
            }
            LifecycleOp::Pause => {
                for t in &self.threads {
                    t.pause(VCPU_STOP_TIMEOUT)?;
                }
            }
            LifecycleOp::Resume => {
                for t in &self.threads {
                    t.resume();
                }
            }
            LifecycleOp::Stop => self.end_threads(),
        }
        self.state = next;
        // A guest that ended while we paused or resumed wins.
        self.poll_events();
        Ok(&self.state)
    }

    /// virtio-mem's host-side status, as the device last published it (without its lock).
    pub fn mem_status(&self) -> Option<MemStatus> {
        self.resize.as_ref().map(ResizeHandle::status)
    }

    /// Set the requested total guest RAM (boot RAM plus hot-plugged memory). Does not wait
    /// for the device or the guest ([`ResizeHandle::resize_total`]).
    pub fn resize_total(&mut self, total: u64) -> Result<(), MicrovmError> {
        self.resize
            .as_ref()
            .ok_or(MicrovmError::NoHotplug)?
            .resize_total(total)
    }

    /// Run `f` on the virtio-mem device's backend (host-side plug and unplug, for tests and
    /// host-driven operations).
    pub fn with_memory_backend<R>(
        &self,
        f: impl FnOnce(&mut PoolMemoryBackend) -> R,
    ) -> Result<R, MicrovmError> {
        let dev = self.mem_dev.as_ref().ok_or(MicrovmError::NoHotplug)?;
        let mut t = self.dev(dev, "virtio-mem")?;
        Ok(f(t.device_mut().backend_mut()))
    }

    /// Memory figures (residency by mincore over every placed block).
    pub fn memory(&mut self) -> Result<MemoryFigures, MicrovmError> {
        let vm = self
            .vm
            .as_ref()
            .ok_or(MicrovmError::Config("VM is gone".into()))?;
        let window = vm.window();
        let mut resident = 0;
        for r in window.placed_ranges() {
            resident += window.resident_bytes(r.start, r.end - r.start)?;
        }
        let boot = self.config.boot_ram;
        let (reported, ballooned, refaulted) = match (&self.balloon_dev, &self.probe) {
            (Some(dev), Some(probe)) => {
                let mut t = self.dev(dev, "virtio-balloon")?;
                let b = t.device_mut();
                if let Err(e) = b.sample_residency(probe) {
                    tracing::warn!(vm = %self.id, error = %e, "balloon residency sample failed");
                }
                let a = b.accounting();
                (a.reported_bytes, a.ballooned_bytes, a.refaulted_bytes)
            }
            _ => (0, 0, 0),
        };
        let m = MemoryFigures {
            boot,
            region: 0,
            plugged: boot,
            requested: boot,
            resident,
            reported,
            ballooned,
            refaulted,
            driver_ready: false,
            resize_from: boot,
        };
        // The resize figures come from what virtio-mem published (blocks plugged from the
        // host side count through the backend's counter), without the device's lock.
        Ok(match &self.resize {
            Some(h) => h.overlay(m),
            None => m,
        })
    }

    /// Set the balloon target.
    pub fn set_balloon(&mut self, target_mib: u64) -> Result<BalloonFigures, MicrovmError> {
        let dev = self.balloon_dev.as_ref().ok_or(MicrovmError::NoBalloon)?;
        self.dev(dev, "virtio-balloon")?
            .device_mut()
            .set_target_mib(target_mib)?;
        self.wake.wake();
        self.balloon()
    }

    /// Balloon figures.
    pub fn balloon(&self) -> Result<BalloonFigures, MicrovmError> {
        let dev = self.balloon_dev.as_ref().ok_or(MicrovmError::NoBalloon)?;
        let t = self.dev(dev, "virtio-balloon")?;
        let b = t.device();
        Ok(BalloonFigures {
            target_mib: b.target_mib(),
            actual_mib: b.actual_mib(),
            stats: b.latest_stats().cloned(),
        })
    }

    /// Total exits over all vCPU threads.
    pub fn vcpu_exits(&self) -> u64 {
        self.threads.iter().map(|t| t.exits()).sum()
    }
}

impl Drop for Microvm {
    fn drop(&mut self) {
        self.end_threads();
        self.pending.clear();
        self.notifier = None;
        if let Some(dev) = &self.mem_dev {
            match self.bus.lock_live(dev) {
                Some(mut t) => t.device_mut().backend_mut().release_all(),
                None => {
                    tracing::error!(vm = %self.id, "virtio-mem is held by a thread parked after a failed swap-in: its hot-plugged blocks stay out of the pool")
                }
            }
        }
        self.mem_dev = None;
        self.resize = None;
        self.balloon_dev = None;
        self.probe = None;
        self.bus = Arc::new(MmioBus::new());
        self.handle = None;
        let mut boot_left = true;
        if let Some(vm) = self.vm.take() {
            if Arc::strong_count(&vm) > 1 {
                tracing::warn!(vm = %self.id, "VM still referenced at delete; its window stays mapped until released");
            }
            let window = Arc::clone(vm.window());
            drop(vm);
            // Boot RAM leaves the window before its blocks go back to the pool, whenever the
            // window would outlive this call or its pages live in a shared pool file.
            if Arc::strong_count(&window) > 1 || window.backing().needs_pool_blocks() {
                for r in window.layout().boot_ram_ranges() {
                    let len = r.end - r.start;
                    if !window.is_range_placed(r.start, len) {
                        continue;
                    }
                    if let Err(e) = window.remove_block(r.start, len) {
                        tracing::error!(vm = %self.id, error = %e, "boot RAM could not leave the window; its pool blocks are kept out of the pool");
                        boot_left = false;
                    }
                }
            }
        }
        let mut boot = lock(&self.boot_blocks);
        if !boot_left {
            boot.clear();
        }
        for (f, _) in boot.drain(..) {
            if let Err(e) = self.pool.free_block(f) {
                tracing::error!(frame = %f, error = %e, "returning a boot block failed");
            }
        }
    }
}
