//! Booting a stock Linux kernel: load it (ELF `vmlinux` or `bzImage`, with linux-loader), the
//! initrd, the command line, the ACPI tables and the boot parameters into guest memory
//! ([`load_linux`]), then set up each vCPU's registers, MSRs, FPU and local APIC
//! ([`setup_vcpu`]). [`run`] is the one-shot runner behind `tidepool run`.
//!
//! Guest-physical layout below 1 MiB (all inside the e820 RAM `[0, 0x9fc00)` or the reserved
//! BIOS area):
//!
//! | address | what |
//! |---|---|
//! | 0x0500 | boot GDT (null, null, code 0x10, data 0x18, TSS 0x20) |
//! | 0x6000 | PVH `hvm_start_info`; memory map at 0x6040, module list at 0x6800 |
//! | 0x7000 | zero page (`boot_params`) for the 64-bit entry |
//! | 0x8ff0 | initial stack (64-bit entry) |
//! | 0x9000 | PML4, PDPT at 0xa000, four PDs at 0xb000: identity map of `[0, 4 GiB)` |
//! | 0x20000 | command line |
//! | 0xe0000 | ACPI tables, RSDP first ([`crate::acpi`]) |
//!
//! The kernel goes where its ELF headers say (16 MiB for Debian's vmlinux) or, for a bzImage,
//! at 1 MiB; the initrd goes at the top of RAM below the hole (and below the kernel's
//! `initrd_addr_max`).

pub mod cmdline;
mod cpu;
mod load;
pub mod params;
pub mod run;
mod vcpu_thread;

pub use cpu::{setup_vcpu, CpuSetupError, LINT_EXTINT, LINT_NMI, MTRR_DEF_TYPE_WB};
pub use load::load_linux;

use std::path::PathBuf;
use std::time::Duration;

use crate::acpi::{NumaMemory, VirtioMmioDevice};
use crate::memory::E820Entry;

/// Boot GDT.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// PVH start info.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memory map table.
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// PVH module list.
pub const PVH_MODLIST_ADDR: u64 = 0x6800;
/// Zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Boot PML4.
pub const PML4_ADDR: u64 = 0x9000;
/// Boot PDPT.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four boot page directories.
pub const PD_ADDR: u64 = 0xb000;
/// Command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Where "high memory" (the protected-mode kernel) starts.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Offset of the 64-bit entry (`startup_64`) in a bzImage's protected-mode code.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// The kernel image's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF `vmlinux` (uncompressed).
    Elf,
    /// A `bzImage` (the kernel decompresses itself).
    BzImage,
}

/// Which entry point to use when the image offers a choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EntryPreference {
    /// PVH (32-bit, paging off) when the ELF has the PVH note, else the 64-bit entry.
    #[default]
    Pvh,
    /// Always the 64-bit boot protocol entry (long mode, zero page in RSI).
    Linux64,
}

impl std::str::FromStr for EntryPreference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pvh" => Ok(EntryPreference::Pvh),
            "linux64" | "64" => Ok(EntryPreference::Linux64),
            other => Err(format!("'{other}': expected pvh or linux64")),
        }
    }
}

/// The entry the vCPU starts at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode, paging off, EBX = start info address.
    Pvh {
        /// Entry point (physical).
        rip: u64,
        /// `hvm_start_info` address.
        start_info: u64,
    },
    /// 64-bit boot protocol: long mode over the boot page tables, RSI = zero page.
    Linux64 {
        /// Entry point (physical, identity-mapped).
        rip: u64,
        /// Zero page address.
        zero_page: u64,
    },
}

/// What to boot.
#[derive(Clone, Debug, Default)]
pub struct LinuxBootConfig {
    /// Kernel image (ELF vmlinux or bzImage; detected).
    pub kernel: PathBuf,
    /// Initrd (initramfs), if any.
    pub initrd: Option<PathBuf>,
    /// The whole kernel command line (see [`cmdline::build`]).
    pub cmdline: String,
    /// Number of vCPUs (for the MADT).
    pub vcpus: u8,
    /// virtio-mmio devices for the DSDT.
    pub virtio_mmio: Vec<VirtioMmioDevice>,
    /// Memory affinity for a SRAT (none when empty).
    pub numa: Vec<NumaMemory>,
    /// Entry preference.
    pub entry: EntryPreference,
}

/// What [`load_linux`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// The image's format.
    pub format: KernelFormat,
    /// The entry the BSP starts at.
    pub entry: Entry,
    /// Where the kernel was loaded: [start, end).
    pub kernel: (u64, u64),
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
    /// The command line as written.
    pub cmdline: String,
    /// ACPI RSDP address.
    pub rsdp_addr: u64,
    /// The e820 map told to the guest.
    pub e820: Vec<E820Entry>,
    /// How long loading took.
    pub load_time: Duration,
}

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither an ELF nor a bzImage.
    #[error("{0}: not an ELF vmlinux or a bzImage")]
    UnknownFormat(PathBuf),
    /// linux-loader refused the image.
    #[error("loading the kernel failed: {0}")]
    Loader(#[from] linux_loader::loader::Error),
    /// The initrd does not fit.
    #[error(
        "initrd of {size} bytes does not fit between the kernel end {kernel_end:#x} and {limit:#x}"
    )]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// Highest address it may end at.
        limit: u64,
    },
    /// Guest memory could not be written.
    #[error("writing guest memory at {addr:#x}: {why}")]
    GuestMemory {
        /// Where.
        addr: u64,
        /// What failed.
        why: String,
    },
    /// The memory window failed.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The ACPI tables could not be built.
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    /// The boot parameters could not be built.
    #[error(transparent)]
    Params(#[from] params::ParamsError),
    /// The command line is invalid.
    #[error(transparent)]
    Cmdline(#[from] cmdline::CmdlineError),
    /// Boot RAM is too small for the boot layout.
    #[error("boot RAM of {0} bytes is too small (at least 32 MiB)")]
    TooLittleRam(u64),
}
