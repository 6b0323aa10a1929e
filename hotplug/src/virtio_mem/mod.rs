//! The virtio-mem device (virtio 1.2, section 5.15; device ID 24).
//!
//! A region of guest-physical address space past boot RAM, cut into blocks the guest driver
//! plugs and unplugs one request at a time. The host asks for a size through
//! `requested_size` ([`VirtioMem::request_size`]); the driver then plugs or unplugs blocks to
//! match it. Each plug or unplug goes through a [`MemoryBackend`], which the VMM implements by
//! mapping pool memory into the VM (plug) or unmapping, discarding and returning it (unplug).
//!
//! - [`request`]: the wire format (24-byte requests, 10-byte responses), parsed with bounds checks.
//! - [`state`]: the per-block plugged bitmap and the region's sizes.
//! - [`device`]: the [`tidepool_virtio::VirtioDevice`] implementation.
//! - [`control`]: the host's handle ([`MemControl`]): resize and read the figures without
//!   the device's lock, which the VMM's device thread holds while it plugs.
//!
//! Answers follow the spec and what Linux's driver does with them: ERROR only for malformed
//! requests (the driver marks the device broken), NACK for a plug beyond `requested_size` (the
//! driver re-reads the config and retries at once), BUSY when the host cannot serve a valid
//! request right now (the driver retries on a backoff timer).

pub mod control;
pub mod device;
pub mod request;
pub mod state;

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod pool_tests;
#[cfg(test)]
mod stale_map_tests;
#[cfg(any(test, feature = "testing"))]
pub mod test_utils;
#[cfg(test)]
mod tests;

pub use control::{ControlSnapshot, MemControl};
pub use device::{MemStatus, VirtioMem, VirtioMemCounters};
pub use request::{BlockRangeState, Request, RequestError, Response, ResponseType};
pub use state::{BlockState, RangeError};

/// virtio device ID of the memory device.
pub const VIRTIO_ID_MEM: u32 = 24;

/// Feature bit: `node_id` is valid and is an ACPI proximity domain.
pub const VIRTIO_MEM_F_ACPI_PXM: u32 = 0;
/// Feature bit: the driver must not access unplugged memory.
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u32 = 1;
/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Size of the device configuration space.
pub const CONFIG_SIZE: usize = 56;
/// The device's only queue (guest requests).
pub const QUEUE_SIZE: u16 = 128;

/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// Default block size: 2 MiB, one THP.
pub const DEFAULT_BLOCK_SIZE: u64 = 2 * MIB;
/// Smallest block size accepted (x86_64 Linux uses sub-blocks of at least 2 MiB anyway).
pub const MIN_BLOCK_SIZE: u64 = 2 * MIB;
/// Largest block size accepted: one Linux memory block on x86_64.
pub const MAX_BLOCK_SIZE: u64 = 128 * MIB;
/// The region's start and size must be multiples of this: one Linux memory block on x86_64
/// (while boot RAM ends below 64 GiB).
pub const REGION_ALIGN: u64 = 128 * MIB;
/// How far the usable region reaches past `requested_size`, so the driver can choose blocks
/// (two Linux memory blocks). Capped at the region's end.
pub const USABLE_EXTENT: u64 = 2 * REGION_ALIGN;

/// Static configuration of a virtio-mem device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMemConfig {
    /// Guest-physical start of the region (128 MiB aligned, past boot RAM).
    pub addr: u64,
    /// Region size in bytes (128 MiB multiple): the most that can be plugged.
    pub region_size: u64,
    /// Block size: a power of two from 2 MiB to 128 MiB.
    pub block_size: u64,
    /// NUMA node (ACPI proximity domain) of the region; offers VIRTIO_MEM_F_ACPI_PXM.
    pub node_id: Option<u16>,
    /// Boot RAM in bytes: the floor for [`VirtioMem::set_requested_total`].
    pub boot_ram: u64,
    /// `requested_size` at power-on (the driver plugs it while probing).
    pub initial_requested: u64,
}

impl VirtioMemConfig {
    /// A region at `addr` of `region_size` bytes with 2 MiB blocks, no NUMA node, nothing
    /// requested.
    pub fn new(addr: u64, region_size: u64, boot_ram: u64) -> Self {
        VirtioMemConfig {
            addr,
            region_size,
            block_size: DEFAULT_BLOCK_SIZE,
            node_id: None,
            boot_ram,
            initial_requested: 0,
        }
    }

    /// Check every rule; the device is only built from a valid config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(ConfigError::BlockSize(bs));
        }
        if self.addr % REGION_ALIGN != 0 {
            return Err(ConfigError::AddrAlign(self.addr));
        }
        if self.region_size == 0 || self.region_size % REGION_ALIGN != 0 {
            return Err(ConfigError::RegionSize(self.region_size));
        }
        self.addr
            .checked_add(self.region_size)
            .ok_or(ConfigError::Overflow)?;
        // One bit per block, addressed by a usize.
        usize::try_from(self.region_size / bs).map_err(|_| ConfigError::Overflow)?;
        if self.boot_ram > self.addr {
            return Err(ConfigError::OverlapsBootRam {
                addr: self.addr,
                boot_ram: self.boot_ram,
            });
        }
        self.boot_ram
            .checked_add(self.region_size)
            .ok_or(ConfigError::Overflow)?;
        if self.initial_requested > self.region_size || self.initial_requested % bs != 0 {
            return Err(ConfigError::InitialRequested(self.initial_requested));
        }
        Ok(())
    }
}

/// An invalid [`VirtioMemConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Block size not a power of two in 2 MiB ..= 128 MiB.
    #[error("block size {0:#x} must be a power of two between 2 MiB and 128 MiB")]
    BlockSize(u64),
    /// Region start not 128 MiB aligned.
    #[error("region address {0:#x} is not 128 MiB aligned")]
    AddrAlign(u64),
    /// Region size zero or not a 128 MiB multiple.
    #[error("region size {0:#x} must be a non-zero multiple of 128 MiB")]
    RegionSize(u64),
    /// The region would overlap boot RAM (which Tidepool maps from 0 up).
    #[error("region at {addr:#x} overlaps boot RAM ending at {boot_ram:#x}")]
    OverlapsBootRam {
        /// Region start.
        addr: u64,
        /// Boot RAM size.
        boot_ram: u64,
    },
    /// Address arithmetic overflows.
    #[error("region end or block count overflows")]
    Overflow,
    /// Initial request above the region or not block aligned.
    #[error("initial requested size {0:#x} must be a block multiple within the region")]
    InitialRequested(u64),
}

/// Why the host refused a resize.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    /// The guest has not activated the device (no driver, or driver not loaded yet): a
    /// request would sit unanswered.
    #[error("the guest's virtio-mem driver is not ready")]
    DriverNotReady,
    /// Total below boot RAM: boot RAM cannot be unplugged.
    #[error("total {total:#x} is below boot RAM {boot_ram:#x}")]
    BelowBootRam {
        /// Requested total.
        total: u64,
        /// Boot RAM.
        boot_ram: u64,
    },
    /// Above what the region can hold.
    #[error("{requested:#x} exceeds the maximum {max:#x}")]
    AboveMaximum {
        /// What was asked.
        requested: u64,
        /// The largest accepted value.
        max: u64,
    },
    /// The new size is recorded, but the config-change interrupt could not be raised.
    #[error("size recorded, but the guest could not be notified: {0}")]
    Notify(String),
    /// Not a multiple of the block size.
    #[error("{bytes:#x} is not a multiple of the block size {block_size:#x}")]
    Unaligned {
        /// The hot-plugged part asked for (for a total: the total minus boot RAM).
        bytes: u64,
        /// The device's block size.
        block_size: u64,
    },
}

/// Error of a [`MemoryBackend`] operation. The device leaves its block state unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The host pool has no memory for this now; the guest is told BUSY and retries later.
    #[error("host memory pool exhausted")]
    OutOfMemory,
    /// The host cannot do it right now (e.g. a migration is running); BUSY as well.
    #[error("host busy")]
    Busy,
    /// A failure that retrying will not fix (mapping failed, invariant broken).
    #[error("host memory operation failed: {0}")]
    Failed(String),
}

/// The host side of plugging: the device calls it for every range it (un)plugs, with ranges
/// already checked to lie inside the device's region and to be block aligned.
pub trait MemoryBackend {
    /// Back `[gpa, gpa + len)` with host memory and make it accessible to the guest.
    fn plug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError>;
    /// Make `[gpa, gpa + len)` inaccessible to the guest, then discard and release its host
    /// memory (unmap first: frames must not return to the pool while the guest can reach them).
    fn unplug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError>;
}

/// Error of a host-side operation on the device as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HotplugError {
    /// The backend failed to unplug a range during a system reset; those blocks stay plugged.
    #[error("unplugging [{gpa:#x}, +{len:#x}) failed: {source}")]
    Unplug {
        /// Range start.
        gpa: u64,
        /// Range length.
        len: u64,
        /// The backend's error.
        source: BackendError,
    },
}
