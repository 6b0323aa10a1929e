//! Magazines: small stacks of pointers to free objects.
//!
//! A magazine is the unit the thread caches and the depot exchange: a thread's alloc pops and
//! its free pushes without any lock, and a whole magazine moves to or from the depot at once
//! (Bonwick and Adams, "Magazines and Vmem", USENIX 2001).

use std::ptr::NonNull;

/// A pointer to a free object of a slab cache.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(transparent)]
pub(crate) struct ObjPtr(NonNull<u8>);

// SAFETY: an `ObjPtr` names a free object, memory that nobody reads or writes while the pointer
// sits in a magazine, a thread cache or a slab's free list. Whoever holds the `ObjPtr` owns the
// object exclusively, so sending it to another thread moves that ownership; nothing is shared.
unsafe impl Send for ObjPtr {}

impl ObjPtr {
    /// Wrap a pointer.
    #[inline]
    pub(crate) const fn new(p: NonNull<u8>) -> Self {
        ObjPtr(p)
    }

    /// The pointer.
    #[inline]
    pub(crate) const fn ptr(self) -> NonNull<u8> {
        self.0
    }

    /// The address.
    #[inline]
    pub(crate) fn addr(self) -> usize {
        self.0.as_ptr() as usize
    }
}

/// A stack of free objects with a fixed capacity.
///
/// The capacity is the `Vec`'s allocated capacity: pushes never go past it, so the fast path
/// never allocates.
#[derive(Debug)]
pub(crate) struct Magazine {
    objs: Vec<ObjPtr>,
}

impl Magazine {
    /// An empty magazine that holds `cap` objects.
    pub(crate) fn new(cap: usize) -> Self {
        Magazine {
            objs: Vec::with_capacity(cap),
        }
    }

    /// An empty magazine with no storage (a placeholder while a real one is swapped out).
    pub(crate) const fn placeholder() -> Self {
        Magazine { objs: Vec::new() }
    }

    /// Objects held.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.objs.len()
    }

    /// Objects it can hold.
    #[inline]
    pub(crate) fn capacity(&self) -> usize {
        self.objs.capacity()
    }

    /// Whether it holds nothing.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.objs.is_empty()
    }

    /// Whether it is full.
    #[inline]
    pub(crate) fn is_full(&self) -> bool {
        self.objs.len() == self.objs.capacity()
    }

    /// Take the most recently pushed object.
    #[inline]
    pub(crate) fn pop(&mut self) -> Option<ObjPtr> {
        self.objs.pop()
    }

    /// Push an object; gives it back when the magazine is full.
    #[inline]
    pub(crate) fn push(&mut self, p: ObjPtr) -> Result<(), ObjPtr> {
        if self.objs.len() < self.objs.capacity() {
            self.objs.push(p);
            Ok(())
        } else {
            Err(p)
        }
    }

    /// Room left.
    #[inline]
    pub(crate) fn room(&self) -> usize {
        self.objs.capacity() - self.objs.len()
    }

    /// The underlying vector, for batch refills that stay within capacity.
    pub(crate) fn objs_mut(&mut self) -> &mut Vec<ObjPtr> {
        &mut self.objs
    }

    /// Heap bytes this magazine's storage occupies.
    pub(crate) fn storage_bytes(&self) -> usize {
        self.objs.capacity() * std::mem::size_of::<ObjPtr>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_pop_respects_capacity() {
        let mut m = Magazine::new(2);
        let a = ObjPtr::new(NonNull::dangling());
        assert!(m.is_empty());
        assert_eq!(m.capacity(), 2);
        assert_eq!(m.push(a), Ok(()));
        assert_eq!(m.push(a), Ok(()));
        assert!(m.is_full());
        assert_eq!(m.push(a), Err(a));
        assert_eq!(m.room(), 0);
        assert_eq!(m.pop(), Some(a));
        assert_eq!(m.len(), 1);
        assert_eq!(m.storage_bytes(), 2 * std::mem::size_of::<usize>());
        assert_eq!(Magazine::placeholder().capacity(), 0);
    }
}
