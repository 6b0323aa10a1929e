//! VMM swap: guest pages written to a host swap file and faulted back in with userfaultfd.
//!
//! * [`SwapFile`]: a file of 4 KiB slots shared by the VMs of a daemon, with clustered writes
//!   (a contiguous run of guest pages goes to contiguous slots in one `pwrite`), reads for
//!   swap-in, congestion back-off (EWMA of write latency against a baseline) and counters.
//!   `O_DIRECT` by default, so written pages never sit in the host page cache.
//! * [`VmSwap`]: one VM's swap state over its [`GuestWindow`](crate::memory::GuestWindow): a
//!   per-4 KiB page state, [`VmSwap::swap_out`] (write cold pages, then discard them),
//!   [`VmSwap::drop_clean`] (discard pages whose slot copy is still current, without I/O), and a
//!   handler thread that resolves userfaultfd faults (vCPUs through KVM and VMM threads alike)
//!   with `UFFDIO_COPY` from the slot.
//! * Hint epochs ([`VmSwap::hint_arm`], [`VmSwap::hint_discard`]): the same write protection
//!   lets the balloon's free page hints be discarded safely (only pages not written since the
//!   epoch began; see `docs/balloon.md`).
//!
//! Write tracking uses userfaultfd write-protect, not KVM's dirty log: a page with a valid slot
//! copy is mapped write-protected, so the first write to it, whether by a vCPU (KVM's
//! `get_user_pages` for write) or by a VMM thread (a device model writing a used ring), stops in
//! the handler, which drops the slot before letting the write through. The same protection
//! closes the race between write-out and discard. The safety argument is in `docs/swap.md`.
//!
//! When a swap-in fails (I/O error, truncated file) the handler never maps zeros: it makes the
//! faulting page inaccessible and wakes the faulting thread, so a vCPU's `KVM_RUN` fails with
//! `EFAULT` (the VM stops with a typed [`VcpuError::Run`](crate::kvm::VcpuError)), and the first
//! failure is kept in [`VmSwap::failure`].

mod congestion;
mod file;
pub mod guard;
mod handler;
mod hint;
mod hook;
mod pages;
mod slots;
pub mod uffd;
mod vm;

#[cfg(test)]
mod guard_tests;
#[cfg(test)]
mod hint_tests;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use congestion::{Advice, CongestionConfig};
pub use file::{AlignedBuf, IoMode, SwapFile, SwapFileConfig, SwapFileCounters, MAX_SLOTS};
pub use hint::{HintArmStats, HintDiscardStats, HintEpoch};
pub use slots::Slot;
pub use vm::{SwapInFailure, SwapOutStats, VmSwap, VmSwapCounters};

/// Swap page size (the host base page).
pub const PAGE: u64 = 4096;

/// Errors of the swap layer.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// Creating or opening the swap file failed.
    #[error("swap file {path:?}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A bad argument or configuration.
    #[error("swap: {0}")]
    Config(String),
    /// A range is not 4 KiB aligned or leaves the window.
    #[error("range [{start:#x}, {end:#x}) is not a 4 KiB-aligned range inside the window")]
    Range {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// No free slot is left in the swap file.
    #[error("swap file is full")]
    Full,
    /// Writing slots failed.
    #[error("writing swap slot {slot}: {source}")]
    Write {
        /// First slot of the write.
        slot: Slot,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading slots failed.
    #[error("reading swap slot {slot}: {source}")]
    Read {
        /// First slot of the read.
        slot: Slot,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file ended before the slot (it was truncated).
    #[error("swap slot {slot}: read {got} of {want} bytes (file truncated?)")]
    ShortRead {
        /// First slot of the read.
        slot: Slot,
        /// Bytes read.
        got: u64,
        /// Bytes wanted.
        want: u64,
    },
    /// A userfaultfd or memory-management call failed.
    #[error("{call} failed: {source}")]
    Host {
        /// The call.
        call: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VM's swap was shut down (the VM is being deleted).
    #[error("swap for this VM is shut down")]
    Closed,
    /// Hinted ranges were offered under a hint epoch that is no longer current (the RAM was
    /// armed again since): they may come from a pass that began before the current epoch, so
    /// they are not discarded.
    #[error("hint epoch {given} is not the current one ({current})")]
    StaleHintEpoch {
        /// The epoch given.
        given: u64,
        /// The current epoch.
        current: u64,
    },
    /// The VM's memory backing cannot be swapped (only the anonymous backing can: discarding
    /// a shared memfd mapping frees nothing, and hugetlbfs pages are not split).
    #[error("swap is unsupported for the {0} backing (anonymous only)")]
    Unsupported(&'static str),
}

impl SwapError {
    pub(crate) fn host(call: &'static str, source: std::io::Error) -> SwapError {
        SwapError::Host { call, source }
    }
}
