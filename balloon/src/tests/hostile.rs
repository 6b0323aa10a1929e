//! Hostile-driver tests: activation that fails half-way, hints of memory that leaves the VM
//! during a pass, stats buffers of every odd size and direction, hint command ids in any
//! order, and PFN and report traffic over a RAM map with a hole and an unplugged region. The
//! device must not panic, must return every chain, must never discard outside the RAM the VM
//! holds, and must not carry state from a failed activation into the next one.

use super::*;
use crate::hinting::VIRTIO_BALLOON_CMD_ID_STOP;
use crate::hinting::{HintPassObserver, HintState, VIRTIO_BALLOON_CMD_ID_DONE};
use crate::stats::{encode, MAX_STATS_BYTES};
use crate::{HUGE_PAGE_SIZE as H, PAGE_SIZE, VIRTIO_BALLOON_F_FREE_PAGE_HINT};
use proptest::prelude::*;
use std::sync::Mutex;

/// With stats, hinting and reporting: inflate 0, deflate 1, stats 2, hint 3, reporting 4.
const STATS: usize = 2;
const HINT: usize = 3;
const REP: usize = 4;

fn hint_cfg() -> BalloonConfig {
    BalloonConfig {
        free_page_hinting: true,
        ..BalloonConfig::default()
    }
}

const HINT_ALL: u64 = ALL | bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT);

fn cmd_id(vm: &Vm) -> u32 {
    let mut b = [0u8; 4];
    vm.dev.read_config(8, &mut b);
    u32::from_le_bytes(b)
}

/// Publish head `head` on queue `q`'s avail ring without a descriptor behind it.
fn publish_bogus_head(vm: &Vm, q: usize, head: u16) {
    let avail = vm.drv[q].avail_addr();
    let idx: u16 = vm.mem.read_obj(GuestAddress(avail + 2)).unwrap();
    let size = BalloonConfig::default().queue_size;
    vm.mem
        .write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(idx % size)))
        .unwrap();
    vm.mem
        .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
        .unwrap();
}

/// The driver starts over: its rings are zeroed and rebuilt at the same places.
fn fresh_rings(vm: &mut Vm) {
    let size = BalloonConfig::default().queue_size;
    for (i, d) in vm.drv.iter_mut().enumerate() {
        let base = 0x1_0000 * (i as u64 + 1);
        let zeros = vec![0u8; d.footprint() as usize];
        vm.mem.write_slice(&zeros, GuestAddress(base)).unwrap();
        *d = crate::testing::DriverQueue::new(base, size);
    }
}

#[test]
fn a_failed_activation_leaves_nothing_behind() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let fake = RecordingBackend::new(&[(0, RAM)]).unwrap();
    let mut vm = Vm::with_backend(mem, hint_cfg(), Box::new(fake.clone()), HINT_ALL);
    // Before DRIVER_OK the driver primes the stats queue (as Linux does), sends a STOP on the
    // hint queue, and publishes a head past the reporting ring: activation handles the first
    // two, then fails on the third.
    let stats = vm.put(0, &encode(&[(4, 1 << 20)]));
    vm.drv[STATS]
        .submit(&vm.mem, &[Buf::out(stats, 10)])
        .unwrap();
    let stop = vm.put(1, &VIRTIO_BALLOON_CMD_ID_STOP.to_le_bytes());
    vm.drv[HINT].submit(&vm.mem, &[Buf::out(stop, 4)]).unwrap();
    publish_bogus_head(&vm, REP, 1000);
    let queues = vm
        .drv
        .iter()
        .map(|d| d.device_queue(&vm.mem).unwrap())
        .collect();
    assert!(vm
        .dev
        .activate(vm.atomic.clone(), queues, vm.irq.clone())
        .is_err());
    assert!(!vm.dev.is_activated());
    // The transport resets nothing it did not activate; the driver re-probes from scratch.
    fresh_rings(&mut vm);
    vm.dev.set_acked_features(HINT_ALL);
    vm.activate();
    // The hint command id is back at STOP, not the DONE the failed attempt wrote.
    assert_eq!(cmd_id(&vm), VIRTIO_BALLOON_CMD_ID_STOP);
    assert_eq!(vm.dev.hinting().state, HintState::Idle);
    // A new stats buffer is held: the device must not return the head of a buffer from the
    // failed attempt, which this driver never made available.
    let stats = vm.put(2, &encode(&[(4, 2 << 20)]));
    assert_eq!(vm.kick(STATS, &[Buf::out(stats, 10)]), 0);
    assert_eq!(vm.dev.accounting().input_errors.extra_stats_buffers, 0);
    assert_eq!(vm.dev.request_stats(), Ok(true));
    assert_eq!(vm.drv[STATS].used_idx(&vm.mem), 1);
    assert_eq!(vm.drv[STATS].used_elem(&vm.mem, 0).0, 0);
}

#[derive(Debug, Default)]
struct Seen(Mutex<Vec<(u64, u64)>>);

impl HintPassObserver for Seen {
    fn pass_ended(&self, _cmd_id: u32, ranges: &[(u64, u64)]) -> u64 {
        self.0.lock().unwrap().extend_from_slice(ranges);
        0
    }
}

#[test]
fn hints_of_memory_unplugged_during_the_pass_are_dropped() {
    let (mut vm, fake) = Vm::new(hint_cfg(), HINT_ALL);
    let seen = Arc::new(Seen::default());
    vm.dev.set_hint_observer(seen.clone());
    let id = vm.dev.start_hinting().unwrap();
    let at = vm.put(0, &id.to_le_bytes());
    assert_eq!(vm.kick(HINT, &[Buf::out(at, 4)]), 1);
    // Two 4 MiB blocks hinted, then the second one leaves the VM (virtio-mem unplug).
    assert_eq!(vm.kick(HINT, &[Buf::inb(8 * H, 2 * H as u32)]), 1);
    assert_eq!(vm.kick(HINT, &[Buf::inb(12 * H, 2 * H as u32)]), 1);
    vm.dev.ram_unplugged(12 * H, 2 * H);
    assert_eq!(vm.dev.hinted_ranges(), vec![(8 * H, 2 * H)]);
    assert_eq!(vm.dev.hinting().pass_hinted_bytes, 2 * H);
    // A hint there now is refused.
    assert_eq!(vm.kick(HINT, &[Buf::inb(12 * H, 2 * H as u32)]), 1);
    let at = vm.put(1, &VIRTIO_BALLOON_CMD_ID_STOP.to_le_bytes());
    assert_eq!(vm.kick(HINT, &[Buf::out(at, 4)]), 1);
    assert_eq!(cmd_id(&vm), VIRTIO_BALLOON_CMD_ID_DONE);
    // The observer (which discards) only hears of RAM the VM still holds.
    assert_eq!(*seen.0.lock().unwrap(), vec![(8 * H, 2 * H)]);
    assert!(fake.discards().is_empty());
}

#[test]
fn stats_buffers_of_every_odd_size_and_direction() {
    let (mut vm, _) = Vm::new(BalloonConfig::default(), ALL);
    const S: usize = 2;
    let good = encode(&[(4, 7), (5, 8)]);
    let addr = vm.put(0, &good);
    assert_eq!(vm.kick(S, &[Buf::out(addr, good.len() as u32)]), 0);
    let latest = vm.dev.latest_stats().cloned().unwrap();
    let mut returned = 0u16;
    for (len, writable, replaces) in [
        (0u32, false, false),
        (9, false, false),
        (10, true, false),
        (11, false, true),
        (MAX_STATS_BYTES as u32 + 10, false, true),
        (u32::MAX, false, true),
    ] {
        // Each new buffer returns the held one.
        let before = vm.dev.latest_stats().cloned().unwrap();
        let n = vm.kick(
            S,
            &[Buf {
                addr,
                len,
                writable,
            }],
        );
        returned += n;
        assert_eq!(n, 1, "{len} {writable}");
        // Nothing shorter than one entry (or writable) replaces the statistics.
        let now = vm.dev.latest_stats().unwrap();
        if !replaces {
            assert_eq!(now.values, before.values, "{len}");
        }
    }
    // The 11-byte buffer gave one entry and a trailing byte; the oversized ones were cut at
    // the cap and parsed.
    let now = vm.dev.latest_stats().unwrap();
    assert_eq!(
        now.get(crate::StatTag::FreeMemory),
        latest.get(crate::StatTag::FreeMemory)
    );
    let e = vm.dev.accounting().input_errors;
    assert_eq!(e.wrong_direction, 1);
    assert_eq!(e.oversized, 2);
    assert_eq!(e.extra_stats_buffers, u64::from(returned));
    // A stats buffer outside RAM: unreadable, counted, returned later like any other.
    assert_eq!(vm.kick(S, &[Buf::out(RAM - 4, 10)]), 1);
    assert_eq!(vm.kick(S, &[Buf::out(u64::MAX - 3, 10)]), 1);
    assert!(vm.dev.accounting().input_errors.unreadable >= 2);
    assert_eq!(vm.dev.request_stats(), Ok(true));
    assert_eq!(vm.dev.request_stats(), Ok(false));
}

#[derive(Clone, Debug)]
enum HintOp {
    Start,
    Stop,
    Finish,
    Reset,
    /// The guest sends the current pass id, an old one, STOP, DONE, or anything.
    Cmd(u8, u32),
    /// A command buffer shorter than 4 bytes.
    ShortCmd(u32),
    Hint(u64, u32),
}

fn hint_op() -> impl Strategy<Value = HintOp> {
    prop_oneof![
        2 => Just(HintOp::Start),
        1 => Just(HintOp::Stop),
        1 => Just(HintOp::Finish),
        1 => Just(HintOp::Reset),
        4 => (0u8..5, any::<u32>()).prop_map(|(k, v)| HintOp::Cmd(k, v)),
        1 => (0u32..4).prop_map(HintOp::ShortCmd),
        4 => (prop_oneof![(0..RAM / H).prop_map(|b| b * H), any::<u64>()], prop_oneof![Just(2 * H as u32), any::<u32>()])
            .prop_map(|(a, l)| HintOp::Hint(a, l)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn hint_command_ids_in_any_order(ops in prop::collection::vec(hint_op(), 1..50)) {
        let (mut vm, fake) = Vm::new(hint_cfg(), HINT_ALL);
        let mut last_id = 0u32;
        for op in ops {
            match op {
                HintOp::Start => {
                    if let Ok(id) = vm.dev.start_hinting() {
                        prop_assert!(id > VIRTIO_BALLOON_CMD_ID_DONE);
                        prop_assert_eq!(cmd_id(&vm), id);
                        last_id = id;
                    }
                }
                HintOp::Stop => {
                    let _ = vm.dev.stop_hinting();
                }
                HintOp::Finish => {
                    vm.dev.finish_hinting().unwrap();
                    prop_assert_eq!(cmd_id(&vm), VIRTIO_BALLOON_CMD_ID_DONE);
                }
                HintOp::Reset => {
                    let _ = vm.dev.reset();
                    fresh_rings(&mut vm);
                    vm.dev.set_acked_features(HINT_ALL);
                    vm.activate();
                    prop_assert_eq!(cmd_id(&vm), VIRTIO_BALLOON_CMD_ID_STOP);
                }
                HintOp::Cmd(kind, any) => {
                    let id = match kind {
                        0 => last_id,
                        1 => last_id.wrapping_sub(1),
                        2 => VIRTIO_BALLOON_CMD_ID_STOP,
                        3 => VIRTIO_BALLOON_CMD_ID_DONE,
                        _ => any,
                    };
                    let at = vm.put(0, &id.to_le_bytes());
                    prop_assert_eq!(vm.kick(HINT, &[Buf::out(at, 4)]), 1);
                }
                HintOp::ShortCmd(len) => {
                    let at = vm.put(0, &last_id.to_le_bytes());
                    prop_assert_eq!(vm.kick(HINT, &[Buf::out(at, len)]), 1);
                }
                HintOp::Hint(gpa, len) => {
                    prop_assert_eq!(vm.kick(HINT, &[Buf::inb(gpa, len)]), 1);
                }
            }
            let s = vm.dev.hinting();
            let c = cmd_id(&vm);
            prop_assert_eq!(c, s.config_cmd_id);
            match s.state {
                HintState::Idle | HintState::Stopping => prop_assert_eq!(c, VIRTIO_BALLOON_CMD_ID_STOP),
                HintState::Done => prop_assert_eq!(c, VIRTIO_BALLOON_CMD_ID_DONE),
                HintState::Requested | HintState::Running => prop_assert_eq!(c, s.pass_cmd_id),
            }
            prop_assert!(s.pass_hinted_bytes <= RAM);
            prop_assert!(vm.dev.hinted_ranges().iter().all(|&(a, l)| a + l <= RAM));
        }
        // Hints are never discarded by the device.
        prop_assert!(fake.discards().is_empty());
    }
}

/// RAM with a hole: [0, 32 MiB) and [64 MiB, 128 MiB), of which [96 MiB, 128 MiB) is an
/// unplugged virtio-mem part.
const LOW: u64 = 32 << 20;
const HIGH: u64 = 64 << 20;
const HIGH_END: u64 = 128 << 20;
const UNPLUGGED: u64 = 96 << 20;

fn holey_vm() -> (Vm, RecordingBackend) {
    let ranges = [(0, LOW), (HIGH, HIGH_END - HIGH)];
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), LOW as usize),
        (GuestAddress(HIGH), (HIGH_END - HIGH) as usize),
    ])
    .unwrap();
    let fake = RecordingBackend::new(&ranges).unwrap();
    let mut vm = Vm::with_backend(mem, BalloonConfig::default(), Box::new(fake.clone()), ALL);
    vm.activate();
    vm.dev.ram_unplugged(UNPLUGGED, HIGH_END - UNPLUGGED);
    (vm, fake)
}

fn pfn() -> impl Strategy<Value = u32> {
    let page = |a: u64| (a / PAGE_SIZE) as u32;
    prop_oneof![
        (0..page(LOW)),
        (page(LOW)..page(HIGH)),
        (page(HIGH)..page(UNPLUGGED)),
        (page(UNPLUGGED)..page(HIGH_END) + 16),
        any::<u32>(),
    ]
}

#[derive(Clone, Debug)]
enum PfnOp {
    Inflate(Vec<u32>, usize),
    Deflate(Vec<u32>, usize),
    Report(u64, u32),
}

fn pfn_op() -> impl Strategy<Value = PfnOp> {
    prop_oneof![
        (prop::collection::vec(pfn(), 0..64), 0usize..4).prop_map(|(p, t)| PfnOp::Inflate(p, t)),
        (prop::collection::vec(pfn(), 0..64), 0usize..4).prop_map(|(p, t)| PfnOp::Deflate(p, t)),
        (
            prop_oneof![(0..HIGH_END / H).prop_map(|b| b * H), any::<u64>()],
            prop_oneof![Just(H as u32), any::<u32>()]
        )
            .prop_map(|(a, l)| PfnOp::Report(a, l)),
    ]
}

/// Whether `[gpa, gpa+len)` is RAM the VM holds.
fn held(gpa: u64, len: u64) -> bool {
    let end = gpa + len;
    end <= LOW || (gpa >= HIGH && end <= UNPLUGGED)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn pfns_and_reports_around_a_hole_and_an_unplugged_region(
        ops in prop::collection::vec(pfn_op(), 1..24)
    ) {
        let (mut vm, fake) = holey_vm();
        for op in ops {
            match &op {
                PfnOp::Inflate(pfns, trailing) | PfnOp::Deflate(pfns, trailing) => {
                    let q = usize::from(matches!(op, PfnOp::Deflate(..)));
                    let mut bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
                    // An array of odd length: a few trailing bytes.
                    bytes.extend(std::iter::repeat_n(0xffu8, *trailing));
                    let addr = vm.put(0, &bytes);
                    prop_assert_eq!(vm.kick(q, &[Buf::out(addr, bytes.len() as u32)]), 1);
                }
                PfnOp::Report(gpa, len) => {
                    prop_assert_eq!(vm.kick(3, &[Buf::inb(*gpa, *len)]), 1);
                }
            }
        }
        for d in fake.discards() {
            prop_assert!(held(d.gpa, d.len), "discarded {:?}", d);
        }
        for (a, l) in vm.dev.ledger().ballooned().runs() {
            prop_assert!(held(a, l), "ballooned {:#x}+{:#x}", a, l);
        }
        for (a, l) in vm.dev.ledger().reported().runs() {
            prop_assert!(held(a, l), "reported {:#x}+{:#x}", a, l);
        }
        let acc = vm.dev.accounting();
        prop_assert_eq!(acc.assigned_bytes, LOW + (UNPLUGGED - HIGH));
        prop_assert_eq!(
            acc.resident_estimate_bytes + acc.ballooned_bytes + acc.reported_bytes,
            acc.assigned_bytes
        );
    }
}
