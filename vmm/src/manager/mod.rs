//! The VM manager: one thread per VM owns its [`Microvm`]; the manager sends it closures over a
//! channel and waits for the answer with a timeout, so a stuck VM never blocks requests for
//! other VMs. The manager implements [`tidepool_api::ApiBackend`] (`api`).

mod api;
mod host;
pub mod images;
mod mover;
mod reclaim;
mod request;
mod swap;
#[cfg(test)]
mod tests;

pub use mover::VmPoolActions;
pub use reclaim::{DaemonReclaimConfig, ReclaimRuntime};
pub use request::{config_from_request, info_from_request, RequestError};
pub use swap::{
    default_runtime_dir, ram_fallback_path, DaemonSwapConfig, DaemonSwapError, SWAP_FILE_NAME,
};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_mm::slab::TypedSlab;
use tidepool_api::types::VmInfo;

use crate::devices::{lock, BlockRecord, IrqMode};
use crate::hostpool::FramePool;
use crate::memory::PoolFiles;
use crate::microvm::{
    MemoryFigures, Microvm, MicrovmConfig, MicrovmError, NodeResidency, ResizeHandle, VmLifecycle,
};
use crate::swap::VmSwap;

/// A VM's swap, shared by the manager (figures, reclaim) and the VM thread (which shuts it
/// down right after dropping the VM).
type SwapCell = Arc<Mutex<Option<Arc<VmSwap>>>>;

/// Default time the manager waits for a VM thread to answer.
pub const DEFAULT_VM_TIMEOUT: Duration = Duration::from_secs(20);
/// How often an idle VM thread looks at vCPU events and refreshes its published figures.
const IDLE_TICK: Duration = Duration::from_millis(50);
/// How often the published residency figures are refreshed.
const RESIDENCY_REFRESH: Duration = Duration::from_secs(2);

/// Errors of the manager.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// No VM with this id.
    #[error("no VM with id {0:?}")]
    NotFound(String),
    /// The VM thread did not answer in time.
    #[error("VM {id} did not answer within {timeout:?}")]
    Timeout {
        /// VM id.
        id: String,
        /// How long the manager waited.
        timeout: Duration,
    },
    /// The VM thread is gone (it panicked).
    #[error("VM {0} is gone (its thread ended)")]
    Gone(String),
    /// The request cannot be turned into a VM.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The VM refused or failed.
    #[error(transparent)]
    Vm(#[from] MicrovmError),
    /// A thread could not be started.
    #[error("cannot start the VM thread: {0}")]
    Spawn(std::io::Error),
    /// A guest nice value outside 0..=19.
    #[error("guest nice value {0} is outside 0..=19")]
    GuestNice(i32),
}

/// Sends a call's result; run after the VM thread published its new state, so a caller that
/// reads the published state after the reply sees the effect of its own call.
type Reply = Box<dyn FnOnce() + Send>;
type Call = Box<dyn FnOnce(&mut Microvm) -> Reply + Send>;

enum Msg {
    Call(Call),
    Delete(Sender<()>),
}

/// What a VM thread publishes for readers that must not wait for it.
#[derive(Debug, Clone)]
pub struct Published {
    /// Lifecycle state.
    pub state: VmLifecycle,
    /// Residency per node, refreshed every couple of seconds (and at creation).
    pub residency: Vec<NodeResidency>,
    /// Host virtual range of the VM's window (for THP accounting).
    pub window: std::ops::Range<usize>,
    /// Set by the swap's failure hook the moment a swap-in of this VM failed (the VM thread
    /// then stops the VM): the API reports the VM stopped with this reason from then on,
    /// even before (or if never) the VM thread gets to it.
    pub failure: Option<String>,
    /// The last full memory figures (refreshed with the residency, and by every
    /// `GET /memory`), for answers that must not wait for the VM thread.
    pub memory: Option<MemoryFigures>,
}

impl Published {
    /// `info` with this state and stop reason.
    fn apply(&self, mut info: VmInfo) -> VmInfo {
        match &self.failure {
            Some(f) => {
                info.state = tidepool_api::types::VmState::Stopped;
                info.stop_reason = Some(format!("guest failed: {f}"));
            }
            None => {
                info.state = self.state.api_state();
                info.stop_reason = self.state.stop_reason();
            }
        }
        info
    }
}

#[derive(Debug)]
struct Entry {
    tx: Sender<Msg>,
    info: VmInfo,
    published: Arc<Mutex<Published>>,
    join: Option<JoinHandle<()>>,
    swap: SwapCell,
    /// Resizes the VM without its thread (VMs with virtio-mem).
    resize: Option<ResizeHandle>,
}

/// Manages the VMs of one daemon.
#[derive(Debug)]
pub struct VmManager {
    pool: Arc<dyn FramePool>,
    /// The pool's files for memfd and hugetlbfs backings, shared by all VMs of the daemon.
    files: Arc<PoolFiles>,
    slab: TypedSlab<BlockRecord>,
    slab_nodes: u16,
    vms: Mutex<BTreeMap<String, Entry>>,
    next_id: AtomicU64,
    timeout: Duration,
    irq: IrqMode,
    /// The reclaim engine and pool monitor, once started ([`VmManager::start_reclaim`]).
    reclaim: Mutex<Option<ReclaimRuntime>>,
    /// Nice value of the threads of VMs created from now on.
    guest_nice: AtomicI32,
}

impl VmManager {
    /// A manager taking VM memory from `pool`, with block records in `slab` (built for
    /// `slab_nodes` nodes), waiting at most `timeout` for a VM thread.
    pub fn new(
        pool: Arc<dyn FramePool>,
        slab: TypedSlab<BlockRecord>,
        slab_nodes: u16,
        timeout: Duration,
    ) -> VmManager {
        VmManager {
            pool,
            files: PoolFiles::new(),
            slab,
            slab_nodes,
            vms: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            timeout,
            irq: IrqMode::Irqfd,
            reclaim: Mutex::new(None),
            guest_nice: AtomicI32::new(crate::latency::DEFAULT_GUEST_NICE),
        }
    }

    /// Run the threads of VMs created from now on at nice `nice` (0..=19; default
    /// [`crate::latency::DEFAULT_GUEST_NICE`]), below the daemon's API threads.
    pub fn set_guest_nice(&self, nice: i32) -> Result<(), ManagerError> {
        if !crate::latency::GUEST_NICE_RANGE.contains(&nice) {
            return Err(ManagerError::GuestNice(nice));
        }
        self.guest_nice.store(nice, Ordering::Relaxed);
        Ok(())
    }

    /// The nice value new VMs' threads get.
    pub fn guest_nice(&self) -> i32 {
        self.guest_nice.load(Ordering::Relaxed)
    }

    /// Use `irq` for the VMs created from API requests (default: irqfd with the in-kernel
    /// irqchip).
    pub fn with_irq_mode(mut self, irq: IrqMode) -> VmManager {
        self.irq = irq;
        self
    }

    /// How API-created VMs signal interrupts.
    pub fn irq_mode(&self) -> IrqMode {
        self.irq
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<dyn FramePool> {
        &self.pool
    }

    /// The pool files behind memfd and hugetlbfs backings.
    pub fn pool_files(&self) -> &Arc<PoolFiles> {
        &self.files
    }

    /// The slab of block records.
    pub fn slab(&self) -> &TypedSlab<BlockRecord> {
        &self.slab
    }

    /// A fresh VM id.
    pub fn next_id(&self) -> String {
        format!("vm{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Build a VM on its own thread from `config` (whose id must be new); `info` is what the
    /// API reports about it. Returns once the VM exists (or failed to build).
    pub fn create(
        &self,
        config: MicrovmConfig,
        info: VmInfo,
        start: bool,
    ) -> Result<VmInfo, ManagerError> {
        let id = config.id.clone();
        let mut config = config;
        if config.pool_files.is_none() {
            config.pool_files = Some(Arc::clone(&self.files));
        }
        let (tx, rx) = channel::<Msg>();
        type Ready = Result<(Published, Option<ResizeHandle>), MicrovmError>;
        let (ready_tx, ready_rx) = sync_channel::<Ready>(1);
        let pool = Arc::clone(&self.pool);
        let slab = self.slab.clone();
        let nodes = self.slab_nodes;
        let published = Arc::new(Mutex::new(Published {
            state: VmLifecycle::Created,
            residency: Vec::new(),
            window: 0..0,
            failure: None,
            memory: None,
        }));
        let pub2 = Arc::clone(&published);
        let swap: SwapCell = Arc::new(Mutex::new(None));
        let swap2 = Arc::clone(&swap);
        let guest_nice = self.guest_nice.load(Ordering::Relaxed);
        let join = std::thread::Builder::new()
            .name(format!("{id}-vmm"))
            .spawn(move || {
                // Often started by an API thread (short scheduler slice, nice 0): the VM's
                // threads (this one, its vCPUs, devices and swap) run with the kernel's
                // default slice and the guests' nice value (see `crate::latency`).
                crate::latency::enter_guest_thread(guest_nice);
                let mut vm = match Microvm::new(config, pool, slab, nodes) {
                    Ok(vm) => vm,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if start {
                    if let Err(e) = vm.apply(crate::microvm::LifecycleOp::Start) {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                publish(&mut vm, &pub2, true);
                let snapshot = lock(&pub2).clone();
                let resize = vm.resize_handle().cloned();
                if ready_tx.send(Ok((snapshot, resize))).is_err() {
                    // The manager gave up waiting: nobody will ever talk to this VM.
                    return;
                }
                vm_thread(vm, &rx, &pub2, &swap2);
            })
            .map_err(ManagerError::Spawn)?;
        let ready = match ready_rx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(_) => {
                return Err(ManagerError::Timeout {
                    id,
                    timeout: self.timeout,
                })
            }
        };
        match ready {
            Ok((p, resize)) => {
                let info = p.apply(info);
                lock(&self.vms).insert(
                    id.clone(),
                    Entry {
                        tx,
                        info: info.clone(),
                        published,
                        join: Some(join),
                        swap,
                        resize,
                    },
                );
                self.reclaim_attach(&id);
                Ok(info)
            }
            Err(e) => {
                let _ = join.join();
                Err(e.into())
            }
        }
    }

    /// Run `f` on VM `id`'s thread and wait (at most the manager's timeout) for its result.
    pub fn call<R: Send + 'static>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Microvm) -> R + Send + 'static,
    ) -> Result<R, ManagerError> {
        let tx = {
            let vms = lock(&self.vms);
            let e = vms
                .get(id)
                .ok_or_else(|| ManagerError::NotFound(id.into()))?;
            e.tx.clone()
        };
        let (rtx, rrx) = sync_channel::<R>(1);
        let call: Call = Box::new(move |vm| {
            let r = f(vm);
            Box::new(move || {
                let _ = rtx.send(r);
            })
        });
        tx.send(Msg::Call(call))
            .map_err(|_| ManagerError::Gone(id.into()))?;
        rrx.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => ManagerError::Timeout {
                id: id.into(),
                timeout: self.timeout,
            },
            RecvTimeoutError::Disconnected => ManagerError::Gone(id.into()),
        })
    }

    /// Set VM `id`'s requested total guest RAM without going through its thread: the target
    /// is recorded and the guest told, and the answer is built from what the device
    /// published (resize fields, current) and the VM's last memory sample (residency and
    /// balloon figures, at most `RESIDENCY_REFRESH` old). Waits for neither the VM thread,
    /// the device (which may be plugging) nor the guest.
    pub fn resize(&self, id: &str, total: u64) -> Result<MemoryFigures, ManagerError> {
        let (handle, published) = {
            let vms = lock(&self.vms);
            let e = vms
                .get(id)
                .ok_or_else(|| ManagerError::NotFound(id.into()))?;
            (e.resize.clone(), Arc::clone(&e.published))
        };
        let handle = handle.ok_or(ManagerError::Vm(MicrovmError::NoHotplug))?;
        handle.resize_total(total)?;
        let sample = lock(&published).memory;
        let sample = sample.unwrap_or(MemoryFigures {
            boot: 0,
            region: 0,
            plugged: 0,
            requested: 0,
            resident: 0,
            reported: 0,
            ballooned: 0,
            refaulted: 0,
            driver_ready: false,
            resize_from: 0,
        });
        Ok(handle.overlay(sample))
    }

    /// Keep `m`, just measured on VM `id`'s thread, as its latest memory sample.
    pub(crate) fn store_memory_sample(&self, id: &str, m: MemoryFigures) {
        let published = lock(&self.vms).get(id).map(|e| Arc::clone(&e.published));
        if let Some(p) = published {
            lock(&p).memory = Some(m);
        }
    }

    /// Queue `f` on VM `id`'s thread without waiting for it.
    pub(crate) fn post(
        &self,
        id: &str,
        f: impl FnOnce(&mut Microvm) + Send + 'static,
    ) -> Result<(), ManagerError> {
        let tx = {
            let vms = lock(&self.vms);
            let e = vms
                .get(id)
                .ok_or_else(|| ManagerError::NotFound(id.into()))?;
            e.tx.clone()
        };
        let call: Call = Box::new(move |vm| {
            f(vm);
            Box::new(|| {})
        });
        tx.send(Msg::Call(call))
            .map_err(|_| ManagerError::Gone(id.into()))
    }

    /// VM `id`'s swap, when it has one.
    pub fn vm_swap(&self, id: &str) -> Option<Arc<VmSwap>> {
        let vms = lock(&self.vms);
        let cell = Arc::clone(&vms.get(id)?.swap);
        drop(vms);
        let s = lock(&cell).clone();
        s
    }

    /// The API view of VM `id`, with its published state (never waits for the VM).
    pub fn info(&self, id: &str) -> Result<VmInfo, ManagerError> {
        let vms = lock(&self.vms);
        let e = vms
            .get(id)
            .ok_or_else(|| ManagerError::NotFound(id.into()))?;
        let info = lock(&e.published).apply(e.info.clone());
        Ok(info)
    }

    /// All VMs (never waits for any VM).
    pub fn list(&self) -> Vec<VmInfo> {
        let vms = lock(&self.vms);
        vms.values()
            .map(|e| lock(&e.published).apply(e.info.clone()))
            .collect()
    }

    /// What every VM published: `(id, info, published)`.
    pub fn published(&self) -> Vec<(VmInfo, Published)> {
        let vms = lock(&self.vms);
        vms.values()
            .map(|e| {
                let p = lock(&e.published).clone();
                let info = p.apply(e.info.clone());
                (info, p)
            })
            .collect()
    }

    /// Number of VMs.
    pub fn count(&self) -> usize {
        lock(&self.vms).len()
    }

    /// Stop and delete VM `id`: its thread drops the `Microvm` (vCPUs stopped, blocks
    /// unplugged, every frame back to the pool) and the manager waits for that.
    pub fn delete(&self, id: &str) -> Result<(), ManagerError> {
        let mut entry = lock(&self.vms)
            .remove(id)
            .ok_or_else(|| ManagerError::NotFound(id.into()))?;
        self.reclaim_detach(id);
        let (atx, arx) = channel();
        if entry.tx.send(Msg::Delete(atx)).is_err() {
            return Ok(());
        }
        match arx.recv_timeout(self.timeout) {
            Ok(()) => {
                if let Some(j) = entry.join.take() {
                    let _ = j.join();
                }
                Ok(())
            }
            Err(RecvTimeoutError::Disconnected) => Ok(()),
            Err(RecvTimeoutError::Timeout) => Err(ManagerError::Timeout {
                id: id.into(),
                timeout: self.timeout,
            }),
        }
    }

    /// Delete every VM (daemon shutdown).
    pub fn shutdown(&self) {
        let ids: Vec<String> = lock(&self.vms).keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.delete(&id) {
                tracing::error!(vm = %id, error = %e, "delete at shutdown failed");
            }
        }
    }
}

impl Drop for VmManager {
    fn drop(&mut self) {
        self.shutdown();
        // Stop the reclaim threads after the VMs are gone.
        lock(&self.reclaim).take();
    }
}

fn publish(vm: &mut Microvm, published: &Mutex<Published>, residency: bool) {
    let state = vm.state().clone();
    let (res, memory) = if residency {
        let r = match vm.residency_by_node() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(vm = %vm.id(), error = %e, "residency probe failed");
                None
            }
        };
        (r, vm.memory().ok())
    } else {
        (None, None)
    };
    let window = vm.vm().map(|v| v.window().host_range()).unwrap_or(0..0);
    let mut p = lock(published);
    p.state = state;
    p.window = window;
    if let Some(r) = res {
        p.residency = r;
    }
    if memory.is_some() {
        p.memory = memory;
    }
}

/// Drop the VM, then shut its swap down. The swap's fault handler keeps serving while the
/// vCPUs and the device thread stop (none is left waiting on a fault), unplugged blocks free
/// their slots as the VM releases them, and the shutdown frees the rest (boot RAM) and
/// unregisters the window, which the swap held mapped until then.
fn end_vm(vm: Microvm, swap: &SwapCell) {
    drop(vm);
    if let Some(s) = lock(swap).take() {
        s.shutdown();
    }
}

fn vm_thread(mut vm: Microvm, rx: &Receiver<Msg>, published: &Mutex<Published>, swap: &SwapCell) {
    let mut last_residency = Instant::now();
    let mut last_stats = Instant::now();
    loop {
        match rx.recv_timeout(IDLE_TICK) {
            Ok(Msg::Call(f)) => {
                // A panic in one request must not take the VM (or the daemon) down with it.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut vm)));
                publish(&mut vm, published, false);
                match r {
                    Ok(reply) => reply(),
                    Err(_) => tracing::error!(vm = %vm.id(), "a request panicked on the VM thread"),
                }
            }
            Ok(Msg::Delete(ack)) => {
                end_vm(vm, swap);
                let _ = ack.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                end_vm(vm, swap);
                return;
            }
        }
        let refresh = last_residency.elapsed() >= RESIDENCY_REFRESH;
        if refresh {
            last_residency = Instant::now();
        }
        publish(&mut vm, published, refresh);
        let stats = vm
            .config()
            .balloon
            .as_ref()
            .is_some_and(|b| b.stats_interval_s > 0);
        // Only a balloon with a stats queue needs the device here (its lock is not taken
        // every tick for nothing); a failed VM's held device is skipped.
        if let Some(dev) = vm.balloon_device().filter(|_| stats) {
            let due = vm.bus().lock_live(dev).is_some_and(|t| {
                let b = t.device();
                b.stats_interval()
                    .is_some_and(|every| last_stats.elapsed() >= every)
                    && tidepool_virtio::VirtioDevice::is_activated(b)
            });
            if due {
                last_stats = Instant::now();
                // Returning the stats buffer writes the used ring (guest memory): the device
                // thread does it, never this thread (see NotifyThread::post).
                let dev = Arc::clone(dev);
                let failed = Arc::clone(vm.bus().failed_flag());
                let posted = vm.post_device_work(Box::new(move || {
                    if let Some(mut t) = crate::devices::lock_live(&dev, &failed) {
                        let _ = t.device_mut().request_stats();
                    }
                }));
                if posted.is_err() {
                    tracing::debug!(vm = %vm.id(), "no device thread: stats not requested");
                }
            }
        }
    }
}
