//! # tidepool-balloon: the virtio-balloon device (device ID 5)
//!
//! A [`Balloon`] implements [`tidepool_virtio::VirtioDevice`]. It offers VIRTIO_F_VERSION_1,
//! STATS_VQ, DEFLATE_ON_OOM and REPORTING (free page reporting), plus PAGE_POISON with
//! reporting so that guests with `init_on_free=1` keep reporting, and FREE_PAGE_HINT when
//! configured: host-started hinting passes ([`Balloon::start_hinting`]) whose hints are
//! recorded and counted but never discarded ([`hinting`] says why). MUST_TELL_HOST is not
//! offered.
//!
//! - Inflated pages and reported free blocks are discarded through a [`ReclaimBackend`]:
//!   [`MmapBackend`] does `madvise(MADV_DONTNEED)` on private memory and `PUNCH_HOLE` on shared
//!   memfd memory; [`RecordingBackend`] is the test fake.
//! - Every guest-supplied PFN and range is checked against the VM's RAM; bad input is counted
//!   per kind in [`InputErrors`] and ignored. Nothing outside the VM's RAM is ever discarded.
//! - [`AccountingSnapshot`] gives per-VM figures (assigned, ballooned, reported, resident
//!   estimate, refaulted); [`Balloon::sample_residency`] refines them with `mincore`.
//! - Guest statistics (tags 0-15) arrive through the stats queue; the VMM's timer calls
//!   [`Balloon::request_stats`] every [`Balloon::stats_interval`].
//!
//! Queue numbering follows Linux: inflate 0, deflate 1, then stats if negotiated, then free page
//! hinting if negotiated, then reporting if negotiated ([`queue_roles`]).

pub mod accounting;
pub mod backend;
#[cfg(feature = "bench")]
pub mod bench;
pub mod config;
pub mod device;
pub mod error;
pub mod hinting;
pub mod inflate;
pub mod mmap_backend;
pub mod pageset;
pub mod reporting;
pub mod stats;
#[cfg(any(test, feature = "bench"))]
pub mod testing;

#[cfg(test)]
mod tests;

pub use accounting::{AccountingSnapshot, Counters, InputErrors, Ledger, ResidencySample};
pub use backend::{RamMap, ReclaimBackend, RecordingBackend, ResidencyProbe};
pub use config::{BalloonConfig, ConfigSpace};
pub use device::{queue_roles, Balloon, QueueRole};
pub use error::{BackendError, BalloonError};
pub use hinting::{
    HintMode, HintPassObserver, HintState, HintStatus, PassSummary, ReportOnlyReason,
    VIRTIO_BALLOON_CMD_ID_DONE, VIRTIO_BALLOON_CMD_ID_STOP,
};
pub use mmap_backend::MmapBackend;
pub use stats::{GuestStats, StatTag};

/// virtio device ID of the balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// VIRTIO_F_VERSION_1 feature bit.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Host must be told before pages are reused (not offered).
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
/// Statistics queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// The guest may deflate on OOM without host permission.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Free page hinting (offered when configured; report only, see [`hinting`]).
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
/// The guest tells its page poison value.
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
/// Free page reporting.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// The balloon's page size (`VIRTIO_BALLOON_PFN_SHIFT` = 12).
pub const PAGE_SIZE: u64 = guest_mm::FRAME_SIZE;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// Host huge page size (x86_64 THP).
pub const HUGE_PAGE_SIZE: u64 = 2 * MIB;
/// The Linux driver's probe fails with -ENOSPC below this reporting queue size.
pub const REPORTING_MIN_QUEUE_SIZE: u16 = 32;
