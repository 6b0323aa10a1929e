//! ACPI tables for a Tidepool guest, built with the `acpi_tables` crate: RSDP, XSDT, a
//! hardware-reduced FADT, a DSDT (virtio-mmio devices as `LNRO0005`, `_S5_` for power-off), a
//! MADT (IOAPIC, one local APIC per vCPU, LINT1 as NMI) and, when asked, a SRAT.
//!
//! The Debian cloud kernel has `X86_MPPARSE` unset, so the MADT is how it finds the IOAPIC and
//! the vCPUs, and `VIRTIO_MMIO_CMDLINE_DEVICES` unset, so the DSDT is how it finds virtio-mmio
//! devices. Power-off uses the hardware-reduced ACPI sleep registers: the guest writes
//! `SLP_TYP << 2 | SLP_EN` to [`SLEEP_CONTROL_PORT`], which the legacy-device handler turns into
//! a stop ([`crate::legacy`]).

mod dsdt;
mod madt;
mod srat;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

pub use dsdt::dsdt;
pub use madt::{madt, IOAPIC_ADDR, LAPIC_ADDR};
pub use srat::{srat, NumaMemory};

/// OEM id in every table.
pub const OEM_ID: [u8; 6] = *b"TIDEPL";
/// OEM table id in every table.
pub const OEM_TABLE_ID: [u8; 8] = *b"TIDEPOOL";
/// OEM revision.
pub const OEM_REVISION: u32 = 1;
/// Where the RSDP goes (in the BIOS area Linux also scans, `[0xe0000, 0x100000)`).
pub const RSDP_ADDR: u64 = 0xe0000;
/// End of the area the tables may use.
pub const ACPI_AREA_END: u64 = 0x10_0000;
/// I/O port of the hardware-reduced sleep control register (one byte).
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// I/O port of the hardware-reduced sleep status register (one byte).
pub const SLEEP_STATUS_PORT: u16 = 0x3c1;
/// The `SLP_TYP` the DSDT's `_S5_` names (written with SLP_EN to power off).
pub const S5_SLP_TYP: u8 = 5;
/// `SLP_EN` bit in the sleep control register.
pub const SLP_EN: u8 = 1 << 5;

/// One virtio-mmio device the DSDT describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Base of its 0x1000-byte register window (below 4 GiB).
    pub addr: u64,
    /// Its GSI (IOAPIC pin, 5..=23).
    pub gsi: u32,
}

/// Size of a virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

/// What the tables describe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC ids 0..n).
    pub vcpus: u8,
    /// virtio-mmio devices.
    pub virtio_mmio: Vec<VirtioMmioDevice>,
    /// Memory affinity for a SRAT; no SRAT when empty.
    pub numa: Vec<NumaMemory>,
}

/// Errors building the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// The tables do not fit below 1 MiB.
    #[error("ACPI tables end at {end:#x}, past {ACPI_AREA_END:#x}")]
    TooLarge {
        /// Where they would end.
        end: u64,
    },
    /// A device is outside what the tables can express.
    #[error("virtio-mmio device at {addr:#x} (GSI {gsi}): {why}")]
    BadDevice {
        /// Its address.
        addr: u64,
        /// Its GSI.
        gsi: u32,
        /// Why it was refused.
        why: &'static str,
    },
    /// No vCPUs.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
}

/// The tables, each with the guest-physical address it goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// Address of the RSDP (what `boot_params.acpi_rsdp_addr` / PVH `rsdp_paddr` get).
    pub rsdp_addr: u64,
    /// (address, bytes) of every table, the RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The hardware-reduced FADT pointing at the DSDT.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // IA-PC boot architecture: VGA not present (bit 2), MSI not supported (bit 3), CMOS RTC not
    // present (bit 5). No 8042 (bit 1): the i8042 is only there for reset.
    b.iapc_boot_arch = ((1u16 << 2) | (1 << 3) | (1 << 5)).into();
    b.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_CONTROL_PORT),
    );
    b.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_STATUS_PORT),
    );
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"TIDEPOOL").into();
    aml_bytes(&b.finalize())
}

fn align(x: u64) -> u64 {
    (x + 63) & !63
}

/// Build every table for `config`, laid out from [`RSDP_ADDR`].
pub fn build(config: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    if config.vcpus == 0 {
        return Err(AcpiError::NoVcpus);
    }
    for d in &config.virtio_mmio {
        let bad = |why| AcpiError::BadDevice {
            addr: d.addr,
            gsi: d.gsi,
            why,
        };
        if d.addr % VIRTIO_MMIO_SIZE != 0 || d.addr.saturating_add(VIRTIO_MMIO_SIZE) > 1 << 32 {
            return Err(bad("window must be 4 KiB aligned and below 4 GiB"));
        }
        if !(5..=23).contains(&d.gsi) {
            return Err(bad(
                "GSI must be 5..=23 (IOAPIC pins not used by legacy devices)",
            ));
        }
    }
    let dsdt = dsdt(&config.virtio_mmio);
    let madt = madt(config.vcpus);
    let srat = (!config.numa.is_empty()).then(|| srat(config.vcpus, &config.numa));

    let rsdp_len = Rsdp::len() as u64;
    let xsdt_addr = align(RSDP_ADDR + rsdp_len);
    let n_tables = 2 + u64::from(srat.is_some());
    let xsdt_len = 36 + 8 * n_tables;
    let dsdt_addr = align(xsdt_addr + xsdt_len);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let mut next = align(madt_addr + madt.len() as u64);
    let mut blobs = Vec::new();
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let srat_blob = srat.map(|s| {
        let addr = next;
        next = align(addr + s.len() as u64);
        (addr, s)
    });
    if let Some((addr, _)) = &srat_blob {
        xsdt.add_entry(*addr);
    }
    let end = next;
    if end > ACPI_AREA_END {
        return Err(AcpiError::TooLarge { end });
    }
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    blobs.push((RSDP_ADDR, aml_bytes(&rsdp)));
    blobs.push((xsdt_addr, aml_bytes(&xsdt)));
    blobs.push((dsdt_addr, dsdt));
    blobs.push((fadt_addr, fadt));
    blobs.push((madt_addr, madt));
    blobs.extend(srat_blob);
    Ok(AcpiTables {
        rsdp_addr: RSDP_ADDR,
        blobs,
    })
}

/// Sum of all bytes mod 256 (0 for a table with a correct checksum).
pub fn byte_sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

#[cfg(test)]
mod tests;
