//! The typed front end: caches of `T`, and boxes that give their memory back when they drop.

use super::handle::SlabHandle;
use super::{SlabCache, SlabCacheBuilder, SlabConfigError, SlabError, SlabStats};
use crate::frame::NodeId;
use std::alloc::Layout;
use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

/// A slab cache of `T` values. Cheap to clone (an `Arc`), `Send + Sync`.
///
/// Zero-sized types are refused ([`SlabConfigError::ZeroSize`]): they need no memory.
pub struct TypedSlab<T> {
    cache: Arc<SlabCache>,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for TypedSlab<T> {
    fn clone(&self) -> Self {
        TypedSlab {
            cache: Arc::clone(&self.cache),
            _t: PhantomData,
        }
    }
}

impl<T> fmt::Debug for TypedSlab<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedSlab")
            .field("type", &std::any::type_name::<T>())
            .field("cache", &self.cache)
            .finish()
    }
}

impl<T> TypedSlab<T> {
    /// A cache of `T` with default settings.
    pub fn new(name: impl Into<String>) -> Result<Self, SlabConfigError> {
        Self::with_config(name, |b| b)
    }

    /// A cache of `T`; `configure` may set the slab size, magazine size, colouring, nodes,
    /// depot limits and backend. Object size and alignment are `T`'s. A constructor set here is
    /// dropped: typed objects are initialized by [`TypedHandle::alloc`] with a value.
    pub fn with_config(
        name: impl Into<String>,
        configure: impl FnOnce(SlabCacheBuilder) -> SlabCacheBuilder,
    ) -> Result<Self, SlabConfigError> {
        let layout = Layout::new::<T>();
        let mut b = configure(SlabCacheBuilder::for_layout(name, layout));
        b.ctor = None;
        b.object_size = layout.size();
        b.align = layout.align();
        Ok(TypedSlab {
            cache: b.build()?,
            _t: PhantomData,
        })
    }

    /// A thread cache on `node`.
    pub fn handle(&self, node: NodeId) -> Result<TypedHandle<T>, SlabError> {
        let inner = self.cache.handle(node)?;
        Ok(TypedHandle {
            inner: RefCell::new(inner),
            node: usize::from(node.0),
            cache: Arc::clone(&self.cache),
            _t: PhantomData,
        })
    }

    /// Move `value` into a slab object of `node` that is tied to no thread cache.
    ///
    /// The box keeps the cache alive, is `Send`/`Sync` when `T` is, and can be stored anywhere
    /// (for example in a table of per-block metadata). The price: its alloc and its drop each
    /// take the node's depot lock. On failure the value is dropped.
    pub fn alloc_owned(&self, node: NodeId, value: T) -> Result<OwnedSlabBox<T>, SlabError> {
        let p = self.cache.alloc_direct(node)?.cast::<T>();
        // SAFETY: as in `TypedHandle::alloc`: the object is sized and aligned for `T` and was
        // handed to us alone.
        unsafe { p.as_ptr().write(value) };
        Ok(OwnedSlabBox {
            ptr: p,
            node: usize::from(node.0),
            cache: Arc::clone(&self.cache),
            _owns: PhantomData,
        })
    }

    /// The untyped cache underneath.
    pub fn cache(&self) -> &Arc<SlabCache> {
        &self.cache
    }

    /// The cache's counters.
    pub fn stats(&self) -> SlabStats {
        self.cache.stats()
    }
}

/// A thread cache of `T` objects.
///
/// It is `Send` (it holds no `T`), but not `Sync`: the boxes it hands out borrow it, so they
/// stay on the thread that owns the handle and are freed into its magazines.
pub struct TypedHandle<T> {
    inner: RefCell<SlabHandle>,
    node: usize,
    cache: Arc<SlabCache>,
    _t: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for TypedHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedHandle")
            .field("type", &std::any::type_name::<T>())
            .field("inner", &self.inner)
            .finish()
    }
}

impl<T> TypedHandle<T> {
    /// Move `value` into a slab object. On failure the value is dropped.
    #[inline]
    pub fn alloc(&self, value: T) -> Result<SlabBox<'_, T>, SlabError> {
        let p = {
            let mut h = self.inner.try_borrow_mut().map_err(|_| SlabError::Busy)?;
            h.alloc()?
        };
        let p = p.cast::<T>();
        // SAFETY: the cache was built from `Layout::new::<T>()`, so the object has room for a
        // `T`; it is aligned for `T` (slabs are aligned to the slab size, which is at least the
        // alignment, and colours and the stride are multiples of it); and it was just handed to
        // us alone, so writing it races with nothing.
        unsafe { p.as_ptr().write(value) };
        Ok(SlabBox {
            ptr: p,
            handle: self,
            _owns: PhantomData,
        })
    }

    /// Return every cached object to the depot (see [`SlabHandle::flush`]).
    pub fn flush(&self) -> Result<(), SlabError> {
        self.inner
            .try_borrow_mut()
            .map_err(|_| SlabError::Busy)?
            .flush();
        Ok(())
    }

    /// The untyped cache underneath.
    pub fn cache(&self) -> &Arc<SlabCache> {
        &self.cache
    }

    /// Give a box's memory back (its value is already dropped or moved out).
    fn release(&self, p: NonNull<u8>) {
        match self.inner.try_borrow_mut() {
            // SAFETY: `p` came from `alloc` on this handle, whose cache is the same; the box
            // that owned it is gone and its value was dropped or moved out, so nothing uses it.
            Ok(mut h) => unsafe { h.free(p) },
            // Re-entrant drop while the handle is inside one of its own operations: send the
            // object straight to the depot instead.
            Err(_) => self.cache.free_direct(self.node, p),
        }
    }
}

/// An owned `T` in a slab object, like a `Box<T>`. Dropping it drops the `T` and returns the
/// memory to its thread cache's magazine.
///
/// It borrows the [`TypedHandle`] it came from, so it cannot outlive it (nor the cache, which
/// the handle keeps alive) and is neither `Send` nor `Sync`.
pub struct SlabBox<'h, T> {
    ptr: NonNull<T>,
    handle: &'h TypedHandle<T>,
    _owns: PhantomData<T>,
}

impl<T> SlabBox<'_, T> {
    /// Move the value out and free the object.
    pub fn into_inner(b: Self) -> T {
        let b = ManuallyDrop::new(b);
        // SAFETY: the box holds an initialized `T` that it owns; reading moves it out, and
        // `ManuallyDrop` keeps the box's own `Drop` from dropping it a second time.
        let v = unsafe { b.ptr.as_ptr().read() };
        b.handle.release(b.ptr.cast());
        v
    }

    /// The object's address.
    pub fn as_ptr(b: &Self) -> *const T {
        b.ptr.as_ptr()
    }
}

impl<T> Deref for SlabBox<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the box owns an initialized, aligned `T` until it drops, and `&self` keeps
        // anyone from getting `&mut` at the same time.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for SlabBox<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for SlabBox<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the box owns an initialized `T`; it is dropped exactly once, here (a
        // panicking `T::drop` leaks the object's memory, which is safe).
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        self.handle.release(self.ptr.cast());
    }
}

impl<T: fmt::Debug> fmt::Debug for SlabBox<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// An owned `T` in a slab object, tied to no thread cache (see [`TypedSlab::alloc_owned`]).
/// Dropping it drops the `T` and returns the object straight to its slab.
pub struct OwnedSlabBox<T> {
    ptr: NonNull<T>,
    node: usize,
    cache: Arc<SlabCache>,
    _owns: PhantomData<T>,
}

// SAFETY: the box owns its `T` exclusively (like `Box<T>`), and its drop frees the object
// through the cache, which is `Sync`; so sending the box sends the `T`, which `T: Send` allows.
unsafe impl<T: Send> Send for OwnedSlabBox<T> {}
// SAFETY: `&OwnedSlabBox<T>` gives out only `&T`, which `T: Sync` allows to share.
unsafe impl<T: Sync> Sync for OwnedSlabBox<T> {}

impl<T> OwnedSlabBox<T> {
    /// Move the value out and free the object.
    pub fn into_inner(b: Self) -> T {
        let b = ManuallyDrop::new(b);
        // SAFETY: the box holds an initialized `T` that it owns; reading moves it out, and
        // `ManuallyDrop` keeps the box's own `Drop` from dropping it again.
        let v = unsafe { b.ptr.as_ptr().read() };
        b.cache.free_direct(b.node, b.ptr.cast());
        // SAFETY: `b` is in a `ManuallyDrop` and never used again, so moving its `Arc` out
        // here is the only time it is dropped (the box's `Drop` does not run).
        let cache: Arc<SlabCache> = unsafe { std::ptr::read(&b.cache) };
        drop(cache);
        v
    }

    /// The object's address.
    pub fn as_ptr(b: &Self) -> *const T {
        b.ptr.as_ptr()
    }
}

impl<T> Deref for OwnedSlabBox<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the box owns an initialized, aligned `T` until it drops.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for OwnedSlabBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for OwnedSlabBox<T> {
    fn drop(&mut self) {
        // SAFETY: the box owns an initialized `T`; it is dropped exactly once, here.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        self.cache.free_direct(self.node, self.ptr.cast());
    }
}

impl<T: fmt::Debug> fmt::Debug for OwnedSlabBox<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}
