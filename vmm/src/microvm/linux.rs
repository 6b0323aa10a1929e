//! Linux guests in a [`super::Microvm`]: the kernel, initrd, command line and ACPI tables
//! (with the VM's virtio-mmio devices in the DSDT) loaded by [`crate::boot`], the vCPUs set up
//! for its entry, and the legacy devices (serial console into a bounded in-memory log, i8042
//! reset, ACPI power-off) in front of the VM's own exit handler.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::MicrovmError;
use crate::acpi::VirtioMmioDevice;
use crate::boot::cmdline::{self, CpuWorkarounds};
use crate::boot::{load_linux, setup_vcpu, BootInfo, EntryPreference, LinuxBootConfig};
use crate::devices::{lock, MmioBus};
use crate::kvm::{Vcpu, Vm};
use crate::legacy::{IrqLine, LegacyDevices, SerialConsole, COM1_GSI};

/// Bytes of console output a VM keeps (the most recent).
pub const CONSOLE_KEEP: usize = 64 << 10;

/// What a Linux VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxImage {
    /// Kernel (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Options added after Tidepool's default command line.
    pub cmdline: Option<String>,
}

/// The most recent console output of a VM.
#[derive(Debug, Clone, Default)]
pub struct ConsoleLog(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleLog {
    /// What the guest printed, the most recent [`CONSOLE_KEEP`] bytes, lossily decoded.
    pub fn text(&self) -> String {
        let g = lock(&self.0);
        let (a, b) = g.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut g = lock(&self.0);
        g.extend(buf.iter().copied());
        let excess = g.len().saturating_sub(CONSOLE_KEEP);
        g.drain(..excess);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A Linux VM ready to start.
#[derive(Debug)]
pub(super) struct PreparedLinux {
    pub vcpus: Vec<Vcpu>,
    pub legacy: Arc<Mutex<LegacyDevices>>,
    pub console: ConsoleLog,
    pub boot: BootInfo,
}

fn err(what: &str) -> impl FnOnce(String) -> MicrovmError + '_ {
    move |why| MicrovmError::Config(format!("{what}: {why}"))
}

/// Load `image` into `vm` with the devices on `bus` described in the DSDT, and set up
/// `vcpus` vCPUs for its entry. `numa` is the SRAT's memory ranges (empty: no SRAT, one guest
/// node).
pub(super) fn prepare(
    vm: &Vm,
    image: &LinuxImage,
    vcpus: u8,
    bus: &MmioBus,
    numa: Vec<crate::acpi::NumaMemory>,
) -> Result<PreparedLinux, MicrovmError> {
    let mut created = Vec::new();
    for id in 0..vcpus {
        created.push(vm.create_vcpu(u64::from(id))?);
    }
    let line = cmdline::build(
        true,
        CpuWorkarounds::Auto,
        cmdline::host_is_pvm(),
        image.cmdline.as_deref().unwrap_or(""),
    )
    .map_err(|e| err("kernel command line")(e.to_string()))?;
    let boot = load_linux(
        vm,
        &LinuxBootConfig {
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline: line,
            vcpus,
            virtio_mmio: bus
                .slots()
                .iter()
                .map(|s| VirtioMmioDevice {
                    addr: s.base,
                    gsi: s.gsi,
                })
                .collect(),
            numa,
            entry: EntryPreference::Pvh,
        },
    )
    .map_err(|e| err("loading the kernel")(e.to_string()))?;
    for (i, v) in created.iter().enumerate() {
        setup_vcpu(v, &boot.entry, i == 0).map_err(|e| err("vCPU set-up")(e.to_string()))?;
    }
    let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| err("serial eventfd")(e.to_string()))?;
    vm.fd()
        .register_irqfd(&evt, COM1_GSI)
        .map_err(|e| err("serial irqfd")(e.to_string()))?;
    let console = ConsoleLog::default();
    let serial = SerialConsole::new(IrqLine::Irqfd(evt), Box::new(console.clone()));
    Ok(PreparedLinux {
        vcpus: created,
        legacy: Arc::new(Mutex::new(LegacyDevices::new(serial))),
        console,
        boot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_log_keeps_the_most_recent_bytes() {
        let mut c = ConsoleLog::default();
        c.write_all(b"hello ").expect("write");
        c.write_all(&vec![b'x'; CONSOLE_KEEP]).expect("write");
        c.write_all(b" end").expect("write");
        let t = c.text();
        assert_eq!(t.len(), CONSOLE_KEEP);
        assert!(t.ends_with("x end"));
        assert!(!t.contains("hello"));
    }
}
