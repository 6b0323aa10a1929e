//! Shared rig of the in-process daemon tests (`daemon_swap`, `daemon_swap_safety`): a tiny guest
//! that fills a range, waits for the host, then verifies it; a `VmManager` with the daemon's
//! reclaim engine and swap file; report lookup and condition waits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mm::slab::TypedSlab;
use guest_mm::topology::Topology;
use tidepool_api::types::{ImagePrivilege, RawImage};
use tidepool_vmm::hostpool::{build_pool, FramePool};
use tidepool_vmm::manager::{DaemonReclaimConfig, DaemonSwapConfig, VmManager};
use tidepool_vmm::memory::{Layout, LayoutConfig};
use tidepool_vmm::tiny_guest::program::{Stride, TAG_USER};
use tidepool_vmm::tiny_guest::{Privilege, Step, TinyGuestBuilder};

pub const MIB: u64 = 1 << 20;
/// Boot RAM of the test VMs.
pub const BOOT_MIB: u64 = 64;
/// The guest spins until the host writes a non-zero word here.
pub const FLAG: u64 = 8 * MIB;
/// Reported under `TAG_USER` once the guest has filled its range.
pub const FILLED: u64 = 0xf111;

/// A tiny guest that fills `data` with `seed`'s pattern, reports [`FILLED`], spins until
/// [`FLAG`] is set, verifies `data` and halts.
pub fn fill_spin_verify(data: std::ops::Range<u64>, stride: Stride, seed: u64) -> RawImage {
    let layout = Layout::new(LayoutConfig {
        boot_ram: BOOT_MIB * MIB,
        hotplug_size: 0,
    })
    .expect("layout");
    // mov rax, FLAG; 1: cmp qword [rax], 0; je 1b
    let mut spin = vec![0x48, 0xb8];
    spin.extend_from_slice(&FLAG.to_le_bytes());
    spin.extend_from_slice(&[0x48, 0x83, 0x38, 0x00, 0x74, 0xfa]);
    let img = TinyGuestBuilder::new(&layout)
        .privilege(Privilege::Kernel)
        .step(Step::Fill {
            ranges: vec![data.clone()],
            seed,
            stride,
        })
        .step(Step::Report {
            tag: TAG_USER,
            value: FILLED,
        })
        .step(Step::Raw(spin))
        .step(Step::Verify {
            ranges: vec![data],
            seed,
            stride,
        })
        .step(Step::Halt)
        .build()
        .expect("image");
    RawImage {
        path: None,
        inline: Some(img.bytes.clone()),
        load_addr: img.load_addr,
        entry: img.entry(),
        privilege: ImagePrivilege::Kernel,
    }
}

/// A manager over a 256 MiB pool with the daemon's reclaim engine (100 ms interval, one
/// working-set interval) and a 128 MiB swap file in a fresh directory, after `cfg` adjusted
/// the reclaim configuration. `None` (and a line saying why) when KVM is unavailable.
pub fn manager(
    name: &str,
    prefix: &str,
    call_timeout: Duration,
    cfg: impl FnOnce(&mut DaemonReclaimConfig),
) -> Option<(Arc<VmManager>, Arc<dyn FramePool>, PathBuf)> {
    if let Err(why) = tidepool_vmm::kvm::kvm_available() {
        eprintln!("skipping {name}: {why}");
        return None;
    }
    let gpool = Arc::new(build_pool(Topology::single(1 << 30), Some(256 << 20)).expect("pool"));
    let pool: Arc<dyn FramePool> = Arc::clone(&gpool) as Arc<dyn FramePool>;
    let slab = TypedSlab::new(prefix).expect("slab");
    let m = Arc::new(VmManager::new(Arc::clone(&pool), slab, 1, call_timeout));
    let dir = std::env::temp_dir().join(format!("{prefix}-{name}-{}", std::process::id()));
    let mut c = DaemonReclaimConfig::default();
    c.engine.interval = Duration::from_millis(100);
    c.engine.working_set_intervals = 1;
    c.swap = DaemonSwapConfig {
        enabled: true,
        path: Some(dir.join("swap")),
        runtime_dir: None,
        max_bytes: Some(128 * MIB),
    };
    cfg(&mut c);
    m.start_reclaim(gpool, c).expect("reclaim");
    Some((m, pool, dir))
}

/// The newest value the VM `id` reported under `tag`.
pub fn reported(m: &VmManager, id: &str, tag: u64) -> Option<u64> {
    m.call(id, move |vm| {
        vm.reports()
            .iter()
            .rev()
            .find(|r| r.tag == tag)
            .map(|r| r.value)
    })
    .expect("call")
}

/// Write the mailbox value 1 (the tiny-guest drivers' "stop") at guest-physical `mailbox` of
/// the VM `id`, through its window (guest RAM, no exit).
#[allow(dead_code)] // only the hinting tests stop a driver
pub fn stop_driver(m: &VmManager, id: &str, mailbox: u64) {
    use vm_memory::{Bytes, GuestAddress};
    m.call(id, move |vm| {
        let w = vm.vm().expect("vm").window();
        w.guest_memory()
            .expect("view")
            .write_obj(1u64, GuestAddress(mailbox))
            .expect("mailbox");
    })
    .expect("call");
}

/// Wait for a condition (generous: the machine may be busy), never for a fixed time.
pub fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
