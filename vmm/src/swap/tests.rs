//! In-process tests of the swap layer over real [`GuestWindow`]s: host threads play the vCPUs
//! and device models, reading and writing guest memory through the userfaultfd handler.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::memory::{GuestWindow, Layout, LayoutConfig, GIB, MIB};

static SEQ: AtomicU64 = AtomicU64::new(0);

fn swap_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "tidepool-swap-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

fn window(boot: u64, hotplug: u64) -> Arc<GuestWindow> {
    let layout = Layout::new(LayoutConfig {
        boot_ram: boot,
        hotplug_size: hotplug,
    })
    .expect("layout");
    Arc::new(GuestWindow::new(layout).expect("window"))
}

fn file(capacity: u64) -> Arc<SwapFile> {
    Arc::new(SwapFile::create(SwapFileConfig::new(swap_path(), capacity)).expect("swap file"))
}

fn word(gpa: u64, seed: u64) -> u64 {
    gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed
}

fn ptr(w: &GuestWindow, gpa: u64) -> *mut u64 {
    w.host_addr(gpa).expect("in window") as *mut u64
}

pub(super) fn wr(w: &GuestWindow, gpa: u64, v: u64) {
    // SAFETY: tests only pass placed guest memory, accessed only through raw pointers.
    unsafe { ptr(w, gpa).write_volatile(v) }
}

pub(super) fn rd(w: &GuestWindow, gpa: u64) -> u64 {
    // SAFETY: as in `wr`.
    unsafe { ptr(w, gpa).read_volatile() }
}

/// Fill every word of `[range)` with `word(gpa, seed)`.
fn fill(w: &GuestWindow, range: Range<u64>, seed: u64) {
    for gpa in range.step_by(8) {
        // SAFETY: the range is placed guest memory; tests access it only through raw pointers.
        unsafe { ptr(w, gpa).write_volatile(word(gpa, seed)) };
    }
}

/// Count words of `[range)` that differ from `word(gpa, seed)`.
fn mismatches(w: &GuestWindow, range: Range<u64>, seed: u64) -> u64 {
    let mut bad = 0;
    for gpa in range.step_by(8) {
        // SAFETY: as in `fill`.
        if unsafe { ptr(w, gpa).read_volatile() } != word(gpa, seed) {
            bad += 1;
        }
    }
    bad
}

/// Read guest memory like a device model that wants a typed error instead of a crash:
/// process_vm_readv on our own process goes through the same faults (and the uffd handler),
/// and returns EFAULT where a plain load would raise SIGSEGV.
fn remote_read(w: &GuestWindow, gpa: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: w.host_addr(gpa).expect("in window") as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    // SAFETY: local points at `buf`; the remote range is only read by the kernel, which
    // reports failures as errors.
    let rc = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

#[test]
fn one_gib_round_trip_with_checksums_clusters_and_clean_drop() {
    let w = window(GIB, 0);
    // No back-off here, so that the cluster count is exact whatever else loads the disk.
    let mut cfg = SwapFileConfig::new(swap_path(), 2 * GIB);
    cfg.congestion.factor = f64::INFINITY;
    let f = Arc::new(SwapFile::create(cfg).expect("swap file"));
    let swap = VmSwap::new(Arc::clone(&w), Arc::clone(&f)).expect("swap");
    let seed = 0x1234_5678_9abc_def0;
    fill(&w, 0..GIB, seed);
    let t0 = std::time::Instant::now();
    let out = swap.swap_out(0..GIB, u64::MAX).expect("swap out");
    println!("swap out 1 GiB ({:?}): {:?}", f.io_mode(), t0.elapsed());
    let pages = GIB / PAGE;
    assert_eq!(out.written_pages, pages);
    assert_eq!(out.swapped_pages, pages);
    assert_eq!(out.redirtied_pages, 0);
    // Each 2 MiB block is one contiguous run of 512 pages, written in batches of 256 pages
    // (the back-off's largest batch) into contiguous slots.
    assert_eq!(out.clusters, pages / 256);
    let fc = f.counters();
    assert_eq!(fc.clusters, pages / 256);
    assert_eq!(fc.writes, pages / 256);
    assert_eq!(fc.bytes_written, GIB);
    assert_eq!(swap.swapped_bytes(), GIB);
    assert!(w.resident_bytes(0, GIB).expect("mincore") < 64 * MIB);

    // Two host threads read everything back through the handler.
    let t0 = std::time::Instant::now();
    let bad: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2u64)
            .map(|i| {
                let w = &w;
                s.spawn(move || mismatches(w, i * GIB / 2..(i + 1) * GIB / 2, seed))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("reader")).sum()
    });
    println!("swap in 1 GiB by 2 readers: {:?}", t0.elapsed());
    assert_eq!(bad, 0);
    let c = swap.counters();
    assert_eq!(c.swapped_in_pages, pages);
    assert_eq!(c.swapped_bytes, 0);
    assert_eq!(c.clean_bytes, GIB);
    // Read-around: one read per 32-page cluster piece.
    assert_eq!(c.swap_in_reads, pages / handler::READ_AROUND);

    // Clean drop: no I/O at all.
    let writes = f.counters().writes;
    let dropped = swap.drop_clean(0..GIB).expect("drop clean");
    assert_eq!(dropped, GIB);
    assert_eq!(f.counters().writes, writes);
    assert_eq!(swap.swapped_bytes(), GIB);
    assert!(w.resident_bytes(0, GIB).expect("mincore") < 64 * MIB);

    // Dirty a few pages (the write faults drop their slots); only they are written next.
    for p in [0u64, 1, 700, 262_143] {
        wr(&w, p * PAGE, word(p * PAGE, seed));
    }
    let out = swap.swap_out(0..GIB, u64::MAX).expect("swap out 2");
    assert_eq!(out.written_pages, 4);
    assert_eq!(out.clusters, 3);
    assert_eq!(f.counters().writes, writes + 3);
    assert_eq!(mismatches(&w, 0..GIB, seed), 0);
}

#[test]
fn concurrent_writers_never_lose_data() {
    const LEN: u64 = 64 * MIB;
    let w = window(LEN, 0);
    let f = file(GIB);
    let swap = VmSwap::new(Arc::clone(&w), Arc::clone(&f)).expect("swap");
    let pages = LEN / PAGE;
    // Each page holds its last version in its first and last word; the shadow keeps what was
    // written last.
    let shadow: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(0)).collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Writes done so far: the swap rounds wait for the writers, so that on an idle machine
    // they do not all run before the writer threads got going (nothing resident to swap).
    let writes = AtomicU64::new(0);
    let wait_writes = |n: u64| {
        let t0 = std::time::Instant::now();
        while writes.load(Ordering::Relaxed) < n && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (w, shadow, stop, writes) = (&w, &shadow, &stop, &writes);
            s.spawn(move || {
                let mut x = 0x9e37_79b9u64 + t;
                let mut v = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Thread t owns the pages with p % 2 == t.
                    let p = (x % (pages / 2)) * 2 + t;
                    let val = (p << 32) | v;
                    wr(w, p * PAGE, val);
                    wr(w, p * PAGE + PAGE - 8, val);
                    shadow[p as usize].store(val, Ordering::Relaxed);
                    writes.fetch_add(1, Ordering::Relaxed);
                    v += 1;
                    // Pace the writers (about a million writes a second) so that most pages
                    // stay unwritten for the length of a write-out and really go out, while
                    // many are still written during one.
                    if v % 64 == 0 {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            });
        }
        // Most pages written (resident) before the first round, and fresh writes before each.
        wait_writes(pages);
        for round in 0..30 {
            let seen = writes.load(Ordering::Relaxed);
            wait_writes(seen + 256);
            let out = swap.swap_out(0..LEN, u64::MAX).expect("swap out");
            if round % 3 == 0 {
                swap.drop_clean(0..LEN).expect("drop clean");
            }
            let _ = out;
        }
        stop.store(true, Ordering::Relaxed);
    });
    let mut bad = 0;
    for p in 0..pages {
        let want = shadow[p as usize].load(Ordering::Relaxed);
        let (a, b) = (rd(&w, p * PAGE), rd(&w, p * PAGE + PAGE - 8));
        if a != want || b != want {
            bad += 1;
        }
    }
    let c = swap.counters();
    println!("concurrent writers: {c:?}");
    assert_eq!(bad, 0);
    // The race was really exercised: writes hit protected pages during or after write-out.
    assert!(c.wp_faults > 0);
    assert!(c.swapped_out_pages > 0);
    assert!(c.redirtied_pages <= c.written_pages);
}

#[test]
fn write_error_keeps_data_resident() {
    let w = window(16 * MIB, 0);
    let f = file(GIB);
    let swap = VmSwap::new(Arc::clone(&w), Arc::clone(&f)).expect("swap");
    fill(&w, 0..16 * MIB, 7);
    f.inject_write_errors(1);
    let e = swap.swap_out(0..16 * MIB, u64::MAX);
    assert!(matches!(e, Err(SwapError::Write { .. })), "{e:?}");
    assert_eq!(swap.swapped_bytes(), 0);
    assert_eq!(f.counters().slots_used, 0);
    // Writable again (protection lifted) and intact.
    fill(&w, 0..16 * MIB, 8);
    assert_eq!(mismatches(&w, 0..16 * MIB, 8), 0);
    let out = swap.swap_out(0..16 * MIB, u64::MAX).expect("second try");
    assert_eq!(out.swapped_pages, 16 * MIB / PAGE);
    assert_eq!(mismatches(&w, 0..16 * MIB, 8), 0);
}

fn swapped_window(seed: u64) -> (Arc<GuestWindow>, Arc<SwapFile>, VmSwap) {
    let w = window(8 * MIB, 0);
    let f = file(GIB);
    let swap = VmSwap::new(Arc::clone(&w), Arc::clone(&f)).expect("swap");
    fill(&w, 0..8 * MIB, seed);
    swap.swap_out(0..8 * MIB, u64::MAX).expect("swap out");
    assert_eq!(swap.swapped_bytes(), 8 * MIB);
    (w, f, swap)
}

/// Read in a thread and fail the test instead of hanging.
fn read_with_timeout(w: &Arc<GuestWindow>, gpa: u64) -> std::io::Result<usize> {
    let (tx, rx) = std::sync::mpsc::channel();
    let w2 = Arc::clone(w);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; PAGE as usize];
        let _ = tx.send(remote_read(&w2, gpa, &mut buf));
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the read hung")
}

#[test]
fn read_error_poisons_the_page_and_reports() {
    let (w, f, swap) = swapped_window(3);
    let hooked = Arc::new(AtomicU64::new(u64::MAX));
    let h2 = Arc::clone(&hooked);
    swap.set_failure_hook(move |fl| h2.store(fl.gpa, Ordering::SeqCst));
    f.inject_read_errors(u64::MAX);
    let r = read_with_timeout(&w, 5 * PAGE);
    assert_eq!(r.map_err(|e| e.raw_os_error()), Err(Some(libc::EFAULT)));
    let fl = swap.failure().expect("failure recorded");
    assert_eq!(fl.gpa, 5 * PAGE);
    assert!(
        matches!(*fl.error, SwapError::Read { .. }),
        "{:?}",
        fl.error
    );
    assert_eq!(hooked.load(Ordering::SeqCst), 5 * PAGE);
    let c = swap.counters();
    assert_eq!((c.swap_in_errors, c.poisoned_pages), (1, 1));
    // Other pages come back once the file reads again; the poisoned page stays inaccessible.
    f.inject_read_errors(0);
    assert_eq!(mismatches(&w, PAGE * 64..8 * MIB, 3), 0);
    assert!(read_with_timeout(&w, 5 * PAGE).is_err());
}

#[test]
fn truncated_file_is_a_typed_error_not_zeros() {
    let (w, f, swap) = swapped_window(4);
    f.truncate_for_test(0).expect("truncate");
    let r = read_with_timeout(&w, 0);
    assert!(r.is_err());
    let fl = swap.failure().expect("failure");
    assert!(
        matches!(*fl.error, SwapError::ShortRead { got: 0, .. }),
        "{:?}",
        fl.error
    );
}

#[test]
fn unlinked_file_still_serves_and_missing_dir_is_refused() {
    let (w, f, _swap) = swapped_window(5);
    std::fs::remove_file(f.path()).expect("unlink");
    assert_eq!(mismatches(&w, 0..8 * MIB, 5), 0);
    let e = SwapFile::create(SwapFileConfig::new("/nonexistent-dir/swap", GIB));
    assert!(matches!(e, Err(SwapError::Open { .. })));
}

#[test]
fn shutdown_wakes_a_pending_fault_with_an_error() {
    let (w, _f, swap) = swapped_window(6);
    swap.pause_handler(true);
    let (tx, rx) = std::sync::mpsc::channel();
    let w2 = Arc::clone(&w);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64];
        let _ = tx.send(remote_read(&w2, 3 * PAGE, &mut buf));
    });
    // The fault stays pending while the handler is paused.
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    swap.shutdown();
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("pending fault was not woken");
    assert_eq!(r.map_err(|e| e.raw_os_error()), Err(Some(libc::EFAULT)));
    assert!(matches!(swap.swap_out(0..PAGE, 1), Err(SwapError::Closed)));
}

#[test]
fn remove_block_frees_slots_and_place_starts_zero() {
    let w = window(64 * MIB, 256 * MIB);
    let hot = w.layout().hotplug().expect("hotplug region");
    let blk = hot.start..hot.start + 4 * MIB;
    w.place_block(blk.start, 4 * MIB).expect("place");
    let f = file(GIB);
    let swap = VmSwap::new(Arc::clone(&w), Arc::clone(&f)).expect("swap");
    fill(&w, blk.clone(), 9);
    swap.swap_out(blk.clone(), u64::MAX).expect("swap out");
    assert_eq!(swap.swapped_bytes(), 4 * MIB);
    assert_eq!(f.counters().slots_used as u64, 4 * MIB / PAGE);
    w.remove_block(blk.start, 4 * MIB).expect("remove");
    assert_eq!(swap.swapped_bytes(), 0);
    assert_eq!(f.counters().slots_used, 0);
    w.place_block(blk.start, 4 * MIB).expect("place again");
    // It reads as zero, without the handler.
    for gpa in blk.clone().step_by(4096) {
        assert_eq!(rd(&w, gpa), 0);
    }
    // And the range swaps again normally.
    fill(&w, blk.clone(), 10);
    swap.swap_out(blk.clone(), u64::MAX)
        .expect("swap out again");
    assert_eq!(mismatches(&w, blk, 10), 0);
}

#[test]
fn congestion_throttles_writes() {
    let w = window(64 * MIB, 0);
    let f = file(GIB);
    let swap = VmSwap::new(Arc::clone(&w), Arc::clone(&f)).expect("swap");
    fill(&w, 0..64 * MIB, 11);
    // The warm-up's real disk writes may already look congested on a busy machine (that is
    // the back-off working, not a failure), so only the injected delay's effect is asserted.
    swap.swap_out(0..32 * MIB, u64::MAX).expect("warm-up");
    f.inject_write_delay(Duration::from_millis(100));
    swap.swap_out(32 * MIB..40 * MIB, u64::MAX).expect("slow");
    let c = f.counters();
    assert!(c.throttle_events >= 1, "{c:?}");
    assert!(c.congested);
    assert!(c.batch_pages < 256);
    assert!(c.throttle_sleep_us > 0);
    assert_eq!(mismatches(&w, 0..64 * MIB, 11), 0);
}

#[test]
fn random_operations_match_a_model() {
    // A small window; random writes, reads, swap-outs of random ranges, clean drops and
    // swap-in-all, checked against a shadow copy after every step.
    const LEN: u64 = 4 * MIB;
    let w = window(LEN, 0);
    let f = file(GIB);
    let swap = VmSwap::new(Arc::clone(&w), Arc::clone(&f)).expect("swap");
    let pages = LEN / PAGE;
    let mut shadow = vec![0u64; pages as usize];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for step in 0..3000u64 {
        let op = rnd(10);
        let p = rnd(pages);
        let len = 1 + rnd(64);
        let r = p * PAGE..(p + len).min(pages) * PAGE;
        match op {
            0..=3 => {
                wr(&w, p * PAGE + 8 * rnd(512), step + 1);
                // Only the first word is modelled: write it too.
                wr(&w, p * PAGE, step + 1);
                shadow[p as usize] = step + 1;
            }
            4..=5 => {
                let v = rd(&w, p * PAGE);
                assert_eq!(v, shadow[p as usize], "page {p} at step {step}");
            }
            6..=7 => {
                swap.swap_out(r, rnd(2) * u64::MAX / 2 + PAGE * 8)
                    .expect("swap out");
            }
            8 => {
                swap.drop_clean(r).expect("drop clean");
            }
            _ => {
                swap.swap_in_all().expect("swap in all");
            }
        }
    }
    for p in 0..pages {
        let v = rd(&w, p * PAGE);
        assert_eq!(v, shadow[p as usize], "page {p} at the end");
    }
    let c = swap.counters();
    assert!(
        c.swapped_in_pages > 0 && c.dropped_clean_pages > 0 && c.wp_faults > 0,
        "{c:?}"
    );
}

fn cached_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Cached:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Measurement for docs/swap.md (not a test of timing): swap 1 GiB out and in with each I/O
/// mode and print throughput and page-cache growth. Run with
/// `cargo test --release -p tidepool-vmm --lib swap::tests::measure_io_modes -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_io_modes() {
    for mode in [IoMode::Direct, IoMode::Buffered] {
        let w = window(GIB, 0);
        let mut cfg = SwapFileConfig::new(swap_path(), 2 * GIB);
        cfg.io = Some(mode);
        cfg.congestion.factor = f64::INFINITY;
        let f = Arc::new(SwapFile::create(cfg).expect("swap file"));
        let swap = VmSwap::new(Arc::clone(&w), Arc::clone(&f)).expect("swap");
        fill(&w, 0..GIB, 1);
        let c0 = cached_kib();
        let t0 = std::time::Instant::now();
        swap.swap_out(0..GIB, u64::MAX).expect("swap out");
        let out = t0.elapsed();
        let c1 = cached_kib();
        let t0 = std::time::Instant::now();
        let n = swap.swap_in_all().expect("swap in");
        let inn = t0.elapsed();
        assert_eq!(n, GIB / PAGE);
        assert_eq!(mismatches(&w, 0..GIB, 1), 0);
        println!(
            "{mode:?}: swap-out 1 GiB {:.2} GiB/s, swap-in {:.2} GiB/s, page cache grew {} MiB",
            1.0 / out.as_secs_f64(),
            1.0 / inn.as_secs_f64(),
            c1.saturating_sub(c0) / 1024
        );
    }
}

#[test]
fn vmm_writes_to_clean_pages_are_seen() {
    // A device model writes guest memory through the host mapping (a used ring, say): KVM's
    // dirty log would miss it, the write protection does not.
    use vm_memory::{Bytes, GuestAddress};
    let (w, f, swap) = swapped_window(12);
    let mem = w.guest_memory().expect("view");
    // Swap everything back in (clean), then a "device" writes two pages.
    assert_eq!(mismatches(&w, 0..8 * MIB, 12), 0);
    assert_eq!(swap.clean_bytes(), 8 * MIB);
    mem.write_obj(0xdead_beefu64, GuestAddress(5 * PAGE + 16))
        .expect("device write");
    mem.write_slice(&[7u8; 100], GuestAddress(900 * PAGE))
        .expect("device write");
    assert_eq!(swap.clean_bytes(), 8 * MIB - 2 * PAGE);
    let writes = f.counters().writes;
    assert_eq!(
        swap.drop_clean(0..8 * MIB).expect("drop"),
        8 * MIB - 2 * PAGE
    );
    assert_eq!(f.counters().writes, writes);
    // The written pages stayed, and swap out writes exactly them.
    let out = swap.swap_out(0..8 * MIB, u64::MAX).expect("swap out");
    assert_eq!((out.written_pages, out.dropped_clean_pages), (2, 0));
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(5 * PAGE + 16)).ok(),
        Some(0xdead_beef)
    );
    let mut b = [0u8; 100];
    mem.read_slice(&mut b, GuestAddress(900 * PAGE))
        .expect("read");
    assert_eq!(b, [7u8; 100]);
    assert_eq!(rd(&w, 4 * PAGE), word(4 * PAGE, 12));
}

#[test]
fn swap_hook_respects_budgets() {
    use crate::reclaim::SwapHook;
    let w = window(16 * MIB, 0);
    let f = file(GIB);
    let swap = VmSwap::new(Arc::clone(&w), Arc::clone(&f)).expect("swap");
    fill(&w, 0..16 * MIB, 13);
    let cold = [0..4 * MIB, 8 * MIB..16 * MIB];
    let freed = SwapHook::swap_out(&swap, &cold, 6 * MIB).expect("hook swap out");
    assert_eq!(freed, 6 * MIB);
    assert_eq!(swap.swapped_bytes(), 6 * MIB);
    assert_eq!(mismatches(&w, 0..16 * MIB, 13), 0);
    assert_eq!(swap.clean_bytes(), 6 * MIB);
    let dropped = SwapHook::drop_clean(&swap, &cold, 3 * MIB).expect("hook drop");
    assert_eq!(dropped, 3 * MIB);
    assert_eq!(swap.clean_bytes(), 3 * MIB);
    swap.shutdown();
    assert_eq!(
        SwapHook::swap_out(&swap, &cold, MIB),
        Err(crate::reclaim::TargetError::Gone)
    );
}

#[test]
fn memfd_backed_window_is_refused() {
    use crate::memory::{BackingKind, BackingSpec, PoolBlock, PoolFiles};
    use guest_mm::{FrameId, NodeId};
    let files = PoolFiles::new();
    let backing = files
        .backing(BackingSpec {
            kind: BackingKind::Memfd,
            thp: false,
        })
        .expect("backing");
    let blocks: Vec<PoolBlock> = (0..2)
        .map(|i| PoolBlock {
            frame: FrameId(i * (2 * MIB / guest_mm::FRAME_SIZE)),
            node: NodeId(0),
        })
        .collect();
    let layout = Layout::new(LayoutConfig {
        boot_ram: 4 * MIB,
        hotplug_size: 0,
    })
    .expect("layout");
    let w = Arc::new(GuestWindow::with_backing(layout, backing, &blocks).expect("window"));
    let r = VmSwap::new(w, file(GIB));
    assert!(matches!(r, Err(SwapError::Unsupported("memfd"))), "{r:?}");
}
