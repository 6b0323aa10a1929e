//! [`load_linux`]: kernel, initrd, command line, ACPI tables, boot parameters and boot page
//! tables into guest memory.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::params::{self, PvhInputs, ZeroPageInputs};
use super::*;
use crate::acpi::{self, AcpiConfig};
use crate::kvm::Vm;
use crate::memory::{WindowMemory, MIB};

/// Smallest boot RAM a Linux guest is loaded into.
const MIN_RAM: u64 = 32 * MIB;
/// Highest initrd end an ELF kernel (no setup header to say) is given: 2 GiB, the boot
/// protocol's default `initrd_addr_max` for 2.03+.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |source| BootError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(mem: &WindowMemory, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| BootError::GuestMemory {
            addr,
            why: e.to_string(),
        })
}

/// Detect the format from the first bytes of the image.
pub fn detect_format(path: &Path) -> Result<KernelFormat, BootError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut head = vec![0u8; 0x206];
    let n = f.read(&mut head).map_err(io(path))?;
    head.truncate(n);
    if head.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    if head.get(0x202..0x206) == Some(b"HdrS".as_slice()) {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat(path.to_path_buf()))
}

/// The 4-level identity map of `[0, 4 GiB)` with 2 MiB pages, as (address, entry) pairs.
pub(crate) fn boot_page_tables() -> Vec<(u64, u64)> {
    const P: u64 = 1;
    const W: u64 = 1 << 1;
    const PS: u64 = 1 << 7;
    let mut v = vec![(PML4_ADDR, PDPT_ADDR | P | W)];
    for i in 0..4u64 {
        let pd = PD_ADDR + i * 0x1000;
        v.push((PDPT_ADDR + i * 8, pd | P | W));
        for j in 0..512u64 {
            v.push((pd + j * 8, ((i << 30) + (j << 21)) | P | W | PS));
        }
    }
    v
}

/// The boot GDT: null, null, 64-bit code (0x10), data (0x18), 32-bit code (0x20). The same
/// table serves both entries; the 32-bit PVH entry uses selector 0x20 for CS.
pub(crate) const BOOT_GDT: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff, // 0x10: 64-bit code, DPL 0
    0x00cf_9300_0000_ffff, // 0x18: data, 4 GiB flat
    0x00cf_9b00_0000_ffff, // 0x20: 32-bit code, 4 GiB flat
];

/// Load everything a Linux boot needs into `vm`'s boot RAM. The vCPUs are set up afterwards
/// with [`setup_vcpu`].
pub fn load_linux(vm: &Vm, config: &LinuxBootConfig) -> Result<BootInfo, BootError> {
    let t0 = Instant::now();
    let layout = vm.window().layout().clone();
    let low_end = layout.low_ram().end;
    if low_end < MIN_RAM {
        return Err(BootError::TooLittleRam(low_end));
    }
    let mem = vm.window().guest_memory()?;
    let cmdline = config.cmdline.clone();
    if cmdline.contains(['\0', '\n', '\r']) {
        return Err(cmdline::CmdlineError::BadByte.into());
    }
    if cmdline.len() > cmdline::CMDLINE_MAX {
        return Err(cmdline::CmdlineError::TooLong(cmdline.len()).into());
    }

    // Kernel.
    let format = detect_format(&config.kernel)?;
    let mut kf = File::open(&config.kernel).map_err(io(&config.kernel))?;
    let high = Some(GuestAddress(HIGH_MEMORY_START));
    let (loaded, setup_header, pvh) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(&*mem, None, &mut kf, high)?;
            (r, None, r.pvh_boot_cap)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(&*mem, None, &mut kf, high)?;
            (r, r.setup_header, PvhBootCapability::PvhEntryNotPresent)
        }
    };
    let kernel_start = loaded.kernel_load.0;
    let kernel_end = loaded.kernel_end;

    // Initrd: at the top of RAM below the hole, page aligned, below initrd_addr_max.
    let initrd = match &config.initrd {
        None => None,
        Some(path) => {
            let bytes = std::fs::read(path).map_err(io(path))?;
            let size = bytes.len() as u64;
            let addr_max = setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|m| *m != 0)
                .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
            let limit = low_end.min(addr_max + 1);
            let addr = limit.checked_sub(size).map(|a| a & !0xfff);
            let addr = match addr {
                Some(a) if a >= kernel_end => a,
                _ => {
                    return Err(BootError::InitrdTooLarge {
                        size,
                        kernel_end,
                        limit,
                    })
                }
            };
            write(&mem, addr, &bytes)?;
            Some((addr, size))
        }
    };

    // Command line (NUL-terminated).
    let mut cl = cmdline.clone().into_bytes();
    cl.push(0);
    write(&mem, CMDLINE_ADDR, &cl)?;

    // ACPI.
    let tables = acpi::build(&AcpiConfig {
        vcpus: config.vcpus.max(1),
        virtio_mmio: config.virtio_mmio.clone(),
        numa: config.numa.clone(),
    })?;
    for (addr, b) in &tables.blobs {
        write(&mem, *addr, b)?;
    }

    // GDT and page tables (used by the 64-bit entry; harmless for PVH).
    let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(&mem, BOOT_GDT_ADDR, &gdt)?;
    for (addr, e) in boot_page_tables() {
        write(&mem, addr, &e.to_le_bytes())?;
    }

    let e820 = layout.e820();
    // The zero page is written for both entries (a PVH kernel ignores it).
    let zp = params::zero_page(
        setup_header,
        &e820,
        &ZeroPageInputs {
            cmdline_addr: CMDLINE_ADDR,
            cmdline_len: cmdline.len() as u32,
            initrd: initrd.map(|(a, s)| (a, s as u32)),
            rsdp_addr: tables.rsdp_addr,
        },
    )?;
    mem.write_obj(zp, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| BootError::GuestMemory {
            addr: ZERO_PAGE_ADDR,
            why: e.to_string(),
        })?;

    let pvh_entry = match pvh {
        PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
        _ => None,
    };
    let entry = match (config.entry, pvh_entry) {
        (EntryPreference::Pvh, Some(rip)) => {
            let blobs = params::pvh_blobs(
                &e820,
                &PvhInputs {
                    memmap_addr: PVH_MEMMAP_ADDR,
                    modlist_addr: PVH_MODLIST_ADDR,
                    cmdline_addr: CMDLINE_ADDR,
                    initrd,
                    rsdp_addr: tables.rsdp_addr,
                },
            );
            write(&mem, PVH_MEMMAP_ADDR, &blobs.memmap)?;
            write(&mem, PVH_MODLIST_ADDR, &blobs.modlist)?;
            write(&mem, PVH_INFO_ADDR, &blobs.start_info)?;
            Entry::Pvh {
                rip,
                start_info: PVH_INFO_ADDR,
            }
        }
        _ => Entry::Linux64 {
            rip: match format {
                // The ELF entry is startup_64's physical address.
                KernelFormat::Elf => kernel_start,
                KernelFormat::BzImage => kernel_start + BZIMAGE_64BIT_ENTRY_OFFSET,
            },
            zero_page: ZERO_PAGE_ADDR,
        },
    };
    Ok(BootInfo {
        format,
        entry,
        kernel: (kernel_start, kernel_end),
        initrd,
        cmdline,
        rsdp_addr: tables.rsdp_addr,
        e820,
        load_time: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_map_4g_identity() {
        let t = boot_page_tables();
        assert_eq!(t.len(), 1 + 4 + 4 * 512);
        assert_eq!(t[0], (PML4_ADDR, PDPT_ADDR | 3));
        let find = |a: u64| t.iter().find(|(x, _)| *x == a).map(|(_, e)| *e);
        assert_eq!(find(PDPT_ADDR + 24), Some((PD_ADDR + 0x3000) | 3));
        // The 2 MiB page at 16 MiB (the kernel) and the last one below 4 GiB.
        assert_eq!(find(PD_ADDR + 8 * 8), Some((16 * MIB) | 0x83));
        assert_eq!(
            find(PD_ADDR + 0x3000 + 511 * 8),
            Some(((4u64 << 30) - 2 * MIB) | 0x83)
        );
        // Tables do not overlap the zero page, stack or command line.
        const { assert!(PML4_ADDR > BOOT_STACK && PD_ADDR + 4 * 0x1000 <= CMDLINE_ADDR) };
        const { assert!(ZERO_PAGE_ADDR + 0x1000 <= BOOT_STACK) };
    }

    #[test]
    fn gdt_descriptors() {
        // 64-bit code: L=1, D=0, present, DPL 0, type 0xb.
        assert_eq!((BOOT_GDT[2] >> 53) & 1, 1);
        assert_eq!((BOOT_GDT[2] >> 54) & 1, 0);
        // 32-bit code: D=1, L=0.
        assert_eq!((BOOT_GDT[4] >> 53) & 1, 0);
        assert_eq!((BOOT_GDT[4] >> 54) & 1, 1);
        assert_eq!((BOOT_GDT[3] >> 40) & 0xff, 0x93);
    }

    #[test]
    fn format_detection() {
        let dir = std::env::temp_dir().join(format!("tidepool-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let elf = dir.join("elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").expect("write");
        assert_eq!(detect_format(&elf).ok(), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzp = dir.join("bz");
        std::fs::write(&bzp, &bz).expect("write");
        assert_eq!(detect_format(&bzp).ok(), Some(KernelFormat::BzImage));
        let junk = dir.join("junk");
        std::fs::write(&junk, b"hello").expect("write");
        assert!(matches!(
            detect_format(&junk),
            Err(BootError::UnknownFormat(_))
        ));
        assert!(matches!(
            detect_format(&dir.join("missing")),
            Err(BootError::Io { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
