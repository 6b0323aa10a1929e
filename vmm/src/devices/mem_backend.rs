//! The host side of virtio-mem: plugging takes MOVABLE 2 MiB blocks from the pool (under the
//! VM's NUMA policy) and places them in the VM window (memslot included); unplugging removes
//! them from the window and KVM first (which also discards their host pages), and only then
//! returns the frames to the pool. One record per plugged block lives in a guest-mm slab.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use guest_mm::frame::{FrameId, MigrateType, NodeId};
use guest_mm::policy::NumaPolicy;
use guest_mm::slab::{OwnedSlabBox, TypedSlab};
use tidepool_hotplug::{BackendError, MemoryBackend};
use tidepool_virtio::GuestMem;
use vm_memory::GuestMemoryAtomic;

use crate::hostpool::{FramePool, PoolError, POOL_BLOCK_BYTES};
use crate::kvm::{KvmError, Vm};
use crate::memory::{MemoryError, PoolBlock};

/// What the VMM keeps per plugged 2 MiB block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRecord {
    /// Guest-physical address of the block.
    pub gpa: u64,
    /// The pool block behind it.
    pub frame: FrameId,
    /// The node the pool took it from.
    pub node: NodeId,
}

/// The VM and the device-visible memory map, refreshed whenever blocks are placed or
/// removed, so that device models see exactly the accessible guest RAM.
#[derive(Debug, Clone)]
pub struct VmMemoryHandle {
    vm: Arc<Vm>,
    mem: GuestMem,
}

impl VmMemoryHandle {
    /// A handle with a map of what `vm`'s window has placed now.
    pub fn new(vm: Arc<Vm>) -> Result<VmMemoryHandle, MemoryError> {
        let view = vm.window().guest_memory()?;
        let mem = GuestMemoryAtomic::new((*view).clone());
        Ok(VmMemoryHandle { vm, mem })
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The map device models use (shared: a refresh is seen by all of them).
    pub fn guest_mem(&self) -> GuestMem {
        self.mem.clone()
    }

    /// Publish a map without `[gpa, gpa+len)`, which is about to be removed (it stays
    /// placed until then). Device models that load the map from now on cannot reach it.
    pub fn hide(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.publish(&self.vm.window().guest_memory_without(gpa, len)?)
    }

    /// Rebuild the map from the window's placed blocks.
    pub fn refresh(&self) -> Result<(), MemoryError> {
        self.publish(&self.vm.window().guest_memory()?)
    }

    /// Make `view` the map device models load from now on.
    fn publish(&self, view: &crate::memory::WindowMemory) -> Result<(), MemoryError> {
        let guard = self
            .mem
            .lock()
            .map_err(|_| MemoryError::GuestMemory("memory map lock poisoned".into()))?;
        guard.replace((**view).clone());
        Ok(())
    }
}

/// A change of the VM's RAM made by a [`PoolMemoryBackend`], given to its [`RamListener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamChange {
    /// `[gpa, gpa+len)` was plugged (placed in the window and KVM).
    Plugged {
        /// Guest-physical start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `[gpa, gpa+len)` is about to be unplugged: device models no longer get it in the
    /// memory map, but one may still be working through an older map that has it. The
    /// listener must return only once no device does (the VMM's takes and releases the
    /// balloon's transport lock, under which the balloon does all its guest memory accesses),
    /// since the range becomes inaccessible next and an access through an old map would then
    /// be a SIGSEGV in the VMM.
    Unplugging {
        /// Guest-physical start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `[gpa, gpa+len)` was unplugged: it has left the window and KVM and its host memory is
    /// discarded (its frames are back in the pool, or about to be).
    Unplugged {
        /// Guest-physical start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// Told of every successful plug and unplug, after the fact (the VMM uses it to keep the
/// balloon's accounting in step with virtio-mem).
pub struct RamListener(Box<dyn FnMut(RamChange) + Send>);

impl RamListener {
    /// A listener calling `f`.
    pub fn new(f: impl FnMut(RamChange) + Send + 'static) -> RamListener {
        RamListener(Box::new(f))
    }
}

impl std::fmt::Debug for RamListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RamListener")
    }
}

/// [`MemoryBackend`] of a VM's virtio-mem device.
#[derive(Debug)]
pub struct PoolMemoryBackend {
    handle: VmMemoryHandle,
    pool: Arc<dyn FramePool>,
    policy: NumaPolicy,
    local: Option<NodeId>,
    slab: TypedSlab<BlockRecord>,
    slab_nodes: u16,
    records: BTreeMap<u64, OwnedSlabBox<BlockRecord>>,
    listener: Option<RamListener>,
    /// `plugged_bytes()`, published for readers that must not take the device's lock.
    plugged: Arc<AtomicU64>,
}

fn pool_err(e: PoolError) -> BackendError {
    match e {
        PoolError::OutOfMemory => BackendError::OutOfMemory,
        other => BackendError::Failed(other.to_string()),
    }
}

fn kvm_err(e: KvmError) -> BackendError {
    BackendError::Failed(e.to_string())
}

impl PoolMemoryBackend {
    /// A backend placing blocks in `handle`'s VM, taken from `pool` under `policy` for a caller
    /// on `local` (None: the node of the CPU that runs each plug), with records in `slab`
    /// (built for `slab_nodes` nodes).
    pub fn new(
        handle: VmMemoryHandle,
        pool: Arc<dyn FramePool>,
        policy: NumaPolicy,
        local: Option<NodeId>,
        slab: TypedSlab<BlockRecord>,
        slab_nodes: u16,
    ) -> PoolMemoryBackend {
        PoolMemoryBackend {
            handle,
            pool,
            policy,
            local,
            slab,
            slab_nodes: slab_nodes.max(1),
            records: BTreeMap::new(),
            listener: None,
            plugged: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Tell `listener` of every plug and unplug from now on (replaces any earlier one).
    pub fn set_listener(&mut self, listener: RamListener) {
        self.listener = Some(listener);
    }

    fn notify(&mut self, change: RamChange) {
        if let Some(l) = self.listener.as_mut() {
            (l.0)(change);
        }
    }

    /// The node the Local policy means: the one given at construction, else the node of the
    /// CPU running the plug.
    fn local_node(&self) -> NodeId {
        self.local.unwrap_or_else(|| self.pool.local_node())
    }

    /// Bytes plugged through this backend.
    pub fn plugged_bytes(&self) -> u64 {
        self.records.len() as u64 * POOL_BLOCK_BYTES
    }

    /// A counter that always holds [`PoolMemoryBackend::plugged_bytes`], for readers that
    /// must not wait for the device (whose lock is held while it plugs).
    pub fn plugged_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.plugged)
    }

    fn publish(&self) {
        self.plugged.store(self.plugged_bytes(), Ordering::Release);
    }

    /// The record of the block at `gpa`, if plugged.
    pub fn record(&self, gpa: u64) -> Option<BlockRecord> {
        self.records.get(&gpa).map(|r| **r)
    }

    /// All records, by address.
    pub fn records(&self) -> Vec<BlockRecord> {
        self.records.values().map(|r| **r).collect()
    }

    /// Repoint the record of the plugged block at `gpa` from pool block `from` to `to` on
    /// `node` (the pool's block mover, after it moved the block's data if the backing needs
    /// that). Returns false, changing nothing, when no record at `gpa` holds `from` (unplugged
    /// or moved meanwhile). The record stays in its slab slot.
    pub fn repoint(&mut self, gpa: u64, from: FrameId, to: FrameId, node: NodeId) -> bool {
        match self.records.get_mut(&gpa) {
            Some(r) if r.frame == from => {
                r.frame = to;
                r.node = node;
                true
            }
            _ => false,
        }
    }

    fn give_back(&self, frames: &[FrameId]) {
        for f in frames {
            if let Err(e) = self.pool.free_block(*f) {
                tracing::error!(frame = %f, error = %e, "returning a block to the pool failed");
            }
        }
    }

    /// Unplug every block (VM deletion). Errors are logged; blocks that could not be removed
    /// from the window keep their frames out of the pool (they may still be reachable).
    pub fn release_all(&mut self) {
        let gpas: Vec<u64> = self.records.keys().copied().collect();
        for gpa in gpas {
            if let Err(e) = self.unplug(gpa, POOL_BLOCK_BYTES) {
                tracing::error!(gpa, error = %e, "unplug at release failed");
            }
        }
    }
}

impl MemoryBackend for PoolMemoryBackend {
    fn plug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        if len == 0 || gpa % POOL_BLOCK_BYTES != 0 || len % POOL_BLOCK_BYTES != 0 {
            return Err(BackendError::Failed(format!(
                "plug [{gpa:#x}, +{len:#x}) is not 2 MiB aligned"
            )));
        }
        let n = len / POOL_BLOCK_BYTES;
        if (0..n).any(|i| self.records.contains_key(&(gpa + i * POOL_BLOCK_BYTES))) {
            return Err(BackendError::Failed(format!(
                "plug [{gpa:#x}, +{len:#x}): part of it is plugged already"
            )));
        }
        // 1. Frames from the pool; all or nothing.
        let mut taken: Vec<(FrameId, NodeId)> = Vec::new();
        for _ in 0..n {
            match self
                .pool
                .alloc_block(MigrateType::Movable, &self.policy, self.local_node())
            {
                Ok(b) => taken.push(b),
                Err(e) => {
                    let frames: Vec<FrameId> = taken.iter().map(|t| t.0).collect();
                    self.give_back(&frames);
                    return Err(pool_err(e));
                }
            }
        }
        let frames: Vec<FrameId> = taken.iter().map(|t| t.0).collect();
        let blocks: Vec<PoolBlock> = taken
            .iter()
            .map(|(frame, node)| PoolBlock {
                frame: *frame,
                node: *node,
            })
            .collect();
        // 2. Into the window and KVM (a file backing maps the blocks' pool-file pages).
        if let Err(e) = self.handle.vm.place_blocks(gpa, len, &blocks) {
            self.give_back(&frames);
            return Err(kvm_err(e));
        }
        // 3. Records.
        for (i, (frame, node)) in taken.iter().enumerate() {
            let b = gpa + i as u64 * POOL_BLOCK_BYTES;
            let rec = BlockRecord {
                gpa: b,
                frame: *frame,
                node: *node,
            };
            let slab_node = if node.0 < self.slab_nodes {
                *node
            } else {
                NodeId(0)
            };
            match self.slab.alloc_owned(slab_node, rec) {
                Ok(r) => {
                    self.records.insert(b, r);
                }
                Err(e) => {
                    // Undo everything: the range leaves the window before its frames return.
                    for j in 0..i {
                        self.records.remove(&(gpa + j as u64 * POOL_BLOCK_BYTES));
                    }
                    let undo = self.handle.vm.remove_block(gpa, len);
                    if undo.is_ok() {
                        self.give_back(&frames);
                    }
                    let _ = self.handle.refresh();
                    return Err(BackendError::Failed(format!("block record: {e}")));
                }
            }
        }
        self.publish();
        self.notify(RamChange::Plugged { gpa, len });
        self.handle
            .refresh()
            .map_err(|e| BackendError::Failed(e.to_string()))
    }

    fn unplug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        if len == 0 || gpa % POOL_BLOCK_BYTES != 0 || len % POOL_BLOCK_BYTES != 0 {
            return Err(BackendError::Failed(format!(
                "unplug [{gpa:#x}, +{len:#x}) is not 2 MiB aligned"
            )));
        }
        let n = len / POOL_BLOCK_BYTES;
        let blocks: Vec<u64> = (0..n).map(|i| gpa + i * POOL_BLOCK_BYTES).collect();
        if let Some(missing) = blocks.iter().find(|b| !self.records.contains_key(b)) {
            return Err(BackendError::Failed(format!(
                "unplug: block {missing:#x} is not plugged"
            )));
        }
        // 0. Out of the device models' memory map, and no device still working through an
        //    older map: a guest could otherwise have the balloon (which processes its queues
        //    on a vCPU thread when its driver sets DRIVER_OK) read a buffer in this block
        //    while it becomes inaccessible, and kill the VMM with SIGSEGV.
        self.handle
            .hide(gpa, len)
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        self.notify(RamChange::Unplugging { gpa, len });
        // 1. Out of KVM and the window: memslots deleted, then the range made inaccessible and
        //    its content dropped (anonymous: PROT_NONE + MADV_DONTNEED; file backings:
        //    PROT_NONE anonymous over the range, then punch-hole). Only then do the frames go
        //    back; if this fails they stay out of the pool.
        if let Err(e) = self.handle.vm.remove_block(gpa, len) {
            // Still placed: device models may use it again.
            let _ = self.handle.refresh();
            return Err(kvm_err(e));
        }
        // The range is gone from the guest: whoever accounts for it (the balloon) forgets it
        // before its frames can go to anyone else.
        self.notify(RamChange::Unplugged { gpa, len });
        let refreshed = self.handle.refresh();
        // 2. Frames back to the pool; records freed into the slab.
        for b in blocks {
            if let Some(rec) = self.records.remove(&b) {
                let rec = OwnedSlabBox::into_inner(rec);
                self.give_back(&[rec.frame]);
            }
        }
        self.publish();
        refreshed.map_err(|e| BackendError::Failed(e.to_string()))
    }
}

impl Drop for PoolMemoryBackend {
    fn drop(&mut self) {
        self.release_all();
    }
}
