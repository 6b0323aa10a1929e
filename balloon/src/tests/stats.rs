//! The statistics queue: priming, the held buffer, periodic requests, every tag.

use super::*;
use crate::error::BalloonError;
use crate::stats::{encode, StatTag};
use std::time::Duration;

fn all_tags(base: u64) -> Vec<(u16, u64)> {
    (0..16u16).map(|t| (t, base + u64::from(t))).collect()
}

#[test]
fn primed_buffer_is_held_and_returned_on_request() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let fake = RecordingBackend::new(&[(0, RAM)]).unwrap();
    let mut vm = Vm::with_backend(mem, BalloonConfig::default(), Box::new(fake), ALL);
    assert_eq!(vm.dev.stats_interval(), Some(Duration::from_secs(1)));

    // Linux primes the stats queue during probe, before DRIVER_OK.
    let bytes = encode(&all_tags(100));
    let addr = vm.put(0, &bytes);
    vm.drv[2]
        .submit(&vm.mem, &[Buf::out(addr, bytes.len() as u32)])
        .unwrap();
    vm.activate();
    let s = vm.dev.latest_stats().expect("stats read at activation");
    for t in StatTag::ALL {
        assert_eq!(s.get(t), Some(100 + t as u64), "{}", t.name());
    }
    assert_eq!(s.unknown_tags, 0);
    assert_eq!(
        vm.drv[2].used_idx(&vm.mem),
        0,
        "the device keeps the buffer"
    );

    // The VMM's timer asks for fresh numbers: the buffer goes back with an interrupt.
    assert_eq!(vm.dev.request_stats(), Ok(true));
    assert_eq!(vm.drv[2].used_idx(&vm.mem), 1);
    assert_eq!(vm.irq.used(), 1);
    // Nothing held until the driver answers.
    assert_eq!(vm.dev.request_stats(), Ok(false));

    // The driver refills the same buffer and re-queues it, with one unknown tag appended.
    let mut entries = all_tags(200);
    entries.push((77, 1));
    let bytes = encode(&entries);
    vm.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    assert_eq!(vm.kick(2, &[Buf::out(addr, bytes.len() as u32)]), 0);
    let s = vm.dev.latest_stats().unwrap();
    assert_eq!(s.get(StatTag::DirectReclaims), Some(215));
    assert_eq!(s.get(StatTag::OomKills), Some(210));
    assert_eq!(s.unknown_tags, 1);
    let a = vm.dev.accounting();
    assert_eq!(a.counters.stats_updates, 2);
    assert_eq!(a.input_errors.unknown_stat_tags, 1);
    assert_eq!(vm.dev.request_stats(), Ok(true));
    assert_eq!(vm.drv[2].used_idx(&vm.mem), 2);
}

#[test]
fn a_second_buffer_returns_the_first() {
    let (mut vm, _) = Vm::new(BalloonConfig::default(), ALL);
    let a = vm.put(0, &encode(&[(4, 1)]));
    let b = vm.put(1, &encode(&[(4, 2), (5, 3)]));
    assert_eq!(vm.kick(2, &[Buf::out(a, 10)]), 0);
    assert_eq!(vm.kick(2, &[Buf::out(b, 15)]), 1, "older buffer returned");
    let s = vm.dev.latest_stats().unwrap();
    assert_eq!(s.get(StatTag::FreeMemory), Some(2));
    assert_eq!(s.trailing_bytes, 5);
    let e = vm.dev.accounting().input_errors;
    assert_eq!(e.extra_stats_buffers, 1);
    assert_eq!(e.trailing_bytes, 1);
    // A device-writable (wrong direction) buffer carries nothing: the last stats stay.
    assert_eq!(vm.kick(2, &[Buf::inb(a, 10)]), 1);
    assert_eq!(
        vm.dev.latest_stats().unwrap().get(StatTag::FreeMemory),
        Some(2)
    );
    assert_eq!(vm.dev.accounting().input_errors.wrong_direction, 1);
}

#[test]
fn stats_disabled() {
    let cfg = BalloonConfig {
        stats_interval_s: 0,
        ..Default::default()
    };
    let (mut vm, _) = Vm::new(
        cfg,
        bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_REPORTING),
    );
    assert_eq!(vm.dev.stats_interval(), None);
    assert_eq!(vm.dev.request_stats(), Err(BalloonError::StatsDisabled));
    assert_eq!(
        vm.dev.set_stats_interval_s(5),
        Err(BalloonError::StatsDisabled)
    );
    // Offered but not negotiated by the guest.
    let (mut vm, _) = Vm::new(BalloonConfig::default(), bit(VIRTIO_F_VERSION_1));
    assert_eq!(vm.dev.request_stats(), Err(BalloonError::StatsDisabled));
    vm.dev.set_stats_interval_s(10).unwrap();
    assert_eq!(vm.dev.stats_interval(), Some(Duration::from_secs(10)));
}
