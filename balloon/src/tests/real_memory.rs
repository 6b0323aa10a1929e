//! The device over real memory with the real backend: discards must really drop host
//! residency (checked with `mincore`) and make the guest read zeroes.

use super::*;
use crate::backend::ResidencyProbe;
use crate::mmap_backend::MmapBackend;
use crate::{HUGE_PAGE_SIZE as H, PAGE_SIZE};
use std::os::fd::FromRawFd;
use vm_memory::FileOffset;

const REP: usize = 3;

fn fill(mem: &GuestMemoryMmap<()>, gpa: u64, len: u64, byte: u8) {
    let data = vec![byte; len as usize];
    mem.write_slice(&data, GuestAddress(gpa)).unwrap();
}

fn resident(probe: &MmapBackend, gpa: u64, len: u64) -> u64 {
    let mut out = vec![false; (len / PAGE_SIZE) as usize];
    probe.residency(gpa, &mut out).unwrap();
    out.iter().filter(|r| **r).count() as u64 * PAGE_SIZE
}

fn all_zero(mem: &GuestMemoryMmap<()>, gpa: u64, len: u64) -> bool {
    let mut data = vec![1u8; len as usize];
    mem.read_slice(&mut data, GuestAddress(gpa)).unwrap();
    data.iter().all(|b| *b == 0)
}

fn anon_vm(huge: bool) -> (Vm, MmapBackend) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let mut backend = MmapBackend::from_guest_memory(&mem).unwrap();
    let mut probe = MmapBackend::from_guest_memory(&mem).unwrap();
    if huge {
        backend.advise_huge().unwrap();
        probe.advise_huge().unwrap();
    }
    let mut vm = Vm::with_backend(mem, BalloonConfig::default(), Box::new(backend), ALL);
    vm.activate();
    (vm, probe)
}

#[test]
fn inflate_drops_residency_of_exactly_those_pages() {
    let (mut vm, probe) = anon_vm(false);
    fill(&vm.mem, 4 << 20, 4 << 20, 0x5a);
    assert_eq!(resident(&probe, 4 << 20, 4 << 20), 4 << 20);
    let pfns: Vec<u32> = (0x400..0x500).collect(); // 4 MiB .. 5 MiB
    vm.send_pfns(0, &pfns);
    assert_eq!(resident(&probe, 4 << 20, 4 << 20), 3 << 20);
    assert_eq!(resident(&probe, 4 << 20, 1 << 20), 0);
    assert!(all_zero(&vm.mem, 4 << 20, 1 << 20));
    let mut b = [0u8; 1];
    vm.mem.read_slice(&mut b, GuestAddress(5 << 20)).unwrap();
    assert_eq!(b[0], 0x5a, "neighbouring data survives");
    assert_eq!(vm.dev.accounting().ballooned_bytes, 1 << 20);
}

#[test]
fn reports_drop_residency_and_refaults_are_seen() {
    let (mut vm, probe) = anon_vm(true);
    let data = 8 * H; // 16 MiB .. 48 MiB
    fill(&vm.mem, data, 16 * H, 0x77);
    let before = vm.dev.sample_residency(&probe).unwrap().resident_bytes;
    assert!(before >= 16 * H);
    // A 4 KiB block, a 2 MiB block and a 4 MiB block.
    let chain = [
        Buf::inb(data + 0x5000, 0x1000),
        Buf::inb(data + 2 * H, H as u32),
        Buf::inb(data + 4 * H, 2 * H as u32),
    ];
    assert_eq!(vm.kick(REP, &chain), 1);
    let freed = 3 * H + 0x1000;
    let s = vm.dev.sample_residency(&probe).unwrap();
    assert_eq!(s.resident_bytes, before - freed);
    assert_eq!(s.refaulted_bytes, 0);
    let a = vm.dev.accounting();
    assert_eq!(a.reported_bytes, freed);
    assert_eq!(a.counters.whole_huge_blocks, 3);
    assert_eq!(a.counters.split_huge_blocks, 1);

    // The guest reuses half of the 2 MiB block: those pages come back as refaults.
    fill(&vm.mem, data + 2 * H, H / 2, 0x11);
    let s = vm.dev.sample_residency(&probe).unwrap();
    // With THP the touch may fault a whole huge page back in; at least the touched half.
    assert!(
        s.refaulted_bytes >= H / 2 && s.refaulted_bytes <= H,
        "{s:?}"
    );
    let a = vm.dev.accounting();
    assert_eq!(a.reported_bytes, freed - s.refaulted_bytes);
    assert_eq!(a.refaulted_bytes, s.refaulted_bytes);

    // Discarded memory reads back as zeroes (reading maps the zero page, which mincore counts
    // as resident, so this comes after the refault check).
    assert!(all_zero(&vm.mem, data + 4 * H, 2 * H));
    assert!(all_zero(&vm.mem, data + 0x5000, 0x1000));
    let mut b = [0u8; 1];
    vm.mem
        .read_slice(&mut b, GuestAddress(data + 3 * H))
        .unwrap();
    assert_eq!(b[0], 0x77, "the unreported block between keeps its data");
}

#[test]
fn memfd_backing_is_punched() {
    const LEN: u64 = 16 << 20;
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by `file` below.
    let fd = unsafe { libc::memfd_create(c"tidepool-balloon-test".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(LEN).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        LEN as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let backend = MmapBackend::from_guest_memory(&mem).unwrap();
    let probe = MmapBackend::from_guest_memory(&mem).unwrap();
    let mut vm = Vm::with_backend(mem, BalloonConfig::default(), Box::new(backend), ALL);
    vm.activate();
    fill(&vm.mem, 4 << 20, 8 << 20, 0x33);
    // The rings live in the first MiB; touch it so that the device's first used-ring write
    // does not allocate a file page during the measurement.
    fill(&vm.mem, 0, 1 << 20, 0);
    let blocks = |f: &std::fs::File| {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks() * 512
    };
    let before = blocks(&file);
    assert!(before >= 8 << 20);
    assert_eq!(
        vm.kick(
            REP,
            &[Buf::inb(4 << 20, 2 << 20), Buf::inb(8 << 20, 4 << 20)]
        ),
        1
    );
    assert_eq!(before - blocks(&file), 6 << 20, "file blocks freed");
    assert_eq!(resident(&probe, 4 << 20, 8 << 20), 2 << 20);
    assert!(all_zero(&vm.mem, 4 << 20, 2 << 20));
    assert!(all_zero(&vm.mem, 8 << 20, 4 << 20));
}

#[test]
fn mmap_backend_refuses_foreign_ranges() {
    use crate::backend::ReclaimBackend;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 4 << 20),
        (GuestAddress(16 << 20), 4 << 20),
    ])
    .unwrap();
    let mut b = MmapBackend::from_guest_memory(&mem).unwrap();
    assert!(b.discard(4 << 20, 0x1000).is_err(), "hole");
    assert!(
        b.discard((4 << 20) - 0x1000, 0x2000).is_err(),
        "runs into the hole"
    );
    assert!(b.discard(0x800, 0x1000).is_err());
    assert!(b.discard(16 << 20, 4 << 20).is_ok());
    // A backend restricted to part of guest memory.
    let mut r = MmapBackend::with_ram(&mem, &[(0, 2 << 20)]).unwrap();
    assert!(r.discard(2 << 20, 0x1000).is_err());
    assert!(r.discard(0, 2 << 20).is_ok());
    assert!(MmapBackend::with_ram(&mem, &[(3 << 20, 2 << 20)]).is_err());
    assert!(b.host_address(16 << 20).is_some());
    assert!(b.host_address(8 << 20).is_none());
}
