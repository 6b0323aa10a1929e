//! Hostile-driver tests of virtio-mem: every request type against every kind of bad range,
//! chains of odd shapes (short, overlong, split, wrong direction), UNPLUG_ALL at odd times,
//! requests racing resizes, and a property test that checks the device against a small model
//! over random traffic. Whatever the guest sends: no panic, the spec's answer (ERROR for a
//! malformed request, NACK for a plug beyond the request), no backend call for a refused
//! request, and the backend's mappings always equal the device's plugged blocks.

use super::request::{BlockRangeState as S, Request, Response, ResponseType as T, RESPONSE_SIZE};
use super::test_utils::*;
use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;
use vm_memory::{Bytes, GuestAddress};

const BS: u64 = DEFAULT_BLOCK_SIZE;
const CFG_USABLE: u64 = 32;
const CFG_PLUGGED: u64 = 40;
const CFG_REQUESTED: u64 = 48;
const NR_BLOCKS: u64 = REGION / BS;

fn err() -> Response {
    Response::of(T::Error)
}

fn booted(requested: u64) -> Guest {
    let mut g = Guest::booted(config());
    g.dev_mut().request_size(requested).expect("resize");
    g
}

/// The device's plugged blocks, as block indices.
fn plugged_set(g: &Guest) -> BTreeSet<u64> {
    let s = g.dev().block_state();
    (0..s.nr_blocks() as u64)
        .filter(|&i| s.is_plugged(i as usize))
        .collect()
}

/// The backend's mapped 2 MiB pages, as block indices.
fn mapped_set(g: &Guest) -> BTreeSet<u64> {
    g.dev()
        .backend()
        .mapped
        .iter()
        .map(|gpa| (gpa - BASE) / BS)
        .collect()
}

fn assert_consistent(g: &Guest) {
    assert_eq!(g.dev().backend().misuse, 0, "backend misuse");
    assert_eq!(plugged_set(g), mapped_set(g), "device and backend disagree");
    assert_eq!(g.cfg(CFG_PLUGGED), g.dev().backend().mapped_bytes());
    let usable = g.cfg(CFG_USABLE);
    assert!(plugged_set(g).iter().all(|b| (b + 1) * BS <= usable));
}

/// Addresses no request may act on, whatever the block count.
fn bad_addrs(usable: u64) -> Vec<u64> {
    vec![
        0,
        BS,
        BASE - BS,
        BASE + 1,
        BASE + BS / 2,
        BASE + 4096,
        BASE + usable,
        BASE + REGION,
        BASE + REGION + BS,
        !(BS - 1),
        u64::MAX,
        1 << 63,
    ]
}

#[test]
fn bad_ranges_get_error_for_every_request_type_and_change_nothing() {
    let mut g = booted(64 * BS);
    // Something plugged, so that an unplug of a bad range could hurt.
    assert_eq!(g.request(plug(BASE, 4)), Response::of(T::Ack));
    let usable = g.cfg(CFG_USABLE);
    let calls = g.dev().backend().calls.len();
    let before = plugged_set(&g);
    let mut cases: Vec<(u64, u16)> = Vec::new();
    for a in bad_addrs(usable) {
        for nb in [0u16, 1, 2, 255, u16::MAX] {
            cases.push((a, nb));
        }
    }
    // Good start, bad count: zero blocks, past the usable end, the whole u16 range.
    for nb in [0u16, (usable / BS) as u16 + 1, u16::MAX] {
        cases.push((BASE, nb));
    }
    // Straddling the usable end.
    cases.push((BASE + usable - BS, 2));
    for (addr, nb) in cases {
        for req in [
            Request::Plug {
                addr,
                nb_blocks: nb,
            },
            Request::Unplug {
                addr,
                nb_blocks: nb,
            },
            Request::State {
                addr,
                nb_blocks: nb,
            },
        ] {
            assert_eq!(g.request(req), err(), "{req:?}");
        }
    }
    assert_eq!(g.dev().backend().calls.len(), calls, "no backend call");
    assert_eq!(plugged_set(&g), before);
    assert_consistent(&g);
    assert_eq!(g.request(state(BASE, 4)), Response::state(S::Plugged));
}

#[test]
fn odd_chain_shapes() {
    let mut g = booted(64 * BS);
    let req = plug(BASE, 1).to_bytes();
    // The request one byte per descriptor (24 readable descriptors), the response one byte
    // per descriptor (10 writable ones): a valid request.
    g.mmap.write_slice(&req, GuestAddress(REQ_ADDR)).unwrap();
    let mut chain: Vec<(u64, u32, bool)> = (0..24).map(|i| (REQ_ADDR + i, 1, false)).collect();
    chain.extend((0..10).map(|i| (RESP_ADDR + 0x10 * i, 1, true)));
    assert_eq!(g.send(&chain), RESPONSE_SIZE as u32);
    let mut resp = [0u8; RESPONSE_SIZE];
    for (i, b) in resp.iter_mut().enumerate() {
        *b = g
            .mmap
            .read_obj(GuestAddress(RESP_ADDR + 0x10 * i as u64))
            .unwrap();
    }
    assert_eq!(Response::parse(&resp, false), Some(Response::of(T::Ack)));
    assert_eq!(g.cfg(CFG_PLUGGED), BS);

    // An overlong request (4 KiB readable): the first 24 bytes count.
    let mut long = vec![0xeeu8; 4096];
    long[..24].copy_from_slice(&plug(BASE + BS, 1).to_bytes());
    assert_eq!(g.raw_request(&long), Response::of(T::Ack));
    assert_eq!(g.cfg(CFG_PLUGGED), 2 * BS);

    // Every short length: ERROR, nothing done.
    let unplug_req = unplug(BASE, 2).to_bytes();
    for n in 0..24 {
        assert_eq!(g.raw_request(&unplug_req[..n]), err(), "{n} bytes");
    }
    assert_eq!(g.cfg(CFG_PLUGGED), 2 * BS);

    // The request buffer flagged device-writable: no readable bytes, so ERROR (written into
    // the first writable bytes) and nothing unplugged.
    g.mmap
        .write_slice(&unplug_req, GuestAddress(REQ_ADDR))
        .unwrap();
    assert_eq!(
        g.send(&[(REQ_ADDR, 24, true), (RESP_ADDR, 10, true)]),
        RESPONSE_SIZE as u32
    );
    let mut b = [0u8; RESPONSE_SIZE];
    g.mmap.read_slice(&mut b, GuestAddress(REQ_ADDR)).unwrap();
    assert_eq!(Response::parse(&b, false), Some(err()));
    // The response buffer flagged device-readable: nowhere to answer, nothing done.
    g.mmap
        .write_slice(&unplug_req, GuestAddress(REQ_ADDR))
        .unwrap();
    assert_eq!(g.send(&[(REQ_ADDR, 24, false), (RESP_ADDR, 10, false)]), 0);
    // A response split so that its second half leaves guest RAM: nothing done.
    assert_eq!(
        g.send(&[
            (REQ_ADDR, 24, false),
            (RESP_ADDR, 5, true),
            (GUEST_RAM + 0x1000, 5, true)
        ]),
        0
    );
    // Zero-length descriptors around a good request are harmless.
    assert_eq!(
        g.send(&[
            (u64::MAX, 0, false),
            (REQ_ADDR, 24, false),
            (RESP_ADDR, 10, true),
            (u64::MAX, 0, true)
        ]),
        RESPONSE_SIZE as u32
    );
    assert_eq!(g.response(), Response::of(T::Ack));
    assert_eq!(g.cfg(CFG_PLUGGED), 0);
    assert_consistent(&g);
}

#[test]
fn unplug_all_at_odd_times() {
    let mut g = booted(0);
    // Nothing requested, nothing plugged.
    assert_eq!(g.request(Request::UnplugAll), Response::of(T::Ack));
    assert_eq!(g.cfg(CFG_USABLE), USABLE_EXTENT);
    // While a grow is pending, before any plug: the usable region keeps what the request
    // needs, so the driver can still plug it.
    g.dev_mut().request_size(300 * MIB).unwrap();
    let usable = g.cfg(CFG_USABLE);
    assert!(usable >= 300 * MIB);
    assert_eq!(g.request(Request::UnplugAll), Response::of(T::Ack));
    assert_eq!(g.cfg(CFG_USABLE), usable);
    assert_eq!(g.request(plug(BASE + usable - BS, 1)), Response::of(T::Ack));
    // Twice in a row, with blocks plugged, while the backend is busy: BUSY and nothing lost.
    assert_eq!(g.request(plug(BASE, 3)), Response::of(T::Ack));
    g.dev_mut().backend_mut().fail_next = Some(BackendError::Busy);
    assert_eq!(g.request(Request::UnplugAll), Response::of(T::Busy));
    assert_consistent(&g);
    assert_eq!(g.request(Request::UnplugAll), Response::of(T::Ack));
    assert_eq!(g.request(Request::UnplugAll), Response::of(T::Ack));
    assert_eq!(g.cfg(CFG_PLUGGED), 0);
    // UNPLUG_ALL with padding and an address: the extra fields are ignored.
    let mut b = Request::UnplugAll.to_bytes();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    b[16..18].copy_from_slice(&u16::MAX.to_le_bytes());
    assert_eq!(g.raw_request(&b), Response::of(T::Ack));
    // After a device reset without re-probing nothing can be sent; after the re-probe the
    // block state is as it was.
    assert_eq!(g.request(plug(BASE, 2)), Response::of(T::Ack));
    g.wr(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS, 0);
    assert!(g.t.notify(0).is_err());
    let offered = g.offered();
    assert!(g.init(offered));
    assert_eq!(g.cfg(CFG_PLUGGED), 2 * BS);
    assert_eq!(g.request(Request::UnplugAll), Response::of(T::Ack));
    assert_consistent(&g);
}

#[test]
fn requests_racing_resizes() {
    let mut g = booted(8 * BS);
    assert_eq!(g.request(plug(BASE, 6)), Response::of(T::Ack));
    // Shrink below what is plugged: further plugs are NACKed, unplugs and states work.
    g.dev_mut().request_size(2 * BS).unwrap();
    assert_eq!(g.request(plug(BASE + 6 * BS, 1)), Response::of(T::Nack));
    assert_eq!(g.request(unplug(BASE, 2)), Response::of(T::Ack));
    assert_eq!(g.request(plug(BASE, 1)), Response::of(T::Nack));
    // Grow between two requests: the usable region grows with it before the next request.
    g.dev_mut().request_size(REGION).unwrap();
    assert_eq!(g.cfg(CFG_USABLE), REGION);
    assert_eq!(
        g.request(plug(BASE + REGION - 2 * BS, 2)),
        Response::of(T::Ack)
    );
    // Shrink to zero: the usable region does not cut off plugged blocks.
    g.dev_mut().request_size(0).unwrap();
    assert_eq!(g.cfg(CFG_USABLE), REGION);
    assert_eq!(
        g.request(state(BASE + REGION - 2 * BS, 2)),
        Response::state(S::Plugged)
    );
    assert_eq!(g.request(plug(BASE, 2)), Response::of(T::Nack));
    // Resizes the host refuses leave the request as it was.
    assert!(g.dev_mut().request_size(REGION + BS).is_err());
    assert!(g.dev_mut().request_size(BS / 2).is_err());
    assert!(g.dev_mut().request_size(u64::MAX).is_err());
    assert_eq!(g.cfg(CFG_REQUESTED), 0);
    assert_consistent(&g);
}

#[derive(Clone, Debug)]
enum Op {
    Plug(u64, u16),
    Unplug(u64, u16),
    State(u64, u16),
    UnplugAll,
    Raw(u16),
    Resize(u64),
    BackendFails(bool),
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0..NR_BLOCKS + 2).prop_map(|b| BASE + b * BS),
        1 => (0..REGION).prop_map(|o| BASE + o),
        1 => any::<u64>(),
        1 => Just(!(BS - 1)),
    ]
}

fn nb() -> impl Strategy<Value = u16> {
    prop_oneof![6 => 0u16..6, 1 => Just(u16::MAX), 1 => any::<u16>()]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (addr(), nb()).prop_map(|(a, n)| Op::Plug(a, n)),
        3 => (addr(), nb()).prop_map(|(a, n)| Op::Unplug(a, n)),
        1 => (addr(), nb()).prop_map(|(a, n)| Op::State(a, n)),
        1 => Just(Op::UnplugAll),
        1 => (4u16..).prop_map(Op::Raw),
        2 => (0..=NR_BLOCKS).prop_map(|b| Op::Resize(b * BS)),
        1 => any::<bool>().prop_map(Op::BackendFails),
    ]
}

/// What the device must answer for a ranged request, from the config the driver can read
/// (usable, requested) and the plugged set.
fn expect(
    plugged: &BTreeSet<u64>,
    usable: u64,
    requested: u64,
    kind: u8,
    addr: u64,
    nb: u16,
) -> Response {
    let len = u64::from(nb) * BS;
    let end = addr.checked_add(len);
    let ok = addr % BS == 0 && nb > 0 && addr >= BASE && end.is_some_and(|e| e <= BASE + usable);
    if !ok {
        return err();
    }
    let first = (addr - BASE) / BS;
    let n = (first..first + u64::from(nb))
        .filter(|b| plugged.contains(b))
        .count() as u64;
    let state = if n == u64::from(nb) {
        S::Plugged
    } else if n == 0 {
        S::Unplugged
    } else {
        S::Mixed
    };
    match kind {
        0 if state != S::Unplugged => err(),
        0 if plugged.len() as u64 * BS + len > requested => Response::of(T::Nack),
        0 => Response::of(T::Ack),
        1 if state != S::Plugged => err(),
        1 => Response::of(T::Ack),
        _ => Response::state(state),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn random_traffic_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut g = booted(16 * BS);
        let mut failing = false;
        for op in ops {
            let plugged = plugged_set(&g);
            let usable = g.cfg(CFG_USABLE);
            let requested = g.cfg(CFG_REQUESTED);
            let calls = g.dev().backend().calls.len();
            if failing {
                g.dev_mut().backend_mut().fail_next = Some(BackendError::Busy);
            }
            let (got, want) = match op {
                Op::Plug(a, n) => (g.request(plug(a, n)), Some(expect(&plugged, usable, requested, 0, a, n))),
                Op::Unplug(a, n) => (g.request(unplug(a, n)), Some(expect(&plugged, usable, requested, 1, a, n))),
                Op::State(a, n) => (g.request(state(a, n)), Some(expect(&plugged, usable, requested, 2, a, n))),
                Op::UnplugAll => {
                    let r = g.request(Request::UnplugAll);
                    let want = if failing && !plugged.is_empty() { T::Busy } else { T::Ack };
                    (r, Some(Response::of(want)))
                }
                Op::Raw(t) => {
                    let mut b = plug(BASE, 1).to_bytes();
                    b[0..2].copy_from_slice(&t.to_le_bytes());
                    (g.raw_request(&b), Some(err()))
                }
                Op::Resize(bytes) => {
                    prop_assert!(g.dev_mut().request_size(bytes).is_ok());
                    prop_assert_eq!(g.cfg(CFG_REQUESTED), bytes);
                    prop_assert!(g.cfg(CFG_USABLE) >= usable, "usable shrank on a resize");
                    (Response::of(T::Ack), None)
                }
                Op::BackendFails(f) => {
                    failing = f;
                    (Response::of(T::Ack), None)
                }
            };
            g.dev_mut().backend_mut().fail_next = None;
            if let Some(mut want) = want {
                // A valid plug or unplug the failing backend refused is BUSY, state unchanged.
                if failing && want == Response::of(T::Ack)
                    && matches!(op, Op::Plug(..) | Op::Unplug(..))
                {
                    want = Response::of(T::Busy);
                }
                prop_assert_eq!(got, want, "{:?}", op);
                if want.resp_type == T::Error || want.resp_type == T::Nack
                    || matches!(op, Op::State(..))
                {
                    prop_assert_eq!(g.dev().backend().calls.len(), calls, "backend called for {:?}", op);
                    prop_assert_eq!(plugged_set(&g), plugged.clone(), "state changed by {:?}", op);
                }
                if want.resp_type == T::Busy && !matches!(op, Op::UnplugAll) {
                    prop_assert_eq!(plugged_set(&g), plugged.clone(), "state changed by {:?}", op);
                }
            }
            prop_assert_eq!(g.dev().backend().misuse, 0);
            prop_assert_eq!(plugged_set(&g), mapped_set(&g));
            prop_assert_eq!(g.cfg(CFG_PLUGGED), g.dev().backend().mapped_bytes());
            let usable = g.cfg(CFG_USABLE);
            prop_assert!(plugged_set(&g).iter().all(|b| (b + 1) * BS <= usable));
        }
    }
}
