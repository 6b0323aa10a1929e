//! Error types of the balloon crate.

/// Errors returned to the VMM by the balloon's host-facing API.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BalloonError {
    /// The configuration is invalid.
    #[error("invalid balloon configuration: {0}")]
    InvalidConfig(String),
    /// The balloon target is larger than the guest RAM the balloon covers.
    #[error("balloon target of {target_mib} MiB exceeds the {ram_mib} MiB of guest RAM")]
    TargetTooLarge {
        /// Requested target.
        target_mib: u64,
        /// Guest RAM covered by the balloon.
        ram_mib: u64,
    },
    /// The device is not activated (the guest driver has not set DRIVER_OK).
    #[error("balloon device is not activated")]
    NotActivated,
    /// Statistics were not configured or the guest did not negotiate STATS_VQ.
    #[error("balloon statistics are not enabled or not negotiated by the guest")]
    StatsDisabled,
    /// Free page hinting was not configured or the guest did not negotiate FREE_PAGE_HINT.
    #[error("free page hinting is not enabled or not negotiated by the guest")]
    HintingDisabled,
    /// A hinting pass is already requested, running or stopping.
    #[error("a free page hinting pass (command id {cmd_id}) is still in progress")]
    HintingBusy {
        /// The pass in progress.
        cmd_id: u32,
    },
    /// Raising an interrupt failed.
    #[error("failed to signal the guest: {0}")]
    Interrupt(String),
    /// Returning a buffer to the guest failed (the queue is broken).
    #[error("queue error: {0}")]
    Queue(String),
}

/// Error of a host-side backend operation (discard, residency probe).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// The range is not (entirely) guest RAM owned by this backend.
    #[error("range {gpa:#x}+{len:#x} is not guest RAM owned by this VM")]
    NotGuestRam {
        /// Guest physical address.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The range is not 4 KiB aligned.
    #[error("range {gpa:#x}+{len:#x} is not 4 KiB aligned")]
    Misaligned {
        /// Guest physical address.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A system call failed.
    #[error("{op} failed on {gpa:#x}+{len:#x}: {errno}")]
    Os {
        /// The operation (`madvise`, `fallocate`, `mincore`, `mmap`).
        op: &'static str,
        /// Guest physical address (0 when not applicable).
        gpa: u64,
        /// Length in bytes.
        len: u64,
        /// The OS error.
        errno: String,
    },
    /// A region of the guest memory map cannot be used by this backend.
    #[error("unsupported guest memory region: {0}")]
    Unsupported(String),
    /// A failure injected by a test backend.
    #[error("injected failure: {0}")]
    Injected(String),
}
