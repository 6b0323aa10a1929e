//! # guest-mm: Tidepool's host memory pool
//!
//! Every byte of guest RAM that Tidepool hands to a microVM comes from this crate's pool: one
//! zone per host NUMA node, each a buddy allocator over 4 KiB frames with Linux-style migration
//! types, pageblock stealing, fragmentation indices, compaction through a `Mover` callback,
//! a THP allocation policy, NUMA policies, a slab allocator for small metadata, and a monitor.
//!
//! The core makes no syscalls and has no KVM dependency. Host operations (populate, discard,
//! huge-page advice, node binding) go through the [`host::HostOps`] trait, which the VMM
//! implements over real mappings and tests implement with [`host::RecordingHost`].
//!
//! See `docs/guest-mm.md` for the design.

pub mod compaction;
pub mod frame;
pub mod host;
pub mod monitor;
pub mod pcp;
pub mod policy;
pub mod pool;
pub mod slab;
pub mod thp;
pub mod topology;
pub mod zone;

pub use compaction::{
    compact_full, compact_until, CompactResult, CompactionStats, MoveError, Mover,
};
pub use frame::{
    FrameId, MigrateType, NodeId, FRAME_SIZE, MAX_ORDER, NR_ORDERS, PAGEBLOCK_ORDER, THP_ORDER,
};
pub use pcp::{CpuCache, PcpConfig};
pub use thp::{alloc_thp, split_thp, ThpOutcome, ThpStats};
pub use zone::{AllocError, FreeError, ValidateError, Zone, ZoneError, ZoneStats};
