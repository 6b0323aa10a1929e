//! The balloon behind the virtio-mmio transport, driven register by register the way Linux's
//! virtio_mmio + virtio_balloon probe it.

use super::*;
use crate::stats::{encode, StatTag};
use std::sync::atomic::{AtomicU64, Ordering};
use tidepool_virtio::mmio::{status, CONFIG_OFFSET};
use tidepool_virtio::{IrqTrigger, MmioTransport, TransportError};

#[derive(Default)]
struct Irq(AtomicU64);

impl IrqTrigger for Irq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn w(t: &mut MmioTransport<Balloon>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r(t: &MmioTransport<Balloon>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Probe like Linux: features, FEATURES_OK, queues, stats priming kick before DRIVER_OK,
/// then DRIVER_OK. Returns the transport, guest memory, the driver queues and the trigger.
fn probe(
    acked: u64,
) -> (
    MmioTransport<Balloon>,
    GuestMemoryMmap<()>,
    Vec<DriverQueue>,
    Arc<Irq>,
) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let fake = RecordingBackend::new(&[(0, RAM)]).unwrap();
    let dev = Balloon::new(BalloonConfig::default(), Box::new(fake)).unwrap();
    let irq = Arc::new(Irq::default());
    let mut t = MmioTransport::new(
        Box::new(dev),
        GuestMemoryAtomic::new(mem.clone()),
        irq.clone(),
    )
    .unwrap();
    assert_eq!(r(&t, 0x0), 0x7472_6976);
    assert_eq!(r(&t, 0x4), 2);
    assert_eq!(r(&t, 0x8), 5);
    w(&mut t, 0x70, status::ACKNOWLEDGE);
    w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut t, 0x14, 0);
    let lo = u64::from(r(&t, 0x10));
    w(&mut t, 0x14, 1);
    let offered = lo | (u64::from(r(&t, 0x10)) << 32);
    assert_eq!(offered, ALL);
    for (sel, v) in [(0u32, acked as u32), (1, (acked >> 32) as u32)] {
        w(&mut t, 0x24, sel);
        w(&mut t, 0x20, v);
    }
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w(&mut t, 0x70, s);
    assert_eq!(r(&t, 0x70) & status::FEATURES_OK, status::FEATURES_OK);
    let n = crate::device::queue_roles(acked).len();
    let mut drv = Vec::new();
    for i in 0..n {
        w(&mut t, 0x30, i as u32);
        let max = r(&t, 0x34);
        assert!(max >= 32, "reporting needs at least 32 entries");
        let d = DriverQueue::new(0x1_0000 * (i as u64 + 1), max as u16);
        w(&mut t, 0x38, max);
        for (off, addr) in [
            (0x80, d.desc_addr()),
            (0x90, d.avail_addr()),
            (0xa0, d.used_addr()),
        ] {
            w(&mut t, off, addr as u32);
            w(&mut t, off + 4, (addr >> 32) as u32);
        }
        w(&mut t, 0x44, 1);
        drv.push(d);
    }
    // Queues beyond the negotiated ones do not exist.
    w(&mut t, 0x30, n as u32);
    assert_eq!(r(&t, 0x34), 0);
    // init_vqs primes the stats queue and kicks before the device is ready.
    if acked & bit(VIRTIO_BALLOON_F_STATS_VQ) != 0 {
        let entries: Vec<(u16, u64)> = (0..16u16).map(|tag| (tag, u64::from(tag) * 7)).collect();
        let bytes = encode(&entries);
        mem.write_slice(&bytes, GuestAddress(BUF_AREA)).unwrap();
        drv[2]
            .submit(&mem, &[Buf::out(BUF_AREA, bytes.len() as u32)])
            .unwrap();
        assert!(matches!(t.notify(2), Err(TransportError::NotActivated)));
    }
    w(&mut t, 0x70, s | status::DRIVER_OK);
    assert!(t.is_activated(), "{:?}", t.last_error());
    (t, mem, drv, irq)
}

#[test]
fn linux_style_probe_and_operation() {
    let acked = ALL & !bit(VIRTIO_BALLOON_F_PAGE_POISON);
    let (mut t, mem, mut drv, irq) = probe(acked);
    // The primed stats buffer was read at activation and is held.
    let s = t.device().latest_stats().unwrap();
    assert_eq!(s.get(StatTag::DirectReclaims), Some(105));
    assert_eq!(drv[2].used_idx(&mem), 0);

    // The host sets a target: config interrupt, the driver reads num_pages at 0x100.
    let gen = r(&t, 0xfc);
    t.device_mut().set_target_mib(2).unwrap();
    assert_eq!(r(&t, 0x60) & 2, 2);
    assert_eq!(irq.0.load(Ordering::Relaxed), 1);
    assert_eq!(r(&t, CONFIG_OFFSET), 512);
    assert_ne!(r(&t, 0xfc), gen, "config generation moves on a change");
    w(&mut t, 0x64, 2);

    // Inflate 512 pages in two batches of 256, then write actual.
    for batch in 0..2u32 {
        let pfns: Vec<u8> = (0..256u32)
            .flat_map(|i| (0x1000 + batch * 256 + i).to_le_bytes())
            .collect();
        mem.write_slice(&pfns, GuestAddress(BUF_AREA + 0x1000))
            .unwrap();
        drv[0]
            .submit(&mem, &[Buf::out(BUF_AREA + 0x1000, 1024)])
            .unwrap();
        w(&mut t, 0x50, 0);
    }
    assert_eq!(drv[0].used_idx(&mem), 2);
    assert_eq!(r(&t, 0x60) & 1, 1);
    t.write(CONFIG_OFFSET + 4, &512u32.to_le_bytes());
    let a = t.device().accounting();
    assert_eq!(a.ballooned_mib, 2);
    assert_eq!(a.guest_actual_bytes, 2 << 20);

    // A free page report on queue 3 (stats took 2).
    drv[3]
        .submit(
            &mem,
            &[Buf::inb(32 << 20, 2 << 20), Buf::inb(36 << 20, 4 << 20)],
        )
        .unwrap();
    w(&mut t, 0x50, 3);
    assert_eq!(drv[3].used_idx(&mem), 1);
    assert_eq!(t.device().accounting().reported_mib, 6);

    // The VMM's stats timer returns the buffer.
    assert_eq!(t.device_mut().request_stats(), Ok(true));
    assert_eq!(drv[2].used_idx(&mem), 1);

    // Device reset by the driver: the balloon empties, the device can be probed again.
    w(&mut t, 0x70, 0);
    assert!(!t.is_activated());
    assert_eq!(t.device().accounting().ballooned_bytes, 0);
    assert_eq!(t.device().accounting().reported_mib, 6);
}

#[test]
fn reporting_is_queue_two_without_stats() {
    let acked = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_REPORTING);
    let (mut t, mem, mut drv, _) = probe(acked);
    assert_eq!(drv.len(), 3);
    drv[2].submit(&mem, &[Buf::inb(32 << 20, 2 << 20)]).unwrap();
    w(&mut t, 0x50, 2);
    assert_eq!(drv[2].used_idx(&mem), 1);
    assert_eq!(t.device().accounting().reported_mib, 2);
    assert!(matches!(t.notify(3), Err(TransportError::NoSuchQueue(3))));
}
