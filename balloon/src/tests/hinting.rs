//! Free page hinting played by a Linux-like driver over real guest memory: the host starts a
//! pass, the driver acknowledges the id, hints 4 MiB blocks and ends with STOP; the device
//! records and counts the hints, never discards them, and answers the STOP with DONE. Stale and
//! malformed input, host-side stop and finish, reset, and the refusals.

use super::*;
use crate::hinting::{HintState, VIRTIO_BALLOON_CMD_ID_DONE, VIRTIO_BALLOON_CMD_ID_STOP};
use crate::{BalloonError, HUGE_PAGE_SIZE as H, VIRTIO_BALLOON_F_FREE_PAGE_HINT};

/// With stats and hinting negotiated: inflate 0, deflate 1, stats 2, hint 3, reporting 4.
const HINT: usize = 3;
const REP: usize = 4;
/// Linux hints blocks of order MAX_PAGE_ORDER (10 on x86-64): 4 MiB.
const BLOCK: u64 = 2 * H;

fn hinting_vm() -> (Vm, RecordingBackend) {
    let cfg = BalloonConfig {
        free_page_hinting: true,
        ..BalloonConfig::default()
    };
    Vm::new(cfg, ALL | bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT))
}

/// The config's command id as the driver reads it.
fn cmd_id(vm: &Vm) -> u32 {
    let mut b = [0u8; 4];
    vm.dev.read_config(8, &mut b);
    u32::from_le_bytes(b)
}

/// The driver sends a command id (a 4-byte device-readable buffer), as `send_cmd_id_start`
/// and `send_cmd_id_stop` do.
fn send_cmd(vm: &mut Vm, slot: u64, id: u32) {
    let addr = vm.put(slot, &id.to_le_bytes());
    assert_eq!(vm.kick(HINT, &[Buf::out(addr, 4)]), 1);
}

/// The driver hints one block (a device-writable buffer), as `get_free_page_and_send` does.
fn hint(vm: &mut Vm, gpa: u64, len: u64) {
    assert_eq!(vm.kick(HINT, &[Buf::inb(gpa, len as u32)]), 1);
}

#[test]
fn a_pass_is_recorded_counted_and_answered_with_done_without_discarding() {
    let (mut vm, fake) = hinting_vm();
    assert_eq!(
        crate::queue_roles(vm.dev.acked_features()),
        vec![
            crate::QueueRole::Inflate,
            crate::QueueRole::Deflate,
            crate::QueueRole::Stats,
            crate::QueueRole::FreePageHint,
            crate::QueueRole::Reporting
        ]
    );
    assert_eq!(cmd_id(&vm), VIRTIO_BALLOON_CMD_ID_STOP);
    let irqs = vm.irq.config();
    let id = vm.dev.start_hinting().expect("start");
    assert!(id > VIRTIO_BALLOON_CMD_ID_DONE);
    assert_eq!(cmd_id(&vm), id);
    assert_eq!(vm.irq.config(), irqs + 1, "the guest is told");
    assert_eq!(vm.dev.hinting().state, HintState::Requested);
    assert!(matches!(
        vm.dev.start_hinting(),
        Err(BalloonError::HintingBusy { cmd_id }) if cmd_id == id
    ));

    // Hints before the acknowledgement are stale.
    hint(&mut vm, 2 * BLOCK, BLOCK);
    send_cmd(&mut vm, 0, id);
    assert_eq!(vm.dev.hinting().state, HintState::Running);
    for i in [4u64, 5, 7] {
        hint(&mut vm, i * BLOCK, BLOCK);
    }
    // The same block again (the guest freed and re-took it): counted, recorded once.
    hint(&mut vm, 7 * BLOCK, BLOCK);
    // Malformed: outside RAM, misaligned, empty.
    hint(&mut vm, RAM, BLOCK);
    hint(&mut vm, 9 * BLOCK + 0x800, 0x1000);
    hint(&mut vm, 10 * BLOCK, 0);
    let s = vm.dev.hinting();
    assert_eq!(s.pass_hinted_bytes, 3 * BLOCK);
    assert_eq!(s.hint_buffers, 4);
    assert_eq!(s.hinted_bytes_total, 4 * BLOCK);
    assert_eq!(s.stale_hints, 1);
    let e = vm.dev.accounting().input_errors;
    assert_eq!((e.out_of_ram, e.misaligned, e.zero_length), (1, 1, 1));
    assert_eq!(
        vm.dev.hinted_ranges(),
        vec![(4 * BLOCK, 2 * BLOCK), (7 * BLOCK, BLOCK)]
    );

    // The guest ends the pass: DONE, with a config interrupt, so it frees its blocks.
    let irqs = vm.irq.config();
    send_cmd(&mut vm, 1, VIRTIO_BALLOON_CMD_ID_STOP);
    assert_eq!(cmd_id(&vm), VIRTIO_BALLOON_CMD_ID_DONE);
    assert_eq!(vm.irq.config(), irqs + 1);
    let s = vm.dev.hinting();
    assert_eq!(s.state, HintState::Done);
    assert_eq!(
        (s.passes_requested, s.passes_started, s.passes_completed),
        (1, 1, 1)
    );
    let last = s.last_pass.expect("last pass");
    assert_eq!(
        (last.cmd_id, last.hinted_bytes, last.hint_buffers),
        (id, 3 * BLOCK, 4)
    );
    assert!(!last.cut_short);

    // Report only: nothing was discarded or counted as reclaimed.
    assert!(fake.discards().is_empty());
    assert_eq!(s.discarded_bytes, 0);
    assert_eq!(
        s.mode,
        crate::HintMode::ReportOnly(crate::ReportOnlyReason::NoWriteTracking),
        "no VMM write tracking attached: report only, and the status says why"
    );
    let a = vm.dev.accounting();
    assert_eq!(a.reported_bytes + a.ballooned_bytes, 0);
    assert_eq!(fake.resident_bytes(), RAM);

    // Hints after DONE are stale; a fresh pass gets a fresh id and a fresh range set.
    hint(&mut vm, 4 * BLOCK, BLOCK);
    assert_eq!(vm.dev.hinting().stale_hints, 2);
    let id2 = vm.dev.start_hinting().expect("second pass");
    assert_ne!(id2, id);
    assert_eq!(vm.dev.hinting().pass_hinted_bytes, 0);
    // The old id is stale now.
    send_cmd(&mut vm, 2, id);
    assert_eq!(vm.dev.hinting().stale_cmd_ids, 1);
    assert_eq!(vm.dev.hinting().state, HintState::Requested);

    // Reporting still works beside hinting (its queue index moved to 4).
    assert_eq!(vm.kick(REP, &[Buf::inb(12 * BLOCK, H as u32)]), 1);
    assert_eq!(vm.dev.accounting().reported_bytes, H);
}

#[test]
fn host_stop_finish_and_reset() {
    let (mut vm, _fake) = hinting_vm();
    // Stopped before the guest acknowledged: the config goes back to STOP; if the guest had
    // started anyway, its hints are stale and its STOP gets a DONE so it frees its blocks.
    let id = vm.dev.start_hinting().expect("start");
    assert!(vm.dev.stop_hinting().expect("stop"));
    assert_eq!(cmd_id(&vm), VIRTIO_BALLOON_CMD_ID_STOP);
    assert_eq!(vm.dev.hinting().state, HintState::Idle);
    send_cmd(&mut vm, 0, id);
    hint(&mut vm, 0, BLOCK);
    send_cmd(&mut vm, 1, VIRTIO_BALLOON_CMD_ID_STOP);
    let s = vm.dev.hinting();
    assert_eq!((s.stale_cmd_ids, s.stale_hints, s.hint_buffers), (2, 1, 0));
    assert_eq!(cmd_id(&vm), VIRTIO_BALLOON_CMD_ID_DONE);
    assert!(!vm.dev.stop_hinting().expect("nothing to stop"));

    // Stopped while running: STOP in the config; the guest's STOP completes the pass.
    let id = vm.dev.start_hinting().expect("start");
    send_cmd(&mut vm, 2, id);
    hint(&mut vm, BLOCK, BLOCK);
    assert!(vm.dev.stop_hinting().expect("stop"));
    assert_eq!(vm.dev.hinting().state, HintState::Stopping);
    hint(&mut vm, 2 * BLOCK, BLOCK);
    assert_eq!(
        vm.dev.hinting().pass_hinted_bytes,
        BLOCK,
        "hints after STOP are ignored"
    );
    send_cmd(&mut vm, 3, VIRTIO_BALLOON_CMD_ID_STOP);
    assert_eq!(cmd_id(&vm), VIRTIO_BALLOON_CMD_ID_DONE);
    assert_eq!(vm.dev.hinting().passes_completed, 1);

    // The host cuts a pass short with DONE.
    let id = vm.dev.start_hinting().expect("start");
    send_cmd(&mut vm, 4, id);
    hint(&mut vm, 3 * BLOCK, BLOCK);
    vm.dev.finish_hinting().expect("finish");
    assert_eq!(cmd_id(&vm), VIRTIO_BALLOON_CMD_ID_DONE);
    let s = vm.dev.hinting();
    assert!(s.last_pass.expect("pass").cut_short);
    assert_eq!(s.passes_completed, 2);

    // A command buffer too short to hold an id is counted, nothing else changes.
    let addr = vm.put(5, &[1, 2]);
    assert_eq!(vm.kick(HINT, &[Buf::out(addr, 2)]), 1);
    assert_eq!(vm.dev.hinting().bad_cmd_buffers, 1);

    // A device reset ends any pass and puts STOP back.
    let id = vm.dev.start_hinting().expect("start");
    send_cmd(&mut vm, 6, id);
    assert!(vm.dev.reset().is_some());
    assert_eq!(cmd_id(&vm), VIRTIO_BALLOON_CMD_ID_STOP);
    assert_eq!(vm.dev.hinting().state, HintState::Idle);
    assert_eq!(vm.dev.hinting().passes_completed, 3);
}

#[test]
fn hinting_is_refused_without_negotiation_or_activation() {
    // Offered but not accepted by the driver.
    let cfg = BalloonConfig {
        free_page_hinting: true,
        ..BalloonConfig::default()
    };
    let (mut vm, _) = Vm::new(cfg, ALL);
    assert_eq!(vm.dev.start_hinting(), Err(BalloonError::HintingDisabled));
    assert_eq!(vm.dev.stop_hinting(), Err(BalloonError::HintingDisabled));
    assert_eq!(vm.dev.finish_hinting(), Err(BalloonError::HintingDisabled));
    // Not offered at all: the feature bit is absent.
    let (vm2, _) = Vm::new(BalloonConfig::default(), ALL);
    assert_eq!(
        vm2.dev.avail_features() & bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT),
        0
    );
    // Negotiated but not activated yet.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let fake = RecordingBackend::new(&[(0, RAM)]).unwrap();
    let mut vm3 = Vm::with_backend(
        mem,
        cfg,
        Box::new(fake),
        ALL | bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT),
    );
    assert_eq!(vm3.dev.start_hinting(), Err(BalloonError::NotActivated));
    vm3.activate();
    assert!(vm3.dev.start_hinting().is_ok());
    drop(vm);
}

/// One call to the observer: the pass's id and its hinted runs.
type Call = (u32, Vec<(u64, u64)>);

/// Records what it is told.
#[derive(Debug, Default)]
struct Recorder {
    calls: std::sync::Mutex<Vec<Call>>,
}

impl crate::HintPassObserver for Recorder {
    fn pass_ended(&self, cmd_id: u32, ranges: &[(u64, u64)]) -> u64 {
        let mut c = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        c.push((cmd_id, ranges.to_vec()));
        // Pretend half of the hinted bytes were released.
        ranges.iter().map(|(_, l)| l / 2).sum()
    }
}

#[test]
fn the_observer_is_told_once_per_ended_pass() {
    let (mut vm, _fake) = hinting_vm();
    let rec = std::sync::Arc::new(Recorder::default());
    vm.dev.set_hint_observer(rec.clone());
    let calls = |r: &Recorder| r.calls.lock().unwrap_or_else(|e| e.into_inner()).clone();

    // The guest's STOP ends the pass: the observer runs, its bytes count as discarded.
    let id = vm.dev.start_hinting().expect("start");
    send_cmd(&mut vm, 0, id);
    hint(&mut vm, 4 * BLOCK, BLOCK);
    hint(&mut vm, 6 * BLOCK, BLOCK);
    assert!(calls(&rec).is_empty(), "nothing while the pass runs");
    send_cmd(&mut vm, 1, VIRTIO_BALLOON_CMD_ID_STOP);
    assert_eq!(cmd_id(&vm), VIRTIO_BALLOON_CMD_ID_DONE);
    assert_eq!(
        calls(&rec),
        vec![(id, vec![(4 * BLOCK, BLOCK), (6 * BLOCK, BLOCK)])]
    );
    assert_eq!(vm.dev.hinting().discarded_bytes, BLOCK);
    // A stale STOP, a second finish: no pass ended, nobody told.
    send_cmd(&mut vm, 2, VIRTIO_BALLOON_CMD_ID_STOP);
    vm.dev.finish_hinting().expect("finish");
    assert_eq!(calls(&rec).len(), 1);

    // Stopped before the guest acknowledged: the pass never ran, nothing to tell.
    let id = vm.dev.start_hinting().expect("start");
    assert!(vm.dev.stop_hinting().expect("stop"));
    send_cmd(&mut vm, 3, id);
    send_cmd(&mut vm, 4, VIRTIO_BALLOON_CMD_ID_STOP);
    assert_eq!(calls(&rec).len(), 1);

    // The host cuts a pass short, and a reset ends another: both are told.
    let id = vm.dev.start_hinting().expect("start");
    send_cmd(&mut vm, 5, id);
    hint(&mut vm, 2 * BLOCK, BLOCK);
    vm.dev.finish_hinting().expect("finish");
    let id2 = vm.dev.start_hinting().expect("start");
    send_cmd(&mut vm, 6, id2);
    hint(&mut vm, 8 * BLOCK, BLOCK);
    assert!(vm.dev.reset().is_some());
    assert_eq!(
        calls(&rec)[1..],
        [
            (id, vec![(2 * BLOCK, BLOCK)]),
            (id2, vec![(8 * BLOCK, BLOCK)])
        ]
    );
    assert_eq!(vm.dev.hinting().discarded_bytes, 2 * BLOCK);
}
