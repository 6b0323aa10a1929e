//! Per-frame metadata and the intrusive free lists (one per order and migration type).
//!
//! Every frame of the zone has one [`Meta`] entry (12 bytes). The first frame of a block
//! (its *head*) records the block's kind (free or allocated), order and migration type; every
//! other frame of the block is a *tail*. Free heads are linked into a doubly-linked list
//! through `next`/`prev`, which hold zone-relative frame indices (`NIL` ends a list), so
//! insertion and removal are O(1) and never allocate.

use super::Zone;
use crate::frame::{MigrateType, MAX_ORDER, NR_ORDERS, PAGEBLOCK_ORDER};

/// End of a list.
pub(crate) const NIL: u32 = u32::MAX;
/// How many blocks at the head of a free list [`Zone::list_pick`] compares (bounded, so that
/// allocation stays O(1)).
pub(crate) const PLACEMENT_SCAN: usize = 8;
/// A frame inside a block that is not its head.
pub(crate) const KIND_TAIL: u8 = 0;
/// Head of a free block (on a free list).
pub(crate) const KIND_FREE: u8 = 1;
/// Head of an allocated block.
pub(crate) const KIND_ALLOC: u8 = 2;

/// Metadata of one frame.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Meta {
    /// Next free head on the same list (free heads only).
    pub next: u32,
    /// Previous free head on the same list (free heads only).
    pub prev: u32,
    /// `KIND_TAIL`, `KIND_FREE` or `KIND_ALLOC`.
    pub kind: u8,
    /// Block order (heads only).
    pub order: u8,
    /// Free heads: the list's migration type. Allocated heads: the allocation's type.
    pub mt: u8,
    _pad: u8,
}

impl Meta {
    /// A tail frame.
    pub(crate) const TAIL: Meta = Meta {
        next: NIL,
        prev: NIL,
        kind: KIND_TAIL,
        order: 0,
        mt: 0,
        _pad: 0,
    };
}

/// The heads, lengths and non-empty masks of all free lists.
#[derive(Clone, Debug)]
pub(crate) struct FreeLists {
    /// First free head per (type, order).
    pub heads: [[u32; NR_ORDERS]; MigrateType::COUNT],
    /// Blocks per (type, order).
    pub counts: [[u64; NR_ORDERS]; MigrateType::COUNT],
    /// Bit `o` set when list (type, o) is non-empty.
    pub nonempty: [u32; MigrateType::COUNT],
}

impl FreeLists {
    pub(crate) fn new() -> Self {
        FreeLists {
            heads: [[NIL; NR_ORDERS]; MigrateType::COUNT],
            counts: [[0; NR_ORDERS]; MigrateType::COUNT],
            nonempty: [0; MigrateType::COUNT],
        }
    }
}

impl Zone {
    /// Push the free block at `idx` (order `order`) onto list `mt`, marking it a free head.
    #[inline]
    pub(crate) fn list_push(&mut self, idx: u32, order: u8, mt: usize) {
        self.link(idx, order, mt);
        if order < PAGEBLOCK_ORDER {
            let pb = self.pb_index(idx);
            self.pb_free[pb] += 1u16 << order;
        }
    }

    /// [`Zone::list_push`] without the pageblock free counter (the caller updates it).
    #[inline(always)]
    fn link(&mut self, idx: u32, order: u8, mt: usize) {
        debug_assert!(order <= MAX_ORDER && mt < MigrateType::COUNT);
        let o = order as usize;
        let head = self.lists.heads[mt][o];
        let m = &mut self.meta[idx as usize];
        m.kind = KIND_FREE;
        m.order = order;
        m.mt = mt as u8;
        m.prev = NIL;
        m.next = head;
        if head != NIL {
            self.meta[head as usize].prev = idx;
        }
        self.lists.heads[mt][o] = idx;
        self.lists.counts[mt][o] += 1;
        self.lists.nonempty[mt] |= 1 << o;
    }

    /// Unlink the free head at `idx` from its list. Its kind stays `KIND_FREE`: the caller
    /// re-marks it.
    #[inline]
    pub(crate) fn list_remove(&mut self, idx: u32) {
        let order = self.unlink(idx);
        if order < PAGEBLOCK_ORDER {
            let pb = self.pb_index(idx);
            self.pb_free[pb] -= 1u16 << order;
        }
    }

    /// [`Zone::list_remove`] without the pageblock free counter; returns the block's order.
    #[inline(always)]
    pub(crate) fn unlink(&mut self, idx: u32) -> u8 {
        let m = self.meta[idx as usize];
        debug_assert_eq!(m.kind, KIND_FREE);
        let (o, mt) = (m.order as usize, m.mt as usize);
        if m.prev != NIL {
            self.meta[m.prev as usize].next = m.next;
        } else {
            self.lists.heads[mt][o] = m.next;
        }
        if m.next != NIL {
            self.meta[m.next as usize].prev = m.prev;
        }
        let c = &mut self.lists.counts[mt][o];
        *c -= 1;
        if *c == 0 {
            self.lists.nonempty[mt] &= !(1 << o);
        }
        m.order
    }

    /// Pop the first block of list (mt, order). The list must be non-empty.
    #[inline]
    pub(crate) fn list_pop(&mut self, order: u8, mt: usize) -> u32 {
        let idx = self.lists.heads[mt][order as usize];
        debug_assert_ne!(idx, NIL);
        self.list_remove(idx);
        idx
    }

    /// A block of list (mt, order), which must be non-empty, for an allocation: among the first
    /// [`PLACEMENT_SCAN`] blocks of the list, the one whose pageblock has the fewest free
    /// frames (the most used pageblock), so that small allocations pack into pageblocks that
    /// are already busy and the emptier ones can drain and merge back into 2 MiB blocks.
    /// For blocks below pageblock order (larger ones fill whole pageblocks: take the head).
    #[inline(never)]
    pub(crate) fn list_pick(&self, order: u8, mt: usize) -> u32 {
        let mut cur = self.lists.heads[mt][order as usize];
        debug_assert!(cur != NIL && order < PAGEBLOCK_ORDER);
        let (mut best, mut best_free) = (cur, u16::MAX);
        for _ in 0..PLACEMENT_SCAN {
            let f = self.pb_free[self.pb_index(cur)];
            if f < best_free {
                (best, best_free) = (cur, f);
                if f == 1u16 << order {
                    // The block is its pageblock's only free space: nothing is fuller.
                    break;
                }
            }
            cur = self.meta[cur as usize].next;
            if cur == NIL {
                break;
            }
        }
        best
    }

    /// Move the free head at `idx` to list `mt` (same order).
    pub(crate) fn list_move(&mut self, idx: u32, mt: usize) {
        let order = self.meta[idx as usize].order;
        if self.meta[idx as usize].mt as usize != mt {
            self.list_remove(idx);
            self.list_push(idx, order, mt);
        }
    }

    /// Split the (unlisted) block `idx` of order `high` down to order `low`, putting the
    /// upper halves on list `mt`. The lower part at `idx` is left for the caller.
    #[inline]
    pub(crate) fn expand(&mut self, idx: u32, low: u8, high: u8, mt: usize) {
        let mut h = high;
        while h > low {
            h -= 1;
            self.link(idx + (1u32 << h), h, mt);
        }
        // The halves below pageblock order all lie in the pageblock of `idx`.
        if low < PAGEBLOCK_ORDER && high > low {
            let pb = self.pb_index(idx);
            self.pb_free[pb] += (1u16 << high.min(PAGEBLOCK_ORDER)) - (1u16 << low);
        }
    }
}
