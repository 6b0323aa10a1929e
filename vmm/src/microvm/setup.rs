//! Building a [`Microvm`]: boot blocks from the pool, the KVM VM and window, the image, the
//! devices and the vCPUs (created, not started).

use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use guest_mm::frame::{FrameId, MigrateType, NodeId};
use guest_mm::policy::NumaPolicy;
use guest_mm::slab::TypedSlab;
use tidepool_balloon::{Balloon, BalloonConfig};
use tidepool_hotplug::{VirtioMem, VirtioMemConfig};
use tidepool_virtio::{IrqTrigger, MmioTransport};
use vm_memory::{Bytes, GuestAddress};

use super::{ExitCounters, Microvm, MicrovmError, VmLifecycle};
use crate::devices::{
    lock, BlockRecord, DeviceSetupError, IrqMode, IrqfdTrigger, MmioBus, NotifyThread, PolledIrq,
    PoolMemoryBackend, RamChange, RamListener, VmMemoryHandle, WindowReclaim,
};
use crate::hostpool::{FramePool, POOL_BLOCK_BYTES};
use crate::kvm::{Vm, VmConfig};
use crate::memory::{BackingSpec, Layout, LayoutConfig, PoolBlock, PoolFiles};
use crate::tiny_guest::boot::{CR4_PAE, RFLAGS_FIXED, RFLAGS_IOPL3};
use crate::tiny_guest::{BootState, GuestImage, Privilege};

/// What the VM boots.
#[derive(Debug, Clone)]
pub enum BootImage {
    /// A tiny guest built with [`crate::tiny_guest::TinyGuestBuilder`] (one program per vCPU).
    Tiny(GuestImage),
    /// A raw image (the API's `image`): `bytes` loaded at `load_addr`, entered at `entry` in
    /// 64-bit mode at `privilege` (IOPL 3 either way), with the stack at the image's end.
    /// The image brings its own GDT and page tables at the tiny guest's addresses (it is
    /// what `TinyGuestBuilder` emits; its GDT has both the CPL0 and the CPL3 segments).
    Raw {
        /// The bytes.
        bytes: Vec<u8>,
        /// Load address.
        load_addr: u64,
        /// Entry point.
        entry: u64,
        /// CPL0 ([`Privilege::Kernel`]) or CPL3 ([`Privilege::User`]).
        privilege: Privilege,
    },
    /// A Linux kernel (needs [`IrqMode::Irqfd`]: the in-kernel irqchip).
    Linux(super::linux::LinuxImage),
}

/// The virtio-mem device of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotplugSpec {
    /// Region size (multiple of 128 MiB).
    pub region_size: u64,
    /// Block size (power of two, 2 MiB ..= 128 MiB).
    pub block_size: u64,
    /// KVM memslot strategy of the region.
    pub memslots: crate::kvm::HotplugMemslots,
}

/// The balloon device of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalloonSpec {
    /// Offer free page reporting.
    pub free_page_reporting: bool,
    /// Offer DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Statistics interval (0: no stats queue).
    pub stats_interval_s: u32,
    /// Offer free page hinting (discarded with the VM swap's write tracking, else report only).
    pub free_page_hinting: bool,
}

/// How to build a microVM.
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// VM id (names threads and log lines).
    pub id: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Boot RAM in bytes (multiple of 2 MiB).
    pub boot_ram: u64,
    /// virtio-mem device, if any.
    pub hotplug: Option<HotplugSpec>,
    /// Balloon device, if any.
    pub balloon: Option<BalloonSpec>,
    /// NUMA policy of the VM's pool blocks.
    pub policy: NumaPolicy,
    /// Interrupts through irqfds (creates the in-kernel irqchip) or polled (no irqchip).
    pub irq: IrqMode,
    /// What to boot.
    pub image: BootImage,
    /// What backs guest RAM (default: anonymous with THP).
    pub backing: BackingSpec,
    /// The pool files of the VM's pool, shared by the daemon's VMs (memfd and hugetlbfs
    /// backings). None: a file backing gets files of its own for this VM.
    pub pool_files: Option<Arc<PoolFiles>>,
}

impl MicrovmConfig {
    /// The guest-physical layout this configuration gives.
    pub fn layout(&self) -> Result<Layout, MicrovmError> {
        Ok(Layout::new(self.layout_config())?)
    }

    fn layout_config(&self) -> LayoutConfig {
        LayoutConfig {
            boot_ram: self.boot_ram,
            hotplug_size: self.hotplug.map_or(0, |h| h.region_size),
        }
    }

    fn boot_states(&self, layout: &Layout) -> Result<(u64, Vec<u8>, Vec<BootState>), MicrovmError> {
        let low_end = layout.low_ram().end;
        let (load_addr, bytes, states) = match &self.image {
            BootImage::Tiny(img) => (
                img.load_addr,
                img.bytes.clone(),
                img.boot_states().cloned().collect::<Vec<_>>(),
            ),
            BootImage::Raw {
                bytes,
                load_addr,
                entry,
                privilege,
            } => {
                let end = load_addr.saturating_add(bytes.len() as u64);
                if bytes.is_empty() || !(*load_addr..end).contains(entry) {
                    return Err(MicrovmError::Config(format!(
                        "entry {entry:#x} is not inside the image [{load_addr:#x}, {end:#x})"
                    )));
                }
                let state = BootState {
                    rip: *entry,
                    rsp: end & !0xf,
                    rflags: RFLAGS_FIXED | RFLAGS_IOPL3,
                    privilege: *privilege,
                    cr4: CR4_PAE,
                };
                (*load_addr, bytes.clone(), vec![state])
            }
            BootImage::Linux(_) => {
                return Err(MicrovmError::Config(
                    "a Linux kernel has no raw boot state".into(),
                ))
            }
        };
        let end = load_addr.saturating_add(bytes.len() as u64);
        if end > low_end {
            return Err(MicrovmError::Config(format!(
                "image [{load_addr:#x}, {end:#x}) does not fit in boot RAM below {low_end:#x}"
            )));
        }
        if states.len() != usize::from(self.vcpus) {
            return Err(MicrovmError::Unsupported(format!(
                "the image has entry points for {} vCPU(s), the VM asks for {}; a raw image runs on exactly one vCPU",
                states.len(),
                self.vcpus
            )));
        }
        Ok((load_addr, bytes, states))
    }
}

/// Take `n` blocks of type `mt`; all or nothing.
fn take_blocks(
    pool: &dyn FramePool,
    n: u64,
    mt: MigrateType,
    policy: &NumaPolicy,
) -> Result<Vec<(FrameId, NodeId)>, MicrovmError> {
    let mut out = Vec::new();
    for _ in 0..n {
        match pool.alloc_block(mt, policy, pool.local_node()) {
            Ok(b) => out.push(b),
            Err(e) => {
                for (f, _) in out {
                    let _ = pool.free_block(f);
                }
                return Err(e.into());
            }
        }
    }
    Ok(out)
}

/// The device interrupt on `gsi`, which also wakes the guest's wait requests.
fn trigger(
    vm: &Vm,
    mode: IrqMode,
    gsi: u32,
    wake: &Arc<super::exits::GuestWake>,
) -> Result<Arc<dyn IrqTrigger>, DeviceSetupError> {
    let inner: Arc<dyn IrqTrigger> = match mode {
        IrqMode::Irqfd => Arc::new(IrqfdTrigger::register(vm.fd(), gsi)?),
        IrqMode::Polled => Arc::new(PolledIrq),
    };
    Ok(Arc::new(super::exits::WakingTrigger::new(
        inner,
        Arc::clone(wake),
    )))
}

impl Microvm {
    /// Build a VM: boot RAM from `pool` (UNMOVABLE 2 MiB blocks under the policy), the KVM VM
    /// and window, the image, the devices (virtio-mem blocks come from `pool` too, with
    /// records in `records`, a slab built for `slab_nodes` nodes), and the vCPUs. The VM
    /// starts in [`VmLifecycle::Created`].
    pub fn new(
        config: MicrovmConfig,
        pool: Arc<dyn FramePool>,
        records: TypedSlab<BlockRecord>,
        slab_nodes: u16,
    ) -> Result<Microvm, MicrovmError> {
        if config.vcpus == 0 {
            return Err(MicrovmError::Config("a VM needs at least one vCPU".into()));
        }
        let layout = config.layout()?;
        let linux = match &config.image {
            BootImage::Linux(l) => Some(l.clone()),
            _ => None,
        };
        if linux.is_some() && config.irq != IrqMode::Irqfd {
            return Err(MicrovmError::Config(
                "a Linux guest needs the in-kernel irqchip (irqfd interrupts)".into(),
            ));
        }
        let raw = match linux {
            Some(_) => None,
            None => Some(config.boot_states(&layout)?),
        };
        if let Some(h) = config.hotplug {
            // Check before taking any memory.
            VirtioMemConfig {
                addr: layout.hotplug().map_or(0, |r| r.start),
                region_size: h.region_size,
                block_size: h.block_size,
                node_id: None,
                boot_ram: config.boot_ram,
                initial_requested: 0,
            }
            .validate()
            .map_err(|e| MicrovmError::Config(format!("virtio-mem: {e}")))?;
        }
        config.backing.validate()?;
        // A Linux guest under a policy that names several host nodes gets one guest node per
        // host node (SRAT), each backed by its node's blocks.
        let guest_numa = linux.as_ref().and_then(|_| {
            super::guest_numa::split(&config.policy, config.boot_ram / POOL_BLOCK_BYTES)
        });
        let boot_blocks = match &guest_numa {
            None => take_blocks(
                &*pool,
                config.boot_ram / POOL_BLOCK_BYTES,
                MigrateType::Unmovable,
                &config.policy,
            )?,
            Some(parts) => {
                let mut all: Vec<(FrameId, NodeId)> = Vec::new();
                for part in parts {
                    let policy = NumaPolicy::Bind(vec![part.node]);
                    match take_blocks(&*pool, part.blocks, MigrateType::Unmovable, &policy) {
                        Ok(b) => all.extend(b),
                        Err(e) => {
                            for (f, _) in all {
                                let _ = pool.free_block(f);
                            }
                            return Err(e);
                        }
                    }
                }
                all
            }
        };
        let srat = guest_numa
            .as_ref()
            .map(|parts| super::guest_numa::srat_ranges(&layout, parts))
            .unwrap_or_default();
        let (events_tx, events_rx) = channel();
        // From here on, a failure drops `vm`, which returns the boot blocks.
        let mut vm = Microvm {
            id: config.id.clone(),
            config: config.clone(),
            state: VmLifecycle::Created,
            threads: Vec::new(),
            pending: Vec::new(),
            events_tx,
            events_rx,
            notifier: None,
            mem_dev: None,
            balloon_dev: None,
            probe: None,
            bus: Arc::new(MmioBus::new()),
            reports: Arc::new(Mutex::new(super::ReportRing::default())),
            exit_counters: Arc::new(ExitCounters::default()),
            wake: Arc::new(super::exits::GuestWake::default()),
            resize: None,
            handle: None,
            legacy: None,
            console: None,
            boot_info: None,
            vm: None,
            boot_blocks: Arc::new(Mutex::new(boot_blocks)),
            pool: Arc::clone(&pool),
        };
        let files = config.pool_files.clone().unwrap_or_default();
        let backing = files.backing(config.backing)?;
        // Every backing gets the blocks: a file backing maps their offsets, and on a
        // multi-node host the anonymous backing binds each block's range to its node.
        let boot: Vec<PoolBlock> = vm
            .boot_blocks()
            .iter()
            .map(|(frame, node)| PoolBlock {
                frame: *frame,
                node: *node,
            })
            .collect();
        let kvm_vm = Arc::new(Vm::with_backing(
            VmConfig {
                layout: config.layout_config(),
                platform: config.irq == IrqMode::Irqfd,
                hotplug_memslots: config.hotplug.map(|h| h.memslots).unwrap_or_default(),
            },
            backing,
            &boot,
        )?);
        vm.vm = Some(Arc::clone(&kvm_vm));
        let handle = VmMemoryHandle::new(Arc::clone(&kvm_vm))?;
        vm.handle = Some(handle.clone());
        if let Some((load_addr, bytes, _)) = &raw {
            let view = kvm_vm.window().guest_memory()?;
            view.write_slice(bytes, GuestAddress(*load_addr))
                .map_err(|e| MicrovmError::Config(format!("loading the image: {e}")))?;
        }
        let mut bus = MmioBus::new();
        if let Some(h) = config.hotplug {
            let (_, gsi) = bus.next_slot()?;
            let region = layout
                .hotplug()
                .ok_or_else(|| MicrovmError::Config("layout has no hot-plug region".into()))?;
            let backend = PoolMemoryBackend::new(
                handle.clone(),
                Arc::clone(&pool),
                config.policy.clone(),
                None,
                records,
                slab_nodes,
            );
            let backend_plugged = backend.plugged_counter();
            let dev = VirtioMem::new(
                VirtioMemConfig {
                    addr: region.start,
                    region_size: h.region_size,
                    block_size: h.block_size,
                    node_id: None,
                    boot_ram: config.boot_ram,
                    initial_requested: 0,
                },
                backend,
            )
            .map_err(|e| MicrovmError::Config(format!("virtio-mem: {e}")))?;
            vm.resize = Some(super::ResizeHandle::new(
                Arc::clone(dev.control()),
                backend_plugged,
                Arc::clone(&vm.wake),
            ));
            let t = MmioTransport::new(
                Box::new(dev),
                handle.guest_mem(),
                trigger(&kvm_vm, config.irq, gsi, &vm.wake)?,
            )
            .map_err(DeviceSetupError::from)?;
            let t = Arc::new(Mutex::new(t));
            bus.add("virtio-mem", t.clone())?;
            vm.mem_dev = Some(t);
        }
        if let Some(b) = config.balloon {
            let (_, gsi) = bus.next_slot()?;
            let cfg = BalloonConfig {
                deflate_on_oom: b.deflate_on_oom,
                free_page_reporting: b.free_page_reporting,
                page_poison: b.free_page_reporting,
                stats_interval_s: b.stats_interval_s,
                free_page_hinting: b.free_page_hinting,
                ..BalloonConfig::default()
            };
            let reclaim = WindowReclaim::new(Arc::clone(kvm_vm.window()))
                .map_err(|e| MicrovmError::Config(format!("balloon backend: {e}")))?;
            let dev = Balloon::new(cfg, Box::new(reclaim))?;
            let t = MmioTransport::new(
                Box::new(dev),
                handle.guest_mem(),
                trigger(&kvm_vm, config.irq, gsi, &vm.wake)?,
            )
            .map_err(DeviceSetupError::from)?;
            let t = Arc::new(Mutex::new(t));
            bus.add("virtio-balloon", t.clone())?;
            vm.balloon_dev = Some(t);
            vm.probe = Some(
                WindowReclaim::new(Arc::clone(kvm_vm.window()))
                    .map_err(|e| MicrovmError::Config(format!("balloon probe: {e}")))?,
            );
        }
        if let (Some(mem), Some(balloon), Some(region)) =
            (&vm.mem_dev, &vm.balloon_dev, layout.hotplug())
        {
            // The balloon covers the whole hot-plug region, but the VM holds only its plugged
            // blocks: none yet. From now on every plug and unplug reaches the balloon, so that
            // an unplugged block's ballooned or reported pages are forgotten with it.
            lock(balloon)
                .device_mut()
                .ram_unplugged(region.start, region.end - region.start);
            let balloon = Arc::clone(balloon);
            lock(mem)
                .device_mut()
                .backend_mut()
                .set_listener(RamListener::new(move |change| {
                    let mut t = lock(&balloon);
                    match change {
                        // Holding the balloon's lock is the point: it does every guest memory
                        // access under it, so once we have it, it is done with the old map.
                        RamChange::Unplugging { .. } => {}
                        RamChange::Plugged { gpa, len } => t.device_mut().ram_plugged(gpa, len),
                        RamChange::Unplugged { gpa, len } => {
                            let (ballooned, reported) = t.device_mut().ram_unplugged(gpa, len);
                            if ballooned + reported > 0 {
                                tracing::debug!(
                                    gpa,
                                    len,
                                    ballooned,
                                    reported,
                                    "unplug cleared balloon pages"
                                );
                            }
                        }
                    }
                }));
        }
        if !bus.slots().is_empty() {
            vm.notifier = Some(NotifyThread::start(kvm_vm.fd(), &bus, &config.id)?);
        }
        match (raw, linux) {
            (Some((_, _, states)), _) => {
                for (i, state) in states.into_iter().enumerate() {
                    let vcpu = kvm_vm.create_vcpu(i as u64)?;
                    let mut sregs = vcpu.sregs()?;
                    state.apply_sregs(&mut sregs);
                    vcpu.set_sregs(&sregs)?;
                    vcpu.set_regs(&state.regs())?;
                    vcpu.set_runnable()?;
                    vm.pending.push(vcpu);
                }
            }
            (None, Some(image)) => {
                let p = super::linux::prepare(&kvm_vm, &image, config.vcpus, &bus, srat)?;
                vm.pending = p.vcpus;
                vm.legacy = Some(p.legacy);
                vm.console = Some(p.console);
                vm.boot_info = Some(p.boot);
            }
            (None, None) => {
                return Err(MicrovmError::Config("nothing to boot".into()));
            }
        }
        vm.bus = Arc::new(bus);
        // The balloon's figures need nothing else; make sure the devices see the final map.
        if let Some(dev) = &vm.mem_dev {
            let _ = lock(dev).status();
        }
        Ok(vm)
    }
}
