//! Where slab memory comes from: a small trait and the default `std::alloc` backend.

use crate::frame::NodeId;
use std::alloc::Layout;
use std::fmt;
use std::ptr::NonNull;

/// A source of slab memory.
///
/// The cache asks for one slab at a time with a layout whose size and alignment are both the
/// cache's slab size (a power of two, at least 4 KiB). Objects are found back from their
/// address by masking it with the slab size, which is why the alignment must be honoured.
///
/// # Safety
///
/// Implementors promise that [`alloc_slab`](SlabBackend::alloc_slab), when it returns
/// `Some(p)`:
/// - `p` is aligned to `layout.align()` and valid for reads and writes of `layout.size()` bytes;
/// - the memory overlaps no other live slab and no memory anyone else uses, and stays valid
///   until it is passed to [`free_slab`](SlabBackend::free_slab).
///
/// The cache hands objects carved from this memory to safe code, so a backend that breaks
/// these rules breaks memory safety.
///
/// Both methods are called with the node's depot lock held, so a backend must not allocate
/// from or free to the cache it serves (that would deadlock).
pub unsafe trait SlabBackend: Send + Sync + fmt::Debug {
    /// Allocate one slab of `layout` for `node`; `None` when out of memory.
    fn alloc_slab(&self, node: NodeId, layout: Layout) -> Option<NonNull<u8>>;

    /// Return a slab.
    ///
    /// # Safety
    ///
    /// `ptr` came from `alloc_slab(node, layout)` on this backend with this very `layout`, has
    /// not been freed yet, and nothing reads or writes it any more.
    unsafe fn free_slab(&self, node: NodeId, ptr: NonNull<u8>, layout: Layout);
}

/// The default backend: the global allocator (`std::alloc`), aligned to the slab size.
///
/// It ignores the node: the global allocator has no NUMA placement. A backend that binds
/// slabs to nodes belongs to the VMM, which may make syscalls.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdBackend;

// SAFETY: `std::alloc::alloc` with a non-zero-sized layout returns either null or a fresh,
// exclusive block aligned and sized as the layout asks, valid until `dealloc` with the same
// layout, which is exactly the trait's contract.
unsafe impl SlabBackend for StdBackend {
    fn alloc_slab(&self, _node: NodeId, layout: Layout) -> Option<NonNull<u8>> {
        if layout.size() == 0 {
            return None;
        }
        // SAFETY: the layout's size is not zero (checked above).
        let p = unsafe { std::alloc::alloc(layout) };
        NonNull::new(p)
    }

    unsafe fn free_slab(&self, _node: NodeId, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: the caller guarantees `ptr` came from `alloc_slab` with this layout, which
        // got it from `std::alloc::alloc(layout)`, and that it is not used any more.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) }
    }
}
