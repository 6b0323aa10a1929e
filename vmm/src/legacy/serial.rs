//! The 16550 console (vm-superio) with its interrupt line, and a writer that timestamps
//! marker strings as they pass (for boot-time measurements).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The serial port's interrupt: an eventfd registered as an irqfd on GSI 4, or nothing (the
/// guest then polls).
#[derive(Debug)]
pub enum IrqLine {
    /// An irqfd: writing the eventfd raises the GSI.
    Irqfd(EventFd),
    /// KVM_IRQ_LINE on a VM file descriptor (a duplicate the line owns): raise, then lower.
    IrqLine {
        /// The VM fd.
        vm: std::os::fd::OwnedFd,
        /// The GSI.
        gsi: u32,
    },
    /// No interrupt.
    None,
}

/// `_IOW(KVMIO, 0x61, struct kvm_irq_level)`.
const KVM_IRQ_LINE: libc::c_ulong = 0x4008_ae61;

fn irq_line(vm: &std::os::fd::OwnedFd, gsi: u32, level: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut l = kvm_bindings::kvm_irq_level::default();
    l.__bindgen_anon_1.irq = gsi;
    l.level = level;
    // SAFETY: `vm` is a KVM VM fd; KVM_IRQ_LINE reads one `kvm_irq_level`, which lives on
    // this stack frame for the call.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_IRQ_LINE, &l) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), std::io::Error> {
        match self {
            IrqLine::Irqfd(fd) => fd.write(1),
            IrqLine::IrqLine { vm, gsi } => {
                irq_line(vm, *gsi, 1)?;
                irq_line(vm, *gsi, 0)
            }
            IrqLine::None => Ok(()),
        }
    }
}

type Uart = Serial<IrqLine, NoEvents, Box<dyn Write + Send>>;

/// 16550 interrupt-enable register offset.
const IER_OFFSET: u8 = 1;
/// IER: THR-empty interrupt enable (ETBEI).
const IER_THRE: u8 = 0x02;
/// IIR: THR-empty interrupt pending.
const IIR_THRE: u8 = 0x02;
/// LCR: divisor latch access bit (offsets 0 and 1 are the divisor then).
const LCR_DLAB: u8 = 0x80;

/// The console UART.
pub struct SerialConsole {
    uart: Uart,
    /// Interrupt or output errors seen (the guest cannot be told; they are counted).
    pub errors: u64,
    /// Guest register writes, by offset.
    pub reg_writes: [u64; 8],
    /// Guest register reads, by offset.
    pub reg_reads: [u64; 8],
    /// Extra THR-empty interrupts signalled on IER writes.
    pub rearms: u64,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole")
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

impl SerialConsole {
    /// A UART raising `irq` and writing what the guest sends to `out`.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> SerialConsole {
        SerialConsole {
            uart: Serial::new(irq, out),
            errors: 0,
            reg_writes: [0; 8],
            reg_reads: [0; 8],
            rearms: 0,
        }
    }

    /// Guest read of register `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        if let Some(c) = self.reg_reads.get_mut(usize::from(offset)) {
            *c += 1;
        }
        self.uart.read(offset)
    }

    /// Guest write of register `offset` (0..8).
    pub fn write(&mut self, offset: u8, value: u8) {
        // A 16550 raises the THR-empty interrupt again whenever the driver sets ETBEI while THR
        // is empty. vm-superio raises it only when it is not already pending, but a pending
        // one may have been signalled while the guest had the line masked: Linux's 8250
        // startup tests THRE with IER writes before it requests the IRQ, and then the console
        // never drains (measured: /init's output never appeared). So re-signal it here.
        if let Some(c) = self.reg_writes.get_mut(usize::from(offset)) {
            *c += 1;
        }
        let rearm = offset == IER_OFFSET && value & IER_THRE != 0 && {
            let s = self.uart.state();
            s.line_control & LCR_DLAB == 0 && s.interrupt_identification & IIR_THRE != 0
        };
        if self.uart.write(offset, value).is_err() {
            self.errors += 1;
        }
        if rearm {
            self.rearms += 1;
            if self.uart.interrupt_evt().trigger().is_err() {
                self.errors += 1;
            }
        }
    }

    /// Bytes for the guest to read (console input); returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

/// What a [`MarkerWriter`] saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MarkerLog {
    /// Each marker and when it first appeared (since the writer's start), if it did.
    pub hits: Vec<(String, Option<Duration>)>,
    /// The last complete line written (without the newline).
    pub last_line: String,
    /// When the first byte arrived.
    pub first_byte: Option<Duration>,
    /// Bytes written.
    pub bytes: u64,
}

/// A writer that passes bytes on to `inner` and records when each marker string first
/// appears in a line, and the last complete line.
pub struct MarkerWriter {
    inner: Box<dyn Write + Send>,
    start: Instant,
    line: Vec<u8>,
    log: Arc<Mutex<MarkerLog>>,
}

impl std::fmt::Debug for MarkerWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarkerWriter")
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

impl MarkerWriter {
    /// Watch for `markers`, timing from `start`. The returned log is updated as lines end.
    pub fn new(
        inner: Box<dyn Write + Send>,
        markers: &[String],
        start: Instant,
    ) -> (MarkerWriter, Arc<Mutex<MarkerLog>>) {
        let log = Arc::new(Mutex::new(MarkerLog {
            hits: markers.iter().map(|m| (m.clone(), None)).collect(),
            ..Default::default()
        }));
        (
            MarkerWriter {
                inner,
                start,
                line: Vec::new(),
                log: Arc::clone(&log),
            },
            log,
        )
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line)
            .trim_end_matches('\r')
            .to_string();
        let now = self.start.elapsed();
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        for (m, t) in log.hits.iter_mut() {
            if t.is_none() && text.contains(m.as_str()) {
                *t = Some(now);
            }
        }
        log.last_line = text;
        self.line.clear();
    }
}

impl Write for MarkerWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        {
            let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            if log.first_byte.is_none() && !buf.is_empty() {
                log.first_byte = Some(self.start.elapsed());
            }
            log.bytes += buf.len() as u64;
        }
        for &b in buf {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        self.inner.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl MarkerLog {
    /// When `marker` first appeared.
    pub fn hit(&self, marker: &str) -> Option<Duration> {
        self.hits
            .iter()
            .find(|(m, _)| m == marker)
            .and_then(|(_, t)| *t)
    }
}
