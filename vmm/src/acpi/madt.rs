//! The MADT: local APIC address, one processor local APIC per vCPU, the IOAPIC, and LINT1 of
//! every local APIC as NMI.

use acpi_tables::sdt::Sdt;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// Local APIC base address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC base address (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

/// MADT structure types.
const TYPE_LAPIC: u8 = 0;
const TYPE_IOAPIC: u8 = 1;
const TYPE_LAPIC_NMI: u8 = 4;

/// Build the MADT for `vcpus` vCPUs (APIC ids 0..vcpus).
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"APIC", 36, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    // Flags: PCAT_COMPAT (a dual-8259 PIC is present; KVM's in-kernel irqchip has one).
    body.extend_from_slice(&1u32.to_le_bytes());
    for id in 0..vcpus {
        // Type, length, ACPI processor UID, APIC id, flags (enabled).
        body.extend_from_slice(&[TYPE_LAPIC, 8, id, id]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    // IOAPIC: id after the last APIC id, address, GSI base 0.
    body.extend_from_slice(&[TYPE_IOAPIC, 12, vcpus, 0]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Local APIC NMI: all processors (UID 0xff), flags 0 (bus defaults), LINT1.
    body.extend_from_slice(&[TYPE_LAPIC_NMI, 6, 0xff, 0, 0, 1]);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}
