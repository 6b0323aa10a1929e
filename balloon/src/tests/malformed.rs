//! Hostile driver input: every malformed case is counted per kind and ignored, the chain is
//! still returned, and nothing outside the VM's RAM is discarded.

use super::*;
use crate::backend::Discard;
use crate::HUGE_PAGE_SIZE as H;

const REP: usize = 3;

#[test]
fn malformed_report_entries() {
    let (mut vm, fake) = Vm::new(BalloonConfig::default(), ALL);
    let chain = [
        Buf::out(4 * H, H as u32),          // device-readable: wrong direction
        Buf::inb(RAM, H as u32),            // beyond RAM
        Buf::inb(RAM - 0x1000, 0x2000),     // straddles the end of RAM
        Buf::inb(0x1_0000_0000, 0x1000),    // far outside
        Buf::inb(6 * H + 0x200, 0x1000),    // misaligned address
        Buf::inb(6 * H, 0x1800),            // misaligned length
        Buf::inb(8 * H, 0),                 // zero length
        Buf::inb(u64::MAX - 0xfff, 0x2000), // overflows
        Buf::inb(10 * H, H as u32),         // valid
        Buf::inb(10 * H + H / 2, 0x1000),   // overlaps the valid one
    ];
    assert_eq!(vm.kick(REP, &chain), 1, "the chain still comes back");
    assert_eq!(
        fake.discards(),
        vec![Discard {
            gpa: 10 * H,
            len: H
        }]
    );
    let e = vm.dev.accounting().input_errors;
    assert_eq!(e.wrong_direction, 1);
    assert_eq!(e.out_of_ram, 3);
    assert_eq!(e.misaligned, 2);
    assert_eq!(e.zero_length, 1);
    assert_eq!(e.overflow, 1);
    assert_eq!(e.overlap, 1);
    assert_eq!(vm.dev.accounting().reported_bytes, H);
}

#[test]
fn malformed_pfn_buffers() {
    let (mut vm, fake) = Vm::new(BalloonConfig::default(), ALL);
    // A device-writable PFN buffer: wrong direction, and so an empty buffer.
    let addr = vm.put(0, &7u32.to_le_bytes());
    assert_eq!(vm.kick(0, &[Buf::inb(addr, 4)]), 1);
    // A buffer that points outside guest memory.
    assert_eq!(vm.kick(0, &[Buf::out(RAM + 0x1000, 4)]), 1);
    // Trailing bytes and PFNs beyond RAM.
    let mut bytes: Vec<u8> = [9u32, 0x10_0000, u32::MAX]
        .iter()
        .flat_map(|p| p.to_le_bytes())
        .collect();
    bytes.extend_from_slice(&[1, 2]);
    let addr = vm.put(1, &bytes);
    assert_eq!(vm.kick(0, &[Buf::out(addr, bytes.len() as u32)]), 1);
    // An absurd length: only the first 64 KiB are read (PFNs 0.. from zeroed memory).
    assert_eq!(vm.kick(0, &[Buf::out(0x20_0000, u32::MAX)]), 1);
    let e = vm.dev.accounting().input_errors;
    assert_eq!(e.wrong_direction, 1);
    assert_eq!(e.unreadable, 1);
    assert_eq!(e.zero_length, 2);
    assert_eq!(e.trailing_bytes, 1);
    assert_eq!(e.out_of_ram, 2);
    assert_eq!(e.oversized, 1);
    // PFN 9 and PFN 0 (16 Ki zero entries: one inflate, the rest duplicates).
    assert_eq!(e.duplicate_inflate, 16 * 1024 - 1);
    assert_eq!(vm.dev.accounting().ballooned_bytes, 2 * 4096);
    assert!(fake.discards().iter().all(|d| d.gpa + d.len <= RAM));
}

#[test]
fn never_discards_memory_the_vm_does_not_own() {
    // Guest memory is 64 MiB but the balloon owns only the first 32 MiB (the rest could be a
    // virtio-mem region managed elsewhere).
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let fake = RecordingBackend::new(&[(0, RAM / 2)]).unwrap();
    let mut vm = Vm::with_backend(mem, BalloonConfig::default(), Box::new(fake.clone()), ALL);
    vm.activate();
    vm.kick(
        REP,
        &[
            Buf::inb(RAM / 2, H as u32),
            Buf::inb(RAM / 2 - H, 2 * H as u32),
        ],
    );
    vm.send_pfns(0, &[(RAM / 2 / 4096) as u32]);
    assert!(fake.discards().is_empty());
    assert_eq!(vm.dev.accounting().input_errors.out_of_ram, 3);
    assert_eq!(vm.dev.accounting().assigned_bytes, RAM / 2);
}

#[test]
fn a_corrupt_avail_index_does_not_panic() {
    let (mut vm, fake) = Vm::new(BalloonConfig::default(), ALL);
    for q in 0..4u64 {
        let avail = vm.drv[q as usize].device_queue(&vm.mem).unwrap();
        let avail_addr = virtio_queue::QueueT::avail_ring(&avail);
        // avail.idx far ahead of what the ring can hold.
        vm.mem
            .write_obj(1000u16.to_le(), GuestAddress(avail_addr + 2))
            .unwrap();
        vm.dev.process_queue(q as usize).unwrap();
    }
    assert!(fake.discards().is_empty());
    // Descriptor chains that loop forever are cut by the queue's TTL.
    let (mut vm, _) = Vm::new(BalloonConfig::default(), ALL);
    let head = vm.drv[REP]
        .submit(&vm.mem, &[Buf::inb(4 * H, 0x1000), Buf::inb(6 * H, 0x1000)])
        .unwrap();
    // Point the second descriptor back at the head with NEXT set.
    let q = vm.drv[REP].device_queue(&vm.mem).unwrap();
    let desc = virtio_queue::QueueT::desc_table(&q) + 16 * (u64::from(head) + 1);
    vm.mem
        .write_obj(3u16.to_le(), GuestAddress(desc + 12))
        .unwrap();
    vm.mem
        .write_obj(head.to_le(), GuestAddress(desc + 14))
        .unwrap();
    vm.dev.process_queue(REP).unwrap();
    assert_eq!(vm.drv[REP].used_idx(&vm.mem), 1);
}
