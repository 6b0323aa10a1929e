//! The virtio-mem device model.

use super::control::{usable_for, ControlSnapshot, MemControl};
use super::request::{BlockRangeState, Request, RequestError, Response, ResponseType};
use super::request::{REQUEST_SIZE, RESPONSE_SIZE};
use super::state::{BlockRange, BlockState, RangeError};
use super::{
    BackendError, ConfigError, HotplugError, MemoryBackend, ResizeError, VirtioMemConfig,
    CONFIG_SIZE, QUEUE_SIZE, VIRTIO_F_VERSION_1, VIRTIO_ID_MEM, VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
};
use std::fmt;
use std::sync::Arc;
use tidepool_virtio::{DeviceError, GuestMem, InterruptKind, InterruptSink, VirtioDevice};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

/// Counters of what the device answered and what it rejected. All monotonic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioMemCounters {
    /// PLUG requests acknowledged.
    pub plug_acked: u64,
    /// UNPLUG requests acknowledged.
    pub unplug_acked: u64,
    /// UNPLUG_ALL requests acknowledged.
    pub unplug_all_acked: u64,
    /// STATE requests acknowledged.
    pub state_acked: u64,
    /// PLUG refused with NACK because it would exceed `requested_size`.
    pub nack_over_requested: u64,
    /// ERROR: address not block aligned.
    pub error_misaligned: u64,
    /// ERROR: `nb_blocks` was 0.
    pub error_zero_blocks: u64,
    /// ERROR: range end overflowed.
    pub error_overflow: u64,
    /// ERROR: range outside the usable region.
    pub error_out_of_range: u64,
    /// ERROR: PLUG of a range with plugged blocks.
    pub error_already_plugged: u64,
    /// ERROR: UNPLUG of a range with unplugged blocks.
    pub error_not_plugged: u64,
    /// ERROR: unknown request type.
    pub error_unknown_type: u64,
    /// ERROR: the backend failed a plug for good.
    pub error_backend: u64,
    /// BUSY: the backend could not plug or unplug now.
    pub busy_backend: u64,
    /// Chains with fewer than 24 readable bytes.
    pub short_request: u64,
    /// Chains with fewer than 10 writable bytes (not executed, not answered).
    pub short_response: u64,
    /// Chains with a readable descriptor after a writable one.
    pub wrong_direction: u64,
    /// Chains whose buffers are not in guest memory.
    pub bad_descriptor: u64,
    /// Driver writes to the read-only config space (ignored).
    pub config_write_ignored: u64,
    /// Config-change interrupts raised by resizes.
    pub config_interrupts: u64,
}

/// Host-side view of the device, for the API.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemStatus {
    /// Boot RAM (not managed by this device).
    pub boot_ram: u64,
    /// Region start.
    pub region_addr: u64,
    /// Region size: the most that can be plugged.
    pub region_size: u64,
    /// Block size.
    pub block_size: u64,
    /// Where blocks may currently be plugged.
    pub usable_region_size: u64,
    /// Bytes plugged now.
    pub plugged_size: u64,
    /// Bytes the host asked for.
    pub requested_size: u64,
    /// Whether the guest driver has activated the device.
    pub driver_ready: bool,
    /// Fraction of the last resize done, 0.0 ..= 1.0 (1.0 when plugged == requested).
    pub progress: f64,
}

impl MemStatus {
    /// The status from a device's static configuration and a [`MemControl`] snapshot alone
    /// (the host's view without the device's lock: the plugged size is the one the device
    /// last published, the usable region the one the requests need).
    pub fn from_control(config: &VirtioMemConfig, c: &ControlSnapshot) -> MemStatus {
        let plugged = c.plugged_size;
        let requested = c.requested_size;
        let progress = if plugged == requested || requested == c.resize_from {
            1.0
        } else {
            let done = plugged as f64 - c.resize_from as f64;
            let todo = requested as f64 - c.resize_from as f64;
            (done / todo).clamp(0.0, 1.0)
        };
        MemStatus {
            boot_ram: config.boot_ram,
            region_addr: config.addr,
            region_size: config.region_size,
            block_size: config.block_size,
            usable_region_size: usable_for(config, requested),
            plugged_size: plugged,
            requested_size: requested,
            driver_ready: c.driver_ready,
            progress,
        }
    }
}

/// The virtio-mem device over a [`MemoryBackend`].
///
/// The requested size lives in the device's [`MemControl`], which the host may hold apart
/// from the device (and from whatever lock the device sits behind) to resize without waiting
/// for a plug in progress.
pub struct VirtioMem<B: MemoryBackend> {
    config: VirtioMemConfig,
    state: BlockState,
    control: Arc<MemControl>,
    backend: B,
    acked_features: u64,
    mem: Option<GuestMem>,
    queue: Option<Queue>,
    interrupt: Option<Arc<dyn InterruptSink>>,
    counters: VirtioMemCounters,
}

impl<B: MemoryBackend> fmt::Debug for VirtioMem<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioMem")
            .field("config", &self.config)
            .field("plugged_size", &self.state.plugged_size())
            .field("requested_size", &self.control.requested_size())
            .field("usable_region_size", &self.state.usable_region_size())
            .field("activated", &self.queue.is_some())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// What reading a descriptor chain gave.
struct ChainBuffers {
    request: [u8; REQUEST_SIZE],
    request_len: usize,
    response: Vec<(GuestAddress, usize)>,
    response_space: usize,
    wrong_direction: bool,
    unreadable: bool,
}

impl<B: MemoryBackend> VirtioMem<B> {
    /// A device with every block unplugged and `config.initial_requested` requested.
    pub fn new(config: VirtioMemConfig, backend: B) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut state = BlockState::new(config.addr, config.region_size, config.block_size);
        state.set_usable_region_size(usable_for(&config, config.initial_requested));
        Ok(VirtioMem {
            config,
            state,
            control: Arc::new(MemControl::new(config)),
            backend,
            acked_features: 0,
            mem: None,
            queue: None,
            interrupt: None,
            counters: VirtioMemCounters::default(),
        })
    }

    /// The static configuration.
    pub fn config(&self) -> &VirtioMemConfig {
        &self.config
    }

    /// The host's handle: resize and read the figures without this device's lock.
    pub fn control(&self) -> &Arc<MemControl> {
        &self.control
    }

    /// The plugged bitmap and sizes.
    pub fn block_state(&self) -> &BlockState {
        &self.state
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Counters.
    pub fn counters(&self) -> VirtioMemCounters {
        VirtioMemCounters {
            config_interrupts: self.control.snapshot().config_interrupts,
            ..self.counters
        }
    }

    /// Bytes the host asked the guest to plug.
    pub fn requested_size(&self) -> u64 {
        self.control.requested_size()
    }

    /// Bytes plugged.
    pub fn plugged_size(&self) -> u64 {
        self.state.plugged_size()
    }

    /// Host view: sizes and progress of the last resize.
    pub fn status(&self) -> MemStatus {
        let c = self.control.snapshot();
        let (_, floor) = self.control.peek_request();
        MemStatus {
            usable_region_size: self.state.usable_region_size().max(floor),
            plugged_size: self.state.plugged_size(),
            driver_ready: self.queue.is_some(),
            ..MemStatus::from_control(&self.config, &c)
        }
    }

    /// Publish the plugged size to the control (after every change of the block state).
    fn publish(&self) {
        self.control.publish_plugged(self.state.plugged_size());
    }

    /// Take in what the host asked for since the last look: the usable region grows to what
    /// the requests need. Returns the requested size.
    fn sync_request(&mut self) -> u64 {
        let (requested, floor) = self.control.take_request();
        if floor > self.state.usable_region_size() {
            self.state.set_usable_region_size(floor);
        }
        requested
    }

    /// Ask for a guest RAM total of `total_bytes` (boot RAM plus hot-plugged memory). Same as
    /// [`MemControl::set_requested_total`] on [`VirtioMem::control`].
    pub fn set_requested_total(&mut self, total_bytes: u64) -> Result<(), ResizeError> {
        self.control.set_requested_total(total_bytes)
    }

    /// Ask the guest to plug `bytes` in this device's region (0 = unplug everything). The
    /// target is kept until changed, whether or not the guest reaches it, and announced with a
    /// config-change interrupt. Same as [`MemControl::request_size`].
    pub fn request_size(&mut self, bytes: u64) -> Result<(), ResizeError> {
        self.control.request_size(bytes)
    }

    /// A system reset (VM reboot): the device resets and every plugged block is unplugged
    /// through the backend. `requested_size` is kept, so the rebooted guest plugs it again.
    /// Blocks the backend fails to unplug stay plugged (the driver's UNPLUG_ALL at probe
    /// retries them); the first failure is returned.
    pub fn system_reset(&mut self) -> Result<(), HotplugError> {
        let _ = self.drop_driver_link();
        let result = self.unplug_everything();
        self.control.reset_progress();
        let requested = self.sync_request();
        if self.state.plugged_blocks() == 0 {
            self.state
                .set_usable_region_size(usable_for(&self.config, requested));
        }
        result
    }

    /// Forget the driver: features, memory, queue, interrupt. Block state is untouched.
    fn drop_driver_link(&mut self) -> Option<Queue> {
        self.acked_features = 0;
        self.mem = None;
        self.interrupt = None;
        self.control.detach();
        self.queue.take()
    }

    fn unplug_everything(&mut self) -> Result<(), HotplugError> {
        let mut first_err = None;
        for run in self.state.plugged_runs() {
            let (gpa, len) = self.state.range_gpa(run);
            match self.backend.unplug(gpa, len) {
                Ok(()) => self.state.set_range(run, false),
                Err(source) => {
                    first_err.get_or_insert(HotplugError::Unplug { gpa, len, source });
                }
            }
        }
        self.publish();
        first_err.map_or(Ok(()), Err)
    }

    /// The 56-byte config space, with what the host asked for up to now.
    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let (requested, floor) = self.control.peek_request();
        let usable = self.state.usable_region_size().max(floor);
        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        put(0, &self.config.block_size.to_le_bytes());
        put(8, &self.config.node_id.unwrap_or(0).to_le_bytes());
        put(16, &self.config.addr.to_le_bytes());
        put(24, &self.config.region_size.to_le_bytes());
        put(32, &usable.to_le_bytes());
        put(40, &self.state.plugged_size().to_le_bytes());
        put(48, &requested.to_le_bytes());
        c
    }

    fn range_error(&mut self, e: RangeError) -> Response {
        let c = &mut self.counters;
        match e {
            RangeError::Misaligned(_) => c.error_misaligned += 1,
            RangeError::ZeroBlocks => c.error_zero_blocks += 1,
            RangeError::Overflow => c.error_overflow += 1,
            RangeError::OutOfRange { .. } => c.error_out_of_range += 1,
        }
        Response::of(ResponseType::Error)
    }

    fn checked(&mut self, addr: u64, nb_blocks: u16) -> Result<BlockRange, Response> {
        self.state
            .check_range(addr, nb_blocks)
            .map_err(|e| self.range_error(e))
    }

    /// Execute one parsed request, against the host's request as of now.
    pub(super) fn handle(&mut self, req: Request) -> Response {
        let requested = self.sync_request();
        match req {
            Request::Plug { addr, nb_blocks } => self.plug(addr, nb_blocks, requested),
            Request::Unplug { addr, nb_blocks } => self.unplug(addr, nb_blocks),
            Request::UnplugAll => self.unplug_all(requested),
            Request::State { addr, nb_blocks } => match self.checked(addr, nb_blocks) {
                Ok(r) => {
                    self.counters.state_acked += 1;
                    Response::state(self.state.range_state(r))
                }
                Err(resp) => resp,
            },
        }
    }

    fn plug(&mut self, addr: u64, nb_blocks: u16, requested: u64) -> Response {
        let r = match self.checked(addr, nb_blocks) {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        if self.state.range_state(r) != BlockRangeState::Unplugged {
            self.counters.error_already_plugged += 1;
            return Response::of(ResponseType::Error);
        }
        let (gpa, len) = self.state.range_gpa(r);
        // NACK, not ERROR: a shrink can race a plug the driver had already decided on, and
        // Linux marks the device broken on ERROR but re-reads the config on NACK.
        if self.state.plugged_size().saturating_add(len) > requested {
            self.counters.nack_over_requested += 1;
            return Response::of(ResponseType::Nack);
        }
        match self.backend.plug(gpa, len) {
            Ok(()) => {
                self.state.set_range(r, true);
                self.publish();
                self.counters.plug_acked += 1;
                Response::of(ResponseType::Ack)
            }
            Err(e) => self.backend_error(e, true),
        }
    }

    fn unplug(&mut self, addr: u64, nb_blocks: u16) -> Response {
        let r = match self.checked(addr, nb_blocks) {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        if self.state.range_state(r) != BlockRangeState::Plugged {
            self.counters.error_not_plugged += 1;
            return Response::of(ResponseType::Error);
        }
        let (gpa, len) = self.state.range_gpa(r);
        match self.backend.unplug(gpa, len) {
            Ok(()) => {
                self.state.set_range(r, false);
                self.publish();
                self.counters.unplug_acked += 1;
                Response::of(ResponseType::Ack)
            }
            Err(e) => self.backend_error(e, false),
        }
    }

    /// BUSY (the driver retries on a timer) for transient failures. A permanent plug failure
    /// is an ERROR; a failed unplug stays BUSY, since ERROR would break a guest that did
    /// nothing wrong and the blocks remain plugged and usable.
    fn backend_error(&mut self, e: BackendError, plugging: bool) -> Response {
        match e {
            BackendError::Failed(_) if plugging => {
                self.counters.error_backend += 1;
                Response::of(ResponseType::Error)
            }
            _ => {
                self.counters.busy_backend += 1;
                Response::of(ResponseType::Busy)
            }
        }
    }

    fn unplug_all(&mut self, requested: u64) -> Response {
        if self.unplug_everything().is_err() {
            // What was unplugged stays unplugged; the driver retries the rest.
            self.counters.busy_backend += 1;
            return Response::of(ResponseType::Busy);
        }
        // Shrink the usable region back to what the request needs (no config interrupt for
        // UNPLUG_ALL, as the spec says).
        self.state
            .set_usable_region_size(usable_for(&self.config, requested));
        self.counters.unplug_all_acked += 1;
        Response::of(ResponseType::Ack)
    }

    /// Read a chain: up to 24 request bytes from the readable part, the writable buffers.
    fn read_chain(
        mem: &GuestMemoryMmap<()>,
        chain: DescriptorChain<&GuestMemoryMmap<()>>,
    ) -> ChainBuffers {
        let mut b = ChainBuffers {
            request: [0; REQUEST_SIZE],
            request_len: 0,
            response: Vec::new(),
            response_space: 0,
            wrong_direction: false,
            unreadable: false,
        };
        for d in chain {
            let len = usize::try_from(d.len()).unwrap_or(usize::MAX);
            if d.is_write_only() {
                b.response.push((d.addr(), len));
                b.response_space = b.response_space.saturating_add(len);
            } else if !b.response.is_empty() {
                b.wrong_direction = true;
            } else {
                let want = (REQUEST_SIZE - b.request_len).min(len);
                let dst = &mut b.request[b.request_len..b.request_len + want];
                if mem.read_slice(dst, d.addr()).is_err() {
                    b.unreadable = true;
                } else {
                    b.request_len += want;
                }
            }
        }
        b
    }

    /// Write `bytes` across the writable buffers. False if a buffer is not in guest memory.
    fn write_response(
        mem: &GuestMemoryMmap<()>,
        bufs: &[(GuestAddress, usize)],
        bytes: &[u8],
    ) -> bool {
        let mut done = 0;
        for &(addr, len) in bufs {
            if done == bytes.len() {
                break;
            }
            let n = len.min(bytes.len() - done);
            if mem.write_slice(&bytes[done..done + n], addr).is_err() {
                return false;
            }
            done += n;
        }
        done == bytes.len()
    }

    /// Handle one chain (read through `mem`, a view of `space`); returns the used length.
    fn handle_chain(
        &mut self,
        space: &GuestMem,
        mem: &GuestMemoryMmap<()>,
        chain: DescriptorChain<&GuestMemoryMmap<()>>,
    ) -> u32 {
        let b = Self::read_chain(mem, chain);
        if b.response_space < RESPONSE_SIZE {
            // Nowhere to answer: do nothing the driver could not learn about.
            self.counters.short_response += 1;
            return 0;
        }
        // Probe the response buffers before acting, so no action goes unanswered.
        if !Self::write_response(mem, &b.response, &[0; RESPONSE_SIZE]) {
            self.counters.bad_descriptor += 1;
            return 0;
        }
        let response = if b.unreadable {
            self.counters.bad_descriptor += 1;
            Response::of(ResponseType::Error)
        } else if b.wrong_direction {
            self.counters.wrong_direction += 1;
            Response::of(ResponseType::Error)
        } else {
            match Request::parse(&b.request[..b.request_len]) {
                Ok(req) => self.handle(req),
                Err(RequestError::TooShort(_)) => {
                    self.counters.short_request += 1;
                    Response::of(ResponseType::Error)
                }
                Err(RequestError::UnknownType(_)) => {
                    self.counters.error_unknown_type += 1;
                    Response::of(ResponseType::Error)
                }
            }
        };
        // Through a fresh view: the request may have unplugged memory, and `mem` still maps
        // it (the VMM has made it inaccessible, so a write there would fault). The probe
        // succeeded, so this only fails if the driver put its response in the block it just
        // unplugged.
        if Self::write_response(&space.memory(), &b.response, &response.to_bytes()) {
            RESPONSE_SIZE as u32
        } else {
            self.counters.bad_descriptor += 1;
            0
        }
    }
}

impl<B: MemoryBackend + Send> VirtioDevice for VirtioMem<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE);
        if self.config.node_id.is_some() {
            f |= 1 << VIRTIO_MEM_F_ACPI_PXM;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn check_features(&self, acked: u64) -> Result<(), DeviceError> {
        check_unplugged_inaccessible(acked)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| c.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // All fields are read-only for the driver.
        self.counters.config_write_ignored += 1;
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        mut queues: Vec<Queue>,
        interrupt: Arc<dyn InterruptSink>,
    ) -> Result<(), DeviceError> {
        check_unplugged_inaccessible(self.acked_features)?;
        if queues.len() != 1 {
            return Err(DeviceError::Activate(format!(
                "virtio-mem has one queue, got {}",
                queues.len()
            )));
        }
        self.queue = queues.pop();
        self.mem = Some(mem);
        self.control.attach(Arc::clone(&interrupt));
        self.interrupt = Some(interrupt);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        if index != 0 {
            return Err(DeviceError::NoSuchQueue(index));
        }
        let (Some(mem), Some(interrupt)) = (self.mem.clone(), self.interrupt.clone()) else {
            return Err(DeviceError::NotActivated);
        };
        loop {
            // A fresh view of guest memory for every chain and for the used ring: a request
            // may unplug memory (rings and buffers included), and an older view would still
            // map it.
            let m = mem.memory();
            let Some(queue) = self.queue.as_mut() else {
                return Err(DeviceError::NotActivated);
            };
            let Some(chain) = queue.pop_descriptor_chain(&*m) else {
                break;
            };
            let head = chain.head_index();
            let used = self.handle_chain(&mem, &m, chain);
            drop(m);
            let m = mem.memory();
            if let Some(queue) = self.queue.as_mut() {
                queue
                    .add_used(&*m, head, used)
                    .map_err(|e| DeviceError::Queue(e.to_string()))?;
            }
        }
        let m = mem.memory();
        let Some(queue) = self.queue.as_mut() else {
            return Err(DeviceError::NotActivated);
        };
        if queue
            .needs_notification(&*m)
            .map_err(|e| DeviceError::Queue(e.to_string()))?
        {
            interrupt.signal(InterruptKind::UsedBuffer)?;
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.queue.is_some()
    }

    fn reset(&mut self) -> Option<Vec<Queue>> {
        // Block state survives a device reset (spec 5.15.5.1); only the driver link goes.
        self.drop_driver_link().map(|q| vec![q])
    }
}

fn check_unplugged_inaccessible(acked: u64) -> Result<(), DeviceError> {
    if acked & (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE) == 0 {
        return Err(DeviceError::Activate(
            "virtio-mem: the driver did not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE; \
             Tidepool unmaps unplugged blocks, so a driver that may read them is not supported \
             (Linux 6.1 accepts it)"
                .into(),
        ));
    }
    Ok(())
}
