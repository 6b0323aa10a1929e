//! Negotiation, queue numbering, inflate/deflate, target changes, deflate-on-OOM, reset.

use super::*;
use crate::device::{queue_roles, QueueRole};
use crate::error::BalloonError;
use crate::PAGE_SIZE;
use tidepool_virtio::DeviceError;

#[test]
fn offered_features_and_queue_sizes() {
    let (vm, _) = Vm::new(BalloonConfig::default(), ALL);
    assert_eq!(vm.dev.device_type(), 5);
    assert_eq!(vm.dev.avail_features(), ALL);
    assert_eq!(vm.dev.queue_max_sizes(), &[256, 256, 256, 256]);
    let cfg = BalloonConfig {
        stats_interval_s: 0,
        free_page_reporting: false,
        page_poison: false,
        deflate_on_oom: false,
        queue_size: 64,
        free_page_hinting: false,
    };
    let dev = Balloon::new(cfg, Box::new(RecordingBackend::new(&[(0, RAM)]).unwrap())).unwrap();
    assert_eq!(dev.avail_features(), bit(VIRTIO_F_VERSION_1));
    assert_eq!(dev.queue_max_sizes(), &[64, 64]);
}

#[test]
fn reporting_queue_index_depends_on_stats() {
    use QueueRole::*;
    let rep = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_REPORTING);
    let both = rep | bit(VIRTIO_BALLOON_F_STATS_VQ);
    assert_eq!(queue_roles(rep), vec![Inflate, Deflate, Reporting]);
    assert_eq!(queue_roles(both), vec![Inflate, Deflate, Stats, Reporting]);
    assert_eq!(
        queue_roles(bit(VIRTIO_BALLOON_F_STATS_VQ)),
        vec![Inflate, Deflate, Stats]
    );

    // Without stats: a report on queue 2 is discarded.
    let (mut vm, fake) = Vm::new(BalloonConfig::default(), rep);
    assert_eq!(vm.dev.num_queues_for(rep), 3);
    assert_eq!(vm.dev.queue_role(2), Some(Reporting));
    assert_eq!(vm.kick(2, &[Buf::inb(8 << 20, 2 << 20)]), 1);
    assert_eq!(fake.discarded_bytes(), 2 << 20);
    assert!(matches!(
        vm.dev.process_queue(3),
        Err(DeviceError::NoSuchQueue(3))
    ));

    // With stats: queue 2 is stats (held, nothing discarded), reporting is 3.
    let (mut vm, fake) = Vm::new(BalloonConfig::default(), both);
    assert_eq!(vm.dev.num_queues_for(both), 4);
    let stats = vm.put(0, &crate::stats::encode(&[(4, 1)]));
    assert_eq!(
        vm.kick(2, &[Buf::out(stats, 10)]),
        0,
        "stats buffer is held"
    );
    assert_eq!(vm.kick(3, &[Buf::inb(8 << 20, 2 << 20)]), 1);
    assert_eq!(fake.discarded_bytes(), 2 << 20);
}

#[test]
fn inflate_then_deflate() {
    let (mut vm, fake) = Vm::new(BalloonConfig::default(), ALL);
    vm.dev.set_target_mib(1).unwrap();
    // Linux inflates in batches of up to 256 PFNs.
    let pfns: Vec<u32> = (0x2000..0x2100).collect();
    vm.send_pfns(0, &pfns);
    vm.write_actual(256);
    let (id, len) = vm.drv[0].used_elem(&vm.mem, 0);
    assert_eq!((id, len), (0, 0));
    assert_eq!(vm.irq.used(), 1);
    // One coalesced discard of the 1 MiB run.
    assert_eq!(fake.discards().len(), 1);
    assert_eq!(fake.discarded_bytes(), 1 << 20);
    let a = vm.dev.accounting();
    assert_eq!(a.ballooned_bytes, 1 << 20);
    assert_eq!(a.ballooned_mib, 1);
    assert_eq!(a.guest_actual_bytes, 1 << 20);
    assert_eq!(a.target_bytes, 1 << 20);
    assert_eq!(a.resident_estimate_bytes, RAM - (1 << 20));
    assert_eq!(vm.dev.actual_mib(), 1);

    // The host lowers the target; the guest deflates half.
    vm.dev.set_target_mib(0).unwrap();
    vm.send_pfns(1, &pfns[..128]);
    vm.write_actual(128);
    let a = vm.dev.accounting();
    assert_eq!(a.ballooned_bytes, 128 * PAGE_SIZE);
    assert_eq!(a.counters.deflated_pages, 128);
    assert_eq!(a.counters.oom_deflated_pages, 0);
    assert_eq!(fake.discards().len(), 1, "deflate needs no host action");
    assert_eq!(vm.irq.used(), 2);
}

#[test]
fn deflate_on_oom_is_accepted_and_counted() {
    let (mut vm, _) = Vm::new(BalloonConfig::default(), ALL);
    vm.dev.set_target_mib(2).unwrap();
    let pfns: Vec<u32> = (0x3000..0x3200).collect();
    vm.send_pfns(0, &pfns[..256]);
    vm.send_pfns(0, &pfns[256..]);
    assert_eq!(vm.dev.accounting().ballooned_mib, 2);
    // Under OOM the guest's notifier releases 256 pages without the target changing.
    vm.send_pfns(1, &pfns[..256]);
    let a = vm.dev.accounting();
    assert_eq!(a.counters.oom_deflated_pages, 256);
    assert_eq!(a.counters.unrequested_deflated_pages, 0);
    assert_eq!(a.ballooned_mib, 1);

    // Without DEFLATE_ON_OOM the same deflate is accepted but counted as unrequested.
    let (mut vm, _) = Vm::new(
        BalloonConfig::default(),
        ALL & !bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
    );
    vm.dev.set_target_mib(1).unwrap();
    vm.send_pfns(0, &pfns[..256]);
    vm.send_pfns(1, &pfns[..10]);
    let a = vm.dev.accounting();
    assert_eq!(a.counters.unrequested_deflated_pages, 10);
    assert_eq!(a.counters.oom_deflated_pages, 0);
    assert_eq!(a.ballooned_bytes, 246 * PAGE_SIZE);
}

#[test]
fn target_change_raises_config_interrupt() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let fake = RecordingBackend::new(&[(0, RAM)]).unwrap();
    let mut vm = Vm::with_backend(mem, BalloonConfig::default(), Box::new(fake), ALL);
    // Before activation the driver reads the target at probe: no interrupt.
    vm.dev.set_target_mib(8).unwrap();
    let mut b = [0u8; 4];
    vm.dev.read_config(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 8 * 256);
    vm.activate();
    assert_eq!(vm.irq.config(), 0);
    vm.dev.set_target_mib(16).unwrap();
    vm.dev.set_target_mib(4).unwrap();
    assert_eq!(vm.irq.config(), 2);
    assert_eq!(vm.dev.config_interrupts(), 2);
    assert_eq!(vm.dev.target_mib(), 4);
    vm.dev.read_config(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 4 * 256);
    // The guest cannot change the target.
    vm.dev.write_config(0, &[0; 4]);
    assert_eq!(vm.dev.target_mib(), 4);
    // More than the VM's RAM is refused and changes nothing.
    assert_eq!(
        vm.dev.set_target_mib(65),
        Err(BalloonError::TargetTooLarge {
            target_mib: 65,
            ram_mib: 64
        })
    );
    assert!(vm.dev.set_target_mib(u64::MAX).is_err());
    assert_eq!(vm.dev.target_mib(), 4);
    assert_eq!(vm.irq.config(), 2);
}

#[test]
fn activation_rules_and_reset() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let fake = RecordingBackend::new(&[(0, RAM)]).unwrap();
    let mut vm = Vm::with_backend(mem, BalloonConfig::default(), Box::new(fake), ALL);
    assert!(matches!(
        vm.dev.process_queue(0),
        Err(DeviceError::NotActivated)
    ));
    assert_eq!(vm.dev.request_stats(), Err(BalloonError::NotActivated));
    // Wrong number of queues for the negotiated features.
    let three = vm.drv[..3]
        .iter()
        .map(|d| d.device_queue(&vm.mem).unwrap())
        .collect();
    assert!(matches!(
        vm.dev.activate(vm.atomic.clone(), three, vm.irq.clone()),
        Err(DeviceError::Activate(_))
    ));
    assert!(!vm.dev.is_activated());
    vm.activate();
    assert!(vm.dev.is_activated());
    vm.send_pfns(0, &[0x3f00, 0x3f01]);
    vm.dev.write_config(12, &0xaau32.to_le_bytes());
    let queues = vm.dev.reset().unwrap();
    assert_eq!(queues.len(), 4);
    assert!(!vm.dev.is_activated());
    assert!(vm.dev.reset().is_none());
    // The balloon is empty after a reset; reported pages would stay tracked.
    let a = vm.dev.accounting();
    assert_eq!(a.ballooned_bytes, 0);
    assert_eq!(a.counters.inflated_pages, 2);
    assert_eq!(vm.dev.config_space().poison_val, 0);
    assert_eq!(vm.dev.acked_features(), 0);
}

#[test]
fn page_poison_blocks_discard_of_reports_only() {
    let (mut vm, fake) = Vm::new(BalloonConfig::default(), ALL);
    // init_on_free: poison value 0, reports are discarded.
    vm.dev.write_config(12, &0u32.to_le_bytes());
    vm.kick(3, &[Buf::inb(8 << 20, 2 << 20)]);
    assert_eq!(fake.discarded_bytes(), 2 << 20);
    // Page poisoning with a pattern: reports come back untouched, inflates still discard.
    vm.dev.write_config(12, &0xaaaa_aaaau32.to_le_bytes());
    assert_eq!(vm.kick(3, &[Buf::inb(10 << 20, 2 << 20)]), 1);
    assert_eq!(fake.discarded_bytes(), 2 << 20);
    assert_eq!(vm.dev.accounting().counters.poison_skipped_reports, 1);
    vm.send_pfns(0, &[0x3000]);
    assert_eq!(fake.discarded_bytes(), (2 << 20) + PAGE_SIZE);
    // Without PAGE_POISON negotiated a poison value means nothing.
    let (mut vm, fake) = Vm::new(
        BalloonConfig::default(),
        ALL & !bit(VIRTIO_BALLOON_F_PAGE_POISON),
    );
    vm.dev.write_config(12, &0xaaaa_aaaau32.to_le_bytes());
    vm.kick(3, &[Buf::inb(8 << 20, 2 << 20)]);
    assert_eq!(fake.discarded_bytes(), 2 << 20);
}
