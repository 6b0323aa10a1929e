//! What the VMM tells a booting Linux: the zero page (`struct boot_params`, for the 64-bit boot
//! protocol) and the PVH start info (`struct hvm_start_info` with its memory map and module
//! list, for the PVH entry), both built from one e820 map.
//!
//! Layouts: `Documentation/x86/boot.rst` and `zero-page.rst` of Linux (boot protocol 2.15), and
//! Xen's `include/public/arch-x86/hvm/start_info.h` (PVH, version 1).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use crate::memory::{E820Entry, E820Kind};

/// `boot_flag` a valid setup header carries.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic ("HdrS").
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: "undefined" boot loader.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags` bit: the protected-mode code is loaded at 1 MiB (a bzImage).
pub const LOADED_HIGH: u8 = 0x01;
/// `loadflags` bit: `heap_end_ptr` is valid.
pub const CAN_USE_HEAP: u8 = 0x80;
/// Alignment the kernel asks for when the image does not say (16 MiB, x86-64 default).
pub const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Number of e820 entries the zero page holds.
pub const E820_MAX_ZEROPAGE: usize = 128;

/// `hvm_start_info.magic` (XEN_HVM_START_MAGIC_VALUE).
pub const PVH_START_MAGIC: u32 = 0x336e_c578;
/// Size of `struct hvm_start_info` (version 1).
pub const PVH_START_INFO_SIZE: usize = 56;
/// Size of `struct hvm_memmap_table_entry`.
pub const PVH_MEMMAP_ENTRY_SIZE: usize = 24;
/// Size of `struct hvm_modlist_entry`.
pub const PVH_MODLIST_ENTRY_SIZE: usize = 32;

/// Errors building boot parameters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    /// More e820 entries than the zero page holds.
    #[error("{0} e820 entries, the zero page holds {E820_MAX_ZEROPAGE}")]
    TooManyE820(usize),
    /// An address does not fit the 32-bit field the boot protocol gives it.
    #[error("{what} at {addr:#x} does not fit in 32 bits")]
    Above4G {
        /// Which field.
        what: &'static str,
        /// The address.
        addr: u64,
    },
}

/// Where the pieces the zero page points at live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroPageInputs {
    /// Command line address (NUL-terminated string).
    pub cmdline_addr: u64,
    /// Command line length without the NUL.
    pub cmdline_len: u32,
    /// Initrd address and size, if any.
    pub initrd: Option<(u64, u32)>,
    /// ACPI RSDP address (0 for none).
    pub rsdp_addr: u64,
}

fn low32(what: &'static str, addr: u64) -> Result<u32, ParamsError> {
    u32::try_from(addr).map_err(|_| ParamsError::Above4G { what, addr })
}

/// Build the zero page. `image_header` is the bzImage's setup header (None for an ELF vmlinux,
/// which has none: then a minimal valid header is made up).
pub fn zero_page(
    image_header: Option<setup_header>,
    e820: &[E820Entry],
    inputs: &ZeroPageInputs,
) -> Result<boot_params, ParamsError> {
    if e820.len() > E820_MAX_ZEROPAGE {
        return Err(ParamsError::TooManyE820(e820.len()));
    }
    let mut p = boot_params {
        hdr: image_header.unwrap_or_default(),
        ..Default::default()
    };
    let hdr = &mut p.hdr;
    if image_header.is_none() {
        hdr.boot_flag = BOOT_FLAG_MAGIC;
        hdr.header = HDRS_MAGIC;
        hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
    }
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = low32("command line", inputs.cmdline_addr)?;
    hdr.cmdline_size = inputs.cmdline_len;
    if let Some((addr, size)) = inputs.initrd {
        hdr.ramdisk_image = low32("initrd", addr)?;
        hdr.ramdisk_size = size;
    }
    p.acpi_rsdp_addr = inputs.rsdp_addr;
    for (slot, e) in p.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind.code(),
        };
    }
    // Checked above: at most 128 entries.
    p.e820_entries = e820.len() as u8;
    Ok(p)
}

/// Where the PVH structures live and what they point at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvhInputs {
    /// Address of the memory map table.
    pub memmap_addr: u64,
    /// Address of the module list (used when there is an initrd).
    pub modlist_addr: u64,
    /// Command line address.
    pub cmdline_addr: u64,
    /// Initrd address and size, if any.
    pub initrd: Option<(u64, u64)>,
    /// ACPI RSDP address (0 for none).
    pub rsdp_addr: u64,
}

/// The PVH blobs: start info, memory map table and module list, as guest bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PvhBlobs {
    /// `struct hvm_start_info`, version 1.
    pub start_info: Vec<u8>,
    /// `struct hvm_memmap_table_entry[]`.
    pub memmap: Vec<u8>,
    /// `struct hvm_modlist_entry[]` (empty without an initrd).
    pub modlist: Vec<u8>,
}

/// Build the PVH start info, memory map and module list.
pub fn pvh_blobs(e820: &[E820Entry], inputs: &PvhInputs) -> PvhBlobs {
    let mut memmap = Vec::with_capacity(e820.len() * PVH_MEMMAP_ENTRY_SIZE);
    for e in e820 {
        memmap.extend_from_slice(&e.addr.to_le_bytes());
        memmap.extend_from_slice(&e.size.to_le_bytes());
        memmap.extend_from_slice(&e.kind.code().to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    let mut modlist = Vec::new();
    if let Some((addr, size)) = inputs.initrd {
        modlist.extend_from_slice(&addr.to_le_bytes());
        modlist.extend_from_slice(&size.to_le_bytes());
        modlist.extend_from_slice(&0u64.to_le_bytes()); // cmdline_paddr
        modlist.extend_from_slice(&0u64.to_le_bytes()); // reserved
    }
    let mut si = Vec::with_capacity(PVH_START_INFO_SIZE);
    si.extend_from_slice(&PVH_START_MAGIC.to_le_bytes());
    si.extend_from_slice(&1u32.to_le_bytes()); // version
    si.extend_from_slice(&0u32.to_le_bytes()); // flags
    let nr_modules = u32::from(inputs.initrd.is_some());
    si.extend_from_slice(&nr_modules.to_le_bytes());
    let modlist_addr = if nr_modules > 0 {
        inputs.modlist_addr
    } else {
        0
    };
    si.extend_from_slice(&modlist_addr.to_le_bytes());
    si.extend_from_slice(&inputs.cmdline_addr.to_le_bytes());
    si.extend_from_slice(&inputs.rsdp_addr.to_le_bytes());
    si.extend_from_slice(&inputs.memmap_addr.to_le_bytes());
    // At most a handful of entries; the layout makes no more than five.
    si.extend_from_slice(&(e820.len() as u32).to_le_bytes());
    si.extend_from_slice(&0u32.to_le_bytes()); // reserved
    PvhBlobs {
        start_info: si,
        memmap,
        modlist,
    }
}

/// Number of e820 RAM bytes (what MemTotal is bounded by).
pub fn e820_ram_bytes(e820: &[E820Entry]) -> u64 {
    e820.iter()
        .filter(|e| e.kind == E820Kind::Ram)
        .map(|e| e.size)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Layout, LayoutConfig, GIB, MIB};

    fn e820(boot: u64, hotplug: u64) -> Vec<E820Entry> {
        Layout::new(LayoutConfig {
            boot_ram: boot,
            hotplug_size: hotplug,
        })
        .expect("layout")
        .e820()
    }

    #[test]
    fn zero_page_for_vmlinux_has_a_made_up_header_and_the_e820_map() {
        let map = e820(512 * MIB, 1024 * MIB);
        let inputs = ZeroPageInputs {
            cmdline_addr: 0x20000,
            cmdline_len: 42,
            initrd: Some((0x1f00_0000, 0x10_0000)),
            rsdp_addr: 0xe0000,
        };
        let p = zero_page(None, &map, &inputs).expect("zero page");
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x1f00_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x10_0000);
        assert_eq!({ hdr.kernel_alignment }, DEFAULT_KERNEL_ALIGNMENT);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        // RAM [0, 0x9fc00), reserved up to 1 MiB, RAM [1 MiB, 512 MiB); no hot-plug region.
        assert_eq!(p.e820_entries, 3);
        let t = p.e820_table;
        assert_eq!(
            ({ t[0].addr }, { t[0].size }, { t[0].r#type }),
            (0, 0x9fc00, 1)
        );
        assert_eq!(
            ({ t[1].addr }, { t[1].size }, { t[1].r#type }),
            (0x9fc00, 0x100000 - 0x9fc00, 2)
        );
        assert_eq!(
            ({ t[2].addr }, { t[2].size }, { t[2].r#type }),
            (MIB, 511 * MIB, 1)
        );
        assert_eq!(e820_ram_bytes(&map), 0x9fc00 + 511 * MIB);
    }

    #[test]
    fn zero_page_keeps_the_bzimage_header() {
        let hdr = setup_header {
            setup_sects: 27,
            version: 0x20f,
            loadflags: LOADED_HIGH,
            header: HDRS_MAGIC,
            boot_flag: BOOT_FLAG_MAGIC,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let inputs = ZeroPageInputs {
            cmdline_addr: 0x20000,
            cmdline_len: 1,
            initrd: None,
            rsdp_addr: 0,
        };
        let p = zero_page(Some(hdr), &e820(4 * GIB, 0), &inputs).expect("zero page");
        let h = p.hdr;
        assert_eq!({ h.setup_sects }, 27);
        assert_eq!({ h.version }, 0x20f);
        assert_eq!({ h.loadflags }, LOADED_HIGH | CAN_USE_HEAP);
        assert_eq!({ h.kernel_alignment }, 0x20_0000);
        assert_eq!({ h.ramdisk_image }, 0);
        // 4 GiB of boot RAM: 3 GiB below the hole, 1 GiB above 4 GiB.
        assert_eq!(p.e820_entries, 4);
        let last = p.e820_table[3];
        assert_eq!(({ last.addr }, { last.size }), (4 * GIB, GIB));
    }

    #[test]
    fn zero_page_refuses_addresses_above_4g() {
        let inputs = ZeroPageInputs {
            cmdline_addr: 0x1_0000_0000,
            cmdline_len: 1,
            initrd: None,
            rsdp_addr: 0,
        };
        assert!(matches!(
            zero_page(None, &e820(64 * MIB, 0), &inputs),
            Err(ParamsError::Above4G { .. })
        ));
        let many = vec![
            E820Entry {
                addr: 0,
                size: 1,
                kind: E820Kind::Ram
            };
            129
        ];
        let ok = ZeroPageInputs {
            cmdline_addr: 0,
            ..inputs
        };
        assert_eq!(
            zero_page(None, &many, &ok).err(),
            Some(ParamsError::TooManyE820(129))
        );
    }

    #[test]
    fn pvh_start_info_layout() {
        let map = e820(256 * MIB, 0);
        let b = pvh_blobs(
            &map,
            &PvhInputs {
                memmap_addr: 0x6040,
                modlist_addr: 0x6800,
                cmdline_addr: 0x20000,
                initrd: Some((0x0f00_0000, 0x1234)),
                rsdp_addr: 0xe0000,
            },
        );
        let u32_at = |v: &[u8], o: usize| u32::from_le_bytes(v[o..o + 4].try_into().expect("4"));
        let u64_at = |v: &[u8], o: usize| u64::from_le_bytes(v[o..o + 8].try_into().expect("8"));
        let si = &b.start_info;
        assert_eq!(si.len(), PVH_START_INFO_SIZE);
        assert_eq!(u32_at(si, 0), PVH_START_MAGIC);
        assert_eq!(u32_at(si, 4), 1);
        assert_eq!(u32_at(si, 12), 1);
        assert_eq!(u64_at(si, 16), 0x6800);
        assert_eq!(u64_at(si, 24), 0x20000);
        assert_eq!(u64_at(si, 32), 0xe0000);
        assert_eq!(u64_at(si, 40), 0x6040);
        assert_eq!(u32_at(si, 48), 3);
        assert_eq!(b.memmap.len(), 3 * PVH_MEMMAP_ENTRY_SIZE);
        assert_eq!(u64_at(&b.memmap, 24), 0x9fc00);
        assert_eq!(u32_at(&b.memmap, 24 + 16), 2);
        assert_eq!(u64_at(&b.memmap, 48), MIB);
        assert_eq!(u64_at(&b.memmap, 56), 255 * MIB);
        assert_eq!(b.modlist.len(), PVH_MODLIST_ENTRY_SIZE);
        assert_eq!(u64_at(&b.modlist, 0), 0x0f00_0000);
        assert_eq!(u64_at(&b.modlist, 8), 0x1234);
        // Without an initrd there is no module and no module list address.
        let b = pvh_blobs(
            &map,
            &PvhInputs {
                memmap_addr: 0x6040,
                modlist_addr: 0x6800,
                cmdline_addr: 0x20000,
                initrd: None,
                rsdp_addr: 0,
            },
        );
        assert_eq!(u32_at(&b.start_info, 12), 0);
        assert_eq!(u64_at(&b.start_info, 16), 0);
        assert!(b.modlist.is_empty());
    }
}
