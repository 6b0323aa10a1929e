//! Typed errors of the zone allocator.

use crate::frame::{FrameId, MigrateType};

/// Why an allocation failed.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum AllocError {
    /// No free block of the requested order in any allowed list.
    #[error("out of memory: no free order-{order} block for {mt}")]
    OutOfMemory {
        /// Requested order.
        order: u8,
        /// Requested migration type.
        mt: MigrateType,
    },
    /// The order is above [`crate::MAX_ORDER`].
    #[error("invalid order {0}")]
    InvalidOrder(u8),
    /// `Isolate` was requested: it is never allocated from.
    #[error("migration type {0} cannot be allocated")]
    InvalidType(MigrateType),
    /// The frame (or part of the block) lies outside the zone.
    #[error("frame {0} is outside the zone")]
    OutOfZone(FrameId),
    /// The frame is not naturally aligned to the order.
    #[error("frame {frame} is not aligned to order {order}")]
    Unaligned {
        /// The frame.
        frame: FrameId,
        /// The order.
        order: u8,
    },
    /// Some frame of the requested block is not free.
    #[error("block at {0} is not entirely free")]
    NotFree(FrameId),
    /// The block lies in an isolated pageblock.
    #[error("block at {0} lies in an isolated pageblock")]
    Isolated(FrameId),
}

/// Why a free (or a split of an allocated block) was refused.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum FreeError {
    /// The order is above [`crate::MAX_ORDER`] or the split target is above the block's order.
    #[error("invalid order {0}")]
    InvalidOrder(u8),
    /// The frame lies outside the zone.
    #[error("frame {0} is outside the zone")]
    OutOfZone(FrameId),
    /// The frame is already free.
    #[error("double free of frame {0}")]
    DoubleFree(FrameId),
    /// The frame is allocated, but with another order.
    #[error("frame {frame} was allocated with order {allocated}, freed with order {given}")]
    WrongOrder {
        /// The frame.
        frame: FrameId,
        /// Order it was allocated with.
        allocated: u8,
        /// Order given to free.
        given: u8,
    },
    /// The frame lies inside an allocated block but is not its head.
    #[error("frame {frame} is a tail of the block at {head}")]
    TailFrame {
        /// The frame.
        frame: FrameId,
        /// Head of the allocated block that contains it.
        head: FrameId,
    },
    /// The block was allocated with another migration type than the one given.
    #[error("frame {frame} was allocated as {allocated}, returned as {given}")]
    WrongType {
        /// The frame.
        frame: FrameId,
        /// Type it was allocated with.
        allocated: MigrateType,
        /// Type given.
        given: MigrateType,
    },
}

/// Why a range operation (isolation) was refused.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum ZoneError {
    /// The range is empty or leaves the zone.
    #[error("range [{start}, +{count}) is empty or outside the zone")]
    OutOfZone {
        /// First frame.
        start: FrameId,
        /// Frames.
        count: u64,
    },
    /// Start or end is neither pageblock aligned nor a zone edge.
    #[error("range [{start}, +{count}) is not pageblock aligned")]
    Unaligned {
        /// First frame.
        start: FrameId,
        /// Frames.
        count: u64,
    },
    /// A pageblock in the range is already isolated.
    #[error("pageblock at {0} is already isolated")]
    AlreadyIsolated(FrameId),
    /// A pageblock in the range is not isolated.
    #[error("pageblock at {0} is not isolated")]
    NotIsolated(FrameId),
    /// An allocated block crosses the range boundary.
    #[error("allocated block at {0} crosses the range boundary")]
    Straddling(FrameId),
    /// The migration type cannot be used here.
    #[error("migration type {0} not allowed here")]
    InvalidType(MigrateType),
}

/// A broken internal invariant found by [`super::Zone::validate`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("zone invariant '{invariant}' broken at {frame:?}: {detail}")]
pub struct ValidateError {
    /// Short name of the invariant.
    pub invariant: &'static str,
    /// The frame where it broke, if one is known.
    pub frame: Option<FrameId>,
    /// Details.
    pub detail: String,
}

impl ValidateError {
    pub(crate) fn new(invariant: &'static str, frame: Option<FrameId>, detail: String) -> Self {
        ValidateError {
            invariant,
            frame,
            detail,
        }
    }
}
