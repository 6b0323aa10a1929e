//! Ready-made raw images for API clients and tests.

use tidepool_api::types::{ImagePrivilege, RawImage};

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
///
/// It is the one built-in image entered at CPL0: `hlt` is privileged (at CPL3 it would fault
/// the VM), and the three instructions before it cost nothing even where CPL0 is emulated.
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
        privilege: ImagePrivilege::Kernel,
    })
}

/// Longest idle wait of [`virtio_mem_guest`]'s driver, in microseconds. A resize wakes it at
/// once; the limit only bounds how late it sees a change nothing woke it for.
pub const VIRTIO_MEM_GUEST_IDLE_WAIT_US: u32 = 50_000;

/// A raw image for a VM with `boot_ram_mib` of boot RAM and a `region_mib` hot-plug region
/// whose guest runs the tiny guest's polled virtio-mem driver against the VM's first device
/// window ([`crate::devices::DEVICE_MMIO_BASE`], where a VM with `hotplug` puts virtio-mem):
/// it plugs and unplugs to follow every resize, writing and checking the memory it plugs.
///
/// It runs at CPL3, natively even where KVM emulates CPL0 code (nested hosts such as this
/// project's CI machine), and idles with guest wait requests
/// ([`crate::tiny_guest::program::TAG_WAIT`]) instead of spinning: an idle VM of this image
/// holds no host CPU, and a resize wakes its driver at once.
pub fn virtio_mem_guest(boot_ram_mib: u64, region_mib: u64) -> Result<RawImage, ImageError> {
    virtio_mem_guest_with(boot_ram_mib, region_mib, true)
}

/// [`virtio_mem_guest`], choosing whether the driver writes and checks every page it plugs
/// (`touch_plugged`) or, like a Linux guest onlining memory, leaves it untouched (the host
/// then faults nothing in for it).
pub fn virtio_mem_guest_with(
    boot_ram_mib: u64,
    region_mib: u64,
    touch_plugged: bool,
) -> Result<RawImage, ImageError> {
    use crate::tiny_guest::virtio_mem_driver::{virtio_mem_program, VirtioMemDriver};
    use crate::tiny_guest::virtq::DEFAULT_SCRATCH;
    let layout = Layout::new(LayoutConfig {
        boot_ram: boot_ram_mib.saturating_mul(1 << 20),
        hotplug_size: region_mib.saturating_mul(1 << 20),
    })?;
    let mut driver = VirtioMemDriver::new(crate::devices::DEVICE_MMIO_BASE, DEFAULT_SCRATCH);
    driver.idle_wait_us = VIRTIO_MEM_GUEST_IDLE_WAIT_US;
    // The used ring is polled between waits of at most 1 ms that the device's interrupt
    // ends: a minute of unanswered waits means the queue is stalled.
    driver.poll_limit = 60_000;
    driver.blocks_per_request = 4;
    driver.touch_plugged = touch_plugged;
    let img = virtio_mem_program(&layout, driver)?;
    Ok(RawImage {
        path: None,
        inline: Some(img.bytes.clone()),
        load_addr: img.load_addr,
        entry: img.entry(),
        privilege: match img.boot.privilege {
            Privilege::Kernel => ImagePrivilege::Kernel,
            Privilege::User => ImagePrivilege::User,
        },
    })
}
