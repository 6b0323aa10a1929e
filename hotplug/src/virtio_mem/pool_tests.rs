//! The device over a backend built on the real `guest_mm` allocator: plugs take MOVABLE
//! order-9 blocks from a [`Zone`] and "map" them into a model of the VM window; unplugs unmap,
//! discard through [`HostOps`], and only then free the frames back to the zone.

use super::request::{BlockRangeState as S, Request, Response, ResponseType as T};
use super::test_utils::*;
use super::{BackendError, MemoryBackend, DEFAULT_BLOCK_SIZE, MIB};
use guest_mm::host::{FrameRange, HostCall, HostOps, RecordingHost};
use guest_mm::{FrameId, MigrateType, NodeId, Zone};
use std::collections::BTreeMap;

const CHUNK: u64 = 2 * MIB;
const CHUNK_ORDER: u8 = 9;
const CHUNK_FRAMES: u64 = 512;

/// What happened to a frame block, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Map { gpa: u64, frame: FrameId },
    Unmap { gpa: u64, frame: FrameId },
    Free { frame: FrameId },
}

/// A `MemoryBackend` over a guest-mm zone, with the VM window modelled as gpa → frame.
struct ZoneBackend {
    zone: Zone,
    host: RecordingHost,
    window: BTreeMap<u64, FrameId>,
    events: Vec<Event>,
}

impl ZoneBackend {
    fn new(pool_bytes: u64) -> Self {
        ZoneBackend {
            zone: Zone::new(NodeId(0), FrameId(0), pool_bytes / 4096),
            host: RecordingHost::new(),
            window: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    fn chunks(gpa: u64, len: u64) -> impl Iterator<Item = u64> {
        (gpa..gpa + len).step_by(CHUNK as usize)
    }

    /// Unmap, discard, then free: frames never return to the pool while mapped.
    fn release(&mut self, gpa: u64) -> Result<(), BackendError> {
        let frame = self
            .window
            .remove(&gpa)
            .ok_or_else(|| BackendError::Failed(format!("{gpa:#x} is not mapped")))?;
        self.events.push(Event::Unmap { gpa, frame });
        self.host
            .discard(FrameRange::new(frame, CHUNK_FRAMES))
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        self.zone
            .free(frame, CHUNK_ORDER)
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        self.events.push(Event::Free { frame });
        Ok(())
    }
}

impl MemoryBackend for ZoneBackend {
    fn plug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        if Self::chunks(gpa, len).any(|g| self.window.contains_key(&g)) {
            return Err(BackendError::Failed("already mapped".into()));
        }
        let mut done = Vec::new();
        for g in Self::chunks(gpa, len) {
            match self.zone.alloc(CHUNK_ORDER, MigrateType::Movable) {
                Ok(frame) => {
                    self.window.insert(g, frame);
                    self.events.push(Event::Map { gpa: g, frame });
                    done.push(g);
                }
                Err(_) => {
                    // All or nothing: give back what this call took.
                    for g in done {
                        self.release(g)?;
                    }
                    return Err(BackendError::OutOfMemory);
                }
            }
        }
        Ok(())
    }

    fn unplug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        if !Self::chunks(gpa, len).all(|g| self.window.contains_key(&g)) {
            return Err(BackendError::Failed("unplug of unmapped memory".into()));
        }
        for g in Self::chunks(gpa, len) {
            self.release(g)?;
        }
        Ok(())
    }
}

/// Every Free follows the Unmap of the same frame, with no Map in between.
fn assert_unmap_before_free(events: &[Event]) {
    for (i, e) in events.iter().enumerate() {
        if let Event::Free { frame } = *e {
            let last = events[..i].iter().rev().find(|p| match p {
                Event::Map { frame: f, .. } | Event::Unmap { frame: f, .. } => *f == frame,
                Event::Free { .. } => false,
            });
            assert!(
                matches!(last, Some(Event::Unmap { .. })),
                "frame {frame:?} freed while mapped: {events:?}"
            );
        }
    }
}

fn pool_guest(pool_bytes: u64, requested: u64) -> Guest<ZoneBackend> {
    let mut g = Guest::booted_with(config(), ZoneBackend::new(pool_bytes));
    g.dev_mut().request_size(requested).expect("resize");
    g
}

const BS: u64 = DEFAULT_BLOCK_SIZE;

#[test]
fn plug_and_unplug_through_the_zone() {
    let mut g = pool_guest(256 * MIB, 64 * MIB);
    let total = g.dev().backend().zone.free_frames();
    assert_eq!(
        g.request(Request::Plug {
            addr: BASE,
            nb_blocks: 16
        }),
        Response::of(T::Ack)
    );
    let b = g.dev().backend();
    assert_eq!(b.window.len(), 16);
    assert_eq!(b.zone.free_frames(), total - 16 * CHUNK_FRAMES);
    // Every mapped block is a MOVABLE order-9 allocation.
    for f in b.window.values() {
        assert_eq!(
            b.zone.allocation_at(*f),
            Some((*f, CHUNK_ORDER, MigrateType::Movable))
        );
    }
    assert_eq!(
        g.request(Request::Unplug {
            addr: BASE + 4 * BS,
            nb_blocks: 8
        }),
        Response::of(T::Ack)
    );
    let b = g.dev().backend();
    assert_eq!(b.zone.free_frames(), total - 8 * CHUNK_FRAMES);
    assert_eq!(b.host.discarded_frames(), 8 * CHUNK_FRAMES);
    assert!(b
        .host
        .calls()
        .iter()
        .all(|c| matches!(c, HostCall::Discard(_))));
    b.zone.validate().expect("zone invariants");
    assert_unmap_before_free(&b.events);
    assert_eq!(
        g.request(Request::State {
            addr: BASE,
            nb_blocks: 16
        }),
        Response::state(S::Mixed)
    );
}

#[test]
fn pool_exhaustion_is_busy_and_all_or_nothing() {
    // 16 MiB of pool for a 64 MiB request.
    let mut g = pool_guest(16 * MIB, 64 * MIB);
    let total = g.dev().backend().zone.free_frames();
    assert_eq!(
        g.request(Request::Plug {
            addr: BASE,
            nb_blocks: 6
        }),
        Response::of(T::Ack)
    );
    // 3 more blocks do not fit in the 2 left: BUSY, nothing kept.
    assert_eq!(
        g.request(Request::Plug {
            addr: BASE + 6 * BS,
            nb_blocks: 3
        }),
        Response::of(T::Busy)
    );
    let b = g.dev().backend();
    assert_eq!(b.window.len(), 6);
    assert_eq!(b.zone.free_frames(), total - 6 * CHUNK_FRAMES);
    assert_eq!(g.dev().plugged_size(), 6 * BS);
    assert_eq!(g.dev().counters().busy_backend, 1);
    b.zone.validate().expect("zone invariants");
    assert_unmap_before_free(&b.events);
    // The 2 that fit do.
    assert_eq!(
        g.request(Request::Plug {
            addr: BASE + 6 * BS,
            nb_blocks: 2
        }),
        Response::of(T::Ack)
    );
    assert_eq!(g.dev().backend().zone.free_frames(), 0);
}

#[test]
fn unplug_all_and_system_reset_return_everything() {
    let mut g = pool_guest(128 * MIB, 64 * MIB);
    let total = g.dev().backend().zone.free_frames();
    for (addr, n) in [(BASE, 4u16), (BASE + 10 * BS, 8), (BASE + 30 * BS, 2)] {
        assert_eq!(
            g.request(Request::Plug { addr, nb_blocks: n }),
            Response::of(T::Ack)
        );
    }
    assert_eq!(g.request(Request::UnplugAll), Response::of(T::Ack));
    assert_eq!(g.dev().backend().zone.free_frames(), total);
    assert!(g.dev().backend().window.is_empty());

    assert_eq!(
        g.request(Request::Plug {
            addr: BASE,
            nb_blocks: 32
        }),
        Response::of(T::Ack)
    );
    g.dev_mut().system_reset().expect("system reset");
    let b = g.dev().backend();
    assert_eq!(b.zone.free_frames(), total);
    assert!(b.window.is_empty());
    assert_eq!(b.host.discarded_frames(), (14 + 32) * CHUNK_FRAMES);
    b.zone.validate().expect("zone invariants");
    assert_unmap_before_free(&b.events);
}
