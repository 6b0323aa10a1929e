//! What is behind a VM window's placed blocks: the [`Backing`] trait and its three kinds.
//!
//! - [`AnonymousBacking`] (the default): the window's own private anonymous memory, with
//!   `MADV_HUGEPAGE` when THP is asked for. Pool blocks are accounting only; the pages appear
//!   on first touch and go with `MADV_DONTNEED`.
//! - [`FileBacking`] with [`BackingKind::Memfd`]: one memfd per host NUMA node is the pool
//!   file, shared by every VM of the daemon ([`PoolFiles`]). A pool block's file offset is its
//!   first frame number times 4 KiB ([`PoolBlock::file_offset`]). Placing a block maps the file
//!   at that offset into the window (`mmap(MAP_SHARED | MAP_FIXED)`); discarding punches a hole
//!   (`fallocate(PUNCH_HOLE)`: `MADV_DONTNEED` frees nothing on a shared mapping); removing
//!   maps `PROT_NONE` anonymous memory over the range and *then* punches the hole, before the
//!   caller returns the block to the pool.
//! - [`FileBacking`] with [`BackingKind::Hugetlbfs`]: the same over a `MFD_HUGETLB` memfd
//!   (2 MiB hugetlbfs pages). Each block's huge page is allocated up front with `fallocate`
//!   when it is placed, so a host without free huge pages gives a typed
//!   [`MemoryError::HugePages`] instead of a `SIGBUS` on first touch.
//!
//! See `docs/memory-window.md` for the isolation argument and the measured costs.

use guest_mm::frame::{FrameId, NodeId};

use super::layout::BLOCK_SIZE;
use super::numa::{self, HostNuma};
use super::MemoryError;

/// The kinds of backing a VM's RAM can have.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BackingKind {
    /// The window's private anonymous memory (default).
    #[default]
    Anonymous,
    /// Per-node memfd pool files, blocks mapped shared into the window.
    Memfd,
    /// Per-node `MFD_HUGETLB` memfd pool files (2 MiB hugetlbfs pages, reserved per block).
    Hugetlbfs,
}

impl BackingKind {
    /// Lower-case name, as the API spells it.
    pub fn name(self) -> &'static str {
        match self {
            BackingKind::Anonymous => "anonymous",
            BackingKind::Memfd => "memfd",
            BackingKind::Hugetlbfs => "hugetlbfs",
        }
    }
}

/// A backing kind with its THP wish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackingSpec {
    /// The kind.
    pub kind: BackingKind,
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`). For memfd this only has an effect when
    /// the host's `shmem_enabled` is `advise` (or `always`/`within_size`); it is `never` here by
    /// default. Not allowed with hugetlbfs, whose pages are huge already.
    pub thp: bool,
}

impl Default for BackingSpec {
    fn default() -> Self {
        BackingSpec {
            kind: BackingKind::Anonymous,
            thp: true,
        }
    }
}

impl BackingSpec {
    /// Refuse combinations that make no sense.
    pub fn validate(&self) -> Result<(), MemoryError> {
        if self.kind == BackingKind::Hugetlbfs && self.thp {
            return Err(MemoryError::Unsupported(
                "hugetlbfs backing with THP: hugetlbfs pages are huge pages already".into(),
            ));
        }
        Ok(())
    }
}

/// A 2 MiB pool block behind a window block: the pool frame and the node it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolBlock {
    /// First frame of the block (2 MiB aligned).
    pub frame: FrameId,
    /// Node of the pool the block belongs to (selects the node's pool file).
    pub node: NodeId,
}

impl PoolBlock {
    /// Offset of the block in its node's pool file: frame number times 4 KiB. Frame numbers are
    /// unique in a pool, so no two blocks share an offset.
    pub fn file_offset(&self) -> Result<u64, MemoryError> {
        let off = self
            .frame
            .0
            .checked_mul(guest_mm::FRAME_SIZE)
            .ok_or(MemoryError::BadPoolBlock(self.frame))?;
        if off % BLOCK_SIZE != 0 || off > i64::MAX as u64 - BLOCK_SIZE {
            return Err(MemoryError::BadPoolBlock(self.frame));
        }
        Ok(off)
    }
}

/// How a window's blocks are backed. The window calls these with host ranges inside its own
/// mapping, 2 MiB aligned for `place`/`remove` (4 KiB for `discard`), under its lock.
pub trait Backing: Send + Sync + std::fmt::Debug {
    /// Kind and THP wish.
    fn spec(&self) -> BackingSpec;

    /// Whether placing needs the pool blocks (file offsets) behind each 2 MiB block.
    fn needs_pool_blocks(&self) -> bool {
        self.spec().kind != BackingKind::Anonymous
    }

    /// Called once on the fresh `PROT_NONE` reservation of the whole window.
    fn prepare(&self, addr: usize, len: usize) -> Result<(), MemoryError> {
        let advice = if self.spec().thp {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        madvise(addr, len, advice, "madvise(MADV_(NO)HUGEPAGE)")?;
        madvise(addr, len, libc::MADV_DONTDUMP, "madvise(MADV_DONTDUMP)")
    }

    /// Make `[addr, addr+len)` read-write, backed by `blocks` (one per 2 MiB, in order; empty
    /// for the anonymous backing). It reads as zeros until written. On error nothing stays
    /// placed.
    fn place(&self, addr: usize, len: usize, blocks: &[PoolBlock]) -> Result<(), MemoryError>;

    /// Make `[addr, addr+len)` inaccessible and drop its content, so the pool blocks behind it
    /// can go to another VM: after this returns `Ok`, no page of the range is reachable through
    /// this window and the blocks' content reads as zeros to their next user.
    fn remove(&self, addr: usize, len: usize, blocks: &[PoolBlock]) -> Result<(), MemoryError>;

    /// Drop the host pages behind `[addr, addr+len)` while it stays placed (balloon and free
    /// page reporting): the next touch reads zeros. `at` is the pool block holding the range
    /// and the range's offset in it (None for the anonymous backing); the range never crosses
    /// a 2 MiB block.
    fn discard(
        &self,
        addr: usize,
        len: usize,
        at: Option<(PoolBlock, u64)>,
    ) -> Result<(), MemoryError>;

    /// The host page size discards should be aligned to for whole pages to go back (None: no
    /// huge pages expected).
    fn huge_page_size(&self) -> Option<u64>;

    /// Move the placed 2 MiB block at `addr` from pool block `from` to `to` (compaction, NUMA
    /// rebalancing): copy its data to `to`'s file offset, map `to` over the range, then punch
    /// `from`, so that when this returns `Ok` no window maps `from` and it reads as zeros. The
    /// caller keeps every writer of the block (vCPUs, device models) stopped meanwhile. On an
    /// error the range still maps `from` with its data, and `to` holds nothing. The anonymous
    /// backing overrides this: its data lives in the window, so only a cross-node move on a
    /// multi-node host has work to do (the pages migrate, `mbind` with `MPOL_MF_MOVE`). This
    /// default refuses.
    fn relocate(&self, addr: usize, from: PoolBlock, to: PoolBlock) -> Result<(), MemoryError> {
        let _ = (addr, from, to);
        Err(MemoryError::Unsupported(format!(
            "relocating a block of the {} backing",
            self.spec().kind.name()
        )))
    }
}

pub(crate) fn madvise(
    addr: usize,
    len: usize,
    advice: i32,
    call: &'static str,
) -> Result<(), MemoryError> {
    // SAFETY: callers pass a range inside a window mapping they own; madvise changes no Rust
    // object (guest memory is only reached through volatile accessors or KVM).
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    if rc != 0 {
        return Err(MemoryError::last_os(call));
    }
    Ok(())
}

pub(crate) fn mprotect(addr: usize, len: usize, prot: i32) -> Result<(), MemoryError> {
    // SAFETY: callers pass a range inside a window mapping they own; no Rust reference points
    // into guest memory.
    let rc = unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) };
    if rc != 0 {
        return Err(MemoryError::last_os("mprotect"));
    }
    Ok(())
}

/// The anonymous backing: the window's own private memory.
#[derive(Debug, Clone, Copy)]
pub struct AnonymousBacking {
    thp: bool,
}

impl AnonymousBacking {
    /// An anonymous backing, with `MADV_HUGEPAGE` when `thp` (else `MADV_NOHUGEPAGE`).
    pub fn new(thp: bool) -> AnonymousBacking {
        AnonymousBacking { thp }
    }
}

impl Backing for AnonymousBacking {
    fn spec(&self) -> BackingSpec {
        BackingSpec {
            kind: BackingKind::Anonymous,
            thp: self.thp,
        }
    }

    fn place(&self, addr: usize, len: usize, blocks: &[PoolBlock]) -> Result<(), MemoryError> {
        mprotect(addr, len, libc::PROT_READ | libc::PROT_WRITE)?;
        let mut r = Ok(());
        if self.thp {
            r = madvise(addr, len, libc::MADV_HUGEPAGE, "madvise(MADV_HUGEPAGE)");
        }
        // Before anything touches the range: its pages will come from the blocks' nodes.
        if r.is_ok() && HostNuma::get().is_multi_node() {
            r = bind_blocks(addr, len, blocks);
        }
        if let Err(e) = r {
            let _ = mprotect(addr, len, libc::PROT_NONE);
            return Err(e);
        }
        Ok(())
    }

    fn remove(&self, addr: usize, len: usize, blocks: &[PoolBlock]) -> Result<(), MemoryError> {
        // PROT_NONE first: nothing can fault pages back in (KVM's mappings go through the MMU
        // notifier); then the private pages are freed at once.
        mprotect(addr, len, libc::PROT_NONE)?;
        madvise(addr, len, libc::MADV_DONTNEED, "madvise(MADV_DONTNEED)")?;
        if !blocks.is_empty() && HostNuma::get().is_multi_node() {
            // The removed range holds no page; dropping its binding lets it merge with the
            // rest of the reservation again. Failing here costs a VMA, not correctness: the
            // next place binds the range anew.
            if let Err(e) = numa::reset_range(addr, len) {
                tracing::warn!(error = %e, "resetting the NUMA policy of a removed range");
            }
        }
        Ok(())
    }

    fn discard(
        &self,
        addr: usize,
        len: usize,
        _at: Option<(PoolBlock, u64)>,
    ) -> Result<(), MemoryError> {
        madvise(addr, len, libc::MADV_DONTNEED, "madvise(MADV_DONTNEED)")
    }

    /// The data stays in the window. On a multi-node host a move to another node binds the
    /// range to `to`'s node and migrates the pages already there (`MPOL_MF_MOVE |
    /// MPOL_MF_STRICT`: [`numa::NumaError::NotMoved`] if some could not move; the binding is
    /// then already `to`'s). Otherwise there is nothing to do.
    fn relocate(&self, addr: usize, from: PoolBlock, to: PoolBlock) -> Result<(), MemoryError> {
        if from.node != to.node && HostNuma::get().is_multi_node() {
            numa::bind_range(addr, BLOCK_SIZE as usize, to.node, true)?;
        }
        Ok(())
    }

    fn huge_page_size(&self) -> Option<u64> {
        self.thp.then_some(BLOCK_SIZE)
    }
}

/// Bind `[addr, addr+len)` to the nodes of `blocks` (one per 2 MiB, in order; each run of
/// blocks from one node is one `mbind`). Nothing to do for an empty slice (no pool blocks
/// given: the range keeps the process's policy).
pub(crate) fn bind_blocks(
    addr: usize,
    len: usize,
    blocks: &[PoolBlock],
) -> Result<(), MemoryError> {
    if blocks.is_empty() {
        return Ok(());
    }
    if blocks.len() as u64 * BLOCK_SIZE != len as u64 {
        return Err(MemoryError::PoolBlocks {
            expected: len as u64 / BLOCK_SIZE,
            got: blocks.len() as u64,
        });
    }
    let step = BLOCK_SIZE as usize;
    let mut i = 0;
    while i < blocks.len() {
        let node = blocks[i].node;
        let n = blocks[i..].iter().take_while(|b| b.node == node).count();
        numa::bind_range(addr + i * step, n * step, node, false)?;
        i += n;
    }
    Ok(())
}

pub use super::file_backing::{shmem_thp_enabled, FileBacking, PoolFile, PoolFiles, SHMEM_ENABLED};
