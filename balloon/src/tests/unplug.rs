//! RAM leaving the VM (a virtio-mem unplug): the balloon forgets its pages there, refuses guest
//! input there, and skips it in residency samples, until the VMM says it is plugged again.

use super::*;
use crate::backend::ResidencyProbe;
use crate::HUGE_PAGE_SIZE as H;

const REP: usize = 3;
const HL: u32 = H as u32;

#[test]
fn unplugged_ranges_are_forgotten_and_refused() {
    let (mut vm, fake) = Vm::new(BalloonConfig::default(), ALL);
    // Report [8H, 10H) and inflate the first two pages of 12H.
    vm.kick(REP, &[Buf::inb(8 * H, 2 * HL)]);
    let pfn = (12 * H / 4096) as u32;
    vm.send_pfns(0, &[pfn, pfn + 1]);
    let a = vm.dev.accounting();
    assert_eq!((a.reported_bytes, a.ballooned_bytes), (2 * H, 2 * 4096));

    // The VMM unplugs [9H, 13H): half the report and the ballooned pages go.
    let (ballooned, reported) = vm.dev.ram_unplugged(9 * H, 4 * H);
    assert_eq!((ballooned, reported), (2 * 4096, H));
    let a = vm.dev.accounting();
    assert_eq!(a.reported_bytes, H);
    assert_eq!(a.ballooned_bytes, 0);
    assert_eq!(a.assigned_bytes, RAM - 4 * H);
    assert_eq!(a.resident_estimate_bytes, RAM - 5 * H);
    assert_eq!(a.counters.unplugged_ranges, 1);
    assert_eq!(a.counters.unplug_cleared_bytes, H + 2 * 4096);
    // The balloon target is capped by what the VM holds now.
    let present_mib = (RAM - 4 * H) >> 20;
    assert!(vm.dev.set_target_mib(present_mib).is_ok());
    assert_eq!(
        vm.dev.set_target_mib(present_mib + 1),
        Err(crate::BalloonError::TargetTooLarge {
            target_mib: present_mib + 1,
            ram_mib: present_mib
        })
    );
    vm.dev.set_target_mib(0).unwrap();
    assert_eq!(
        vm.dev.ledger().present_runs(),
        vec![(0, 9 * H), (13 * H, RAM - 13 * H)]
    );

    // Guest input there: refused and counted, nothing discarded.
    fake.clear_discards();
    vm.kick(
        REP,
        &[Buf::inb(10 * H, HL), Buf::inb(8 * H + H - 4096, 8192)],
    );
    vm.send_pfns(0, &[pfn + 2]);
    let a = vm.dev.accounting();
    assert_eq!(a.input_errors.not_plugged, 3, "{:?}", a.input_errors);
    assert!(fake.discards().is_empty());

    // Residency samples only probe what the VM holds.
    let s = vm.dev.sample_residency(&fake).unwrap();
    assert_eq!(
        s.resident_bytes,
        fake.resident_bytes() - resident_in_unplugged(&fake)
    );

    // Plugged again: fresh memory, accepted again.
    vm.dev.ram_plugged(10 * H, H);
    vm.kick(REP, &[Buf::inb(10 * H, HL)]);
    let a = vm.dev.accounting();
    assert_eq!(a.reported_bytes, 2 * H);
    assert_eq!(a.assigned_bytes, RAM - 3 * H);
}

/// Resident bytes the fake holds in [9H, 13H) (the unplugged range; the fake does not know it
/// is gone).
fn resident_in_unplugged(fake: &RecordingBackend) -> u64 {
    let mut out = vec![false; (4 * H / 4096) as usize];
    fake.residency(9 * H, &mut out).unwrap();
    out.iter().filter(|r| **r).count() as u64 * 4096
}
