//! The shared rig of the microVM and device tests (test builds only): a base config, tiny-guest
//! images, the KVM skip check, and waiting for a VM to stop.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mm::policy::NumaPolicy;
use guest_mm::slab::TypedSlab;

use super::{BootImage, HotplugSpec, LifecycleOp, Microvm, MicrovmConfig, VmLifecycle};
use crate::devices::{BlockRecord, IrqMode};
use crate::hostpool::BlockPool;
use crate::memory::{BackingSpec, MIB};
use crate::tiny_guest::{Privilege, Step, Stride, TinyGuestBuilder};

/// Whether /dev/kvm can be used; if not, prints why `test` skips.
pub(crate) fn kvm_or_skip(test: &str) -> bool {
    match crate::kvm::kvm_available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("skipping {test}: {why}");
            false
        }
    }
}

/// A host pool of `mib` MiB.
pub(crate) fn pool(mib: u64) -> Arc<BlockPool> {
    Arc::new(BlockPool::new(mib * MIB))
}

/// A block-record slab named `name`.
pub(crate) fn slab(name: &str) -> TypedSlab<BlockRecord> {
    TypedSlab::new(name).expect("slab")
}

/// The config the tests start from: one vCPU, `boot_ram`, a 128 MiB hot-plug region of 2 MiB
/// blocks with the default memslots, no balloon, polled interrupts, local policy, the default
/// backing, and a one-byte placeholder raw image (see [`with_steps`]).
pub(crate) fn base_config(id: &str, boot_ram: u64) -> MicrovmConfig {
    MicrovmConfig {
        id: id.into(),
        vcpus: 1,
        boot_ram,
        hotplug: Some(HotplugSpec {
            region_size: 128 * MIB,
            block_size: 2 * MIB,
            memslots: Default::default(),
        }),
        balloon: None,
        policy: NumaPolicy::Local,
        irq: IrqMode::Polled,
        image: BootImage::Raw {
            bytes: vec![0],
            load_addr: 0x1000,
            entry: 0x1000,
            privilege: Privilege::Kernel,
        },
        backing: BackingSpec::default(),
        pool_files: None,
    }
}

/// `c` booting a tiny guest that runs `steps` (built over `c`'s layout).
pub(crate) fn with_steps(mut c: MicrovmConfig, steps: Vec<Step>) -> MicrovmConfig {
    let layout = c.layout().expect("layout");
    let b = steps
        .into_iter()
        .fold(TinyGuestBuilder::new(&layout), |b, s| b.step(s));
    c.image = BootImage::Tiny(b.build().expect("image"));
    c
}

/// Tiny-guest steps that fill `range` page by page with `seed`, verify it, and finish.
pub(crate) fn fill_verify_done(range: Range<u64>, seed: u64) -> Vec<Step> {
    vec![
        Step::Fill {
            ranges: vec![range.clone()],
            seed,
            stride: Stride::Page,
        },
        Step::Verify {
            ranges: vec![range],
            seed,
            stride: Stride::Page,
        },
        Step::Done,
    ]
}

/// Waits up to `timeout` for `vm` to stop; its state then.
pub(crate) fn wait_stopped(vm: &mut Microvm, timeout: Duration) -> VmLifecycle {
    let deadline = Instant::now() + timeout;
    while !vm.state().is_stopped() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    vm.state().clone()
}

/// Starts `vm` and waits up to `timeout` for it to stop; its state then.
pub(crate) fn start_and_wait(vm: &mut Microvm, timeout: Duration) -> VmLifecycle {
    vm.apply(LifecycleOp::Start).expect("start");
    wait_stopped(vm, timeout)
}

/// The value of the last report with `tag` from `vm`'s guest.
pub(crate) fn last_report(vm: &Microvm, tag: u64) -> Option<u64> {
    vm.reports()
        .iter()
        .rev()
        .find(|r| r.tag == tag)
        .map(|r| r.value)
}
