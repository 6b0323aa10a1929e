//! # tidepool-hotplug
//!
//! Memory hot(un)plug for Tidepool guests: the virtio-mem device ([`virtio_mem`]), which plugs
//! and unplugs blocks of a guest-physical region at the guest driver's request, backed by the
//! host memory pool through a [`virtio_mem::MemoryBackend`].

pub mod virtio_mem;

pub use virtio_mem::{
    BackendError, ConfigError, ControlSnapshot, HotplugError, MemControl, MemStatus, MemoryBackend,
    ResizeError, VirtioMem, VirtioMemConfig, VirtioMemCounters,
};
