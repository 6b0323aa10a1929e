//! Property tests: random driver input never panics the device, every chain comes back, and
//! nothing outside the VM's RAM is ever discarded; the page sets agree with a simple model.

use super::*;
use crate::accounting::PageSet;
use crate::backend::RamMap;
use crate::PAGE_SIZE;
use proptest::prelude::*;
use std::collections::BTreeSet;

/// Addresses that hit RAM, its edges, the rings, and far outside.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0..RAM / PAGE_SIZE).prop_map(|p| p * PAGE_SIZE),
        0..RAM + (4 << 20),
        (RAM - (4 << 20))..RAM + (4 << 20),
        any::<u64>(),
        Just(u64::MAX - 0xfff),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(0x1000),
        Just(2 << 20),
        Just(4 << 20),
        (1u32..0x20_0000),
        any::<u32>(),
    ]
}

fn buf() -> impl Strategy<Value = Buf> {
    (addr(), len(), any::<bool>()).prop_map(|(addr, len, writable)| Buf {
        addr,
        len,
        writable,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_reports_are_safe(chains in prop::collection::vec(prop::collection::vec(buf(), 1..40), 1..8)) {
        let (mut vm, fake) = Vm::new(BalloonConfig::default(), ALL);
        for chain in &chains {
            // Keep the driver's own rings and buffers out of reach of writable "free" blocks
            // only by not caring: the device must cope with anything.
            prop_assert_eq!(vm.kick(3, chain), 1);
        }
        for d in fake.discards() {
            prop_assert!(d.gpa % PAGE_SIZE == 0 && d.len % PAGE_SIZE == 0 && d.len > 0);
            prop_assert!(d.gpa.checked_add(d.len).is_some_and(|e| e <= RAM), "{:?}", d);
        }
        let a = vm.dev.accounting();
        prop_assert_eq!(a.assigned_bytes, RAM);
        prop_assert!(a.reported_bytes <= RAM);
        prop_assert_eq!(a.resident_estimate_bytes + a.reported_bytes + a.ballooned_bytes, RAM);
        prop_assert_eq!(a.counters.reports, chains.len() as u64);
    }

    #[test]
    fn random_pfn_traffic_matches_a_model(
        ops in prop::collection::vec(
            (any::<bool>(), prop::collection::vec(prop_oneof![0u32..0x4000, any::<u32>()], 0..64), 0usize..4),
            1..24,
        ),
    ) {
        let (mut vm, fake) = Vm::new(BalloonConfig::default(), ALL);
        let mut model = BTreeSet::new();
        for (inflate, pfns, extra) in &ops {
            let mut bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
            bytes.extend(std::iter::repeat_n(0xee, *extra));
            let q = if *inflate { 0 } else { 1 };
            let addr = vm.put(q as u64, &bytes);
            let len = bytes.len().max(1) as u32;
            prop_assert_eq!(vm.kick(q, &[Buf::out(addr, len)]), 1);
            let in_ram = pfns.iter().filter(|p| u64::from(**p) * PAGE_SIZE < RAM).copied();
            if *inflate {
                // An empty buffer (len forced to 1 byte) is a trailing byte, not a PFN.
                model.extend(in_ram);
            } else {
                for p in in_ram {
                    model.remove(&p);
                }
            }
        }
        let a = vm.dev.accounting();
        prop_assert_eq!(a.ballooned_bytes, model.len() as u64 * PAGE_SIZE);
        prop_assert!(fake.discards().iter().all(|d| d.gpa + d.len <= RAM));
    }

    #[test]
    fn page_set_matches_a_model(
        ops in prop::collection::vec((0u8..3, 0u64..0x780, 1u64..0x400), 1..60),
    ) {
        // Two RAM ranges with a hole, in pages: [0, 0x300) and [0x500, 0x700); the second
        // starts in the middle of a 512-page block of the set's index space.
        let ram = RamMap::new(&[(0, 0x300 * PAGE_SIZE), (0x500 * PAGE_SIZE, 0x200 * PAGE_SIZE)]).unwrap();
        let in_ram = |p: u64| p < 0x300 || (0x500..0x700).contains(&p);
        let mut set = PageSet::new(&ram);
        let mut other = PageSet::new(&ram);
        other.insert(0x100 * PAGE_SIZE, 0x80 * PAGE_SIZE);
        let mut model = BTreeSet::new();
        for (op, start, n) in ops {
            let (gpa, len) = (start * PAGE_SIZE, n * PAGE_SIZE);
            let pages = (start..start + n).filter(|p| in_ram(*p));
            match op {
                0 => {
                    let added = set.insert(gpa, len);
                    let before = model.len();
                    model.extend(pages);
                    prop_assert_eq!(added, (model.len() - before) as u64);
                }
                1 => {
                    let removed = set.remove(gpa, len);
                    let before = model.len();
                    for p in pages {
                        model.remove(&p);
                    }
                    prop_assert_eq!(removed, (before - model.len()) as u64);
                }
                _ => {
                    set.insert_except(gpa, len, Some(&other));
                    model.extend(pages.filter(|p| !(0x100..0x180).contains(p)));
                }
            }
            prop_assert_eq!(set.pages(), model.len() as u64);
        }
        let from_runs: BTreeSet<u64> = set
            .runs()
            .iter()
            .flat_map(|&(g, l)| (g / PAGE_SIZE)..(g + l) / PAGE_SIZE)
            .collect();
        prop_assert_eq!(from_runs, model.clone());
        for p in 0..0x780u64 {
            prop_assert_eq!(set.contains(p * PAGE_SIZE), model.contains(&p));
        }
    }
}
