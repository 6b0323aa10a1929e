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
    /// No interrupt.
    None,
}

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), std::io::Error> {
        match self {
            IrqLine::Irqfd(fd) => fd.write(1),
            IrqLine::None => Ok(()),
        }
    }
}

type Uart = Serial<IrqLine, NoEvents, Box<dyn Write + Send>>;

/// The console UART.
pub struct SerialConsole {
    uart: Uart,
    /// Interrupt or output errors seen (the guest cannot be told; they are counted).
    pub errors: u64,
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
        }
    }

    /// Guest read of register `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Guest write of register `offset` (0..8).
    pub fn write(&mut self, offset: u8, value: u8) {
        if self.uart.write(offset, value).is_err() {
            self.errors += 1;
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
