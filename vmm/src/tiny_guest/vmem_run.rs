//! A ready-made virtio-mem set-up for tier-2 tests and `tidepool bench hotplug`: the real
//! `VirtioMem` device behind the real virtio-mmio transport, with a backend that takes
//! order-9 blocks from a guest-mm [`Zone`] and places them in the VM's window (memslots
//! included), and the tiny guest's polled driver running on vCPU 0.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use guest_mm::{FrameId, MigrateType, NodeId, Zone, FRAME_SIZE, PAGEBLOCK_ORDER};
use tidepool_hotplug::{BackendError, MemoryBackend, VirtioMem, VirtioMemConfig};
use tidepool_virtio::MmioTransport;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

use super::harness::{
    start_tiny_guest, wait_report, DeviceExitHandler, HarnessError, NoIrq, ReportLog,
};
use super::run::RunError;
use super::virtio_mem_driver::{
    virtio_mem_program, VirtioMemDriver, MAILBOX_STOP, TAG_VMEM_SETTLED,
};
use super::GuestReport;
use crate::kvm::{ExitHandler, RunSummary, StopReason, VcpuHandle, Vm};
use crate::memory::{WindowMemory, BLOCK_SIZE};

/// Plug: take an order-9 MOVABLE block from the zone per 2 MiB and place it in the window
/// (the VM registers the 128 MiB memslot on its first block). Unplug: remove the block (memslot
/// deleted with its last block, `PROT_NONE`, `MADV_DONTNEED`), then free the frames. A plug
/// the pool cannot serve is all-or-nothing and answers BUSY.
#[derive(Debug)]
pub struct WindowZoneBackend {
    vm: Arc<Vm>,
    zone: Zone,
    frames: BTreeMap<u64, FrameId>,
}

impl WindowZoneBackend {
    /// A backend for `vm` over a pool of `pool_bytes`.
    pub fn new(vm: Arc<Vm>, pool_bytes: u64) -> WindowZoneBackend {
        WindowZoneBackend {
            vm,
            zone: Zone::new(NodeId(0), FrameId(0), pool_bytes / FRAME_SIZE),
            frames: BTreeMap::new(),
        }
    }

    /// The pool's zone (frame accounting).
    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    /// 2 MiB blocks currently plugged.
    pub fn plugged_blocks(&self) -> usize {
        self.frames.len()
    }

    fn release(&mut self, gpa: u64) -> Result<(), BackendError> {
        let frame = self
            .frames
            .remove(&gpa)
            .ok_or_else(|| BackendError::Failed(format!("{gpa:#x} is not plugged")))?;
        self.vm
            .remove_block(gpa, BLOCK_SIZE)
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        self.zone
            .free(frame, PAGEBLOCK_ORDER)
            .map_err(|e| BackendError::Failed(e.to_string()))
    }

    fn plug_one(&mut self, gpa: u64) -> Result<(), BackendError> {
        let frame = self
            .zone
            .alloc(PAGEBLOCK_ORDER, MigrateType::Movable)
            .map_err(|_| BackendError::OutOfMemory)?;
        if let Err(e) = self.vm.place_block(gpa, BLOCK_SIZE) {
            // The frame never became reachable by the guest.
            let _ = self.zone.free(frame, PAGEBLOCK_ORDER);
            return Err(BackendError::Failed(e.to_string()));
        }
        self.frames.insert(gpa, frame);
        Ok(())
    }
}

impl MemoryBackend for WindowZoneBackend {
    fn plug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        let mut done = Vec::new();
        for g in (gpa..gpa.saturating_add(len)).step_by(BLOCK_SIZE as usize) {
            if let Err(e) = self.plug_one(g) {
                for g in done {
                    self.release(g)?;
                }
                return Err(e);
            }
            done.push(g);
        }
        Ok(())
    }

    fn unplug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        for g in (gpa..gpa.saturating_add(len)).step_by(BLOCK_SIZE as usize) {
            self.release(g)?;
        }
        Ok(())
    }
}

/// The transport of a [`VirtioMemRig`], shared between the vCPU thread and the host.
pub type VirtioMemTransport = Arc<Mutex<MmioTransport<VirtioMem<WindowZoneBackend>>>>;
/// The plain exit handler of a [`VirtioMemRig`].
pub type VirtioMemHandler = DeviceExitHandler<VirtioMem<WindowZoneBackend>>;

/// A VM running the polled virtio-mem driver against the real device.
#[derive(Debug)]
pub struct VirtioMemRig<H = VirtioMemHandler> {
    /// The VM.
    pub vm: Arc<Vm>,
    /// The device's transport (lock it for the device: resize, counters, backend).
    pub transport: VirtioMemTransport,
    /// The guest's reports.
    pub log: Arc<ReportLog>,
    /// The running vCPU.
    pub handle: VcpuHandle<H>,
    /// The hot-plug region.
    pub region: Range<u64>,
    /// The driver's parameters.
    pub driver: VirtioMemDriver,
    /// Interrupts the device raised (nobody listens: the driver polls).
    pub irq: Arc<NoIrq>,
    /// A view of boot RAM (the device's memory; the mailbox is written through it).
    boot_view: WindowMemory,
}

/// Start `driver` on `vm` (a fresh VM with a hot-plug region and nothing running) against a
/// virtio-mem device over the whole region whose backend draws on `pool_bytes`.
pub fn start_virtio_mem(
    vm: Arc<Vm>,
    pool_bytes: u64,
    driver: VirtioMemDriver,
) -> Result<VirtioMemRig, HarnessError> {
    start_virtio_mem_with(vm, pool_bytes, driver, |h, _| h)
}

/// [`start_virtio_mem`] with the exit handler wrapped by `wrap`, which also gets the
/// transport (to interpose on the guest's accesses in tests).
pub fn start_virtio_mem_with<H: ExitHandler + Send + 'static>(
    vm: Arc<Vm>,
    pool_bytes: u64,
    driver: VirtioMemDriver,
    wrap: impl FnOnce(VirtioMemHandler, VirtioMemTransport) -> H,
) -> Result<VirtioMemRig<H>, HarnessError> {
    let layout = vm.window().layout().clone();
    let region = layout
        .hotplug()
        .ok_or_else(|| HarnessError::Device("the VM has no hot-plug region".into()))?;
    let backend = WindowZoneBackend::new(Arc::clone(&vm), pool_bytes);
    let boot_ram = layout.config().boot_ram;
    let dev = VirtioMem::new(
        VirtioMemConfig::new(region.start, region.end - region.start, boot_ram),
        backend,
    )
    .map_err(|e| HarnessError::Device(e.to_string()))?;
    // The device only needs boot RAM (its queue lives there); the view keeps the window mapped.
    let boot_view = vm.window().guest_memory()?;
    let irq = Arc::new(NoIrq::default());
    let transport = MmioTransport::new(
        Box::new(dev),
        GuestMemoryAtomic::new((*boot_view).clone()),
        irq.clone(),
    )
    .map_err(|e| HarnessError::Device(e.to_string()))?;
    let transport: VirtioMemTransport = Arc::new(Mutex::new(transport));
    let image = virtio_mem_program(&layout, driver.clone()).map_err(RunError::from)?;
    let log = Arc::new(ReportLog::default());
    let handler = DeviceExitHandler::new(driver.mmio_base, Arc::clone(&transport), log.clone());
    let handle = start_tiny_guest(&vm, &image, 0, wrap(handler, Arc::clone(&transport)))?;
    Ok(VirtioMemRig {
        vm,
        transport,
        log,
        handle,
        region,
        driver,
        irq,
        boot_view,
    })
}

impl<H> VirtioMemRig<H> {
    /// Lock the transport (the device is `.device()` / `.device_mut()`).
    pub fn transport(&self) -> MutexGuard<'_, MmioTransport<VirtioMem<WindowZoneBackend>>> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ask for a guest RAM total (boot RAM plus plugged memory).
    pub fn resize_total(&self, total: u64) -> Result<(), HarnessError> {
        self.transport()
            .device_mut()
            .set_requested_total(total)
            .map_err(|e| HarnessError::Device(e.to_string()))
    }

    /// Wait for a report at index `from` or later satisfying `pred`.
    pub fn wait(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&GuestReport) -> bool,
    ) -> Result<(usize, GuestReport), HarnessError> {
        wait_report(&self.log, &self.handle, from, timeout, pred)
    }

    /// Wait until the driver reports it settled at `plugged` bytes.
    pub fn wait_settled(
        &self,
        from: usize,
        plugged: u64,
        timeout: Duration,
    ) -> Result<(usize, GuestReport), HarnessError> {
        self.wait(from, timeout, |r| {
            r.tag == TAG_VMEM_SETTLED && r.value == plugged
        })
    }

    /// End the driver loop through its mailbox and join the vCPU (kicked after `timeout`).
    pub fn stop(self, timeout: Duration) -> Result<StoppedRig<H>, HarnessError> {
        self.boot_view
            .write_obj(MAILBOX_STOP, GuestAddress(self.driver.mailbox()))
            .map_err(|e| HarnessError::Guest(format!("writing the mailbox: {e}")))?;
        let (summary, kicked) = self.handle.join_timeout(timeout).map_err(RunError::from)?;
        match (&summary.result, kicked) {
            (Ok(StopReason::Handler), false) => Ok(StoppedRig {
                summary,
                transport: self.transport,
                log: self.log,
                irq: self.irq,
            }),
            (r, k) => Err(HarnessError::Guest(format!(
                "driver did not stop cleanly: {r:?}, kicked {k}"
            ))),
        }
    }
}

/// What is left of a [`VirtioMemRig`] after [`VirtioMemRig::stop`].
#[derive(Debug)]
pub struct StoppedRig<H> {
    /// The vCPU's summary.
    pub summary: RunSummary<H>,
    /// The transport.
    pub transport: VirtioMemTransport,
    /// The guest's reports.
    pub log: Arc<ReportLog>,
    /// Interrupts the device raised.
    pub irq: Arc<NoIrq>,
}
