use super::*;
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("sink").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn devices() -> (Arc<Mutex<LegacyDevices>>, Sink) {
    let sink = Sink::default();
    let serial = SerialConsole::new(IrqLine::None, Box::new(sink.clone()));
    (Arc::new(Mutex::new(LegacyDevices::new(serial))), sink)
}

#[test]
fn serial_output_reaches_the_writer() {
    let (dev, sink) = devices();
    let mut h = LegacyExitHandler::new(Arc::clone(&dev), NoMmio);
    for b in b"hi\n" {
        let r = h.handle(Exit::IoOut {
            port: COM1_PORT,
            data: &[*b],
        });
        assert_eq!(r, Ok(ExitAction::Continue));
    }
    assert_eq!(sink.0.lock().expect("sink").as_slice(), b"hi\n");
    // Line status register: transmitter empty (bit 5, bit 6).
    let mut lsr = [0u8];
    h.handle(Exit::IoIn {
        port: COM1_PORT + 5,
        data: &mut lsr,
    })
    .expect("read");
    assert_eq!(lsr[0] & 0x60, 0x60);
}

#[test]
fn absent_ports_and_mmio_read_as_ones() {
    let (dev, _) = devices();
    let mut h = LegacyExitHandler::new(Arc::clone(&dev), NoMmio);
    let mut d = [0u8; 4];
    h.handle(Exit::IoIn {
        port: 0xcfc,
        data: &mut d,
    })
    .expect("read");
    assert_eq!(d, [0xff; 4]);
    let mut m = [0u8; 2];
    h.handle(Exit::MmioRead {
        addr: 0xd000_0000,
        data: &mut m,
    })
    .expect("mmio");
    assert_eq!(m, [0xff; 2]);
    h.handle(Exit::IoOut {
        port: 0x2f8,
        data: &[1],
    })
    .expect("write");
    assert_eq!(dev.lock().expect("dev").unclaimed, 2);
}

#[test]
fn i8042_reset_stops_the_vm() {
    let (dev, _) = devices();
    let mut h = LegacyExitHandler::new(Arc::clone(&dev), NoMmio);
    let mut s = [0u8];
    h.handle(Exit::IoIn {
        port: I8042_CMD_PORT,
        data: &mut s,
    })
    .expect("status");
    assert_eq!(dev.lock().expect("dev").stop_requested(), None);
    let r = h.handle(Exit::IoOut {
        port: I8042_CMD_PORT,
        data: &[0xfe],
    });
    assert_eq!(r, Ok(ExitAction::Stop));
    assert_eq!(
        dev.lock().expect("dev").stop_requested(),
        Some(GuestStop::Reset)
    );
}

#[test]
fn acpi_s5_powers_off_and_other_sleep_states_do_not() {
    let (dev, _) = devices();
    let mut h = LegacyExitHandler::new(Arc::clone(&dev), NoMmio);
    // SLP_TYP 3 with SLP_EN: not S5.
    let r = h.handle(Exit::IoOut {
        port: SLEEP_CONTROL_PORT,
        data: &[(3 << 2) | SLP_EN],
    });
    assert_eq!(r, Ok(ExitAction::Continue));
    // S5 without SLP_EN: nothing.
    let r = h.handle(Exit::IoOut {
        port: SLEEP_CONTROL_PORT,
        data: &[S5_SLP_TYP << 2],
    });
    assert_eq!(r, Ok(ExitAction::Continue));
    let r = h.handle(Exit::IoOut {
        port: SLEEP_CONTROL_PORT,
        data: &[(S5_SLP_TYP << 2) | SLP_EN],
    });
    assert_eq!(r, Ok(ExitAction::Stop));
    assert_eq!(
        dev.lock().expect("dev").stop_requested(),
        Some(GuestStop::PowerOff)
    );
}

#[test]
fn marker_writer_times_markers_and_keeps_the_last_line() {
    let sink = Sink::default();
    let (mut w, log) = MarkerWriter::new(
        Box::new(sink.clone()),
        &["READY".to_string(), "NEVER".to_string()],
        Instant::now() - Duration::from_secs(1),
    );
    w.write_all(b"boot\r\nsystem READY now\npart")
        .expect("write");
    let l = log.lock().expect("log").clone();
    assert!(l.hit("READY").is_some_and(|t| t >= Duration::from_secs(1)));
    assert_eq!(l.hit("NEVER"), None);
    assert_eq!(l.last_line, "system READY now");
    assert_eq!(l.bytes, 27);
    assert!(l.first_byte.is_some());
    assert_eq!(sink.0.lock().expect("sink").len(), 27);
}
