//! The SRAT: every vCPU's local APIC in proximity domain 0, and memory ranges with their
//! proximity domains (the hot-plug region marked hot-pluggable, so virtio-mem's ACPI_PXM
//! feature can name a node that has a range).

use acpi_tables::sdt::Sdt;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// One memory range of the SRAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NumaMemory {
    /// Start.
    pub base: u64,
    /// Length.
    pub size: u64,
    /// ACPI proximity domain.
    pub proximity: u32,
    /// Hot-pluggable (the virtio-mem region).
    pub hotplug: bool,
}

const TYPE_LAPIC_AFFINITY: u8 = 0;
const TYPE_MEMORY_AFFINITY: u8 = 1;

/// Build the SRAT.
pub fn srat(vcpus: u8, memory: &[NumaMemory]) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"SRAT", 36, 3, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    // Reserved: 4 bytes that must be 1, then 8 bytes.
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&[0u8; 8]);
    for id in 0..vcpus {
        // Type, length, proximity[7:0], APIC id, flags (enabled), SAPIC EID,
        // proximity[31:8], clock domain.
        body.extend_from_slice(&[TYPE_LAPIC_AFFINITY, 16, 0, id]);
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&[0, 0, 0, 0]);
        body.extend_from_slice(&0u32.to_le_bytes());
    }
    for m in memory {
        body.extend_from_slice(&[TYPE_MEMORY_AFFINITY, 40]);
        body.extend_from_slice(&m.proximity.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&m.base.to_le_bytes());
        body.extend_from_slice(&m.size.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        // Flags: enabled (bit 0), hot-pluggable (bit 1).
        let flags = 1u32 | (u32::from(m.hotplug) << 1);
        body.extend_from_slice(&flags.to_le_bytes());
        body.extend_from_slice(&[0u8; 8]);
    }
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}
