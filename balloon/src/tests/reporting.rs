//! Free page reporting through the device with the recording backend.

use super::*;
use crate::HUGE_PAGE_SIZE as H;

const HL: u32 = H as u32;
use crate::backend::Discard;

const REP: usize = 3;

#[test]
fn reports_of_4k_2m_and_4m_blocks() {
    let (mut vm, fake) = Vm::new(BalloonConfig::default(), ALL);
    // One 4 KiB block (page_reporting_order=0), one 2 MiB, one 4 MiB (order 10).
    let chain = [
        Buf::inb(0x30_0000, 0x1000),
        Buf::inb(8 * H, HL),
        Buf::inb(12 * H, 2 * HL),
    ];
    assert_eq!(vm.kick(REP, &chain), 1);
    assert_eq!(vm.drv[REP].used_elem(&vm.mem, 0), (0, 0));
    assert_eq!(vm.irq.used(), 1);
    assert_eq!(
        fake.discards(),
        vec![
            Discard {
                gpa: 0x30_0000,
                len: 0x1000
            },
            Discard { gpa: 8 * H, len: H },
            Discard {
                gpa: 12 * H,
                len: 2 * H
            },
        ]
    );
    let a = vm.dev.accounting();
    assert_eq!(a.reported_bytes, 3 * H + 0x1000);
    assert_eq!(a.counters.reports, 1);
    assert_eq!(a.counters.reported_ranges, 3);
    assert_eq!(a.counters.whole_huge_blocks, 3);
    assert_eq!(a.counters.split_huge_blocks, 1);
    assert_eq!(a.resident_estimate_bytes, RAM - 3 * H - 0x1000);
}

#[test]
fn full_32_entry_reports_and_re_reporting() {
    let (mut vm, fake) = Vm::new(BalloonConfig::default(), ALL);
    // Linux's capacity: 32 entries per report. Order-8 (1 MiB) blocks at odd MiB so that none
    // merge; each splits a 2 MiB block.
    let mib = 1u64 << 20;
    let chain: Vec<Buf> = (0..32u64)
        .map(|i| Buf::inb((2 * i + 1) * mib, mib as u32))
        .collect();
    assert_eq!(vm.kick(REP, &chain), 1);
    assert_eq!(fake.discards().len(), 32);
    let a = vm.dev.accounting();
    assert_eq!(a.reported_bytes, 32 * mib);
    assert_eq!(a.counters.split_huge_blocks, 32);
    assert_eq!(a.counters.whole_huge_blocks, 0);
    // The guest reuses a block, frees it, and reports it again: discarded again, counted once
    // in the current reported set.
    assert_eq!(vm.kick(REP, &chain[..1]), 1);
    let a = vm.dev.accounting();
    assert_eq!(a.reported_bytes, 32 * mib);
    assert_eq!(a.counters.reported_bytes_total, 33 * mib);
    assert_eq!(a.counters.reports, 2);
}

#[test]
fn refaults_are_estimated_from_residency() {
    let (mut vm, fake) = Vm::new(BalloonConfig::default(), ALL);
    vm.kick(REP, &[Buf::inb(4 * H, HL), Buf::inb(6 * H, HL)]);
    assert_eq!(fake.resident_bytes(), RAM - 2 * H);
    // The guest reuses 1 MiB of the first block.
    fake.touch(4 * H, 1 << 20);
    let s = vm.dev.sample_residency(&fake).unwrap();
    assert_eq!(s.probed_reported_bytes, 2 * H);
    assert_eq!(s.refaulted_bytes, 1 << 20);
    assert_eq!(s.resident_bytes, RAM - 2 * H + (1 << 20));
    let a = vm.dev.accounting();
    assert_eq!(a.reported_bytes, 2 * H - (1 << 20));
    assert_eq!(a.refaulted_bytes, 1 << 20);
    assert_eq!(a.sampled_resident_bytes, Some(RAM - 2 * H + (1 << 20)));
    assert_eq!(s.ballooned_resident_bytes, 0);
    // A guest that uses ballooned pages without deflating shows up.
    vm.send_pfns(0, &[0x3000, 0x3001]);
    fake.touch(0x300_0000, 0x1000);
    assert_eq!(
        vm.dev
            .sample_residency(&fake)
            .unwrap()
            .ballooned_resident_bytes,
        0x1000
    );
    // A second sample finds nothing new.
    let s = vm.dev.sample_residency(&fake).unwrap();
    assert_eq!(s.refaulted_bytes, 0);
    assert_eq!(vm.dev.accounting().counters.residency_samples, 3);
}

#[test]
fn inflating_reported_pages_moves_them_to_the_balloon() {
    let (mut vm, _) = Vm::new(BalloonConfig::default(), ALL);
    vm.kick(REP, &[Buf::inb(4 * H, HL)]);
    let pfn = (4 * H / 4096) as u32;
    vm.send_pfns(0, &[pfn, pfn + 1]);
    let a = vm.dev.accounting();
    assert_eq!(a.reported_bytes, H - 0x2000);
    assert_eq!(a.ballooned_bytes, 0x2000);
    assert_eq!(a.resident_estimate_bytes, RAM - H);
}

#[test]
fn backend_failures_are_counted_and_the_chain_still_returns() {
    let (mut vm, fake) = Vm::new(BalloonConfig::default(), ALL);
    fake.set_failure(Some("EIO"));
    assert_eq!(vm.kick(REP, &[Buf::inb(4 * H, HL)]), 1);
    let a = vm.dev.accounting();
    assert_eq!(a.reported_bytes, 0);
    assert_eq!(a.counters.discard_failures, 1);
}
