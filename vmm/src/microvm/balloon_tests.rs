//! Tier-2 test (real KVM) of virtio-mem and the balloon together: a block's ballooned and
//! reported state leaves the balloon's accounting when virtio-mem unplugs the block, and guest
//! input about it is refused until it is plugged again. Skips when /dev/kvm cannot be opened.

use std::sync::Arc;

use tidepool_balloon::testing::{Buf, CountingInterrupts, DriverQueue};
use tidepool_balloon::{VIRTIO_BALLOON_F_REPORTING, VIRTIO_F_VERSION_1};
use tidepool_hotplug::MemoryBackend;
use tidepool_virtio::VirtioDevice;
use vm_memory::GuestMemoryAtomic;

use super::test_rig::{base_config, kvm_or_skip, pool, slab};
use super::*;
use crate::devices::{lock, IrqMode, RamChange, RamListener, WindowReclaim};
use crate::memory::MIB;
use vm_memory::{Bytes, GuestAddressSpace};

/// A guest that halts at once: these tests drive the devices from the host.
fn halt_image() -> BootImage {
    BootImage::Raw {
        bytes: vec![0xf4],
        load_addr: 0x1000,
        entry: 0x1000,
        privilege: crate::tiny_guest::Privilege::Kernel,
    }
}

/// Queue index of reporting with VERSION_1 | REPORTING acked (inflate 0, deflate 1).
const REPORTING: usize = 2;

#[test]
fn unplug_clears_the_balloons_state_for_the_block() {
    if !kvm_or_skip("unplug_clears_the_balloons_state_for_the_block") {
        return;
    }
    let pool = pool(256);
    let config = MicrovmConfig {
        balloon: Some(BalloonSpec {
            free_page_reporting: true,
            ..Default::default()
        }),
        irq: IrqMode::Irqfd,
        image: halt_image(),
        ..base_config("balloon-unplug", 64 * MIB)
    };
    let mut vm = Microvm::new(config, pool.clone(), slab("balloon-unplug"), 1).expect("microvm");
    let kvm_vm = Arc::clone(vm.vm().expect("vm"));
    let hp = kvm_vm.window().layout().hotplug().expect("region").start;
    let balloon = Arc::clone(vm.balloon_device().expect("balloon"));

    // Nothing plugged yet: the balloon counts boot RAM only.
    let a = lock(&balloon).device().accounting();
    assert_eq!(a.assigned_bytes, 64 * MIB);

    // Plug 4 MiB host-side; the balloon follows.
    vm.with_memory_backend(|b| b.plug(hp, 4 * MIB))
        .expect("backend")
        .expect("plug");
    assert_eq!(
        lock(&balloon).device().accounting().assigned_bytes,
        68 * MIB
    );

    // Play the guest's balloon driver (rings and buffers in boot RAM) and report the first
    // plugged block as free.
    let view = kvm_vm.window().guest_memory().expect("view");
    let mem: vm_memory::GuestMemoryMmap = (*view).clone();
    let acked = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BALLOON_F_REPORTING);
    let mut drivers: Vec<DriverQueue> = (0..3)
        .map(|i| DriverQueue::new(0x10_0000 + 0x1_0000 * i, 256))
        .collect();
    {
        let mut t = lock(&balloon);
        let dev = t.device_mut();
        dev.set_acked_features(acked);
        let queues = drivers
            .iter()
            .map(|d| d.device_queue(&mem).expect("queue"))
            .collect();
        dev.activate(
            GuestMemoryAtomic::new(mem.clone()),
            queues,
            Arc::new(CountingInterrupts::default()),
        )
        .expect("activate");
    }
    let report = |drivers: &mut Vec<DriverQueue>, gpa: u64| {
        drivers[REPORTING]
            .submit(&mem, &[Buf::inb(gpa, 2 * MIB as u32)])
            .expect("submit");
        lock(&balloon)
            .device_mut()
            .process_queue(REPORTING)
            .expect("process");
    };
    report(&mut drivers, hp);
    let a = lock(&balloon).device().accounting();
    assert_eq!(a.reported_bytes, 2 * MIB, "{a:?}");
    assert_eq!(a.counters.discard_failures, 0);

    // virtio-mem unplugs both blocks: the reported block is forgotten with them.
    vm.with_memory_backend(|b| b.unplug(hp, 4 * MIB))
        .expect("backend")
        .expect("unplug");
    let a = lock(&balloon).device().accounting();
    assert_eq!(a.reported_bytes, 0, "{a:?}");
    assert_eq!(a.assigned_bytes, 64 * MIB);
    assert_eq!(a.counters.unplug_cleared_bytes, 2 * MIB);
    assert_eq!(a.resident_estimate_bytes, 64 * MIB);

    // A report about the unplugged block is refused as not plugged (nothing discarded), and
    // residency sampling skips the region.
    report(&mut drivers, hp);
    let a = lock(&balloon).device().accounting();
    assert_eq!(a.input_errors.not_plugged, 1);
    assert_eq!(a.reported_bytes, 0);
    let probe = WindowReclaim::new(Arc::clone(kvm_vm.window())).expect("probe");
    let s = lock(&balloon)
        .device_mut()
        .sample_residency(&probe)
        .expect("residency sample over boot RAM only");
    assert_eq!(s.refaulted_bytes, 0);
    let figures = vm.memory().expect("memory figures");
    assert_eq!(figures.reported, 0);

    // Plugged again, the block is fresh memory: reports there are honoured again.
    vm.with_memory_backend(|b| b.plug(hp, 2 * MIB))
        .expect("backend")
        .expect("plug again");
    report(&mut drivers, hp);
    let a = lock(&balloon).device().accounting();
    assert_eq!(a.reported_bytes, 2 * MIB);
    assert_eq!(a.assigned_bytes, 66 * MIB);
    drop(view);
    drop(vm);
    assert!(pool.figures().expect("figures").is_whole());
}

/// An unplug takes the block out of the device models' memory map and tells the listener
/// (which waits out the balloon) while the block is still placed, before it becomes
/// inaccessible: no device can reach it through a map that still has it once it is gone.
#[test]
fn an_unplugged_block_leaves_the_device_map_before_it_becomes_inaccessible() {
    if !kvm_or_skip("an_unplugged_block_leaves_the_device_map_before_it_becomes_inaccessible") {
        return;
    }
    let pool = pool(256);
    let config = MicrovmConfig {
        balloon: Some(BalloonSpec::default()),
        irq: IrqMode::Irqfd,
        image: halt_image(),
        ..base_config("unplug-hides", 64 * MIB)
    };
    let vm = Microvm::new(config, pool.clone(), slab("unplug-hides"), 1).expect("microvm");
    let kvm_vm = Arc::clone(vm.vm().expect("vm"));
    let hp = kvm_vm.window().layout().hotplug().expect("region").start;
    let mem = vm.handle.as_ref().expect("memory handle").guest_mem();
    let readable = |mem: &tidepool_virtio::GuestMem, gpa: u64| {
        mem.memory()
            .read_obj::<u8>(vm_memory::GuestAddress(gpa))
            .is_ok()
    };
    vm.with_memory_backend(|b| b.plug(hp, 4 * MIB))
        .expect("backend")
        .expect("plug");
    assert!(readable(&mem, hp) && readable(&mem, hp + 2 * MIB));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (seen, mem, kvm_vm) = (Arc::clone(&seen), mem.clone(), Arc::clone(&kvm_vm));
        vm.with_memory_backend(move |b| {
            b.set_listener(RamListener::new(move |change| {
                if let RamChange::Unplugging { gpa, len } = change {
                    let placed = kvm_vm.window().is_range_placed(gpa, len);
                    let hidden = !readable(&mem, gpa) && readable(&mem, gpa + len);
                    seen.lock().expect("seen").push((gpa, placed, hidden));
                }
            }))
        })
        .expect("backend");
    }
    vm.with_memory_backend(|b| b.unplug(hp, 2 * MIB))
        .expect("backend")
        .expect("unplug");
    assert_eq!(*seen.lock().expect("seen"), vec![(hp, true, true)]);
    assert!(!readable(&mem, hp) && readable(&mem, hp + 2 * MIB));
    assert!(!kvm_vm.window().is_placed(hp));
    drop(vm);
    assert!(pool.figures().expect("figures").is_whole());
}
