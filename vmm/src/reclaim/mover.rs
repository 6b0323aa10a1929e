//! [`VmBlockMover`]: the [`Mover`] compaction and NUMA rebalancing use for the pool blocks
//! VMs hold. A VM remembers which pool block backs each 2 MiB of its RAM in two places: the
//! boot blocks ([`BootBlocks`], in guest-physical order) and the virtio-mem backend's slab
//! records ([`PoolMemoryBackend`], by guest-physical address). Moving a block means:
//!
//! - **anonymous backing**: the pool block is accounting only (the data lives in the VM's
//!   private window), so the record is repointed, nothing is copied. A move to another node
//!   also moves the pages ([`GuestWindow::relocate`]: `mbind` with `MPOL_MF_MOVE` of the
//!   block's window range, before the record is repointed); on a host with one NUMA node that
//!   step is a no-op and is counted as such (`cross_node_single_host_node`).
//! - **memfd / hugetlbfs backing**: the data lives at the pool-file offset, so the block's
//!   data is copied to the new offset, the new offset is mapped over the window range and the
//!   old one punched ([`GuestWindow::relocate`]), with the VM quiesced (vCPUs paused, device
//!   transports held): the caller quiesces a VM and gives the mover its held virtio-mem
//!   backend ([`VmBlockMover::with_quiesced`]). Without that, the move is deferred (counted
//!   `deferred_to_quiesce`, not a refusal) and the VM is remembered ([`VmBlockMover::wanted`])
//!   so the caller can retry under quiesce; the caller counts `refused_needs_quiesce` only
//!   for deferred moves whose VM never got that round ([`VmBlockMover::deferred`]).
//!
//! The mover runs under the zone lock during compaction ([`guest_mm::compaction`]), while a
//! VM's plug and unplug take the VM's memory lock (its virtio-mem transport) *then* the zone
//! lock. So every VM lock the mover takes is a bounded `try_lock`: contention refuses the move
//! as busy instead of deadlocking. Under the VM's lock the mover checks that the record still
//! holds the source block (it may have been unplugged since the VMs were listed); a stale
//! entry is refused (`unowned`). See `docs/reclaim.md` ("Moving VM blocks").

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use guest_mm::compaction::{MoveError, Mover};
use guest_mm::frame::{FrameId, NodeId};
use guest_mm::policy::NumaPolicy;

use crate::devices::{BlockRecord, PoolMemoryBackend};
use crate::hostpool::{BLOCK_ORDER, POOL_BLOCK_BYTES};
use crate::memory::{GuestWindow, PoolBlock};
use crate::microvm::{BootBlocks, MemTransport, Microvm};

/// Longest time the mover tries for one VM lock before refusing the move as busy.
const LOCK_PATIENCE: Duration = Duration::from_millis(2);

/// Which record of a VM holds a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRef {
    /// Boot block `i` (guest-physical order).
    Boot(usize),
    /// The plugged block at this guest-physical address.
    Hot(u64),
}

/// One VM's blocks as the mover sees them, listed on the VM's thread
/// ([`VmBlocks::of`]) before a compaction or rebalancing.
#[derive(Debug, Clone)]
pub struct VmBlocks {
    /// The VM id.
    pub id: String,
    /// Its window.
    pub window: Arc<GuestWindow>,
    /// Its boot blocks (shared; repointed in place).
    pub boot: BootBlocks,
    /// Guest-physical address of each boot block.
    pub boot_gpas: Vec<u64>,
    /// Its virtio-mem transport, whose backend holds the hot-plug records.
    pub hot: Option<MemTransport>,
    /// The hot-plug records when listed.
    pub hot_records: Vec<BlockRecord>,
    /// Its NUMA policy.
    pub policy: NumaPolicy,
}

impl VmBlocks {
    /// List `vm`'s blocks (None while the VM is being dropped).
    pub fn of(vm: &Microvm) -> Option<VmBlocks> {
        let window = Arc::clone(vm.vm()?.window());
        let boot_gpas = window
            .layout()
            .boot_ram_ranges()
            .into_iter()
            .flat_map(|r| r.step_by(POOL_BLOCK_BYTES as usize))
            .collect();
        Some(VmBlocks {
            id: vm.id().to_string(),
            window,
            boot: Arc::clone(vm.boot_block_cell()),
            boot_gpas,
            hot: vm.mem_device().cloned(),
            hot_records: vm.with_memory_backend(|b| b.records()).unwrap_or_default(),
            policy: vm.config().policy.clone(),
        })
    }

    /// Whether the block data lives in a pool file (moves copy it, under quiesce).
    pub fn file_backed(&self) -> bool {
        self.window.backing().needs_pool_blocks()
    }

    /// `(frame, order)` of every block, as listed.
    pub fn allocations(&self) -> Vec<(FrameId, u8)> {
        let mut v: Vec<(FrameId, u8)> = lock(&self.boot)
            .iter()
            .map(|(f, _)| (*f, BLOCK_ORDER))
            .collect();
        v.extend(self.hot_records.iter().map(|r| (r.frame, BLOCK_ORDER)));
        v
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `try_lock` for at most [`LOCK_PATIENCE`].
fn try_lock_briefly<T: ?Sized>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    let until = Instant::now() + LOCK_PATIENCE;
    loop {
        match m.try_lock() {
            Ok(g) => return Some(g),
            Err(TryLockError::Poisoned(e)) => return Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => {
                if Instant::now() >= until {
                    return None;
                }
                std::thread::yield_now();
            }
        }
    }
}

/// Counts of block moves by outcome (`moved_repointed`, `moved_copied`, `refused_busy`, ...),
/// shared by every mover of a daemon and shown in `GET /metrics`.
#[derive(Debug, Default)]
pub struct MoveCounters {
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl MoveCounters {
    /// Count one `outcome`.
    pub fn count(&self, outcome: &'static str) {
        self.add(outcome, 1);
    }

    /// Count `n` of `outcome`.
    pub fn add(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            *lock(&self.counts).entry(outcome).or_insert(0) += n;
        }
    }

    /// All counts.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.counts).clone()
    }

    /// The count of `outcome`.
    pub fn get(&self, outcome: &str) -> u64 {
        lock(&self.counts).get(outcome).copied().unwrap_or(0)
    }
}

/// The physical side of a move to another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhysicalMove {
    /// The host has one NUMA node: the pool's nodes are accounting only, there is nothing to
    /// move (counted `cross_node_single_host_node`).
    SingleHostNode,
    /// The host has several nodes: [`GuestWindow::relocate`] binds the block's window range
    /// to the new node with `mbind(MPOL_BIND, MPOL_MF_MOVE)`, which migrates its present pages
    /// (anonymous), or allocates the copy on the new node (pool files); if the pages cannot
    /// move the move is refused (`refused_failed`). Counted `cross_node_pages_moved`.
    Mbind,
}

impl PhysicalMove {
    /// What a cross-node move does on this host.
    pub fn for_host() -> PhysicalMove {
        if crate::memory::numa::HostNuma::get().is_multi_node() {
            PhysicalMove::Mbind
        } else {
            PhysicalMove::SingleHostNode
        }
    }
}

/// The [`Mover`] for VM blocks. Build one per compaction or rebalancing round.
pub struct VmBlockMover<'a> {
    vms: &'a [VmBlocks],
    index: HashMap<FrameId, (usize, BlockRef)>,
    node_of: &'a (dyn Fn(FrameId) -> Option<NodeId> + 'a),
    counters: &'a MoveCounters,
    physical: PhysicalMove,
    quiesced: Option<(usize, Option<&'a mut PoolMemoryBackend>)>,
    wanted: BTreeMap<usize, u64>,
}

impl std::fmt::Debug for VmBlockMover<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBlockMover")
            .field("blocks", &self.index.len())
            .field("quiesced", &self.quiesced.as_ref().map(|q| q.0))
            .finish_non_exhaustive()
    }
}

impl<'a> VmBlockMover<'a> {
    /// A mover for the blocks of `vms`; `node_of` gives a pool frame's node.
    pub fn new(
        vms: &'a [VmBlocks],
        node_of: &'a (dyn Fn(FrameId) -> Option<NodeId> + 'a),
        counters: &'a MoveCounters,
        physical: PhysicalMove,
    ) -> Self {
        let mut index = HashMap::new();
        for (i, vm) in vms.iter().enumerate() {
            for (b, (f, _)) in lock(&vm.boot).iter().enumerate() {
                index.insert(*f, (i, BlockRef::Boot(b)));
            }
            for r in &vm.hot_records {
                index.insert(r.frame, (i, BlockRef::Hot(r.gpa)));
            }
        }
        VmBlockMover {
            vms,
            index,
            node_of,
            counters,
            physical,
            quiesced: None,
            wanted: BTreeMap::new(),
        }
    }

    /// VM `vm` (an index into the list) is quiesced by the caller, who holds its device
    /// transports: `backend` is its virtio-mem backend from the held transport (None without
    /// virtio-mem). Its file-backed blocks can move.
    pub fn with_quiesced(mut self, vm: usize, backend: Option<&'a mut PoolMemoryBackend>) -> Self {
        self.quiesced = Some((vm, backend));
        self
    }

    /// VMs (indices) with file-backed blocks whose moves were deferred for want of a quiesce.
    pub fn wanted(&self) -> Vec<usize> {
        self.wanted.keys().copied().collect()
    }

    /// Moves deferred for want of a quiesce, by VM (index). Each is counted
    /// `deferred_to_quiesce`; whoever runs the rounds decides their final outcome.
    pub fn deferred(&self) -> BTreeMap<usize, u64> {
        self.wanted.clone()
    }

    fn refuse(&self, outcome: &'static str, e: MoveError) -> Result<(), MoveError> {
        self.counters.count(outcome);
        Err(e)
    }

    fn try_move(
        &mut self,
        vi: usize,
        what: BlockRef,
        from: PoolBlock,
        to: PoolBlock,
    ) -> Result<(), MoveError> {
        let (vms, counters) = (self.vms, self.counters);
        let vm = &vms[vi];
        let busy = MoveError::Busy(from.frame);
        let gone = MoveError::Pinned(from.frame);
        let failed = |e: crate::memory::MemoryError| MoveError::Failed {
            frame: from.frame,
            reason: e.to_string(),
        };
        match what {
            BlockRef::Boot(i) => {
                let Some(mut boot) = try_lock_briefly(&vm.boot) else {
                    return self.refuse("refused_busy", busy);
                };
                let Some(gpa) = vm.boot_gpas.get(i).copied() else {
                    return self.refuse("refused_unowned", gone);
                };
                if boot.get(i).map(|b| b.0) != Some(from.frame) {
                    return self.refuse("refused_unowned", gone);
                }
                if let Err(e) = vm.window.relocate(gpa, from, to) {
                    return self.refuse("refused_failed", failed(e));
                }
                boot[i] = (to.frame, to.node);
            }
            BlockRef::Hot(gpa) => {
                let quiesced_here = matches!(&self.quiesced, Some((q, Some(_))) if *q == vi);
                let mut guard = None;
                let backend: &mut PoolMemoryBackend = if quiesced_here {
                    match self.quiesced.as_mut().and_then(|(_, b)| b.as_deref_mut()) {
                        Some(b) => b,
                        None => return self.refuse("refused_unowned", gone),
                    }
                } else {
                    let Some(t) = vm.hot.as_ref() else {
                        return self.refuse("refused_unowned", gone);
                    };
                    match try_lock_briefly(t) {
                        Some(g) => guard.insert(g).device_mut().backend_mut(),
                        None => {
                            counters.count("refused_busy");
                            return Err(busy);
                        }
                    }
                };
                if backend.record(gpa).map(|r| r.frame) != Some(from.frame) {
                    counters.count("refused_unowned");
                    return Err(gone);
                }
                if let Err(e) = vm.window.relocate(gpa, from, to) {
                    counters.count("refused_failed");
                    return Err(failed(e));
                }
                // The record was checked under the same lock, so this cannot miss.
                backend.repoint(gpa, from.frame, to.frame, to.node);
            }
        }
        Ok(())
    }
}

impl Mover for VmBlockMover<'_> {
    fn move_block(&mut self, from: FrameId, to: FrameId, order: u8) -> Result<(), MoveError> {
        let Some(&(vi, what)) = self.index.get(&from).filter(|_| order == BLOCK_ORDER) else {
            // Not a VM block (or not listed: plugged after the VMs were listed).
            return self.refuse("refused_unowned", MoveError::Pinned(from));
        };
        let node = |f| (self.node_of)(f).unwrap_or(NodeId(0));
        let (from_pb, to_pb) = (
            PoolBlock {
                frame: from,
                node: node(from),
            },
            PoolBlock {
                frame: to,
                node: node(to),
            },
        );
        let file = self.vms[vi].file_backed();
        if file && self.quiesced.as_ref().map(|q| q.0) != Some(vi) {
            *self.wanted.entry(vi).or_insert(0) += 1;
            // Not a refusal yet: the VM may get a quiesced round (see `deferred`).
            return self.refuse("deferred_to_quiesce", MoveError::Busy(from));
        }
        self.try_move(vi, what, from_pb, to_pb)?;
        self.index.remove(&from);
        self.index.insert(to, (vi, what));
        self.counters.count(if file {
            "moved_copied"
        } else {
            "moved_repointed"
        });
        if from_pb.node != to_pb.node {
            self.counters.count(match self.physical {
                PhysicalMove::SingleHostNode => "cross_node_single_host_node",
                PhysicalMove::Mbind => "cross_node_pages_moved",
            });
        }
        Ok(())
    }
}
