//! virtio-mem device tests: a guest driver (see `test_utils`) talks to the device through the
//! virtio-mmio transport over real guest memory.

use super::request::{BlockRangeState as S, Request, Response, ResponseType as T};
use super::test_utils::*;
use super::*;
use std::sync::Arc;
use tidepool_virtio::{DeviceError, VirtioDevice};
use virtio_bindings::virtio_mmio as r;
use vm_memory::{Bytes, GuestAddress};

const CFG_BLOCK_SIZE: u64 = 0;
const CFG_NODE_ID: u64 = 8;
const CFG_ADDR: u64 = 16;
const CFG_REGION_SIZE: u64 = 24;
const CFG_USABLE: u64 = 32;
const CFG_PLUGGED: u64 = 40;
const CFG_REQUESTED: u64 = 48;
const BS: u64 = DEFAULT_BLOCK_SIZE;

fn ack() -> Response {
    Response::of(T::Ack)
}

fn err() -> Response {
    Response::of(T::Error)
}

/// A booted guest whose host asked for `bytes`.
fn guest_with_request(bytes: u64) -> Guest {
    let mut g = Guest::booted(config());
    g.dev_mut().request_size(bytes).expect("resize");
    g
}

#[test]
fn config_space_and_features() {
    let mut g = Guest::new(config());
    let f = g.offered();
    assert_eq!(
        f,
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
    );
    assert_eq!(g.cfg(CFG_BLOCK_SIZE), BS);
    assert_eq!(g.cfg(CFG_ADDR), BASE);
    assert_eq!(g.cfg(CFG_REGION_SIZE), REGION);
    assert_eq!(g.cfg(CFG_USABLE), USABLE_EXTENT);
    assert_eq!(g.cfg(CFG_PLUGGED), 0);
    assert_eq!(g.cfg(CFG_REQUESTED), 0);
    // Past the 56 bytes: zeros. Writes are ignored and counted.
    assert_eq!(g.cfg(56), 0);
    g.t.write(0x100 + CFG_REQUESTED, &[1, 2, 3, 4]);
    assert_eq!(g.cfg(CFG_REQUESTED), 0);
    assert_eq!(g.dev().counters().config_write_ignored, 1);

    let mut cfg = config();
    cfg.node_id = Some(3);
    cfg.block_size = 128 * MIB;
    cfg.initial_requested = 256 * MIB;
    let mut g = Guest::new(cfg);
    assert_ne!(g.offered() & (1 << VIRTIO_MEM_F_ACPI_PXM), 0);
    assert_eq!(g.cfg(CFG_NODE_ID) & 0xffff, 3);
    assert_eq!(g.cfg(CFG_BLOCK_SIZE), 128 * MIB);
    assert_eq!(g.cfg(CFG_REQUESTED), 256 * MIB);
    assert_eq!(g.cfg(CFG_USABLE), 512 * MIB);
}

#[test]
fn config_validation() {
    let with = |f: &dyn Fn(&mut VirtioMemConfig)| {
        let mut c = config();
        f(&mut c);
        c.validate()
    };
    assert_eq!(with(&|_| {}), Ok(()));
    assert_eq!(with(&|c| c.block_size = 128 * MIB), Ok(()));
    for bs in [MIB, 3 * MIB, 256 * MIB, 0] {
        assert_eq!(
            with(&|c| c.block_size = bs),
            Err(ConfigError::BlockSize(bs))
        );
    }
    assert_eq!(
        with(&|c| c.addr = BASE + 2 * MIB),
        Err(ConfigError::AddrAlign(BASE + 2 * MIB))
    );
    assert_eq!(
        with(&|c| c.region_size = 0),
        Err(ConfigError::RegionSize(0))
    );
    assert_eq!(
        with(&|c| c.region_size = 130 * MIB),
        Err(ConfigError::RegionSize(130 * MIB))
    );
    assert!(matches!(
        with(&|c| c.boot_ram = BASE + 1),
        Err(ConfigError::OverlapsBootRam { .. })
    ));
    assert_eq!(
        with(&|c| c.addr = u64::MAX - 127 * MIB),
        Err(ConfigError::AddrAlign(u64::MAX - 127 * MIB))
    );
    assert_eq!(
        with(&|c| c.addr = (u64::MAX / REGION_ALIGN) * REGION_ALIGN),
        Err(ConfigError::Overflow)
    );
    assert_eq!(
        with(&|c| c.initial_requested = 3 * MIB),
        Err(ConfigError::InitialRequested(3 * MIB))
    );
    assert!(VirtioMem::new(with_cfg(|c| c.block_size = 5 * MIB), FakeBackend::new()).is_err());
}

fn with_cfg(f: impl Fn(&mut VirtioMemConfig)) -> VirtioMemConfig {
    let mut c = config();
    f(&mut c);
    c
}

#[test]
fn driver_must_accept_unplugged_inaccessible() {
    let mut g = Guest::new(config());
    assert!(!g.init(1 << VIRTIO_F_VERSION_1));
    let e = g.t.last_error().expect("reason");
    assert!(e.contains("UNPLUGGED_INACCESSIBLE"), "{e}");
    assert!(!g.dev().is_activated());
    assert_eq!(
        g.dev_mut().request_size(BS),
        Err(ResizeError::DriverNotReady)
    );

    // The device itself refuses activation too, with the same clear error.
    let mut dev = VirtioMem::new(config(), FakeBackend::new()).expect("device");
    dev.set_acked_features(1 << VIRTIO_F_VERSION_1);
    let mem = vm_memory::GuestMemoryAtomic::new(
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)])
            .expect("mem"),
    );
    let q = <virtio_queue::Queue as virtio_queue::QueueT>::new(QUEUE_SIZE).expect("queue");
    let irq = std::sync::Arc::new(tidepool_virtio::MmioInterrupt::new(std::sync::Arc::new(
        Trigger::default(),
    )));
    match dev.activate(mem, vec![q], irq) {
        Err(DeviceError::Activate(m)) => assert!(m.contains("UNPLUGGED_INACCESSIBLE")),
        other => panic!("unexpected {other:?}"),
    }

    // Linux's choice works.
    assert!(g.init((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)));
}

#[test]
fn plug_and_unplug_single_blocks_and_ranges() {
    let mut g = guest_with_request(16 * BS);
    assert_eq!(g.request(plug(BASE, 1)), ack());
    assert_eq!(g.cfg(CFG_PLUGGED), BS);
    assert_eq!(g.request(plug(BASE + 4 * BS, 3)), ack());
    assert_eq!(g.cfg(CFG_PLUGGED), 4 * BS);
    assert_eq!(
        g.dev().backend().calls,
        vec![Call::Plug(BASE, BS), Call::Plug(BASE + 4 * BS, 3 * BS)]
    );
    assert_eq!(g.dev().backend().mapped_bytes(), 4 * BS);

    assert_eq!(g.request(unplug(BASE + 5 * BS, 2)), ack());
    assert_eq!(g.request(unplug(BASE, 1)), ack());
    assert_eq!(g.cfg(CFG_PLUGGED), BS);
    assert_eq!(g.dev().backend().mapped_bytes(), BS);
    assert_eq!(
        g.dev().backend().calls[2..],
        [Call::Unplug(BASE + 5 * BS, 2 * BS), Call::Unplug(BASE, BS)]
    );
    let c = g.dev().counters();
    assert_eq!((c.plug_acked, c.unplug_acked), (2, 2));
    assert_eq!(g.dev().backend().misuse, 0);
    // Used-buffer interrupts: one config change for the resize, one per request.
    assert_eq!(g.irqs(), 1 + 4);
}

#[test]
fn state_queries() {
    let mut g = guest_with_request(16 * BS);
    assert_eq!(g.request(plug(BASE + 2 * BS, 2)), ack());
    assert_eq!(
        g.request(state(BASE + 2 * BS, 2)),
        Response::state(S::Plugged)
    );
    assert_eq!(g.request(state(BASE, 2)), Response::state(S::Unplugged));
    assert_eq!(g.request(state(BASE + BS, 2)), Response::state(S::Mixed));
    assert_eq!(g.request(state(BASE, 4)), Response::state(S::Mixed));
    // STATE follows the same range rules.
    assert_eq!(g.request(state(BASE + 1, 1)), err());
    assert_eq!(g.request(state(BASE, 0)), err());
    assert_eq!(g.request(state(BASE + REGION, 1)), err());
    assert_eq!(g.dev().counters().state_acked, 4);
}

#[test]
fn unplug_all_unplugs_everything_and_shrinks_usable() {
    let mut g = guest_with_request(512 * MIB);
    assert_eq!(g.cfg(CFG_USABLE), 768 * MIB);
    assert_eq!(g.request(plug(BASE, 10)), ack());
    assert_eq!(g.request(plug(BASE + 500 * MIB, 5)), ack());
    assert_eq!(g.request(plug(BASE + 700 * MIB, 1)), ack());
    g.dev_mut().request_size(0).expect("shrink");
    let irqs = g.irqs();
    assert_eq!(g.request(Request::UnplugAll), ack());
    assert_eq!(g.cfg(CFG_PLUGGED), 0);
    assert_eq!(g.cfg(CFG_USABLE), USABLE_EXTENT);
    assert!(g.dev().backend().mapped.is_empty());
    // One used-buffer interrupt, no config interrupt for UNPLUG_ALL.
    assert_eq!(g.irqs(), irqs + 1);
    assert_eq!(g.rd(r::VIRTIO_MMIO_INTERRUPT_STATUS) & 1, 1);
    // Nothing plugged: UNPLUG_ALL still succeeds.
    assert_eq!(g.request(Request::UnplugAll), ack());
    assert_eq!(g.dev().counters().unplug_all_acked, 2);
    assert_eq!(g.dev().backend().misuse, 0);
}

#[test]
fn malformed_ranges_are_errors() {
    let mut g = guest_with_request(16 * BS);
    assert_eq!(g.request(plug(BASE + MIB, 1)), err());
    assert_eq!(g.request(unplug(BASE + 4096, 1)), err());
    assert_eq!(g.request(plug(BASE, 0)), err());
    assert_eq!(g.request(plug(BASE - BS, 1)), err());
    assert_eq!(g.request(plug(0, 1)), err());
    // Inside the region but beyond the usable part, and straddling its end.
    assert_eq!(g.cfg(CFG_USABLE), 384 * MIB);
    assert_eq!(g.request(plug(BASE + 384 * MIB, 1)), err());
    assert_eq!(g.request(plug(BASE + 382 * MIB, 2)), err());
    assert_eq!(g.request(plug(BASE + REGION, 1)), err());
    // addr + nb_blocks * block_size overflows.
    assert_eq!(g.request(plug(u64::MAX - BS + 1, 2)), err());
    let c = g.dev().counters();
    assert_eq!(c.error_misaligned, 2);
    assert_eq!(c.error_zero_blocks, 1);
    assert_eq!(c.error_out_of_range, 5);
    assert_eq!(c.error_overflow, 1);
    assert!(g.dev().backend().calls.is_empty());
    assert_eq!(g.cfg(CFG_PLUGGED), 0);
}

#[test]
fn double_plug_and_unplug_of_unplugged_are_errors() {
    let mut g = guest_with_request(16 * BS);
    assert_eq!(g.request(plug(BASE, 2)), ack());
    assert_eq!(g.request(plug(BASE, 2)), err());
    assert_eq!(g.request(plug(BASE + BS, 2)), err(), "partly plugged");
    assert_eq!(g.request(unplug(BASE + 2 * BS, 1)), err());
    assert_eq!(g.request(unplug(BASE + BS, 2)), err(), "partly unplugged");
    let c = g.dev().counters();
    assert_eq!((c.error_already_plugged, c.error_not_plugged), (2, 2));
    assert_eq!(g.dev().backend().calls, vec![Call::Plug(BASE, 2 * BS)]);
    assert_eq!(g.cfg(CFG_PLUGGED), 2 * BS);
}

#[test]
fn unknown_type_is_an_error() {
    let mut g = guest_with_request(16 * BS);
    let mut b = plug(BASE, 1).to_bytes();
    b[0] = 9;
    assert_eq!(g.raw_request(&b), err());
    assert_eq!(g.dev().counters().error_unknown_type, 1);
    assert!(g.dev().backend().calls.is_empty());
}

#[test]
fn malformed_chains_never_act() {
    let mut g = guest_with_request(16 * BS);
    let req = plug(BASE, 1).to_bytes();
    // Short request: 16 of 24 bytes.
    assert_eq!(g.raw_request(&req[..16]), err());
    assert_eq!(g.dev().counters().short_request, 1);
    // Request split across two readable buffers is fine.
    g.mmap
        .write_slice(&req[..10], GuestAddress(REQ_ADDR))
        .expect("write");
    g.mmap
        .write_slice(&req[10..], GuestAddress(REQ_ADDR + 0x100))
        .expect("write");
    let used = g.send(&[
        (REQ_ADDR, 10, false),
        (REQ_ADDR + 0x100, 14, false),
        (RESP_ADDR, 10, true),
    ]);
    assert_eq!((used, g.response()), (10, ack()));
    // Response buffer too short: not executed, nothing written.
    let before = g.dev().backend().calls.len();
    g.mmap
        .write_slice(&plug(BASE + BS, 1).to_bytes(), GuestAddress(REQ_ADDR))
        .expect("write");
    assert_eq!(g.send(&[(REQ_ADDR, 24, false), (RESP_ADDR, 4, true)]), 0);
    assert_eq!(g.dev().counters().short_response, 1);
    // No writable buffer at all.
    assert_eq!(g.send(&[(REQ_ADDR, 24, false)]), 0);
    assert_eq!(g.dev().counters().short_response, 2);
    // Readable after writable: wrong direction, answered with ERROR.
    assert_eq!(g.send(&[(RESP_ADDR, 10, true), (REQ_ADDR, 24, false)]), 10);
    assert_eq!(g.response(), err());
    assert_eq!(g.dev().counters().wrong_direction, 1);
    // Request outside guest RAM: answered with ERROR.
    assert_eq!(
        g.send(&[(GUEST_RAM * 4, 24, false), (RESP_ADDR, 10, true)]),
        10
    );
    assert_eq!(g.response(), err());
    // Response outside guest RAM (or straddling its end): not executed.
    assert_eq!(
        g.send(&[(REQ_ADDR, 24, false), (GUEST_RAM - 4, 10, true)]),
        0
    );
    assert_eq!(
        g.send(&[(REQ_ADDR, 24, false), (u64::MAX - 3, 10, true)]),
        0
    );
    assert_eq!(g.dev().counters().bad_descriptor, 3);
    assert_eq!(g.dev().backend().calls.len(), before);
    assert_eq!(g.cfg(CFG_PLUGGED), BS);
    // The device still serves well-formed requests.
    assert_eq!(g.request(plug(BASE + BS, 1)), ack());
}

#[test]
fn plug_beyond_requested_is_nack() {
    let mut g = guest_with_request(4 * BS);
    assert_eq!(g.request(plug(BASE, 3)), ack());
    assert_eq!(g.request(plug(BASE + 3 * BS, 2)), Response::of(T::Nack));
    assert_eq!(g.dev().counters().nack_over_requested, 1);
    assert_eq!(g.cfg(CFG_PLUGGED), 3 * BS);
    assert_eq!(g.request(plug(BASE + 3 * BS, 1)), ack());
    // A shrink racing a plug the driver already chose: NACK, not ERROR.
    g.dev_mut().request_size(2 * BS).expect("shrink");
    assert_eq!(g.request(plug(BASE + 8 * BS, 1)), Response::of(T::Nack));
    assert_eq!(g.dev().counters().nack_over_requested, 2);
}

#[test]
fn resize_checks_and_config_interrupts() {
    let mut g = Guest::new(config());
    // Before the driver is up.
    assert_eq!(
        g.dev_mut().set_requested_total(BOOT + BS),
        Err(ResizeError::DriverNotReady)
    );
    assert_eq!(
        g.dev_mut().set_requested_total(BOOT - BS),
        Err(ResizeError::BelowBootRam {
            total: BOOT - BS,
            boot_ram: BOOT
        })
    );
    assert_eq!(
        g.dev_mut().set_requested_total(BOOT + REGION + BS),
        Err(ResizeError::AboveMaximum {
            requested: BOOT + REGION + BS,
            max: BOOT + REGION
        })
    );
    assert_eq!(
        g.dev_mut().request_size(MIB),
        Err(ResizeError::Unaligned {
            bytes: MIB,
            block_size: BS
        })
    );
    assert_eq!(g.cfg(CFG_REQUESTED), 0);
    assert_eq!(g.irqs(), 0);

    let offered = g.offered();
    assert!(g.init(offered));
    let gen = g.rd(r::VIRTIO_MMIO_CONFIG_GENERATION);
    g.dev_mut()
        .set_requested_total(BOOT + 600 * MIB)
        .expect("grow");
    assert_eq!(g.cfg(CFG_REQUESTED), 600 * MIB);
    assert_eq!(
        g.cfg(CFG_USABLE),
        896 * MIB,
        "usable grows past the request"
    );
    assert_eq!(g.rd(r::VIRTIO_MMIO_INTERRUPT_STATUS), 2);
    assert_ne!(g.rd(r::VIRTIO_MMIO_CONFIG_GENERATION), gen);
    assert_eq!(g.irqs(), 1);
    g.wr(r::VIRTIO_MMIO_INTERRUPT_ACK, 2);

    let st = g.dev().status();
    assert_eq!(
        (st.plugged_size, st.requested_size, st.progress),
        (0, 600 * MIB, 0.0)
    );
    assert!(st.driver_ready);
    for i in 0..3u64 {
        assert_eq!(g.request(plug(BASE + i * 100 * BS, 100)), ack());
    }
    assert_eq!(g.dev().status().progress, 1.0);
    assert_eq!(g.dev().status().plugged_size, 600 * MIB);

    assert_eq!(g.rd(r::VIRTIO_MMIO_INTERRUPT_STATUS), 1, "used buffers");
    g.wr(r::VIRTIO_MMIO_INTERRUPT_ACK, 1);
    // Shrink to the boot RAM plus 200 MiB.
    g.dev_mut()
        .set_requested_total(BOOT + 200 * MIB)
        .expect("shrink");
    assert_eq!(g.cfg(CFG_REQUESTED), 200 * MIB);
    assert_eq!(
        g.cfg(CFG_USABLE),
        896 * MIB,
        "usable never shrinks on resize"
    );
    assert_eq!(g.rd(r::VIRTIO_MMIO_INTERRUPT_STATUS), 2);
    assert_eq!(g.dev().status().progress, 0.0);
    assert_eq!(g.request(unplug(BASE + 100 * BS, 100)), ack());
    assert_eq!(g.dev().status().progress, 0.5);
    assert_eq!(g.request(unplug(BASE + 200 * BS, 100)), ack());
    assert_eq!(g.dev().status().progress, 1.0);
    g.dev_mut().set_requested_total(BOOT).expect("to boot RAM");
    assert_eq!(g.dev().counters().config_interrupts, 3);
    // Everything plus every request answered: 3 config + 5 used-buffer interrupts.
    assert_eq!(g.irqs(), 3 + 5);
}

#[test]
fn device_reset_keeps_block_state() {
    let mut g = guest_with_request(16 * BS);
    assert_eq!(g.request(plug(BASE, 4)), ack());
    g.wr(r::VIRTIO_MMIO_STATUS, 0);
    assert!(!g.dev().is_activated());
    assert_eq!(g.dev().plugged_size(), 4 * BS);
    assert_eq!(g.cfg(CFG_PLUGGED), 4 * BS);
    assert_eq!(g.dev().requested_size(), 16 * BS, "target kept");
    assert_eq!(
        g.dev_mut().request_size(BS),
        Err(ResizeError::DriverNotReady)
    );
    assert!(g
        .dev()
        .backend()
        .calls
        .iter()
        .all(|c| matches!(c, Call::Plug(..))));
    // A re-probing driver finds the blocks plugged.
    let offered = g.offered();
    assert!(g.init(offered));
    assert_eq!(g.request(state(BASE, 4)), Response::state(S::Plugged));
    assert_eq!(g.request(unplug(BASE, 4)), ack());
}

#[test]
fn system_reset_unplugs_everything() {
    let mut g = guest_with_request(64 * BS);
    assert_eq!(g.request(plug(BASE, 4)), ack());
    assert_eq!(g.request(plug(BASE + 32 * BS, 8)), ack());
    g.dev_mut().system_reset().expect("reset");
    assert!(!g.dev().is_activated());
    assert_eq!(g.dev().plugged_size(), 0);
    assert!(g.dev().backend().mapped.is_empty());
    assert_eq!(
        g.dev().backend().calls[2..],
        [
            Call::Unplug(BASE, 4 * BS),
            Call::Unplug(BASE + 32 * BS, 8 * BS)
        ]
    );
    assert_eq!(g.dev().requested_size(), 64 * BS);
    assert_eq!(g.dev().backend().misuse, 0);
    // The rebooted driver starts from scratch.
    let offered = g.offered();
    assert!(g.init(offered));
    assert_eq!(g.request(state(BASE, 64)), Response::state(S::Unplugged));
}

#[test]
fn backend_failures_leave_state_unchanged() {
    let mut g = guest_with_request(16 * BS);
    g.dev_mut().backend_mut().fail_next = Some(BackendError::OutOfMemory);
    assert_eq!(g.request(plug(BASE, 2)), Response::of(T::Busy));
    g.dev_mut().backend_mut().fail_next = Some(BackendError::Busy);
    assert_eq!(g.request(plug(BASE, 2)), Response::of(T::Busy));
    g.dev_mut().backend_mut().fail_next = Some(BackendError::Failed("mmap".into()));
    assert_eq!(g.request(plug(BASE, 2)), err());
    assert_eq!(g.cfg(CFG_PLUGGED), 0);
    assert_eq!(g.request(state(BASE, 2)), Response::state(S::Unplugged));
    // The pool running dry is a BUSY too.
    g.dev_mut().backend_mut().capacity = 2 * BS;
    assert_eq!(g.request(plug(BASE, 2)), ack());
    assert_eq!(g.request(plug(BASE + 2 * BS, 1)), Response::of(T::Busy));
    // Failed unplug: BUSY, blocks stay plugged.
    g.dev_mut().backend_mut().fail_next = Some(BackendError::Failed("munmap".into()));
    assert_eq!(g.request(unplug(BASE, 2)), Response::of(T::Busy));
    assert_eq!(g.request(state(BASE, 2)), Response::state(S::Plugged));
    let c = g.dev().counters();
    assert_eq!((c.busy_backend, c.error_backend), (4, 1));
    assert_eq!(g.dev().backend().misuse, 0);
}

#[test]
fn partial_unplug_all_and_system_reset_failures() {
    let mut g = guest_with_request(16 * BS);
    assert_eq!(g.request(plug(BASE, 1)), ack());
    assert_eq!(g.request(plug(BASE + 4 * BS, 1)), ack());
    g.dev_mut().backend_mut().fail_next = Some(BackendError::Busy);
    assert_eq!(g.request(Request::UnplugAll), Response::of(T::Busy));
    // The first run failed, the second went.
    assert_eq!(g.cfg(CFG_PLUGGED), BS);
    assert_eq!(g.request(Request::UnplugAll), ack());
    assert_eq!(g.cfg(CFG_PLUGGED), 0);

    assert_eq!(g.request(plug(BASE, 1)), ack());
    g.dev_mut().backend_mut().fail_next = Some(BackendError::Failed("munmap".into()));
    match g.dev_mut().system_reset() {
        Err(HotplugError::Unplug { gpa, len, .. }) => assert_eq!((gpa, len), (BASE, BS)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(g.dev().plugged_size(), BS, "failed block stays plugged");
    g.dev_mut().system_reset().expect("retry");
    assert_eq!(g.dev().plugged_size(), 0);
}

#[test]
fn large_blocks_and_batched_requests() {
    let mut cfg = config();
    cfg.block_size = 128 * MIB;
    let mut g = Guest::booted(cfg);
    g.dev_mut().request_size(256 * MIB).expect("resize");
    assert_eq!(
        g.request(plug(BASE + 2 * BS, 1)),
        err(),
        "2 MiB aligned is not enough"
    );
    assert_eq!(g.request(plug(BASE + 128 * MIB, 2)), ack());
    assert_eq!(
        g.dev().backend().calls,
        vec![Call::Plug(BASE + 128 * MIB, 256 * MIB)]
    );
    assert_eq!(g.request(unplug(BASE + 128 * MIB, 1)), ack());
    assert_eq!(g.cfg(CFG_PLUGGED), 128 * MIB);
}

#[test]
fn not_activated_queue_and_bad_index() {
    let mut dev = VirtioMem::new(config(), FakeBackend::new()).expect("device");
    assert!(matches!(
        dev.process_queue(0),
        Err(DeviceError::NotActivated)
    ));
    assert!(matches!(
        dev.process_queue(1),
        Err(DeviceError::NoSuchQueue(1))
    ));
    assert!(dev.reset().is_none());
    let st = dev.status();
    assert!(!st.driver_ready);
    assert_eq!((st.usable_region_size, st.progress), (USABLE_EXTENT, 1.0));
}

#[test]
fn bogus_ring_entry_needs_reset_without_panic() {
    let mut g = guest_with_request(16 * BS);
    assert_eq!(g.request(plug(BASE, 1)), ack());
    // The driver publishes a head index past the ring.
    let avail = g.vq.avail_addr().0;
    let idx: u16 = g.mmap.read_obj(GuestAddress(avail + 2)).expect("idx");
    g.mmap
        .write_obj(
            500u16,
            GuestAddress(avail + 4 + u64::from(idx % QUEUE_SIZE) * 2),
        )
        .expect("ring");
    g.mmap
        .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
        .expect("idx");
    assert!(g.t.notify(0).is_err());
    assert!(g.t.last_error().is_some());
    assert_ne!(
        g.rd(r::VIRTIO_MMIO_STATUS) & tidepool_virtio::mmio::status::DEVICE_NEEDS_RESET,
        0
    );
    assert_eq!(g.dev().plugged_size(), BS, "block state untouched");
    // A reset and re-probe recover.
    let offered = g.offered();
    assert!(g.init(offered));
    assert_eq!(g.request(state(BASE, 1)), Response::state(S::Plugged));
}

#[test]
fn device_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<VirtioMem<FakeBackend>>();
}

/// Shrinks the host's request through the device's control in the middle of every plug, as
/// a host resize arriving while the device thread is busy plugging would.
struct ResizingBackend {
    inner: FakeBackend,
    control: Arc<std::sync::OnceLock<Arc<MemControl>>>,
    shrink_to: u64,
    resized: Vec<Result<(), ResizeError>>,
}

impl MemoryBackend for ResizingBackend {
    fn plug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        self.inner.plug(gpa, len)?;
        if let Some(c) = self.control.get() {
            self.resized.push(c.request_size(self.shrink_to));
        }
        Ok(())
    }
    fn unplug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        self.inner.unplug(gpa, len)
    }
}

#[test]
fn the_control_resizes_without_the_device_even_during_a_plug() {
    let cell = Arc::new(std::sync::OnceLock::new());
    let backend = ResizingBackend {
        inner: FakeBackend::new(),
        control: Arc::clone(&cell),
        shrink_to: 2 * BS,
        resized: Vec::new(),
    };
    let mut g = Guest::booted_with(config(), backend);
    let control = Arc::clone(g.dev().control());
    // The handle is shared with other threads while the device sits behind its own lock.
    let c2 = Arc::clone(&control);
    std::thread::spawn(move || c2.set_requested_total(BOOT + 8 * BS))
        .join()
        .expect("thread")
        .expect("grow from another thread");
    assert_eq!(g.cfg(CFG_REQUESTED), 8 * BS);
    assert_eq!(control.snapshot().config_interrupts, 1);
    cell.set(Arc::clone(&control)).expect("set once");
    // The host shrinks to 2 blocks while the device is plugging 4: that plug completes
    // (it was decided against the request as it stood), the new target shows at once.
    assert_eq!(g.request(plug(BASE, 4)), ack());
    assert_eq!(g.dev().backend().resized, vec![Ok(())]);
    let snap = control.snapshot();
    assert_eq!(snap.requested_size, 2 * BS);
    assert_eq!(snap.plugged_size, 4 * BS, "the device published its plug");
    assert_eq!(
        snap.resize_from, 0,
        "the shrink was asked before the plug ended"
    );
    assert_eq!(g.cfg(CFG_REQUESTED), 2 * BS);
    assert_eq!(g.cfg(CFG_PLUGGED), 4 * BS);
    assert_eq!(g.dev().counters().config_interrupts, 2);
    // A further plug is over the new target: NACK, and the driver unplugs back to it.
    assert_eq!(g.request(plug(BASE + 4 * BS, 1)), Response::of(T::Nack));
    assert_eq!(g.request(unplug(BASE + 2 * BS, 2)), ack());
    let st = g.dev().status();
    assert_eq!((st.plugged_size, st.requested_size), (2 * BS, 2 * BS));
    assert_eq!(st.progress, 1.0);
    assert_eq!(
        MemStatus::from_control(g.dev().config(), &control.snapshot()),
        MemStatus {
            usable_region_size: st.usable_region_size,
            ..st
        }
    );
    // A device reset detaches the driver from the control too.
    g.wr(r::VIRTIO_MMIO_STATUS, 0);
    assert!(!control.snapshot().driver_ready);
    assert_eq!(control.request_size(BS), Err(ResizeError::DriverNotReady));
}

#[test]
fn control_is_send_and_sync() {
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<MemControl>();
}
