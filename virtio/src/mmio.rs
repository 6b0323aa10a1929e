//! The virtio-mmio (version 2) transport, without KVM.
//!
//! [`MmioTransport`] owns the 0x1000-byte register window of one device: it answers the
//! driver's 32-bit register accesses, runs the device status state machine, negotiates features,
//! keeps each queue's configuration, builds the [`virtio_queue::Queue`]s when the driver sets
//! DRIVER_OK and activates the device with them. Config space (offset 0x100 and up) is
//! delegated to the device.
//!
//! The VMM wires it up like this:
//! - MMIO exits inside the window call [`MmioTransport::read`] / [`MmioTransport::write`] with
//!   the offset from the window's base;
//! - one ioeventfd per queue on `base + 0x50` ([`NOTIFY_OFFSET`]) with the queue index as data
//!   ([`MmioTransport::ioeventfds`]); when one fires, the VMM calls [`MmioTransport::notify`];
//! - one [`IrqTrigger`] per device (an irqfd), which [`MmioInterrupt`] signals after setting the
//!   InterruptStatus bit.
//!
//! A driver that misbehaves (bad access width, writes to read-only registers, queue changes
//! after DRIVER_OK, out-of-range queue selectors, invalid status transitions) never makes the
//! transport panic: the access is ignored and counted in [`MmioCounters`].

#[cfg(test)]
mod hostile_tests;
mod interrupt;
mod regs;
#[cfg(test)]
mod tests;

pub use interrupt::{IrqTrigger, MmioInterrupt};

use crate::device::{DeviceError, GuestMem, InterruptKind, InterruptSink, VirtioDevice};
use regs::*;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};

/// Size of a virtio-mmio register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, shared by all queues (register the ioeventfds here).
pub const NOTIFY_OFFSET: u64 = 0x50;
/// Offset where the device-specific config space starts.
pub const CONFIG_OFFSET: u64 = 0x100;
/// "virt", little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The virtio-mmio version this transport implements.
pub const MMIO_VERSION: u32 = 2;
/// Tidepool's virtio vendor ID ("TIDE" little-endian). Linux does not look at it.
pub const VENDOR_ID: u32 = 0x4544_4954;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// VIRTIO_F_VERSION_1 as a feature mask.
pub const FEATURE_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// VIRTIO_RING_F_EVENT_IDX as a feature mask.
const FEATURE_EVENT_IDX: u64 = 1 << 29;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Device ID 0 means "placeholder" to drivers; a real device needs a real ID.
    #[error("device type 0 is not a valid virtio device ID")]
    InvalidDeviceId,
    /// A version-2 transport needs the device to offer VIRTIO_F_VERSION_1 (Linux refuses the
    /// device otherwise).
    #[error("the device does not offer VIRTIO_F_VERSION_1")]
    MissingVersion1,
    /// A queue size the device offers that virtio_queue cannot represent.
    #[error("queue {index}: invalid maximum size {size} (must be a power of two, 1..=32768)")]
    InvalidQueueMaxSize {
        /// Queue index.
        index: usize,
        /// The size offered.
        size: u16,
    },
    /// A queue the driver configured is unusable (not ready, misaligned, outside guest RAM).
    #[error("queue {index}: {reason}")]
    QueueSetup {
        /// Queue index.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A notification arrived before DRIVER_OK or after a failed activation.
    #[error("device is not activated")]
    NotActivated,
    /// A notification for a queue the device does not have.
    #[error("no such queue: {0}")]
    NoSuchQueue(u32),
    /// The device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Counters of ignored or failed driver actions. All monotonic.
#[derive(Debug, Default)]
pub struct MmioCounters {
    bad_access: AtomicU64,
    read_only_write: AtomicU64,
    write_only_read: AtomicU64,
    unknown_register: AtomicU64,
    queue_sel_out_of_range: AtomicU64,
    queue_config_rejected: AtomicU64,
    status_rejected: AtomicU64,
    features_rejected: AtomicU64,
    activation_failed: AtomicU64,
    notify_rejected: AtomicU64,
    device_errors: AtomicU64,
}

/// A plain copy of [`MmioCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioCountersSnapshot {
    /// Control-register accesses that were not 32 bits wide and aligned, or outside the window.
    pub bad_access: u64,
    /// Writes to read-only registers.
    pub read_only_write: u64,
    /// Reads of write-only registers (answered with 0).
    pub write_only_read: u64,
    /// Accesses to offsets below 0x100 that name no register.
    pub unknown_register: u64,
    /// QueueSel values naming no queue, and queue-register accesses while one is selected.
    pub queue_sel_out_of_range: u64,
    /// Queue configuration writes refused (invalid size, queue ready, wrong device status).
    pub queue_config_rejected: u64,
    /// Status writes refused (clearing bits, skipping steps, setting device-only bits).
    pub status_rejected: u64,
    /// FEATURES_OK refused (features not offered, VERSION_1 missing, device veto), plus
    /// DriverFeatures writes at the wrong time.
    pub features_rejected: u64,
    /// DRIVER_OK with queues or a device that could not be activated.
    pub activation_failed: u64,
    /// Notifications before activation or for queues that do not exist.
    pub notify_rejected: u64,
    /// Errors returned by the device while processing a queue.
    pub device_errors: u64,
}

impl MmioCounters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Copy the current values.
    pub fn snapshot(&self) -> MmioCountersSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MmioCountersSnapshot {
            bad_access: g(&self.bad_access),
            read_only_write: g(&self.read_only_write),
            write_only_read: g(&self.write_only_read),
            unknown_register: g(&self.unknown_register),
            queue_sel_out_of_range: g(&self.queue_sel_out_of_range),
            queue_config_rejected: g(&self.queue_config_rejected),
            status_rejected: g(&self.status_rejected),
            features_rejected: g(&self.features_rejected),
            activation_failed: g(&self.activation_failed),
            notify_rejected: g(&self.notify_rejected),
            device_errors: g(&self.device_errors),
        }
    }
}

/// What the driver wrote for one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Build the virtio_queue view of this configuration, checked against guest memory.
    fn build(
        &self,
        index: usize,
        mem: &GuestMem,
        event_idx: bool,
    ) -> Result<Queue, TransportError> {
        let err = |reason: String| TransportError::QueueSetup { index, reason };
        if !self.ready {
            return Err(err("not ready".into()));
        }
        let mut q = Queue::new(self.max_size).map_err(|e| err(format!("max size: {e}")))?;
        q.try_set_size(self.size)
            .map_err(|e| err(format!("size {}: {e}", self.size)))?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| err(format!("descriptor area {:#x}: {e}", self.desc)))?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|e| err(format!("driver area {:#x}: {e}", self.driver)))?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|e| err(format!("device area {:#x}: {e}", self.device)))?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(&*mem.memory()) {
            return Err(err("rings are not inside guest memory".into()));
        }
        Ok(q)
    }
}

/// The virtio-mmio v2 transport of one device. `D` is the device model; the default,
/// `dyn VirtioDevice`, lets the VMM keep transports of different devices in one list.
pub struct MmioTransport<D: VirtioDevice + ?Sized = dyn VirtioDevice> {
    device: Box<D>,
    mem: GuestMem,
    interrupt: Arc<MmioInterrupt>,
    counters: MmioCounters,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    last_error: Option<String>,
}

impl<D: VirtioDevice + ?Sized> fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("queues", &self.queues)
            .field("interrupt", &self.interrupt)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice + ?Sized> MmioTransport<D> {
    /// A transport for `device` over guest memory `mem`, raising interrupts through `trigger`.
    pub fn new(
        device: Box<D>,
        mem: GuestMem,
        trigger: Arc<dyn IrqTrigger>,
    ) -> Result<Self, TransportError> {
        if device.device_type() == 0 {
            return Err(TransportError::InvalidDeviceId);
        }
        if device.avail_features() & FEATURE_VERSION_1 == 0 {
            return Err(TransportError::MissingVersion1);
        }
        let queues = Self::fresh_queues(&*device)?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt::new(trigger)),
            counters: MmioCounters::default(),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            last_error: None,
        })
    }

    fn fresh_queues(device: &D) -> Result<Vec<QueueRegs>, TransportError> {
        device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                // Check once here that virtio_queue accepts the size, so activation cannot fail
                // on it later.
                Queue::new(size)
                    .map(|_| QueueRegs::new(size))
                    .map_err(|_| TransportError::InvalidQueueMaxSize { index, size })
            })
            .collect()
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably (for host-side requests such as a resize).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The interrupt state shared with the device (status bits, config generation).
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver wrote (final once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Whether the driver set DRIVER_OK and the device accepted activation.
    pub fn is_activated(&self) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & status::DEVICE_NEEDS_RESET == 0
            && self.device.is_activated()
    }

    /// Why the last activation or queue processing failed, if it did.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Counters of ignored driver actions.
    pub fn counters(&self) -> MmioCountersSnapshot {
        self.counters.snapshot()
    }

    /// The ioeventfds the VMM should register for a window at `base`: one
    /// `(address, datamatch)` pair per queue, all on the QueueNotify register.
    pub fn ioeventfds(&self, base: u64) -> Vec<(u64, u32)> {
        (0..self.queues.len())
            .filter_map(|i| u32::try_from(i).ok())
            .map(|i| (base + NOTIFY_OFFSET, i))
            .collect()
    }

    /// Number of queues that exist for the current negotiation state.
    fn num_queues(&self) -> usize {
        let all = self.queues.len();
        if self.status & status::FEATURES_OK != 0 {
            self.device.num_queues_for(self.driver_features).min(all)
        } else {
            all
        }
    }

    fn selected_queue(&self) -> Option<usize> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        (sel < self.num_queues()).then_some(sel)
    }

    /// Handle a driver read of `data.len()` bytes at `offset` into the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            if offset >= MMIO_WINDOW_SIZE {
                MmioCounters::bump(&self.counters.bad_access);
                data.fill(0);
            } else {
                self.device.read_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            MmioCounters::bump(&self.counters.bad_access);
            data.fill(0);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = || self.selected_queue().map(|i| self.queues[i]);
        match offset {
            MAGIC => MAGIC_VALUE,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => queue().map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => match queue() {
                Some(q) => u32::from(q.ready),
                None => {
                    MmioCounters::bump(&self.counters.queue_sel_out_of_range);
                    0
                }
            },
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            CONFIG_GENERATION => self.interrupt.config_generation(),
            // No shared memory regions: length and base read as all ones (spec 4.2.2).
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            // VIRTIO_F_RING_RESET is never offered.
            QUEUE_RESET => 0,
            o if is_write_only(o) => {
                MmioCounters::bump(&self.counters.write_only_read);
                0
            }
            _ => {
                MmioCounters::bump(&self.counters.unknown_register);
                0
            }
        }
    }

    /// Handle a driver write of `data` at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            if offset >= MMIO_WINDOW_SIZE {
                MmioCounters::bump(&self.counters.bad_access);
            } else {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        let value = match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => u32::from_le_bytes(bytes),
            _ => {
                MmioCounters::bump(&self.counters.bad_access);
                return;
            }
        };
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            QUEUE_SEL => {
                self.queue_sel = value;
                if self.selected_queue().is_none() {
                    MmioCounters::bump(&self.counters.queue_sel_out_of_range);
                }
            }
            QUEUE_NUM => self.write_queue(|q| {
                let ok = value != 0 && value <= u32::from(q.max_size) && value.is_power_of_two();
                if ok {
                    q.size = value as u16;
                }
                ok
            }),
            QUEUE_READY => self.write_queue_ready(value),
            QUEUE_NOTIFY => {
                // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index. Errors are
                // counted inside `notify`; nothing can be reported to the guest here.
                let _ = self.notify(value);
            }
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            QUEUE_DESC_LOW => self.write_queue(|q| set_low(&mut q.desc, value)),
            QUEUE_DESC_HIGH => self.write_queue(|q| set_high(&mut q.desc, value)),
            QUEUE_DRIVER_LOW => self.write_queue(|q| set_low(&mut q.driver, value)),
            QUEUE_DRIVER_HIGH => self.write_queue(|q| set_high(&mut q.driver, value)),
            QUEUE_DEVICE_LOW => self.write_queue(|q| set_low(&mut q.device, value)),
            QUEUE_DEVICE_HIGH => self.write_queue(|q| set_high(&mut q.device, value)),
            o if is_read_only(o) => MmioCounters::bump(&self.counters.read_only_write),
            _ => MmioCounters::bump(&self.counters.unknown_register),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features may only be written between DRIVER and FEATURES_OK.
        let allowed =
            self.status & (status::DRIVER | status::FEATURES_OK | status::FAILED) == status::DRIVER;
        if !allowed {
            MmioCounters::bump(&self.counters.features_rejected);
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            // Feature words above 1 do not exist; setting bits there is a driver error.
            _ if value != 0 => MmioCounters::bump(&self.counters.features_rejected),
            _ => {}
        }
    }

    /// Apply `f` to the selected queue's registers if queue configuration is allowed now:
    /// after FEATURES_OK, before DRIVER_OK, while the queue is not ready. `f` returns whether
    /// the value was valid.
    fn write_queue(&mut self, f: impl FnOnce(&mut QueueRegs) -> bool) {
        let Some(i) = self.selected_queue() else {
            MmioCounters::bump(&self.counters.queue_sel_out_of_range);
            return;
        };
        let configurable = self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK;
        if !configurable || self.queues[i].ready || !f(&mut self.queues[i]) {
            MmioCounters::bump(&self.counters.queue_config_rejected);
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let Some(i) = self.selected_queue() else {
            MmioCounters::bump(&self.counters.queue_sel_out_of_range);
            return;
        };
        match value {
            // Linux clears QueueReady when it deletes its queues, after a reset: always fine
            // before DRIVER_OK. After DRIVER_OK the device owns the queue until reset.
            0 if self.status & status::DRIVER_OK == 0 => self.queues[i].ready = false,
            1 => self.write_queue(|q| {
                q.ready = true;
                true
            }),
            _ => MmioCounters::bump(&self.counters.queue_config_rejected),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let cur = self.status;
        let new = value & !cur;
        // Bits are only ever added (a reset clears them); the device alone sets NEEDS_RESET.
        if value & cur != cur || new & status::DEVICE_NEEDS_RESET != 0 {
            MmioCounters::bump(&self.counters.status_rejected);
            return;
        }
        if new & status::FAILED != 0 {
            self.status |= status::FAILED;
        }
        let steps = [
            (status::ACKNOWLEDGE, 0),
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::ACKNOWLEDGE | status::DRIVER),
            (
                status::DRIVER_OK,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            ),
        ];
        let known = status::ACKNOWLEDGE
            | status::DRIVER
            | status::FEATURES_OK
            | status::DRIVER_OK
            | status::FAILED;
        if new & !known != 0 {
            MmioCounters::bump(&self.counters.status_rejected);
            return;
        }
        for (bit, needs) in steps {
            if new & bit == 0 {
                continue;
            }
            // A step needs all earlier steps, and nothing after FAILED but a reset.
            if self.status & needs != needs || self.status & status::FAILED != 0 {
                MmioCounters::bump(&self.counters.status_rejected);
                return;
            }
            match bit {
                status::FEATURES_OK if !self.negotiate() => return,
                status::DRIVER_OK => {
                    self.status |= status::DRIVER_OK;
                    self.activate();
                    return;
                }
                _ => {}
            }
            self.status |= bit;
        }
    }

    /// The FEATURES_OK check: accepted features must be offered and include VERSION_1, and the
    /// device must not veto them. On failure FEATURES_OK stays clear.
    fn negotiate(&mut self) -> bool {
        let acked = self.driver_features;
        let offered = self.device.avail_features();
        let verdict = if acked & !offered != 0 {
            Err(format!(
                "driver accepted features {:#x} that were not offered",
                acked & !offered
            ))
        } else if acked & FEATURE_VERSION_1 == 0 {
            Err("driver did not accept VIRTIO_F_VERSION_1".to_string())
        } else {
            self.device.check_features(acked).map_err(|e| e.to_string())
        };
        match verdict {
            Ok(()) => {
                self.device.set_acked_features(acked);
                true
            }
            Err(reason) => {
                MmioCounters::bump(&self.counters.features_rejected);
                self.last_error = Some(reason);
                false
            }
        }
    }

    /// DRIVER_OK was just set: build the queues and start the device. On failure the device
    /// needs a reset, which the driver learns from the status and a config interrupt.
    fn activate(&mut self) {
        let event_idx = self.driver_features & FEATURE_EVENT_IDX != 0;
        let n = self.num_queues();
        let built: Result<Vec<Queue>, TransportError> = self.queues[..n]
            .iter()
            .enumerate()
            .map(|(i, q)| q.build(i, &self.mem, event_idx))
            .collect();
        let result = built.and_then(|queues| {
            let sink: Arc<dyn InterruptSink> = self.interrupt.clone();
            self.device
                .activate(self.mem.clone(), queues, sink)
                .map_err(TransportError::from)
        });
        if let Err(e) = result {
            MmioCounters::bump(&self.counters.activation_failed);
            self.last_error = Some(e.to_string());
            self.fail_needs_reset();
        }
    }

    fn fail_needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        // The spec asks for a config change notification when NEEDS_RESET is set after
        // DRIVER_OK. A failed signal is already counted by the interrupt.
        let _ = self.interrupt.signal(InterruptKind::ConfigChange);
    }

    /// The driver notified queue `queue` (through an ioeventfd or a QueueNotify write): let
    /// the device process it.
    ///
    /// A notification before activation is refused ([`TransportError::NotActivated`]) and
    /// counted, not replayed: Linux's balloon driver kicks its stats queue before DRIVER_OK,
    /// so a device that must see buffers queued that early looks at its queues in `activate`.
    pub fn notify(&mut self, queue: u32) -> Result<(), TransportError> {
        if !self.is_activated() {
            MmioCounters::bump(&self.counters.notify_rejected);
            return Err(TransportError::NotActivated);
        }
        let index = match usize::try_from(queue) {
            Ok(i) if i < self.num_queues() => i,
            _ => {
                MmioCounters::bump(&self.counters.notify_rejected);
                return Err(TransportError::NoSuchQueue(queue));
            }
        };
        let result = self.device.process_queue(index);
        // Processing may have changed config fields (virtio-mem's plugged_size): make a
        // driver that is reading config space concurrently read it again.
        self.interrupt.bump_config_generation();
        if let Err(e) = result {
            MmioCounters::bump(&self.counters.device_errors);
            self.last_error = Some(e.to_string());
            if matches!(e, DeviceError::Queue(_)) {
                self.fail_needs_reset();
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Device reset (the driver wrote 0 to Status): back to the initial register state. The
    /// device keeps whatever state its spec says survives a reset.
    fn reset(&mut self) {
        if self.device.is_activated() {
            // The returned queues are dropped: the driver sets up new ones.
            let _ = self.device.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.interrupt.reset();
    }
}

fn set_low(reg: &mut u64, value: u32) -> bool {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
    true
}

fn set_high(reg: &mut u64, value: u32) -> bool {
    *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
    true
}
