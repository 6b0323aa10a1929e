//! The per-VM guest memory window: one private, contiguous host virtual reservation covering
//! the VM's whole guest-physical layout, into which 2 MiB-aligned blocks are placed (made
//! accessible) and from which they are removed (discarded and made inaccessible).
//!
//! See `docs/memory-window.md` for the isolation argument, the few-memslots property and huge
//! pages.

pub mod backing;
#[cfg(test)]
mod backing_tests;
mod file_backing;
pub mod layout;
pub mod numa;
pub mod tuning;
pub mod window;

pub use backing::{
    AnonymousBacking, Backing, BackingKind, BackingSpec, FileBacking, PoolBlock, PoolFile,
    PoolFiles,
};
pub use layout::{
    E820Entry, E820Kind, Layout, LayoutConfig, MemslotSpec, Region, RegionKind, BLOCK_SIZE, GIB,
    MEMSLOT_SIZE, MIB, MMIO_HOLE_END, MMIO_HOLE_START,
};
pub use window::{BlockObserver, GuestWindow, WindowMemory};

/// Errors from the memory layout and the window.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A size is zero or not a multiple of the required alignment.
    #[error("{what} size {size:#x} must be a non-zero multiple of {align:#x}")]
    BadSize {
        /// Which size.
        what: &'static str,
        /// The size given.
        size: u64,
        /// Required alignment.
        align: u64,
    },
    /// The layout would end above the supported guest-physical space.
    #[error("guest-physical layout ends at {end:#x}, above the supported {max:#x}")]
    TooLarge {
        /// Where the layout would end.
        end: u64,
        /// The limit.
        max: u64,
    },
    /// A block is not 2 MiB aligned or is empty.
    #[error("block [{gpa:#x}, +{len:#x}) is not a non-empty 2 MiB-aligned range")]
    Unaligned {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A block does not lie inside one RAM-capable region of the layout.
    #[error("block [{gpa:#x}, +{len:#x}) is not inside boot RAM or the hot-plug region")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Part of the block is already placed.
    #[error("block [{gpa:#x}, +{len:#x}) is already (partly) placed")]
    AlreadyPlaced {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Part of the block is not placed.
    #[error("block [{gpa:#x}, +{len:#x}) is not (fully) placed")]
    NotPlaced {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A host memory-management call failed.
    #[error("{call} failed: {source}")]
    Host {
        /// The call (mmap, mprotect, madvise, mincore, ...).
        call: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The host's address space is too small for the window (32-bit host, or usize overflow).
    #[error("window of {0:#x} bytes does not fit the host address space")]
    HostAddressSpace(u64),
    /// vm-memory refused the regions built over the window.
    #[error("building the vm-memory view failed: {0}")]
    GuestMemory(String),
    /// The backing cannot do this (or this combination is not offered).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A file backing was given the wrong number of pool blocks for a range.
    #[error("a file-backed range of {expected} block(s) was given {got} pool block(s)")]
    PoolBlocks {
        /// Blocks in the range.
        expected: u64,
        /// Pool blocks given.
        got: u64,
    },
    /// A pool block's frame does not give a 2 MiB-aligned file offset.
    #[error("pool block at frame {0} has no valid file offset")]
    BadPoolBlock(guest_mm::frame::FrameId),
    /// A NUMA placement call (mbind, set_mempolicy) failed.
    #[error("NUMA placement: {0}")]
    Numa(#[from] numa::NumaError),
    /// The host has no free hugetlbfs pages for a block (`vm.nr_hugepages` too small).
    #[error(
        "no hugetlbfs pages for {bytes:#x} bytes (reserve more with vm.nr_hugepages): {source}"
    )]
    HugePages {
        /// Bytes asked for.
        bytes: u64,
        /// The OS error (ENOSPC or ENOMEM).
        #[source]
        source: std::io::Error,
    },
}

impl MemoryError {
    pub(crate) fn last_os(call: &'static str) -> MemoryError {
        MemoryError::Host {
            call,
            source: std::io::Error::last_os_error(),
        }
    }
}
