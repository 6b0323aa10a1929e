//! KVM: the [`Vm`] (VM file descriptor, platform devices, memslots over the memory window) and
//! its vCPUs ([`vcpu`]), with CPUID filtering in [`cpuid`].

pub mod cpuid;
mod dirty;
pub mod vcpu;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};

use crate::memory::layout::{memslot_of, MemslotSpec, MEMSLOT_SIZE};
use crate::memory::{
    AnonymousBacking, Backing, GuestWindow, Layout, LayoutConfig, MemoryError, PoolBlock,
    RegionKind,
};

pub use vcpu::{
    Exit, ExitAction, ExitHandler, RunSummary, StopReason, Vcpu, VcpuError, VcpuHandle,
};

/// Guest-physical address of the three pages KVM needs for the real-mode TSS (Intel), inside
/// the MMIO hole just below the IOAPIC/LAPIC area.
pub const TSS_ADDRESS: u64 = 0xfffb_d000;
/// Guest-physical address of KVM's identity-map page (Intel real mode), just below the TSS.
pub const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors from the KVM layer.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    Open(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        /// Which operation.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The KVM API version is not 12.
    #[error("KVM API version {0}, expected 12")]
    ApiVersion(i32),
    /// A capability Tidepool needs is missing.
    #[error("KVM capability {0} is missing")]
    MissingCap(&'static str),
    /// The layout needs more memslots than KVM offers.
    #[error("layout needs memslot {needed}, KVM offers {available}")]
    TooManySlots {
        /// Highest slot number needed, plus one.
        needed: usize,
        /// KVM_CAP_NR_MEMSLOTS.
        available: usize,
    },
    /// vCPU ids are limited to what the APIC ID field holds here.
    #[error("vCPU id {0} is too large (max 254)")]
    VcpuId(u64),
    /// The memory window failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { what, source }
}

/// How the hot-plug region's KVM memslots are managed (see docs/memory-window.md, "Few
/// memslots" and "Hot-plug costs").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HotplugMemslots {
    /// Every 128 MiB slot of the region is registered once, at VM creation, over the window's
    /// `PROT_NONE` reservation. Plug and unplug only change the window's protection (and
    /// discard): no memslot ioctl on either path. Unplugged blocks stay inaccessible to the
    /// guest: a touch makes `KVM_RUN` fail with `EFAULT` ([`VcpuError::GuestMemoryFault`]).
    /// Costs KVM's per-slot arrays for the whole region from the start.
    #[default]
    Eager,
    /// A slot is registered when the first block of its 128 MiB chunk is plugged and deleted
    /// when the last one leaves. Fewer live slots, but a plug or unplug that opens or closes a
    /// chunk pays a `KVM_SET_USER_MEMORY_REGION` (an SRCU grace period).
    Lazy,
}

/// How to create a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest memory layout.
    pub layout: LayoutConfig,
    /// Create the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, as a stock kernel needs.
    /// The tiny guest runs with or without.
    pub platform: bool,
    /// Memslot strategy of the hot-plug region (ignored without one).
    pub hotplug_memslots: HotplugMemslots,
}

impl VmConfig {
    /// A VM as the tiny guest uses it: `boot_ram` bytes of RAM, a hot-plug region of
    /// `hotplug_size` bytes (0: none) with the default memslots, no platform devices.
    pub fn tiny(boot_ram: u64, hotplug_size: u64) -> VmConfig {
        VmConfig {
            layout: LayoutConfig {
                boot_ram,
                hotplug_size,
            },
            platform: false,
            hotplug_memslots: HotplugMemslots::default(),
        }
    }
}

/// A KVM VM with its private memory window.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    window: Arc<GuestWindow>,
    supported_cpuid: CpuId,
    /// Hot-plug memslots currently registered: slot number to (spec, placed bytes in it).
    hotplug_slots: Mutex<BTreeMap<u32, (MemslotSpec, u64)>>,
    /// How hot-plug memslots are managed.
    hotplug_memslots: HotplugMemslots,
    /// Whether memslots carry KVM_MEM_LOG_DIRTY_PAGES (see `dirty.rs`).
    dirty_logging: std::sync::atomic::AtomicBool,
    created: Instant,
    timings: VmTimings,
}

/// How long each phase of [`Vm::new`] took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmTimings {
    /// Opening `/dev/kvm` (and the layout arithmetic before it).
    pub open_kvm: Duration,
    /// KVM_CREATE_VM.
    pub create_vm: Duration,
    /// Identity map and TSS addresses, irqchip, PIT (zero without `platform`).
    pub platform: Duration,
    /// KVM_GET_SUPPORTED_CPUID.
    pub supported_cpuid: Duration,
    /// Reserving the window and placing boot RAM.
    pub window: Duration,
    /// Registering the boot memslots.
    pub memslots: Duration,
}

impl VmTimings {
    /// Sum of the phases: all of `Vm::new`.
    pub fn total(&self) -> Duration {
        self.open_kvm
            + self.create_vm
            + self.platform
            + self.supported_cpuid
            + self.window
            + self.memslots
    }
}

/// Whether `/dev/kvm` can be opened here; Err says why not (for tests that must skip).
pub fn kvm_available() -> Result<(), String> {
    Kvm::new().map(|_| ()).map_err(|e| format!("/dev/kvm: {e}"))
}

impl Vm {
    /// Open KVM, create the VM, its platform devices (if asked) and its memory window (the
    /// default anonymous THP backing), and register memslots over boot RAM.
    pub fn new(config: VmConfig) -> Result<Vm, KvmError> {
        Vm::with_backing(config, Arc::new(AnonymousBacking::new(true)), &[])
    }

    /// [`Vm::new`] with the window over `backing`; a file backing needs the pool blocks of
    /// boot RAM in `boot` (one per 2 MiB, in guest-physical order).
    pub fn with_backing(
        config: VmConfig,
        backing: Arc<dyn Backing>,
        boot: &[PoolBlock],
    ) -> Result<Vm, KvmError> {
        let created = Instant::now();
        let layout = Layout::new(config.layout)?;
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let t_open = Instant::now();
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(KvmError::ApiVersion(api));
        }
        if !kvm.check_extension(kvm_ioctls::Cap::UserMemory) {
            return Err(KvmError::MissingCap("KVM_CAP_USER_MEMORY"));
        }
        let max_slot = memslot_of(layout.end().saturating_sub(1)) as usize + 1;
        let available = kvm.get_nr_memslots();
        if max_slot > available {
            return Err(KvmError::TooManySlots {
                needed: max_slot,
                available,
            });
        }
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        let t_vm = Instant::now();
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let t_cpuid = Instant::now();
        let window = Arc::new(GuestWindow::with_backing(layout, backing, boot)?);
        let t_window = Instant::now();
        let mut vm = Vm {
            kvm,
            fd,
            window,
            supported_cpuid,
            hotplug_slots: Mutex::new(BTreeMap::new()),
            hotplug_memslots: config.hotplug_memslots,
            dirty_logging: std::sync::atomic::AtomicBool::new(false),
            created,
            timings: VmTimings::default(),
        };
        // Each memslot registration costs about 0.5-1.5 ms on this nested host (measured with
        // 8 to 64 slots), which is one more reason for few, large slots.
        for slot in vm.window.layout().boot_memslots() {
            vm.set_memslot(slot, false)?;
        }
        if config.hotplug_memslots == HotplugMemslots::Eager {
            vm.register_hotplug_slots()?;
        }
        let t_slots = Instant::now();
        if config.platform {
            vm.fd
                .set_identity_map_address(IDENTITY_MAP_ADDRESS)
                .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
            vm.fd
                .set_tss_address(TSS_ADDRESS as usize)
                .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
            vm.fd
                .create_irq_chip()
                .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
            vm.fd
                .create_pit2(kvm_pit_config::default())
                .map_err(ioctl("KVM_CREATE_PIT2"))?;
        }
        let t_platform = Instant::now();
        vm.timings = VmTimings {
            open_kvm: t_open - created,
            create_vm: t_vm - t_open,
            supported_cpuid: t_cpuid - t_vm,
            window: t_window - t_cpuid,
            memslots: t_slots - t_window,
            platform: t_platform - t_slots,
        };
        Ok(vm)
    }

    /// How long each phase of [`Vm::new`] took.
    pub fn timings(&self) -> VmTimings {
        self.timings
    }

    /// When [`Vm::new`] started.
    pub fn created_at(&self) -> Instant {
        self.created
    }

    /// The memory window.
    pub fn window(&self) -> &Arc<GuestWindow> {
        &self.window
    }

    /// The raw VM file descriptor (for device set-up: ioeventfd, irqfd, ...).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// KVM's supported CPUID, unfiltered.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    fn set_memslot(&self, slot: MemslotSpec, delete: bool) -> Result<(), KvmError> {
        let host = self
            .window
            .host_addr(slot.gpa)
            .ok_or(MemoryError::OutOfRange {
                gpa: slot.gpa,
                len: slot.size,
            })?;
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            flags: self.memslot_flags(),
            guest_phys_addr: slot.gpa,
            memory_size: if delete { 0 } else { slot.size },
            userspace_addr: host as u64,
        };
        // SAFETY: [host, host+size) lies inside the window, which this VM keeps mapped (it holds
        // an Arc) for as long as the VM fd exists; every vCPU also holds an Arc to the window.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))
    }

    /// Create vCPU `id` with the filtered CPUID ([`cpuid::guest_cpuid`]).
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, KvmError> {
        let apic_id = Self::apic_id(id)?;
        let features = cpuid::PlatformFeatures {
            tsc_deadline: self.kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        };
        let cpuid = cpuid::guest_cpuid(&self.supported_cpuid, apic_id, features);
        self.create_vcpu_with_cpuid(id, &cpuid)
    }

    /// Create vCPU `id` with exactly this CPUID (unfiltered: for probing the emulator only).
    pub fn create_vcpu_with_cpuid(&self, id: u64, cpuid: &CpuId) -> Result<Vcpu, KvmError> {
        let apic_id = Self::apic_id(id)?;
        let fd = self.fd.create_vcpu(id).map_err(ioctl("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        Ok(Vcpu::new(apic_id, fd, Arc::clone(&self.window)))
    }

    fn apic_id(id: u64) -> Result<u8, KvmError> {
        u8::try_from(id)
            .ok()
            .filter(|i| *i < 255)
            .ok_or(KvmError::VcpuId(id))
    }

    /// Eager strategy: register every slot of the hot-plug region now, over the `PROT_NONE`
    /// window (KVM only records the host range; nothing is populated).
    fn register_hotplug_slots(&self) -> Result<(), KvmError> {
        let Some(region) = self.window.layout().hotplug() else {
            return Ok(());
        };
        let mut slots = self.hotplug_slots.lock().unwrap_or_else(|e| e.into_inner());
        for spec in crate::memory::layout::split_memslots(region) {
            // No undo needed: a failure fails `Vm::new`, and dropping the VM fd drops its slots.
            self.set_memslot(spec, false)?;
            slots.insert(spec.slot, (spec, 0));
        }
        Ok(())
    }

    /// The memslot strategy of the hot-plug region.
    pub fn hotplug_memslots(&self) -> HotplugMemslots {
        self.hotplug_memslots
    }

    /// Place `[gpa, gpa+len)` in the window (anonymous backing). For the hot-plug region under
    /// [`HotplugMemslots::Lazy`], also register the memslots covering it (one per 128 MiB
    /// chunk, added when the chunk's first block is placed); under `Eager` they exist already.
    pub fn place_block(&self, gpa: u64, len: u64) -> Result<(), KvmError> {
        self.place_blocks(gpa, len, &[])
    }

    /// [`Vm::place_block`] with the pool blocks behind the range (one per 2 MiB, in order),
    /// which a file-backed window needs.
    pub fn place_blocks(&self, gpa: u64, len: u64, blocks: &[PoolBlock]) -> Result<(), KvmError> {
        let kind = self.window.layout().check_block(gpa, len)?;
        // One lock over the whole operation keeps slot counts and placement in step.
        let mut slots = self.hotplug_slots.lock().unwrap_or_else(|e| e.into_inner());
        self.window.place(gpa, len, blocks)?;
        if kind != RegionKind::Hotplug {
            return Ok(());
        }
        let region = self.window.layout().hotplug().unwrap_or(gpa..gpa + len);
        let pieces = crate::memory::layout::split_memslots(gpa..gpa + len);
        let mut added: Vec<MemslotSpec> = Vec::new();
        // Under Eager every chunk is in the map since creation, so nothing is registered here.
        for piece in pieces.iter().filter(|p| !slots.contains_key(&p.slot)) {
            let chunk = u64::from(piece.slot) * MEMSLOT_SIZE;
            let start = chunk.max(region.start);
            let end = (chunk + MEMSLOT_SIZE).min(region.end);
            let spec = MemslotSpec {
                slot: piece.slot,
                gpa: start,
                size: end - start,
            };
            if let Err(e) = self.set_memslot(spec, false) {
                // Undo: no slot or placed block may outlive a failed call.
                for s in &added {
                    let _ = self.set_memslot(*s, true);
                }
                let _ = self.window.remove_block(gpa, len);
                return Err(e);
            }
            added.push(spec);
        }
        for s in added {
            slots.insert(s.slot, (s, 0));
        }
        for piece in pieces {
            if let Some(entry) = slots.get_mut(&piece.slot) {
                entry.1 += piece.size;
            }
        }
        Ok(())
    }

    /// Remove `[gpa, gpa+len)`: discard and protect the range in the window. For the hot-plug
    /// region under [`HotplugMemslots::Lazy`], first delete the memslots whose last placed
    /// block this is. If a deletion or the window removal fails, the slots deleted by this call
    /// are registered again and the slot map is left as it was, so no state is lost.
    pub fn remove_block(&self, gpa: u64, len: u64) -> Result<(), KvmError> {
        let kind = self.window.layout().check_block(gpa, len)?;
        let mut slots = self.hotplug_slots.lock().unwrap_or_else(|e| e.into_inner());
        if !self.window.is_range_placed(gpa, len) {
            return Err(MemoryError::NotPlaced { gpa, len }.into());
        }
        if kind != RegionKind::Hotplug {
            self.window.remove_block(gpa, len)?;
            return Ok(());
        }
        let pieces = crate::memory::layout::split_memslots(gpa..gpa + len);
        let mut emptied: Vec<MemslotSpec> = Vec::new();
        for piece in &pieces {
            let Some(entry) = slots.get(&piece.slot) else {
                return Err(MemoryError::NotPlaced { gpa, len }.into());
            };
            if entry.1 < piece.size {
                return Err(MemoryError::NotPlaced { gpa, len }.into());
            }
            if entry.1 == piece.size && self.hotplug_memslots == HotplugMemslots::Lazy {
                emptied.push(entry.0);
            }
        }
        // 1. KVM first (lazy only): the slot goes before the memory behind it.
        for (i, spec) in emptied.iter().enumerate() {
            if let Err(e) = self.set_memslot(*spec, true) {
                self.restore_slots(&emptied[..i]);
                return Err(e);
            }
        }
        // 2. The window: PROT_NONE (which also zaps KVM's mappings through the MMU notifier),
        //    then the discard.
        if let Err(e) = self.window.remove_block(gpa, len) {
            self.restore_slots(&emptied);
            return Err(e.into());
        }
        // 3. Only now does the map change.
        for piece in pieces {
            if let Some(entry) = slots.get_mut(&piece.slot) {
                entry.1 -= piece.size;
            }
        }
        for spec in emptied {
            slots.remove(&spec.slot);
        }
        Ok(())
    }

    /// Register `specs` again after a failed removal (best effort: a failure is logged, and
    /// the slot stays in the map, so a later removal retries the deletion harmlessly).
    fn restore_slots(&self, specs: &[MemslotSpec]) {
        for s in specs {
            if let Err(e) = self.set_memslot(*s, false) {
                tracing::error!(slot = s.slot, error = %e, "re-registering a hot-plug memslot failed");
            }
        }
    }

    /// Number of KVM memslots currently registered.
    pub fn memslot_count(&self) -> usize {
        let hot = self
            .hotplug_slots
            .lock()
            .map(|s| s.len())
            .unwrap_or_else(|e| e.into_inner().len());
        self.window.layout().boot_memslots().len() + hot
    }
}
