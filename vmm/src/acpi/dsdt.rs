//! The DSDT: the COM1 UART (`PNP0501`), one `LNRO0005` device per virtio-mmio window (what
//! Linux's `virtio_mmio` driver matches), and `_S5_` so the guest can power off through the
//! sleep registers.
//!
//! COM1 must be described here: with a hardware-reduced FADT, Linux installs no legacy PIC
//! (`null_legacy_pic`), so ISA IRQs 0-15 are not identity-mapped to IOAPIC pins and the
//! legacy 8250 probe's IRQ 4 reaches no handler (measured: userspace console output never
//! drained). Through the DSDT, the 8250 PnP driver takes the port with GSI 4 registered
//! through ACPI.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope, IO,
    ONE, ZERO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{VirtioMmioDevice, OEM_ID, OEM_REVISION, OEM_TABLE_ID, S5_SLP_TYP, VIRTIO_MMIO_SIZE};

/// The ACPI HID Linux's virtio_mmio driver matches.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// The AML name of device `i` (`V000`, `V001`, ...).
pub fn device_name(i: usize) -> String {
    format!("V{:03X}", i & 0xfff)
}

fn virtio_device_aml(i: usize, d: &VirtioMmioDevice) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &VIRTIO_MMIO_HID);
    let uid_val = i as u32;
    let uid = Name::new(Path::new("_UID"), &uid_val);
    // Cache-coherent DMA.
    let cca = Name::new(Path::new("_CCA"), &ONE);
    // Checked by `build`: the window lies below 4 GiB.
    let mem = Memory32Fixed::new(true, d.addr as u32, VIRTIO_MMIO_SIZE as u32);
    // Consumer, edge-triggered, active-high, shared (Linux requests the line as shared).
    let irq = Interrupt::new(true, true, false, true, d.gsi);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&mem, &irq]));
    let name = device_name(i);
    let dev = Device::new(Path::new(&name), vec![&hid, &uid, &cca, &crs]);
    let mut v = Vec::new();
    dev.to_aml_bytes(&mut v);
    v
}

/// COM1: the 16550 at 0x3f8 with GSI 4.
fn com1_aml() -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let uid = Name::new(Path::new("_UID"), &ZERO);
    let io = IO::new(0x3f8, 0x3f8, 0, 8);
    // Consumer, edge-triggered, active-high, exclusive.
    let irq = Interrupt::new(true, true, false, false, 4);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&io, &irq]));
    let mut v = Vec::new();
    Device::new(Path::new("COM1"), vec![&hid, &uid, &crs]).to_aml_bytes(&mut v);
    v
}

/// Build the DSDT for `devices`.
pub fn dsdt(devices: &[VirtioMmioDevice]) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    let mut devs: Vec<Vec<u8>> = vec![com1_aml()];
    devs.extend(
        devices
            .iter()
            .enumerate()
            .map(|(i, d)| virtio_device_aml(i, d)),
    );
    let raw: Vec<RawAml<'_>> = devs.iter().map(|b| RawAml(b)).collect();
    let children: Vec<&dyn Aml> = raw.iter().map(|r| r as &dyn Aml).collect();
    Scope::new(Path::new("\\_SB_"), children).to_aml_bytes(&mut body);
    // \_S5_: Package { SLP_TYPa, SLP_TYPb }.
    let typ = S5_SLP_TYP;
    let zero = 0u8;
    Name::new(Path::new("_S5_"), &Package::new(vec![&typ, &zero])).to_aml_bytes(&mut body);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// Pre-encoded AML.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}
