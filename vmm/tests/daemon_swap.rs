//! The daemon's swap end to end: a `VmManager` with the daemon's reclaim (`start_reclaim`,
//! its own engine thread) under a small resident budget swaps a tiny-guest VM's cold memory
//! to the shared swap file; the guest then reads every page back and finds its data; the
//! swap figures show in `GET /metrics` and `GET /v1/vms/{id}/memory`. Deleting a VM with
//! swapped memory frees its slots and gives every frame back. Skips without /dev/kvm.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{fill_spin_verify, manager, reported, wait, BOOT_MIB, FILLED, FLAG, MIB};
use tidepool_api::metrics::sample_value;
use tidepool_api::types::{CreateVmRequest, RawImage};
use tidepool_api::ApiBackend;
use tidepool_vmm::hostpool::FramePool;
use tidepool_vmm::manager::VmManager;
use tidepool_vmm::tiny_guest::program::{Stride, TAG_CHECKED, TAG_MISMATCHES, TAG_USER};

/// The guest fills and later verifies this range, one word per 4 KiB page.
const DATA: std::ops::Range<u64> = 16 * MIB..48 * MIB;
/// The guest spins until the host writes a non-zero word here.
const SEED: u64 = 0x5eed_d5a9;

/// Fill DATA, report FILLED, spin on FLAG, verify DATA, halt.
fn image() -> RawImage {
    fill_spin_verify(DATA, Stride::Page, SEED)
}

fn setup(name: &str) -> Option<(Arc<VmManager>, Arc<dyn FramePool>, PathBuf)> {
    // Resident budget 20 MiB: the guest's 32 MiB of data cannot all stay.
    manager(name, "tp-dswap", Duration::from_secs(20), |c| {
        c.engine.budget_bytes = Some(20 * MIB)
    })
}

/// Create the VM, wait until it filled DATA and the engine swapped at least `min` of it.
fn vm_with_swapped_memory(m: &VmManager, min: u64) -> String {
    let mut req = CreateVmRequest::with_memory(BOOT_MIB);
    req.image = Some(image());
    let id = m.create_vm(req).expect("create").id;
    wait("the guest's fill", 120, || {
        reported(m, &id, TAG_USER) == Some(FILLED)
    });
    wait("swap-out by the daemon's engine", 60, || {
        m.vm_swap(&id)
            .is_some_and(|s| s.counters().swapped_bytes >= min)
    });
    id
}

#[test]
fn daemon_swaps_cold_memory_and_the_guest_reads_it_back() {
    let Some((m, _pool, dir)) = setup("readback") else {
        return;
    };
    let id = vm_with_swapped_memory(&m, 8 * MIB);
    let mem = m.get_memory(&id).expect("memory");
    assert!(
        mem.swapped_mib >= 8,
        "memory figures show the swap: {mem:?}"
    );
    let text = tidepool_api::metrics::render(&m.metrics().expect("metrics")).expect("render");
    let written =
        sample_value(&text, "tidepool_swap_io_bytes_total{dir=\"write\"} ").unwrap_or(0.0);
    assert!(
        written >= (8 * MIB) as f64,
        "swap writes in /metrics:\n{text}"
    );
    assert!(
        sample_value(
            &text,
            "tidepool_reclaim_phase_bytes_total{phase=\"swap_out\",kind=\"reclaimed\"} "
        )
        .unwrap_or(0.0)
            >= (8 * MIB) as f64,
        "{text}"
    );
    let swapped = sample_value(
        &text,
        &format!(
            "tidepool_device_events_total{{vm=\"{id}\",device=\"swap\",event=\"swapped_bytes\"}} "
        ),
    )
    .unwrap_or(0.0);
    assert!(swapped > 0.0, "per-VM swap counters in /metrics:\n{text}");

    // Let the guest verify every page of DATA.
    m.call(&id, |vm| {
        let w = vm.vm().expect("vm").window();
        let host = w.host_addr(FLAG).expect("flag address");
        // SAFETY: `host` is the host address of a placed, 8-byte aligned guest page inside
        // the window, which the VM keeps mapped; the guest only reads it.
        unsafe { std::ptr::write_volatile(host as *mut u64, 1) };
    })
    .expect("call");
    wait("the guest's verify", 180, || {
        reported(&m, &id, TAG_CHECKED).is_some()
    });
    assert_eq!(reported(&m, &id, TAG_MISMATCHES), Some(0), "data lost");
    assert_eq!(
        reported(&m, &id, TAG_CHECKED),
        Some((DATA.end - DATA.start) / 4096),
        "every page checked"
    );
    let c = m.vm_swap(&id).expect("swap").counters();
    assert!(
        c.swapped_in_pages > 0,
        "the guest read swapped pages: {c:?}"
    );
    assert_eq!(c.swap_in_errors, 0);
    let mem = m.get_memory(&id).expect("memory");
    assert!(
        mem.refaulted_mib >= 1,
        "swap-ins count as refaults: {mem:?}"
    );
    let text = tidepool_api::metrics::render(&m.metrics().expect("metrics")).expect("render");
    assert!(
        sample_value(&text, "tidepool_swap_io_bytes_total{dir=\"read\"} ").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    m.delete(&id).expect("delete");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn deleting_a_vm_with_swapped_memory_frees_its_slots_and_frames() {
    let Some((m, pool, dir)) = setup("delete") else {
        return;
    };
    assert!(pool.figures().expect("figures").is_whole());
    let id = vm_with_swapped_memory(&m, 4 * MIB);
    let vm_swap = m.vm_swap(&id).expect("swap");
    let file = Arc::clone(vm_swap.file());
    assert!(file.counters().slots_used > 0);
    drop(vm_swap);
    // The guest still spins on FLAG; the VM goes with swapped memory.
    m.delete(&id).expect("delete");
    assert_eq!(file.counters().slots_used, 0, "every slot freed");
    assert!(
        pool.figures().expect("figures").is_whole(),
        "every frame back in the pool"
    );
    let text = tidepool_api::metrics::render(&m.metrics().expect("metrics")).expect("render");
    assert_eq!(
        sample_value(&text, "tidepool_swap_file_bytes{kind=\"used\"} "),
        Some(0.0),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
