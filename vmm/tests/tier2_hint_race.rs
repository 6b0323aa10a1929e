//! Tier-2 test of free page hinting against a guest that keeps writing hinted pages: does a
//! page the guest hinted and then wrote, before and during the host's discard, keep the data
//! written? On real vCPUs, through the daemon's set-up.
//!
//! Each round is a two-vCPU tiny guest in a `VmManager` with the daemon's reclaim engine
//! (phase 1 only) and a swap (so hinting is write-tracked, mode `discard`), queue
//! notifications through the ioeventfd and the device thread. vCPU 0 runs the hinting driver
//! (`tiny_guest::hint_driver`) over 32 MiB, all of it hinted; it publishes its phase in guest
//! RAM and lingers a different time per round after acknowledging the pass and before its
//! STOP. vCPU 1 runs `tiny_guest::hint_race::HintRaceWriter` over one page in four of the
//! range: from the moment the pass is acknowledged (the host's epoch already began) it writes
//! never-repeated sequence numbers, some pages until the STOP, some until DONE, some to the
//! end, and records the last value of each page and the phases around that write.
//!
//! Checked per round, by the host from guest memory and by the guest itself: every written
//! page holds exactly its last value (never zero, never an older value), every hinted page
//! nobody wrote was discarded (reads zero, not resident, `discarded_bytes` covers them), and
//! the driver finds no page with foreign content. Printed: how many writes (and first writes,
//! the ones that can meet a page still armed for the discard) landed in each window, and how
//! many written pages the discard took before their first write (which then went onto a fresh
//! zero page). The windows are not asserted: they depend on scheduling.
//!
//! Skips when /dev/kvm cannot be opened.

#[allow(dead_code)]
mod common;

use std::time::Duration;

use common::{manager, reported, stop_driver, wait};
use tidepool_api::types::{BalloonConfig as ApiBalloon, CreateVmRequest, ImagePrivilege, RawImage};
use tidepool_balloon::HintMode;
use tidepool_vmm::devices::DEVICE_MMIO_BASE;
use tidepool_vmm::manager::{config_from_request, info_from_request, VmManager};
use tidepool_vmm::memory::{Layout, LayoutConfig, MIB};
use tidepool_vmm::microvm::BootImage;
use tidepool_vmm::reclaim::Phase;
use tidepool_vmm::tiny_guest::hint_driver::*;
use tidepool_vmm::tiny_guest::hint_race::*;
use tidepool_vmm::tiny_guest::pattern;
use tidepool_vmm::tiny_guest::virtq::{DEFAULT_SCRATCH, TAG_DRIVER_FAILED};
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;
const RAM_MIB: u64 = 64;
/// The driver's data: 32 MiB in blocks of 1 MiB, every other one hinted (16 separate ranges:
/// the discard takes the swap's state lock once per range, so a writer can slip in between).
const DATA: std::ops::Range<u64> = 16 * MIB..48 * MIB;
const BLOCK: u64 = MIB;
/// The writer's table.
const TABLE: u64 = 4 * MIB;
/// The writer's pages: in each hinted block one page in four, from its second page.
const TARGET_STRIDE: u64 = 4 * PAGE;
/// The driver's linger per round (µs): how long it idles after acknowledging the pass and
/// again before its STOP, so the STOP meets the writer at different points of its first sweep
/// (each first write is a write-protect fault, about 40 µs here).
const LINGER_US: [u32; 10] = [
    0, 300, 1_000, 2_000, 3_000, 5_000, 8_000, 12_000, 16_000, 24_000,
];

fn layout() -> Layout {
    Layout::new(LayoutConfig {
        boot_ram: RAM_MIB * MIB,
        hotplug_size: 0,
    })
    .expect("layout")
}

fn pair(round: usize) -> (HintDriver, HintRaceWriter) {
    let mut d = HintDriver::new(DEVICE_MMIO_BASE, DEFAULT_SCRATCH, DATA);
    d.wait_us = 50_000;
    d.host_poll_limit = 2400;
    d.block = BLOCK;
    d.hint_every = 2;
    d.rewrite_stride = 0;
    d.linger_us = LINGER_US[round];
    let mut w = HintRaceWriter::new(&d, TABLE, PAGE, TARGET_STRIDE);
    w.tag = (round as u64 + 1) << 40;
    (d, w)
}

/// Create the two-vCPU VM of `round`; returns its id.
fn race_vm(m: &VmManager, d: &HintDriver, w: &HintRaceWriter) -> String {
    let image = hint_race_program(&layout(), d.clone(), w.clone()).expect("image");
    let mut req = CreateVmRequest::with_memory(RAM_MIB);
    req.vcpus = 2;
    // The API's raw image runs on one vCPU; the request only describes the VM, the tiny
    // image with its two programs replaces it below.
    req.image = Some(RawImage {
        path: None,
        inline: Some(image.bytes.clone()),
        load_addr: image.load_addr,
        entry: image.entry(),
        privilege: ImagePrivilege::User,
    });
    req.balloon = Some(ApiBalloon {
        free_page_hinting: true,
        ..ApiBalloon::default()
    });
    let id = m.next_id();
    let mut config = config_from_request(&id, &req, m.irq_mode()).expect("config");
    config.image = BootImage::Tiny(image);
    let info = info_from_request(&id, &req);
    m.create(config, info, true).expect("create").id
}

/// What the host read back after a round.
struct Seen {
    table: RaceTable,
    /// Word 0 (the driver's fill pattern, or 0 if discarded) and the writer's word of every
    /// data page.
    words: Vec<(u64, u64)>,
    /// Resident bytes of the hinted blocks after the pass, before this read.
    resident: u64,
}

fn read_back(m: &VmManager, id: &str, d: &HintDriver, w: &HintRaceWriter) -> Seen {
    let (table_len, word) = (w.table_len(), u64::from(w.word));
    let hinted = d.hinted_blocks();
    m.call(id, move |vm| {
        let win = vm.vm().expect("vm").window();
        let resident = hinted
            .iter()
            .map(|r| {
                win.resident_bytes(r.start, r.end - r.start)
                    .expect("mincore")
            })
            .sum();
        let mem = win.guest_memory().expect("view");
        let mut t = vec![0u8; table_len as usize];
        mem.read_slice(&mut t, GuestAddress(TABLE)).expect("table");
        let words = DATA
            .step_by(PAGE as usize)
            .map(|p| {
                let r = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).expect("read");
                (r(p), r(p + word))
            })
            .collect();
        Seen {
            table: RaceTable::parse(&t),
            words,
            resident,
        }
    })
    .expect("call")
}

/// One round's figures for the summary.
#[derive(Default)]
struct Figures {
    writes: [u64; WINDOWS],
    straddled: [u64; WINDOWS],
    first: [u64; WINDOWS],
    first_straddled: [u64; WINDOWS],
    last: [u64; WINDOWS],
    taken: u64,
    /// Pages whose first write completed between the STOP and DONE (the discard's window):
    /// before the discard reached the page (kept), or onto the discarded page (taken).
    stop_first_kept: u64,
    stop_first_taken: u64,
}

fn run_round(m: &VmManager, round: usize) -> Figures {
    let (d, w) = pair(round);
    let id = race_vm(m, &d, &w);
    wait("the writer's check", 120, || {
        assert_eq!(reported(m, &id, TAG_DRIVER_FAILED), None, "driver failed");
        assert_eq!(reported(m, &id, TAG_RACE_FAILED), None, "writer failed");
        reported(m, &id, TAG_RACE_CHECKED).is_some()
    });
    let st = m
        .call(&id, |vm| {
            let dev = vm.balloon_device().expect("balloon");
            let t = dev.lock().unwrap_or_else(|e| e.into_inner());
            t.device().hinting()
        })
        .expect("call");
    assert_eq!(st.mode, HintMode::Discard, "{st:?}");
    let last = st.last_pass.expect("a finished pass");
    let hinted_bytes: u64 = d.hinted_blocks().iter().map(|r| r.end - r.start).sum();
    assert_eq!(last.hinted_bytes, hinted_bytes);
    assert!(!last.cut_short);
    let swap = m.vm_swap(&id).expect("swap");
    assert_eq!(
        swap.counters().hint_discarded_pages * PAGE,
        st.discarded_bytes
    );

    let seen = read_back(m, &id, &d, &w);
    let t = &seen.table;
    assert_eq!(
        reported(m, &id, TAG_RACE_MISMATCHES),
        Some(0),
        "guest read-back"
    );
    assert_eq!(t.mismatches, 0);
    assert_eq!(t.entries.len() as u64, w.pages());
    assert_eq!(reported(m, &id, TAG_RACE_WRITES), Some(t.total));
    assert_eq!(
        t.writes.iter().chain(&t.straddled).sum::<u64>(),
        t.total,
        "every write is in one window"
    );
    let targets: std::collections::BTreeMap<u64, usize> =
        w.targets().enumerate().map(|(i, p)| (p, i)).collect();
    let mut f = Figures {
        writes: t.writes,
        straddled: t.straddled,
        first: t.first,
        first_straddled: t.first_straddled,
        ..Figures::default()
    };
    let (mut untouched, mut written) = (0u64, 0u64);
    for (k, &(w0, ww)) in seen.words.iter().enumerate() {
        let p = DATA.start + k as u64 * PAGE;
        let fill = pattern(p, d.seed);
        match targets.get(&p) {
            Some(&i) => {
                let e = t.entries[i];
                assert_eq!(
                    ww, e.value,
                    "round {round}: page {p:#x} lost its last write {e:?}"
                );
                if e.value == 0 {
                    assert_ne!(
                        WriterGroup::of(i as u64),
                        WriterGroup::ToTheEnd,
                        "pages written to the end are written at least once after DONE"
                    );
                    // Hinted and never written: discarded like the rest.
                    assert_eq!(w0, 0, "round {round}: unwritten page {p:#x} not discarded");
                    untouched += 1;
                    continue;
                }
                assert_eq!(e.value >> 40, round as u64 + 1, "this round's values");
                written += 1;
                // A written page was kept (old data around the write) or taken by the
                // discard before its first write (zeros around it). A page first written
                // before the STOP was even posted must have been kept: a discard after any
                // of its writes shows here even when a later write refilled the word.
                assert!(w0 == fill || w0 == 0, "page {p:#x}: word 0 {w0:#x}");
                if e.first_after < HintPhase::Stopping as u64 {
                    assert_eq!(
                        w0, fill,
                        "round {round}: page {p:#x} written before the STOP was discarded {e:?}"
                    );
                }
                f.taken += u64::from(w0 == 0);
                if e.first_after == HintPhase::Stopping as u64 {
                    f.stop_first_kept += u64::from(w0 != 0);
                    f.stop_first_taken += u64::from(w0 == 0);
                }
                if e.before == e.after {
                    f.last[e.before as usize] += 1;
                }
                if WriterGroup::of(i as u64) == WriterGroup::UntilStop {
                    assert!(e.before < HintPhase::Stopping as u64, "{e:?}");
                }
            }
            None if d.class(p) == PageClass::Kept => {
                assert_eq!((w0, ww), (fill, 0), "round {round}: page {p:#x} not hinted");
            }
            None => {
                assert_eq!((w0, ww), (0, 0), "round {round}: page {p:#x} not discarded");
                untouched += 1;
            }
        }
    }
    assert_eq!(written, w.pages() - t.unwritten);
    assert_eq!(
        st.discarded_bytes,
        (untouched + f.taken) * PAGE,
        "discarded: the pages nobody wrote and the written ones taken before their first write"
    );
    assert!(st.discarded_bytes > 0);
    // Only target pages can be resident again: written ones, and the rest mapped to the zero
    // page by the writer's read-back.
    assert!(
        seen.resident <= w.pages() * PAGE + MIB,
        "round {round}: resident {} after the pass",
        seen.resident
    );

    // The driver's own check: every hinted page zero or its fill pattern (the writer's word is
    // not the driver's).
    let mailbox = d.mailbox();
    stop_driver(m, &id, mailbox);
    wait("the driver's check", 120, || {
        reported(m, &id, TAG_HINT_CHECKED).is_some()
    });
    let get = |tag| reported(m, &id, tag).expect("report");
    assert_eq!(
        [
            TAG_HINT_OTHER,
            TAG_HINT_REWRITE_LOST,
            TAG_HINT_KEPT_LOST,
            TAG_HINT_CHECKED
        ]
        .map(get),
        [0, 0, 0, (DATA.end - DATA.start) / PAGE]
    );
    assert_eq!(get(TAG_HINT_ZERO), untouched + f.taken);
    assert_eq!(swap.counters().swap_in_errors, 0);
    drop(swap);
    println!(
        "round {round} (linger {:>5} us): {} writes in {} sweeps, {} pages written, {} of them \
         taken by the discard before their first write; resident {} KiB of {} MiB hinted",
        LINGER_US[round],
        t.total,
        t.sweeps,
        written,
        f.taken,
        seen.resident / 1024,
        hinted_bytes / MIB
    );
    m.delete(&id).expect("delete");
    f
}

/// One row per count, one column per window (phases 1..=4: acknowledged, hinted, stopping,
/// done), straddling writes under the window they began in.
fn print_windows(f: &Figures) {
    let row = |v: &[u64; WINDOWS]| format!("{:>12} {:>12} {:>12} {:>12}", v[1], v[2], v[3], v[4]);
    println!(
        "  {:<28} {:>12} {:>12} {:>12} {:>12}\n  {:<28} {}\n  {:<28} {}\n  {:<28} {}\n  \
         {:<28} {}\n  {:<28} {}",
        "window",
        "before-hint",
        "hint..STOP",
        "STOP..DONE",
        "after-DONE",
        "writes",
        row(&f.writes),
        "  of which first writes",
        row(&f.first),
        "writes straddling the next",
        row(&f.straddled),
        "  of which first writes",
        row(&f.first_straddled),
        "pages last written here",
        row(&f.last)
    );
    println!(
        "  first writes done between STOP and DONE: {} before the discard reached the page \
         (kept), {} onto the discarded page",
        f.stop_first_kept, f.stop_first_taken
    );
}

#[test]
fn writes_to_hinted_pages_survive_the_discard_on_a_real_vcpu() {
    let Some((m, _pool, dir)) = manager("hint-race", "tp-hintrace", Duration::from_secs(20), |c| {
        // Always over budget, phase 1 only: the engine starts a hinting pass in each VM.
        c.engine.budget_bytes = Some(12 * MIB);
        c.engine.phases = vec![Phase::Reported];
    }) else {
        return;
    };
    let mut sum = Figures::default();
    for round in 0..LINGER_US.len() {
        let f = run_round(&m, round);
        for w in 0..WINDOWS {
            sum.writes[w] += f.writes[w];
            sum.first[w] += f.first[w];
            sum.last[w] += f.last[w];
            sum.straddled[w] += f.straddled[w];
            sum.first_straddled[w] += f.first_straddled[w];
        }
        sum.taken += f.taken;
        sum.stop_first_kept += f.stop_first_kept;
        sum.stop_first_taken += f.stop_first_taken;
        print_windows(&f);
    }
    println!("all {} rounds:", LINGER_US.len());
    print_windows(&sum);
    println!(
        "  written pages the discard took before their first write: {}",
        sum.taken
    );
    let _ = std::fs::remove_dir_all(dir);
}
