//! Ready-made raw images for API clients and tests.

use tidepool_api::types::RawImage;

use crate::memory::{Layout, LayoutConfig, MemoryError};
use crate::tiny_guest::program::TAG_USER;
use crate::tiny_guest::{Privilege, Step, TinyGuestBuilder, TinyGuestError};

/// Errors building an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The layout is invalid.
    #[error(transparent)]
    Layout(#[from] MemoryError),
    /// The tiny guest could not be built.
    #[error(transparent)]
    Build(#[from] TinyGuestError),
}

/// Value the idle guest reports under [`TAG_USER`] once it runs.
pub const IDLE_GUEST_HELLO: u64 = 0x1d1e;

/// A raw image for a VM with `boot_ram_mib` of boot RAM that reports [`IDLE_GUEST_HELLO`]
/// under [`TAG_USER`] and then halts at CPL0 with interrupts off. With the in-kernel irqchip
/// (the API's default) the halt waits inside KVM, so the VM stays running and costs no CPU.
pub fn idle_guest(boot_ram_mib: u64) -> Result<RawImage, ImageError> {
    let layout = Layout::new(LayoutConfig {
        boot_ram: boot_ram_mib.saturating_mul(1 << 20),
        hotplug_size: 0,
    })?;
    let img = TinyGuestBuilder::new(&layout)
        .privilege(Privilege::Kernel)
        .step(Step::Report {
            tag: TAG_USER,
            value: IDLE_GUEST_HELLO,
        })
        .step(Step::Halt)
        .build()?;
    Ok(RawImage {
        path: None,
        inline: Some(img.bytes.clone()),
        load_addr: img.load_addr,
        entry: img.entry(),
    })
}
