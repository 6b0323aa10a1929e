//! Legacy port-I/O devices of a Tidepool guest: the 16550 serial console at 0x3f8 (GSI 4,
//! vm-superio), an i8042 at 0x60/0x64 whose reset command stops the VM, and the ACPI sleep
//! registers ([`crate::acpi::SLEEP_CONTROL_PORT`]) whose S5 write powers it off.
//!
//! [`LegacyDevices`] is shared by all vCPUs (behind a mutex); [`LegacyExitHandler`] is the
//! per-vCPU [`ExitHandler`] that sends port I/O to it and MMIO to an inner handler (the MMIO
//! bus, or [`NoMmio`]). Reads of ports no device claims return all ones (as on an empty ISA
//! bus) and writes to them are dropped, so the kernel's probes of absent hardware (other
//! UARTs, PCI config ports, the CMOS RTC) find nothing.

mod serial;

pub use serial::{IrqLine, MarkerLog, MarkerWriter, SerialConsole};

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::I8042Device;

use crate::acpi::{S5_SLP_TYP, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT, SLP_EN};
use crate::kvm::{Exit, ExitAction, ExitHandler};

/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 GSI.
pub const COM1_GSI: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;

/// Why the guest asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestStop {
    /// ACPI S5 through the sleep control register.
    PowerOff,
    /// The i8042 reset command (0xfe to port 0x64).
    Reset,
}

impl GuestStop {
    fn code(self) -> u8 {
        match self {
            GuestStop::PowerOff => 1,
            GuestStop::Reset => 2,
        }
    }
    fn from_code(c: u8) -> Option<GuestStop> {
        match c {
            1 => Some(GuestStop::PowerOff),
            2 => Some(GuestStop::Reset),
            _ => None,
        }
    }
}

/// Records that the i8042 reset line fired (vm-superio's reset trigger).
#[derive(Debug, Default, Clone)]
pub struct ResetFlag(Arc<AtomicU8>);

impl vm_superio::Trigger for ResetFlag {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(GuestStop::Reset.code(), Ordering::Release);
        Ok(())
    }
}

/// The legacy devices of one VM.
#[derive(Debug)]
pub struct LegacyDevices {
    serial: SerialConsole,
    i8042: I8042Device<ResetFlag>,
    stop: Arc<AtomicU8>,
    /// Port accesses no device claimed.
    pub unclaimed: u64,
}

impl LegacyDevices {
    /// Devices with `serial` as the console.
    pub fn new(serial: SerialConsole) -> LegacyDevices {
        let stop = Arc::new(AtomicU8::new(0));
        LegacyDevices {
            serial,
            i8042: I8042Device::new(ResetFlag(Arc::clone(&stop))),
            stop,
            unclaimed: 0,
        }
    }

    /// The serial console.
    pub fn serial(&self) -> &SerialConsole {
        &self.serial
    }

    /// Whether (and why) the guest asked to stop.
    pub fn stop_requested(&self) -> Option<GuestStop> {
        GuestStop::from_code(self.stop.load(Ordering::Acquire))
    }

    /// Handle a port read; returns false when no device claims the port (`data` then holds
    /// all ones).
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) -> bool {
        data.fill(0xff);
        match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) && data.len() == 1 => {
                data[0] = self.serial.read((p - COM1_PORT) as u8);
            }
            I8042_DATA_PORT | I8042_CMD_PORT if data.len() == 1 => {
                data[0] = self.i8042.read((port - I8042_DATA_PORT) as u8);
            }
            SLEEP_CONTROL_PORT => data.fill(0),
            // WAK_STS clear: the guest never wakes from S5.
            SLEEP_STATUS_PORT => data.fill(0),
            _ => {
                self.unclaimed += 1;
                return false;
            }
        }
        true
    }

    /// Handle a port write; returns false when no device claims the port.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> bool {
        let Some(&byte) = data.first() else {
            return true;
        };
        match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) => {
                self.serial.write((p - COM1_PORT) as u8, byte);
            }
            I8042_DATA_PORT | I8042_CMD_PORT => {
                // The reset trigger is infallible.
                let _ = self.i8042.write((port - I8042_DATA_PORT) as u8, byte);
            }
            SLEEP_CONTROL_PORT => {
                if byte & SLP_EN != 0 && (byte >> 2) & 0x7 == S5_SLP_TYP {
                    self.stop
                        .store(GuestStop::PowerOff.code(), Ordering::Release);
                }
            }
            SLEEP_STATUS_PORT => {}
            _ => {
                self.unclaimed += 1;
                return false;
            }
        }
        true
    }
}

/// An MMIO handler for VMs without MMIO devices: reads return all ones, writes are dropped.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoMmio;

impl ExitHandler for NoMmio {
    fn handle(&mut self, exit: Exit<'_>) -> Result<ExitAction, String> {
        if let Exit::MmioRead { data, .. } = exit {
            data.fill(0xff);
        }
        Ok(ExitAction::Continue)
    }
}

/// Per-vCPU exit handler: port I/O to the shared [`LegacyDevices`], MMIO to `mmio`. Returns
/// [`ExitAction::Stop`] once the guest asked to power off or reset.
#[derive(Debug)]
pub struct LegacyExitHandler<M> {
    devices: Arc<Mutex<LegacyDevices>>,
    mmio: M,
}

impl<M: ExitHandler> LegacyExitHandler<M> {
    /// A handler over shared `devices`, with `mmio` for MMIO exits.
    pub fn new(devices: Arc<Mutex<LegacyDevices>>, mmio: M) -> Self {
        LegacyExitHandler { devices, mmio }
    }

    /// The MMIO handler.
    pub fn mmio(&self) -> &M {
        &self.mmio
    }
}

impl<M: ExitHandler> ExitHandler for LegacyExitHandler<M> {
    fn handle(&mut self, exit: Exit<'_>) -> Result<ExitAction, String> {
        let mut dev = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        match exit {
            Exit::IoIn { port, data } => {
                dev.pio_read(port, data);
            }
            Exit::IoOut { port, data } => {
                dev.pio_write(port, data);
            }
            other => {
                drop(dev);
                return self.mmio.handle(other);
            }
        }
        Ok(if dev.stop_requested().is_some() {
            ExitAction::Stop
        } else {
            ExitAction::Continue
        })
    }
}

#[cfg(test)]
mod tests;
