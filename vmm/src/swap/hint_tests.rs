//! Tests of write-tracked hint discard ([`VmSwap::hint_arm`] / [`VmSwap::hint_discard`]) over
//! real [`GuestWindow`]s: host threads play the guest writing its memory.

#![allow(clippy::single_range_in_vec_init)]

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use super::tests::{rd, wr};
use super::*;
use crate::memory::{GuestWindow, Layout, LayoutConfig, MIB};

static SEQ: AtomicU64 = AtomicU64::new(0);

fn setup(boot: u64) -> (Arc<GuestWindow>, Arc<SwapFile>, VmSwap) {
    let layout = Layout::new(LayoutConfig {
        boot_ram: boot,
        hotplug_size: 0,
    })
    .expect("layout");
    let w = Arc::new(GuestWindow::new(layout).expect("window"));
    let path = std::env::temp_dir().join(format!(
        "tidepool-hint-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let f = Arc::new(SwapFile::create(SwapFileConfig::new(path, 64 * MIB)).expect("swap file"));
    let s = VmSwap::new(Arc::clone(&w), Arc::clone(&f)).expect("vm swap");
    (w, f, s)
}

/// Write a non-zero tag into the first word of every page of `range`.
fn fill(w: &GuestWindow, range: Range<u64>) {
    for gpa in range.step_by(PAGE as usize) {
        wr(w, gpa, gpa | 1);
    }
}

/// Pages of `range` in memory now (mincore, without faulting anything in).
fn resident_pages(s: &VmSwap, range: Range<u64>) -> u64 {
    let present = s
        .inner
        .mincore(range.start / PAGE..range.end / PAGE)
        .expect("mincore");
    present.iter().filter(|p| **p).count() as u64
}

#[test]
fn unwritten_hinted_pages_are_discarded_and_read_zero() {
    let (w, _f, s) = setup(32 * MIB);
    fill(&w, 0..8 * MIB);
    let arm = s.hint_arm(0..32 * MIB).expect("arm");
    assert_eq!(arm.armed_pages, 4 * 512, "the populated blocks are armed");
    assert!(
        arm.skipped_blocks >= 12,
        "never-touched blocks are left alone"
    );
    assert_eq!(resident_pages(&s, 0..4 * MIB), 1024);
    let d = s.hint_discard(arm.epoch, &[0..4 * MIB]).expect("discard");
    assert_eq!(d.discarded_pages, 1024);
    assert_eq!(d.kept_pages, 0);
    assert_eq!(resident_pages(&s, 0..4 * MIB), 0, "host memory released");
    assert_eq!(s.counters().hint_discarded_pages, 1024);
    for gpa in (0..4 * MIB).step_by(PAGE as usize) {
        assert_eq!(rd(&w, gpa), 0, "a discarded page reads as zero");
    }
    for gpa in (4 * MIB..8 * MIB).step_by(PAGE as usize) {
        assert_eq!(rd(&w, gpa), gpa | 1, "pages outside the hint are untouched");
    }
    // A discarded page is ordinary memory again: writes stick.
    wr(&w, 8192, 77);
    assert_eq!(rd(&w, 8192), 77);
}

#[test]
fn pages_written_after_the_epoch_began_are_kept() {
    let (w, _f, s) = setup(16 * MIB);
    fill(&w, 0..4 * MIB);
    let arm = s.hint_arm(0..16 * MIB).expect("arm");
    // The guest reuses two hinted pages (its shrinker gave them back) before the host acts;
    // one of them is written by a "device model" in another thread.
    wr(&w, 3 * PAGE, 0xabcd);
    let w2 = Arc::clone(&w);
    std::thread::spawn(move || wr(&w2, 7 * PAGE + 8, 0x1234))
        .join()
        .expect("writer");
    let d = s.hint_discard(arm.epoch, &[0..2 * MIB]).expect("discard");
    assert_eq!(d.kept_pages, 2);
    assert_eq!(d.discarded_pages, 510);
    assert_eq!(rd(&w, 3 * PAGE), 0xabcd);
    assert_eq!(rd(&w, 7 * PAGE + 8), 0x1234);
    assert_eq!(
        rd(&w, 7 * PAGE),
        (7 * PAGE) | 1,
        "the rest of a kept page too"
    );
    assert_eq!(rd(&w, 4 * PAGE), 0);
    // A read does not count as a write: a page only read since the epoch began is discarded.
    let arm = s.hint_arm(0..16 * MIB).expect("arm again");
    assert_eq!(rd(&w, 2 * MIB + 5 * PAGE), (2 * MIB + 5 * PAGE) | 1);
    let d = s
        .hint_discard(arm.epoch, &[2 * MIB + 5 * PAGE..2 * MIB + 6 * PAGE])
        .expect("discard read page");
    assert_eq!(d.discarded_pages, 1);
}

#[test]
fn a_stale_epoch_discards_nothing() {
    let (w, _f, s) = setup(8 * MIB);
    fill(&w, 0..2 * MIB);
    let first = s.hint_arm(0..8 * MIB).expect("arm");
    let second = s.hint_arm(0..8 * MIB).expect("arm again");
    assert_ne!(first.epoch, second.epoch);
    assert!(matches!(
        s.hint_discard(first.epoch, &[0..2 * MIB]),
        Err(SwapError::StaleHintEpoch { .. })
    ));
    assert_eq!(resident_pages(&s, 0..2 * MIB), 512);
    assert_eq!(rd(&w, PAGE), PAGE | 1);
}

#[test]
fn a_write_racing_with_the_discard_is_never_lost() {
    let (w, _f, s) = setup(8 * MIB);
    let target = 2 * MIB + 100 * PAGE;
    let mut raced_after = 0;
    for round in 0..40u64 {
        fill(&w, 2 * MIB..4 * MIB);
        let arm = s.hint_arm(0..8 * MIB).expect("arm");
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(0));
        let go = Arc::new(Barrier::new(2));
        let writer = {
            let (w, stop, last, go) = (
                Arc::clone(&w),
                Arc::clone(&stop),
                Arc::clone(&last),
                Arc::clone(&go),
            );
            std::thread::spawn(move || {
                go.wait();
                let mut v = (round << 32) | 1;
                let mut n = 0u64;
                // Hammer until told to stop, and at least a few thousand writes, so some
                // land before, during and after the discard.
                while !stop.load(Ordering::Acquire) || n < 2000 {
                    wr(&w, target, v);
                    last.store(v, Ordering::Release);
                    v += 1;
                    n += 1;
                }
            })
        };
        go.wait();
        if round % 2 == 1 {
            std::thread::yield_now();
        }
        let d = s
            .hint_discard(arm.epoch, &[2 * MIB..4 * MIB])
            .expect("discard");
        stop.store(true, Ordering::Release);
        writer.join().expect("writer");
        assert_eq!(
            rd(&w, target),
            last.load(Ordering::Acquire),
            "round {round}: the last write survived"
        );
        assert!(
            d.discarded_pages >= 511,
            "round {round}: the other pages went"
        );
        if d.kept_pages == 0 {
            raced_after += 1;
        }
    }
    // Not a timing assertion: only reported, both outcomes are correct.
    eprintln!("rounds where the target page was discarded under the writer: {raced_after}");
}

#[test]
fn swapped_out_pages_in_a_hint_lose_their_slot_and_read_zero() {
    let (w, f, s) = setup(16 * MIB);
    fill(&w, 0..4 * MIB);
    let out = s.swap_out(0..4 * MIB, 2 * MIB).expect("swap out");
    assert_eq!(out.swapped_pages, 512);
    let used = f.used_bytes();
    assert_eq!(used, 2 * MIB);
    let arm = s.hint_arm(0..16 * MIB).expect("arm");
    // One swapped page comes back read-only (clean: still armed), one is written (kept).
    assert_eq!(rd(&w, 10 * PAGE), (10 * PAGE) | 1);
    wr(&w, 20 * PAGE, 5);
    let d = s.hint_discard(arm.epoch, &[0..2 * MIB]).expect("discard");
    assert_eq!(d.kept_pages, 1, "the written page");
    assert!(d.freed_slots >= 1);
    assert_eq!(
        s.swapped_bytes(),
        0,
        "no slot left behind for the hinted range"
    );
    assert_eq!(f.used_bytes(), PAGE * u64::from(rd(&w, 20 * PAGE) != 5));
    for gpa in (0..2 * MIB).step_by(PAGE as usize) {
        let want = if gpa == 20 * PAGE { 5 } else { 0 };
        assert_eq!(
            rd(&w, gpa),
            want,
            "page {gpa:#x}: zeros, never the stale slot"
        );
    }
    assert_eq!(s.counters().swap_in_errors, 0);
}

/// Linux with `init_on_alloc` (Debian's default) zeroes every block it allocates for hinting,
/// after the epoch began and before it hints it, so no hinted page is armed any more. Those
/// that hold only zeros are discarded all the same (checked under write protection), and so
/// are hinted pages in blocks the swap did not track at the arm (never populated then, filled
/// by the zeroing); a hinted page the guest reused with data is kept.
#[test]
fn hinted_pages_the_guest_zeroed_are_discarded() {
    let (w, _f, s) = setup(16 * MIB);
    fill(&w, 0..4 * MIB);
    let arm = s.hint_arm(0..16 * MIB).expect("arm");
    assert_eq!(arm.armed_pages, 1024);
    // The guest's allocator zeroes the blocks: 0..4 MiB (armed, with data) and 8..12 MiB
    // (never populated, so not tracked).
    for gpa in (0..4 * MIB).chain(8 * MIB..12 * MIB).step_by(PAGE as usize) {
        wr(&w, gpa, 0);
    }
    // One hinted page is already reused with data (the shrinker gave it back).
    wr(&w, 5 * PAGE + 16, 0xbeef);
    assert_eq!(resident_pages(&s, 8 * MIB..12 * MIB), 1024);
    let d = s
        .hint_discard(arm.epoch, &[0..4 * MIB, 8 * MIB..12 * MIB])
        .expect("discard");
    assert_eq!(d.zero_pages, 2 * 1024 - 1, "{d:?}");
    assert_eq!(d.discarded_pages, d.zero_pages);
    assert_eq!(d.kept_pages, 1);
    assert_eq!(
        resident_pages(&s, 0..4 * MIB),
        1,
        "only the reused page stays"
    );
    assert_eq!(resident_pages(&s, 8 * MIB..12 * MIB), 0);
    assert_eq!(s.counters().hint_discarded_pages, 2 * 1024 - 1);
    assert_eq!(rd(&w, 5 * PAGE + 16), 0xbeef);
    for gpa in (0..4 * MIB).chain(8 * MIB..12 * MIB).step_by(PAGE as usize) {
        if gpa != 5 * PAGE {
            assert_eq!(rd(&w, gpa), 0, "page {gpa:#x}");
        }
    }
    // The discarded pages are ordinary memory again, tracked or not before: writes stick.
    wr(&w, 9 * MIB, 7);
    wr(&w, 2 * MIB, 8);
    assert_eq!((rd(&w, 9 * MIB), rd(&w, 2 * MIB)), (7, 8));
    // With data everywhere, nothing goes.
    let arm = s.hint_arm(0..16 * MIB).expect("arm again");
    fill(&w, 8 * MIB..10 * MIB);
    let d = s
        .hint_discard(arm.epoch, &[8 * MIB..10 * MIB])
        .expect("discard");
    assert_eq!((d.discarded_pages, d.kept_pages), (0, 512));
    assert_eq!(resident_pages(&s, 8 * MIB..10 * MIB), 512);
}
