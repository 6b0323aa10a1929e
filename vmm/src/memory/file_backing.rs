//! The file backings ([`BackingKind::Memfd`], [`BackingKind::Hugetlbfs`]): one pool file per
//! host NUMA node ([`PoolFile`], [`PoolFiles`]) and [`FileBacking`], which maps pool blocks
//! from it into a VM's window (see [`super::backing`] for the whole picture).

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use guest_mm::frame::NodeId;

use super::backing::{madvise, AnonymousBacking, Backing, BackingKind, BackingSpec, PoolBlock};
use super::layout::BLOCK_SIZE;
use super::numa::{self, HostNuma, MemPolicy, ThreadPolicy};
use super::MemoryError;

/// One node's pool file.
#[derive(Debug)]
pub struct PoolFile {
    fd: OwnedFd,
    kind: BackingKind,
    node: NodeId,
    /// Current file size; grown (never shrunk) to cover the blocks mapped so far.
    size: Mutex<u64>,
}

impl PoolFile {
    fn create(kind: BackingKind, node: NodeId) -> Result<PoolFile, MemoryError> {
        let name = CString::new(format!("tidepool-{}-node{}", kind.name(), node.0))
            .map_err(|_| MemoryError::Unsupported("pool file name".into()))?;
        let flags = match kind {
            BackingKind::Memfd => libc::MFD_CLOEXEC,
            BackingKind::Hugetlbfs => libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            BackingKind::Anonymous => {
                return Err(MemoryError::Unsupported(
                    "the anonymous backing has no pool file".into(),
                ))
            }
        };
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create only reads it.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if fd < 0 {
            return Err(MemoryError::last_os("memfd_create"));
        }
        // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(PoolFile {
            fd,
            kind,
            node,
            size: Mutex::new(0),
        })
    }

    /// The backing kind of this file.
    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// The node this file serves.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Make the file at least `end` bytes long (sparse: no memory is used).
    fn ensure_size(&self, end: u64) -> Result<(), MemoryError> {
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
        if end <= *size {
            return Ok(());
        }
        let len = i64::try_from(end).map_err(|_| MemoryError::HostAddressSpace(end))?;
        // SAFETY: ftruncate on a descriptor this object owns; growing a memfd only changes its
        // size, existing pages and mappings are untouched.
        let rc = unsafe { libc::ftruncate(self.fd.as_raw_fd(), len) };
        if rc != 0 {
            return Err(MemoryError::last_os("ftruncate"));
        }
        *size = end;
        Ok(())
    }

    /// `fallocate(mode)` on `[off, off+len)`.
    fn fallocate(
        &self,
        mode: i32,
        off: u64,
        len: u64,
        call: &'static str,
    ) -> Result<(), MemoryError> {
        let off = i64::try_from(off).map_err(|_| MemoryError::HostAddressSpace(off))?;
        let len = i64::try_from(len).map_err(|_| MemoryError::HostAddressSpace(len))?;
        // SAFETY: fallocate on a descriptor this object owns, with a range checked to fit i64;
        // it changes file content only, which no Rust reference points into.
        let rc = unsafe { libc::fallocate(self.fd.as_raw_fd(), mode, off, len) };
        if rc != 0 {
            return Err(MemoryError::last_os(call));
        }
        Ok(())
    }

    /// Punch a hole: free the file's pages in `[off, off+len)`; they read as zeros after.
    pub fn punch_hole(&self, off: u64, len: u64) -> Result<(), MemoryError> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
            "fallocate(PUNCH_HOLE)",
        )
    }

    /// Read `buf.len()` bytes at `off` (holes read as zeros); returns the bytes read (for
    /// checks and tests: the VMs reach the file through their windows).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, MemoryError> {
        let o = libc::off_t::try_from(off).map_err(|_| MemoryError::HostAddressSpace(off))?;
        // SAFETY: pread on a descriptor this object owns into `buf`, which is valid and
        // writable for `buf.len()` bytes.
        let n = unsafe { libc::pread(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), o) };
        if n < 0 {
            return Err(MemoryError::last_os("pread"));
        }
        Ok(n as usize)
    }

    /// Bytes of the file that hold pages (memfd: page cache and swap; for tests and figures).
    pub fn allocated_bytes(&self) -> Result<u64, MemoryError> {
        // SAFETY: fstat on a descriptor this object owns into a zeroed stat buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid, writable stat buffer for the duration of the call.
        let rc = unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) };
        if rc != 0 {
            return Err(MemoryError::last_os("fstat"));
        }
        Ok(st.st_blocks as u64 * 512)
    }
}

/// The pool files of a daemon: one per (backing kind, node), made on first use and shared by
/// every VM whose blocks come from the same pool. Use one `PoolFiles` per pool: offsets are
/// frame numbers, unique only within one pool.
#[derive(Debug, Default)]
pub struct PoolFiles {
    files: Mutex<HashMap<(BackingKind, NodeId), Arc<PoolFile>>>,
}

impl PoolFiles {
    /// An empty set of pool files.
    pub fn new() -> Arc<PoolFiles> {
        Arc::new(PoolFiles::default())
    }

    /// The file of `kind` for `node`, made on first use.
    pub fn file(&self, kind: BackingKind, node: NodeId) -> Result<Arc<PoolFile>, MemoryError> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = files.get(&(kind, node)) {
            return Ok(Arc::clone(f));
        }
        let f = Arc::new(PoolFile::create(kind, node)?);
        files.insert((kind, node), Arc::clone(&f));
        Ok(f)
    }

    /// The backing `spec` asks for, over these files (the anonymous backing needs none).
    pub fn backing(self: &Arc<Self>, spec: BackingSpec) -> Result<Arc<dyn Backing>, MemoryError> {
        spec.validate()?;
        Ok(match spec.kind {
            BackingKind::Anonymous => Arc::new(AnonymousBacking::new(spec.thp)),
            BackingKind::Memfd | BackingKind::Hugetlbfs => Arc::new(FileBacking {
                spec,
                files: Arc::clone(self),
            }),
        })
    }
}

/// The memfd and hugetlbfs backings: pool blocks are pieces of per-node pool files.
#[derive(Debug)]
pub struct FileBacking {
    spec: BackingSpec,
    files: Arc<PoolFiles>,
}

/// Map fresh `PROT_NONE` anonymous memory over `[addr, addr+len)` (replacing whatever was
/// mapped there), with the window's flags, so the range holds no page of any file.
fn unmap_to_reservation(addr: usize, len: usize, thp: bool) -> Result<(), MemoryError> {
    // SAFETY: [addr, addr+len) lies inside a window mapping the caller owns; MAP_FIXED replaces
    // exactly that range with a fresh inaccessible reservation, and no Rust reference points
    // into it.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(MemoryError::last_os("mmap(PROT_NONE, MAP_FIXED)"));
    }
    let advice = if thp {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    // Same flags as the rest of the reservation, so the VMAs merge again.
    madvise(addr, len, advice, "madvise(MADV_(NO)HUGEPAGE)")?;
    madvise(addr, len, libc::MADV_DONTDUMP, "madvise(MADV_DONTDUMP)")
}

impl FileBacking {
    fn hugetlb(&self) -> bool {
        self.spec.kind == BackingKind::Hugetlbfs
    }

    /// Runs of blocks that are contiguous in the same file: (index of first block, count).
    fn runs(blocks: &[PoolBlock]) -> Result<Vec<(usize, usize)>, MemoryError> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            let off = b.file_offset()?;
            if let Some((first, n)) = runs.last_mut() {
                let f = blocks[*first];
                if f.node == b.node && f.file_offset()? + *n as u64 * BLOCK_SIZE == off {
                    *n += 1;
                    continue;
                }
            }
            runs.push((i, 1));
        }
        Ok(runs)
    }

    fn place_run(&self, addr: usize, blocks: &[PoolBlock]) -> Result<(), MemoryError> {
        let Some(first) = blocks.first() else {
            return Ok(());
        };
        let file = self.files.file(self.spec.kind, first.node)?;
        let off = first.file_offset()?;
        let len = blocks.len() as u64 * BLOCK_SIZE;
        file.ensure_size(off + len)?;
        let multi_node = HostNuma::get().is_multi_node();
        if self.hugetlb() {
            // Allocate the huge pages now: a host without them answers ENOSPC here, not with a
            // SIGBUS at the guest's first touch. hugetlbfs's fallocate allocates under the
            // calling thread's policy (no mapping is involved), so on a multi-node host the
            // thread is bound to the file's node for the call.
            let bound = if multi_node {
                Some(ThreadPolicy::set(&MemPolicy::Bind(vec![first.node]))?)
            } else {
                None
            };
            let allocated = file.fallocate(0, off, len, "fallocate(hugetlbfs)");
            drop(bound);
            if let Err(e) = allocated {
                let _ = file.punch_hole(off, len);
                return Err(match e {
                    MemoryError::Host { source, .. } => {
                        MemoryError::HugePages { bytes: len, source }
                    }
                    other => other,
                });
            }
        }
        let mut flags = libc::MAP_SHARED | libc::MAP_FIXED;
        if self.hugetlb() {
            // The pages exist already; fill the page tables so mincore sees them (it reports
            // present huge PTEs for hugetlbfs mappings).
            flags |= libc::MAP_POPULATE;
        }
        // SAFETY: [addr, addr+len) lies inside the caller's window (2 MiB aligned); MAP_FIXED
        // replaces exactly that range with the pool file's pages at `off`, which belong to
        // blocks the pool gave this VM alone. No Rust reference points into the range.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.fd.as_raw_fd(),
                off as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            let e = MemoryError::last_os("mmap(MAP_SHARED, MAP_FIXED)");
            if self.hugetlb() {
                let _ = file.punch_hole(off, len);
            }
            return Err(e);
        }
        if multi_node {
            // On a shared memfd mapping this sets the file's shared policy for these offsets:
            // the pages of this node's pool file are allocated on the node, whichever window
            // (or device model) faults them in. Before any touch of the new mapping.
            if let Err(e) = numa::bind_range(addr, len as usize, first.node, false) {
                let _ = unmap_to_reservation(addr, len as usize, self.spec.thp);
                if self.hugetlb() {
                    let _ = file.punch_hole(off, len);
                }
                return Err(e.into());
            }
        }
        let advise = if self.spec.thp {
            madvise(
                addr,
                len as usize,
                libc::MADV_HUGEPAGE,
                "madvise(MADV_HUGEPAGE)",
            )
        } else {
            Ok(())
        };
        advise.and_then(|()| {
            madvise(
                addr,
                len as usize,
                libc::MADV_DONTDUMP,
                "madvise(MADV_DONTDUMP)",
            )
        })
    }

    fn punch_blocks(&self, blocks: &[PoolBlock]) -> Result<(), MemoryError> {
        let mut first_err = None;
        for (i, n) in Self::runs(blocks)? {
            let b = blocks[i];
            let r = self
                .files
                .file(self.spec.kind, b.node)
                .and_then(|f| f.punch_hole(b.file_offset()?, n as u64 * BLOCK_SIZE));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Backing for FileBacking {
    fn spec(&self) -> BackingSpec {
        self.spec
    }

    fn place(&self, addr: usize, len: usize, blocks: &[PoolBlock]) -> Result<(), MemoryError> {
        if blocks.len() as u64 * BLOCK_SIZE != len as u64 {
            return Err(MemoryError::PoolBlocks {
                expected: len as u64 / BLOCK_SIZE,
                got: blocks.len() as u64,
            });
        }
        let step = BLOCK_SIZE as usize;
        for (i, n) in Self::runs(blocks)? {
            if let Err(e) = self.place_run(addr + i * step, &blocks[i..i + n]) {
                // Undo the runs placed so far (and this one): nothing stays mapped.
                let _ = self.remove(addr, (i + n) * step, &blocks[..i + n]);
                return Err(e);
            }
        }
        Ok(())
    }

    fn remove(&self, addr: usize, len: usize, blocks: &[PoolBlock]) -> Result<(), MemoryError> {
        // First the range leaves this window (and, through the MMU notifier, KVM): then no VM
        // maps the file pages, and punching the hole frees them, so the next VM that gets these
        // offsets reads zeros.
        unmap_to_reservation(addr, len, self.spec.thp)?;
        self.punch_blocks(blocks)
    }

    fn discard(
        &self,
        addr: usize,
        len: usize,
        at: Option<(PoolBlock, u64)>,
    ) -> Result<(), MemoryError> {
        let _ = addr;
        if self.hugetlb() {
            return Err(MemoryError::Unsupported(
                "discard on hugetlbfs backing: its huge pages stay reserved for the VM (a refault \
                 could find the host's huge page pool empty); shrink it through virtio-mem"
                    .into(),
            ));
        }
        let (block, within) = at.ok_or(MemoryError::Unsupported(
            "discard on a file backing needs the pool block".into(),
        ))?;
        let file = self.files.file(self.spec.kind, block.node)?;
        file.punch_hole(block.file_offset()? + within, len as u64)
    }

    fn relocate(&self, addr: usize, from: PoolBlock, to: PoolBlock) -> Result<(), MemoryError> {
        let src = self.files.file(self.spec.kind, from.node)?;
        let dst = self.files.file(self.spec.kind, to.node)?;
        let (src_off, dst_off) = (from.file_offset()?, to.file_offset()?);
        dst.ensure_size(dst_off + BLOCK_SIZE)?;
        // The target's pages are allocated by the fallocate (hugetlbfs) or the copy's own
        // mapping, neither of which carries the node's binding yet: on a multi-node host the
        // thread allocates on `to`'s node meanwhile.
        let _bound = if HostNuma::get().is_multi_node() {
            Some(ThreadPolicy::set(&MemPolicy::Bind(vec![to.node]))?)
        } else {
            None
        };
        if self.hugetlb() {
            dst.fallocate(0, dst_off, BLOCK_SIZE, "fallocate(hugetlbfs)")
                .map_err(|e| match e {
                    MemoryError::Host { source, .. } => MemoryError::HugePages {
                        bytes: BLOCK_SIZE,
                        source,
                    },
                    other => other,
                })?;
        }
        let copied = copy_data_runs(addr, &src, src_off, &dst, dst_off);
        // The new offset maps over the range (the old mapping goes with MAP_FIXED, which also
        // zaps KVM's mappings of it through the MMU notifier).
        let placed = copied.and_then(|()| self.place_run(addr, &[to]));
        if let Err(e) = placed {
            let _ = dst.punch_hole(dst_off, BLOCK_SIZE);
            // A failed MAP_FIXED may have unmapped the range: map the old offset back.
            let _ = self.place_run(addr, &[from]);
            return Err(e);
        }
        // No window maps `from` any more: free its pages.
        src.punch_hole(src_off, BLOCK_SIZE)
    }

    fn huge_page_size(&self) -> Option<u64> {
        match self.spec.kind {
            BackingKind::Hugetlbfs => Some(BLOCK_SIZE),
            _ if self.spec.thp && shmem_thp_enabled() => Some(BLOCK_SIZE),
            _ => None,
        }
    }
}

/// Copy the data of the 2 MiB block mapped at `addr` (backed by `src` at `src_off`) into `dst`
/// at `dst_off`, run by run: only the file's data runs (`SEEK_DATA`/`SEEK_HOLE`) are copied,
/// so holes (never written, discarded by the balloon or free page reporting) stay holes and
/// cost nothing. The destination is written through a temporary shared mapping (hugetlbfs
/// files take no `write`).
fn copy_data_runs(
    addr: usize,
    src: &PoolFile,
    src_off: u64,
    dst: &PoolFile,
    dst_off: u64,
) -> Result<(), MemoryError> {
    let len = BLOCK_SIZE as usize;
    let dst_off_t =
        libc::off_t::try_from(dst_off).map_err(|_| MemoryError::HostAddressSpace(dst_off))?;
    // SAFETY: a fresh shared mapping of 2 MiB of `dst` at an address the kernel chooses; it
    // aliases no Rust object and is unmapped below.
    let tmp = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            dst.fd.as_raw_fd(),
            dst_off_t,
        )
    };
    if tmp == libc::MAP_FAILED {
        return Err(MemoryError::last_os("mmap(relocation target)"));
    }
    let result = (|| {
        let end = src_off + BLOCK_SIZE;
        let mut at = src_off;
        while at < end {
            let Some(data) = seek(src, at, libc::SEEK_DATA)? else {
                break;
            };
            if data >= end {
                break;
            }
            let hole = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            let (rel, n) = ((data - src_off) as usize, (hole - data) as usize);
            // SAFETY: [addr+rel, +n) lies in the caller's placed block (mapping `src` at
            // `src_off`) and [tmp+rel, +n) in the temporary mapping; the two never overlap, and
            // the caller keeps every other writer of the block stopped.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (addr + rel) as *const u8,
                    (tmp as usize + rel) as *mut u8,
                    n,
                )
            };
            at = hole;
        }
        Ok(())
    })();
    // SAFETY: `tmp` is the 2 MiB mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(tmp, len) };
    result
}

/// `lseek(whence)` on the pool file from `off`; None when there is no data after `off`
/// (`ENXIO`).
fn seek(file: &PoolFile, off: u64, whence: i32) -> Result<Option<u64>, MemoryError> {
    let o = libc::off_t::try_from(off).map_err(|_| MemoryError::HostAddressSpace(off))?;
    // SAFETY: lseek on a descriptor the file owns; it only moves the file position.
    let r = unsafe { libc::lseek(file.fd.as_raw_fd(), o, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(MemoryError::Host {
            call: "lseek(SEEK_DATA/SEEK_HOLE)",
            source: e,
        });
    }
    Ok(Some(r as u64))
}

/// Whether the host gives shared memory (memfd) huge pages to a `MADV_HUGEPAGE` mapping:
/// `shmem_enabled` is `always`, `within_size` or `advise`.
pub fn shmem_thp_enabled() -> bool {
    std::fs::read_to_string(SHMEM_ENABLED).is_ok_and(|s| {
        ["[always]", "[within_size]", "[advise]", "[force]"]
            .iter()
            .any(|m| s.contains(m))
    })
}

/// The host's shmem THP setting.
pub const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
