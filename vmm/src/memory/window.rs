//! [`GuestWindow`]: the VM's private host virtual reservation, with block placement, removal,
//! residency queries and a vm-memory view for device models.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::backing::{AnonymousBacking, Backing, PoolBlock};
use super::layout::{Layout, BLOCK_SIZE};
use super::MemoryError;

/// Host base page size used for residency queries.
const HOST_PAGE: usize = 4096;
/// mincore is called on at most this many bytes at a time (bounds the result vector).
const MINCORE_CHUNK: usize = 64 << 20;

/// Placement state, guarded by one mutex so the bitmap always matches the mapping.
#[derive(Debug)]
struct State {
    /// One bit per 2 MiB block of the window: set when the block is placed (read-write).
    placed: Vec<u64>,
    /// Number of placed blocks.
    placed_blocks: u64,
    /// Bumped on every place/remove; a [`WindowMemory`] remembers the generation it was built at.
    generation: u64,
    /// File backings only: the pool block behind each placed 2 MiB block (by block index).
    blocks: BTreeMap<u64, PoolBlock>,
}

impl State {
    fn get(&self, block: u64) -> bool {
        let (w, b) = ((block / 64) as usize, block % 64);
        self.placed.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    fn set(&mut self, block: u64, on: bool) {
        let (w, b) = ((block / 64) as usize, block % 64);
        if let Some(x) = self.placed.get_mut(w) {
            if on {
                *x |= 1 << b;
            } else {
                *x &= !(1 << b);
            }
        }
    }
}

/// Told about block removals before they happen (the VMM swap uses this to free the slots of
/// a removed range and unregister it from userfaultfd, so that a block placed again later
/// starts resident and zero).
pub trait BlockObserver: Send + Sync {
    /// `[gpa, gpa+len)` is about to be removed. Called with the window's placement lock held:
    /// the observer must not call back into the window.
    fn before_remove(&self, gpa: u64, len: u64);
}

/// One VM's guest memory window.
///
/// The window is reserved as a single anonymous, private, `MAP_NORESERVE` mapping of
/// `layout.end()` bytes, 2 MiB aligned, created `PROT_NONE`. Guest-physical address `gpa` lives
/// at host address `base + gpa`. Placed blocks are read-write, backed as its [`Backing`] says
/// (the window's own anonymous memory, or pool-file pages mapped over the range); everything
/// else (the MMIO hole, unplugged hot-plug blocks) stays `PROT_NONE` and holds no host pages.
#[derive(Debug)]
pub struct GuestWindow {
    layout: Layout,
    base: usize,
    size: usize,
    backing: Arc<dyn Backing>,
    state: Mutex<State>,
    observers: Mutex<Vec<Weak<dyn BlockObserver>>>,
}

// SAFETY: the window only holds the address of a mapping it owns; all mutation of the mapping
// (mprotect/madvise) is serialised by `state`, and guest memory itself is accessed through
// volatile vm-memory accessors or by KVM, never through Rust references.
unsafe impl Send for GuestWindow {}
// SAFETY: see `Send`; shared access only reads immutable fields or takes the mutex.
unsafe impl Sync for GuestWindow {}

impl GuestWindow {
    /// Reserve the window for `layout` with the default backing (anonymous, THP) and place all
    /// boot RAM.
    pub fn new(layout: Layout) -> Result<GuestWindow, MemoryError> {
        GuestWindow::with_backing(layout, Arc::new(AnonymousBacking::new(true)), &[])
    }

    /// Reserve the window for `layout` over `backing` and place all boot RAM. A file backing
    /// needs one pool block per 2 MiB of boot RAM in `boot` (in guest-physical order); the
    /// anonymous backing takes them too (it binds each block to its node on a multi-node
    /// host) or an empty slice.
    pub fn with_backing(
        layout: Layout,
        backing: Arc<dyn Backing>,
        boot: &[PoolBlock],
    ) -> Result<GuestWindow, MemoryError> {
        let size64 = layout.end();
        let size = usize::try_from(size64).map_err(|_| MemoryError::HostAddressSpace(size64))?;
        let reserve = size
            .checked_add(BLOCK_SIZE as usize)
            .ok_or(MemoryError::HostAddressSpace(size64))?;
        // SAFETY: a fresh anonymous PROT_NONE reservation at an address the kernel chooses; it
        // cannot alias any existing Rust object.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(MemoryError::last_os("mmap"));
        }
        let raw = raw as usize;
        let align = BLOCK_SIZE as usize;
        let base = (raw + align - 1) & !(align - 1);
        let head = base - raw;
        let tail = reserve - head - size;
        // Trim the unaligned head and tail so the window is exactly [base, base+size).
        if head > 0 {
            // SAFETY: [raw, base) is part of the reservation just made and unused.
            unsafe { libc::munmap(raw as *mut libc::c_void, head) };
        }
        if tail > 0 {
            // SAFETY: [base+size, raw+reserve) is part of the reservation and unused.
            unsafe { libc::munmap((base + size) as *mut libc::c_void, tail) };
        }
        let blocks = size64 / BLOCK_SIZE;
        let window = GuestWindow {
            layout,
            base,
            size,
            backing,
            state: Mutex::new(State {
                placed: vec![0; blocks.div_ceil(64) as usize],
                placed_blocks: 0,
                generation: 0,
                blocks: BTreeMap::new(),
            }),
            observers: Mutex::new(Vec::new()),
        };
        // Ask for huge pages (or not) on the whole window once, so every VMA split off it later
        // carries the same flag and adjacent placed blocks merge back into one VMA. Keep guest
        // memory out of core dumps.
        window.backing.prepare(base, size)?;
        let boot_blocks: u64 = window
            .layout
            .boot_ram_ranges()
            .iter()
            .map(|r| (r.end - r.start) / BLOCK_SIZE)
            .sum();
        // A file backing needs the blocks; the anonymous backing takes them when given (to bind
        // them to their nodes on a multi-node host).
        let file = window.backing.needs_pool_blocks() || !boot.is_empty();
        if file && boot.len() as u64 != boot_blocks {
            return Err(MemoryError::PoolBlocks {
                expected: boot_blocks,
                got: boot.len() as u64,
            });
        }
        let mut next = 0usize;
        for r in window.layout.boot_ram_ranges() {
            let len = r.end - r.start;
            let n = if file { (len / BLOCK_SIZE) as usize } else { 0 };
            let these = boot.get(next..next + n).unwrap_or(&[]);
            window.place(r.start, len, these)?;
            next += n;
        }
        Ok(window)
    }

    /// The backing behind placed blocks.
    pub fn backing(&self) -> &Arc<dyn Backing> {
        &self.backing
    }

    /// The layout this window covers.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Host virtual range of the whole window.
    pub fn host_range(&self) -> Range<usize> {
        self.base..self.base + self.size
    }

    /// Host address of guest-physical `gpa`, if inside the window. The address is only
    /// accessible while the block holding it is placed.
    pub fn host_addr(&self, gpa: u64) -> Option<usize> {
        let off = usize::try_from(gpa).ok()?;
        (off < self.size).then(|| self.base + off)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update; the bitmap is still the
        // best record we have.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn span(&self, gpa: u64, len: u64) -> Result<(usize, usize), MemoryError> {
        let end = gpa
            .checked_add(len)
            .ok_or(MemoryError::OutOfRange { gpa, len })?;
        if end > self.size as u64 {
            return Err(MemoryError::OutOfRange { gpa, len });
        }
        Ok((self.base + gpa as usize, len as usize))
    }

    /// Make `[gpa, gpa+len)` accessible (read-write, huge pages advised) with the anonymous
    /// backing. A file-backed window refuses this (use [`GuestWindow::place`] with the pool
    /// blocks). See [`GuestWindow::place`] for the rules.
    pub fn place_block(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.place(gpa, len, &[])
    }

    /// Make `[gpa, gpa+len)` accessible, backed by `blocks` (one pool block per 2 MiB, in
    /// order; a file backing needs them, the anonymous backing ignores them). The range must be
    /// 2 MiB aligned, inside boot RAM or the hot-plug region, and wholly unplaced. Its content
    /// reads as zeros until written.
    pub fn place(&self, gpa: u64, len: u64, blocks: &[PoolBlock]) -> Result<(), MemoryError> {
        self.layout.check_block(gpa, len)?;
        let (addr, n) = self.span(gpa, len)?;
        let mut st = self.lock();
        let range = gpa / BLOCK_SIZE..(gpa + len) / BLOCK_SIZE;
        if range.clone().any(|b| st.get(b)) {
            return Err(MemoryError::AlreadyPlaced { gpa, len });
        }
        let file = self.backing.needs_pool_blocks();
        // The anonymous backing takes the blocks when it has them (to bind the range to their
        // nodes on a multi-node host) and works without.
        if (file || !blocks.is_empty()) && blocks.len() as u64 != len / BLOCK_SIZE {
            return Err(MemoryError::PoolBlocks {
                expected: len / BLOCK_SIZE,
                got: blocks.len() as u64,
            });
        }
        self.backing.place(addr, n, blocks)?;
        for (i, b) in range.enumerate() {
            st.set(b, true);
            if let Some(pb) = blocks.get(i) {
                st.blocks.insert(b, *pb);
            }
        }
        st.placed_blocks += len / BLOCK_SIZE;
        st.generation += 1;
        Ok(())
    }

    /// Remove `[gpa, gpa+len)`: make it inaccessible (no new faults can populate it) and drop
    /// its content, so that no page of this VM remains behind the range and the pool blocks
    /// behind it read as zeros to their next user. The anonymous backing does `PROT_NONE` then
    /// `MADV_DONTNEED`; a file backing maps `PROT_NONE` anonymous memory over the range, then
    /// punches holes in the pool file. The range must be wholly placed. Callers that
    /// registered a KVM memslot over the range should delete it first.
    pub fn remove_block(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.layout.check_block(gpa, len)?;
        let (addr, n) = self.span(gpa, len)?;
        let mut st = self.lock();
        let range = gpa / BLOCK_SIZE..(gpa + len) / BLOCK_SIZE;
        if !range.clone().all(|b| st.get(b)) {
            return Err(MemoryError::NotPlaced { gpa, len });
        }
        {
            let mut obs = self.observers.lock().unwrap_or_else(|e| e.into_inner());
            obs.retain(|o| o.strong_count() > 0);
            for o in obs.iter().filter_map(Weak::upgrade) {
                o.before_remove(gpa, len);
            }
        }
        let blocks: Vec<PoolBlock> = range
            .clone()
            .filter_map(|b| st.blocks.get(&b).copied())
            .collect();
        let result = self.backing.remove(addr, n, &blocks);
        // The backing's remove makes the range inaccessible before anything else; if only the
        // content drop failed the range is still no longer placed.
        let still_mapped = matches!(result, Err(MemoryError::Host { call, .. }) if call.starts_with("mprotect") || call.starts_with("mmap"));
        if !still_mapped {
            for b in range {
                st.set(b, false);
                st.blocks.remove(&b);
            }
            st.placed_blocks -= len / BLOCK_SIZE;
            st.generation += 1;
        }
        result
    }

    /// Drop the host pages behind `[gpa, gpa+len)` while it stays placed (balloon, free page
    /// reporting): the next touch reads zeros. 4 KiB aligned, wholly placed. Anonymous:
    /// `MADV_DONTNEED`; memfd: punch-hole in the pool file; hugetlbfs: refused.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if gpa % HOST_PAGE as u64 != 0 || len % HOST_PAGE as u64 != 0 || len == 0 {
            return Err(MemoryError::Unaligned { gpa, len });
        }
        let (addr, _) = self.span(gpa, len)?;
        let st = self.lock();
        let end = gpa + len;
        if !(gpa / BLOCK_SIZE..end.div_ceil(BLOCK_SIZE)).all(|b| st.get(b)) {
            return Err(MemoryError::NotPlaced { gpa, len });
        }
        if !self.backing.needs_pool_blocks() {
            return self.backing.discard(addr, len as usize, None);
        }
        // Piece by piece, never crossing a 2 MiB block (its pool block gives the file offset).
        let mut at = gpa;
        while at < end {
            let block = at / BLOCK_SIZE;
            let piece_end = ((block + 1) * BLOCK_SIZE).min(end);
            let pb = st
                .blocks
                .get(&block)
                .copied()
                .ok_or(MemoryError::NotPlaced { gpa, len })?;
            self.backing.discard(
                self.base + at as usize,
                (piece_end - at) as usize,
                Some((pb, at - block * BLOCK_SIZE)),
            )?;
            at = piece_end;
        }
        Ok(())
    }

    /// Move the placed 2 MiB block at `gpa` from pool block `from` to `to`
    /// ([`Backing::relocate`]: file backings copy the data, map `to` over the range and punch
    /// `from`; the anonymous backing, whose blocks are recorded when they were given to
    /// [`GuestWindow::place`], migrates the pages to `to`'s node on a multi-node host).
    /// Refused (nothing changed) when the block is not placed or is not backed by `from`. The
    /// caller keeps the block's writers stopped (vCPUs paused, device transports held). The
    /// host address range and the placement generation stay the same, so KVM's memslots and
    /// device models' views need no update.
    pub fn relocate(&self, gpa: u64, from: PoolBlock, to: PoolBlock) -> Result<(), MemoryError> {
        self.layout.check_block(gpa, BLOCK_SIZE)?;
        let (addr, _) = self.span(gpa, BLOCK_SIZE)?;
        let mut st = self.lock();
        let b = gpa / BLOCK_SIZE;
        if !st.get(b) || st.blocks.get(&b) != Some(&from) {
            return Err(MemoryError::NotPlaced {
                gpa,
                len: BLOCK_SIZE,
            });
        }
        self.backing.relocate(addr, from, to)?;
        st.blocks.insert(b, to);
        Ok(())
    }

    /// Register an observer of block removals (held weakly: it stops being called once
    /// dropped).
    pub fn add_observer(&self, o: Weak<dyn BlockObserver>) {
        self.observers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(o);
    }

    /// The pool block behind the placed 2 MiB block holding `gpa` (file backings always; the
    /// anonymous backing when the blocks were passed to [`GuestWindow::place`]).
    pub fn pool_block(&self, gpa: u64) -> Option<PoolBlock> {
        self.lock().blocks.get(&(gpa / BLOCK_SIZE)).copied()
    }

    /// Whether the 2 MiB block holding `gpa` is placed.
    pub fn is_placed(&self, gpa: u64) -> bool {
        self.lock().get(gpa / BLOCK_SIZE)
    }

    /// Whether every 2 MiB block of `[gpa, gpa+len)` is placed (false for an empty range).
    pub fn is_range_placed(&self, gpa: u64, len: u64) -> bool {
        let st = self.lock();
        len > 0
            && (gpa / BLOCK_SIZE..gpa.saturating_add(len).div_ceil(BLOCK_SIZE)).all(|b| st.get(b))
    }

    /// Bytes currently placed.
    pub fn placed_bytes(&self) -> u64 {
        self.lock().placed_blocks * BLOCK_SIZE
    }

    /// Placement generation: changes whenever a block is placed or removed.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Placed runs, coalesced, in address order.
    pub fn placed_ranges(&self) -> Vec<Range<u64>> {
        let st = self.lock();
        let mut v: Vec<Range<u64>> = Vec::new();
        let blocks = self.size as u64 / BLOCK_SIZE;
        for b in 0..blocks {
            if !st.get(b) {
                continue;
            }
            let start = b * BLOCK_SIZE;
            match v.last_mut() {
                Some(last) if last.end == start => last.end = start + BLOCK_SIZE,
                _ => v.push(start..start + BLOCK_SIZE),
            }
        }
        v
    }

    /// Host memory resident behind `[gpa, gpa+len)`, in bytes (from `mincore`). `gpa` and
    /// `len` must be 4 KiB aligned and inside the window. For a memfd backing, `mincore` on the
    /// shared mapping reports the pool file's page-cache residency at the mapped offsets; each
    /// offset is mapped by one window only, so that is this VM's memory. For hugetlbfs it
    /// reports present huge-page table entries (blocks are populated when placed).
    pub fn resident_bytes(&self, gpa: u64, len: u64) -> Result<u64, MemoryError> {
        if gpa % HOST_PAGE as u64 != 0 || len % HOST_PAGE as u64 != 0 {
            return Err(MemoryError::Unaligned { gpa, len });
        }
        let (addr, len) = self.span(gpa, len)?;
        let mut total = 0u64;
        let mut vec = vec![0u8; MINCORE_CHUNK / HOST_PAGE];
        let mut off = 0usize;
        while off < len {
            let n = (len - off).min(MINCORE_CHUNK);
            // SAFETY: [addr+off, addr+off+n) lies inside our mapping and `vec` has room for one
            // byte per page of it.
            let rc = unsafe {
                libc::mincore(
                    (addr + off) as *mut libc::c_void,
                    n,
                    vec.as_mut_ptr() as *mut libc::c_uchar,
                )
            };
            if rc != 0 {
                return Err(MemoryError::last_os("mincore"));
            }
            total += vec[..n / HOST_PAGE].iter().filter(|b| *b & 1 != 0).count() as u64;
            off += n;
        }
        Ok(total * HOST_PAGE as u64)
    }

    /// A vm-memory view of the currently placed blocks, for device models. The view keeps the
    /// window alive. It is a snapshot: after a block is removed, build a new view (compare
    /// [`WindowMemory::generation`] with [`GuestWindow::generation`]); touching a removed block
    /// through a stale view faults.
    pub fn guest_memory(self: &Arc<Self>) -> Result<WindowMemory, MemoryError> {
        self.view(None)
    }

    /// Like [`GuestWindow::guest_memory`], but without `[gpa, gpa+len)` even where it is still
    /// placed: the view device models get just before that range is removed, so that none of
    /// them can reach it through a view while it becomes inaccessible.
    pub fn guest_memory_without(
        self: &Arc<Self>,
        gpa: u64,
        len: u64,
    ) -> Result<WindowMemory, MemoryError> {
        self.view(Some(gpa..gpa.saturating_add(len)))
    }

    fn view(self: &Arc<Self>, skip: Option<Range<u64>>) -> Result<WindowMemory, MemoryError> {
        let generation = self.generation();
        let mut regions = Vec::new();
        let pieces = self.placed_ranges().into_iter().flat_map(|r| match &skip {
            // What is left of `r` on either side of `skip`.
            Some(k) => vec![r.start..r.end.min(k.start), r.start.max(k.end)..r.end],
            None => vec![r],
        });
        for r in pieces.filter(|r| r.start < r.end) {
            let len = (r.end - r.start) as usize;
            let host = self.base + r.start as usize;
            // SAFETY: [host, host+len) is a placed (read-write) part of the window mapping, which
            // outlives the region because `WindowMemory` holds an Arc to the window. The region
            // is not owned (`build_raw`), so vm-memory never unmaps it.
            let mmap = unsafe {
                MmapRegion::build_raw(
                    host as *mut u8,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                )
            }
            .map_err(|e| MemoryError::GuestMemory(e.to_string()))?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(r.start))
                .ok_or_else(|| MemoryError::GuestMemory(format!("region {r:x?} overflows")))?;
            regions.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::GuestMemory(e.to_string()))?;
        Ok(WindowMemory {
            mem,
            generation,
            _window: Arc::clone(self),
        })
    }
}

impl Drop for GuestWindow {
    fn drop(&mut self) {
        // A file backing's pages outlive the mapping (they belong to the shared pool file):
        // punch every placed block's hole before the window goes, so the offsets read zeros to
        // their next user even if the caller never removed them.
        if self.backing.needs_pool_blocks() {
            let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
            let blocks: Vec<(u64, PoolBlock)> =
                std::mem::take(&mut st.blocks).into_iter().collect();
            for (b, pb) in blocks {
                let addr = self.base + (b * BLOCK_SIZE) as usize;
                if let Err(e) = self.backing.remove(addr, BLOCK_SIZE as usize, &[pb]) {
                    tracing::error!(error = %e, "dropping a file-backed window block failed");
                }
            }
        }
        // SAFETY: the window owns [base, base+size); every view of it (WindowMemory) holds an
        // Arc, so none is left when this runs; KVM memslots are deleted by the VM before it drops
        // its Arc.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
    }
}

/// A vm-memory [`GuestMemoryMmap`] over the placed blocks of a window (derefs to it), keeping
/// the window mapped while it lives.
#[derive(Debug)]
pub struct WindowMemory {
    mem: GuestMemoryMmap,
    generation: u64,
    _window: Arc<GuestWindow>,
}

impl WindowMemory {
    /// The window generation this view was built at.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl std::ops::Deref for WindowMemory {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::{LayoutConfig, GIB, MIB};
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn window(boot: u64, hotplug: u64) -> Arc<GuestWindow> {
        let layout = Layout::new(LayoutConfig {
            boot_ram: boot,
            hotplug_size: hotplug,
        })
        .expect("layout");
        Arc::new(GuestWindow::new(layout).expect("window"))
    }

    #[test]
    fn window_is_aligned_and_boot_ram_placed() {
        let w = window(64 * MIB, 256 * MIB);
        assert_eq!(w.host_range().start % BLOCK_SIZE as usize, 0);
        assert_eq!(w.placed_bytes(), 64 * MIB);
        assert_eq!(w.placed_ranges(), vec![0..64 * MIB]);
        assert!(w.is_placed(0));
        assert!(!w.is_placed(64 * MIB));
        assert!(!w.is_placed(4 * GIB));
        // Nothing resident before the first touch.
        assert_eq!(w.resident_bytes(0, 64 * MIB).ok(), Some(0));
    }

    #[test]
    fn place_write_remove_reads_zero_again() {
        let w = window(16 * MIB, 256 * MIB);
        let hp = w.layout().hotplug().expect("hotplug");
        w.place_block(hp.start, 4 * MIB).expect("place");
        assert!(matches!(
            w.place_block(hp.start + 2 * MIB, 2 * MIB),
            Err(MemoryError::AlreadyPlaced { .. })
        ));
        let mem = w.guest_memory().expect("view");
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xdead_beef_u64, GuestAddress(hp.start + 8))
            .expect("write");
        assert!(w.resident_bytes(hp.start, 2 * MIB).expect("mincore") >= 4096);
        drop(mem);
        w.remove_block(hp.start, 4 * MIB).expect("remove");
        assert_eq!(w.resident_bytes(hp.start, 4 * MIB).ok(), Some(0));
        assert!(matches!(
            w.remove_block(hp.start, 2 * MIB),
            Err(MemoryError::NotPlaced { .. })
        ));
        w.place_block(hp.start, 2 * MIB).expect("place again");
        let mem = w.guest_memory().expect("view");
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(hp.start + 8)).ok(),
            Some(0)
        );
        assert_eq!(mem.generation(), w.generation());
    }

    #[test]
    fn hole_and_outside_are_refused() {
        let w = window(16 * MIB, 128 * MIB);
        assert!(w.place_block(3 * GIB, 2 * MIB).is_err());
        assert!(w.place_block(16 * MIB, 2 * MIB).is_err());
        assert!(w.remove_block(0, MIB).is_err());
        assert!(w.resident_bytes(0, 100).is_err());
        assert!(w.resident_bytes(w.layout().end(), 4096).is_err());
    }

    #[test]
    fn two_windows_do_not_overlap() {
        let a = window(32 * MIB, 0);
        let b = window(32 * MIB, 0);
        let (ra, rb) = (a.host_range(), b.host_range());
        assert!(ra.end <= rb.start || rb.end <= ra.start);
        let (ma, mb) = (a.guest_memory().expect("a"), b.guest_memory().expect("b"));
        ma.write_obj(1u64, GuestAddress(0)).expect("write a");
        mb.write_obj(2u64, GuestAddress(0)).expect("write b");
        assert_eq!(ma.read_obj::<u64>(GuestAddress(0)).ok(), Some(1));
        assert_eq!(mb.read_obj::<u64>(GuestAddress(0)).ok(), Some(2));
    }
}
