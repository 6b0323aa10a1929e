//! The real reclaim backend over the VM's `vm-memory` mappings: `madvise(MADV_DONTNEED)` on
//! private (anonymous) memory, `fallocate(PUNCH_HOLE)` on shared file (memfd) memory, where
//! DONTNEED would free nothing. Residency comes from `mincore`.

use crate::backend::{RamMap, ReclaimBackend, ResidencyProbe};
use crate::error::BackendError;
use crate::{HUGE_PAGE_SIZE, PAGE_SIZE};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

#[derive(Debug)]
struct HostRegion {
    gpa: u64,
    len: u64,
    /// Host virtual address of `gpa`.
    host: usize,
    /// Keeps the mapping alive for as long as the backend may touch it.
    _mapping: Arc<MmapRegion<()>>,
    /// For shared file mappings: the file and the offset of `gpa` in it.
    punch: Option<(Arc<File>, u64)>,
}

/// Discards guest RAM of a `GuestMemoryMmap` on the host.
#[derive(Debug)]
pub struct MmapBackend {
    ram: RamMap,
    regions: Vec<HostRegion>,
    huge: Option<u64>,
}

fn os_err(op: &'static str, gpa: u64, len: u64) -> BackendError {
    BackendError::Os {
        op,
        gpa,
        len,
        errno: std::io::Error::last_os_error().to_string(),
    }
}

impl MmapBackend {
    /// A backend over every region of `mem`.
    pub fn from_guest_memory(mem: &GuestMemoryMmap<()>) -> Result<Self, BackendError> {
        let all: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        Self::with_ram(mem, &all)
    }

    /// A backend that owns only `ram` (ranges inside `mem`'s regions), e.g. boot RAM without
    /// a virtio-mem region that another device manages.
    pub fn with_ram(mem: &GuestMemoryMmap<()>, ram: &[(u64, u64)]) -> Result<Self, BackendError> {
        let ram = RamMap::new(ram)?;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let mapping = r.get_mmap();
            let gpa = r.start_addr().0;
            let len = r.len();
            let host = mapping.as_ptr() as usize;
            if host % PAGE_SIZE as usize != 0 {
                return Err(BackendError::Unsupported(format!(
                    "region at {gpa:#x} is not page aligned on the host"
                )));
            }
            let shared = mapping.flags() & libc::MAP_SHARED != 0;
            let punch = match mapping.file_offset() {
                Some(fo) if shared => Some((Arc::clone(fo.arc()), fo.start())),
                _ => None,
            };
            regions.push(HostRegion {
                gpa,
                len,
                host,
                _mapping: mapping,
                punch,
            });
        }
        for &(gpa, len) in ram.ranges() {
            let inside = regions
                .iter()
                .any(|r| gpa >= r.gpa && gpa + len <= r.gpa + r.len);
            if !inside {
                return Err(BackendError::NotGuestRam { gpa, len });
            }
        }
        Ok(MmapBackend {
            ram,
            regions,
            huge: None,
        })
    }

    /// Ask for transparent huge pages (`MADV_HUGEPAGE`) on the private regions that cover the
    /// backend's RAM, and account discards in 2 MiB blocks. Shared (memfd) regions are left
    /// alone: shmem THP is a host-wide setting.
    pub fn advise_huge(&mut self) -> Result<(), BackendError> {
        for r in self.regions.iter().filter(|r| r.punch.is_none()) {
            // SAFETY: the range is exactly a live mapping this backend keeps alive; the advice
            // does not change its contents.
            let rc = unsafe {
                libc::madvise(
                    r.host as *mut libc::c_void,
                    r.len as usize,
                    libc::MADV_HUGEPAGE,
                )
            };
            if rc != 0 {
                return Err(os_err("madvise(MADV_HUGEPAGE)", r.gpa, r.len));
            }
        }
        self.huge = Some(HUGE_PAGE_SIZE);
        Ok(())
    }

    /// Whether every private region starts at a 2 MiB aligned host address (needed for THP to
    /// back guest 2 MiB blocks with whole huge pages).
    pub fn host_huge_aligned(&self) -> bool {
        self.regions
            .iter()
            .all(|r| (r.host as u64 % HUGE_PAGE_SIZE) == (r.gpa % HUGE_PAGE_SIZE))
    }

    /// Host address of `gpa` and its region, if `[gpa, gpa+len)` lies in one region.
    fn locate(&self, gpa: u64, len: u64) -> Option<&HostRegion> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|e| e <= r.gpa + r.len))
    }

    /// Host virtual address of guest address `gpa` (for tests and benchmarks).
    pub fn host_address(&self, gpa: u64) -> Option<*mut u8> {
        self.locate(gpa, 1)
            .map(|r| (r.host + (gpa - r.gpa) as usize) as *mut u8)
    }

    fn discard_in(&self, r: &HostRegion, gpa: u64, len: u64) -> Result<(), BackendError> {
        let off = gpa - r.gpa;
        match &r.punch {
            Some((file, file_off)) => {
                let pos = i64::try_from(file_off + off)
                    .map_err(|_| BackendError::NotGuestRam { gpa, len })?;
                let l = i64::try_from(len).map_err(|_| BackendError::NotGuestRam { gpa, len })?;
                // SAFETY: fallocate on a file descriptor the backend keeps open; punching a hole
                // only frees the file's blocks, and the shared mapping then reads zeroes.
                let rc = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        pos,
                        l,
                    )
                };
                if rc != 0 {
                    return Err(os_err("fallocate(PUNCH_HOLE)", gpa, len));
                }
            }
            None => {
                let addr = (r.host + off as usize) as *mut libc::c_void;
                // SAFETY: `[addr, addr+len)` lies inside a private mapping this backend keeps
                // alive (checked by `locate`); DONTNEED frees its pages and the next access
                // reads zeroes. Guest memory is only accessed through volatile operations, so
                // a concurrent content change is not undefined behaviour.
                let rc = unsafe { libc::madvise(addr, len as usize, libc::MADV_DONTNEED) };
                if rc != 0 {
                    return Err(os_err("madvise(MADV_DONTNEED)", gpa, len));
                }
            }
        }
        Ok(())
    }
}

impl ReclaimBackend for MmapBackend {
    fn discard(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(BackendError::Misaligned { gpa, len });
        }
        if !self.ram.contains(gpa, len) {
            return Err(BackendError::NotGuestRam { gpa, len });
        }
        for (a, l) in self.ram.split(gpa, len) {
            // A RAM range lies inside one region (checked at construction), so each piece does.
            let r = self
                .locate(a, l)
                .ok_or(BackendError::NotGuestRam { gpa: a, len: l })?;
            self.discard_in(r, a, l)?;
        }
        Ok(())
    }

    fn guest_ram(&self) -> &[(u64, u64)] {
        self.ram.ranges()
    }

    fn huge_page_size(&self) -> Option<u64> {
        self.huge
    }
}

impl ResidencyProbe for MmapBackend {
    fn residency(&self, gpa: u64, out: &mut [bool]) -> Result<(), BackendError> {
        let len = out.len() as u64 * PAGE_SIZE;
        if gpa % PAGE_SIZE != 0 {
            return Err(BackendError::Misaligned { gpa, len });
        }
        let r = self
            .locate(gpa, len)
            .ok_or(BackendError::NotGuestRam { gpa, len })?;
        let mut vec = vec![0u8; out.len()];
        let addr = (r.host + (gpa - r.gpa) as usize) as *mut libc::c_void;
        // SAFETY: `[addr, addr+len)` is inside a live mapping (checked by `locate`) and
        // page aligned; `vec` has one byte per page, as mincore requires.
        let rc = unsafe { libc::mincore(addr, len as usize, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(os_err("mincore", gpa, len));
        }
        for (o, v) in out.iter_mut().zip(vec) {
            *o = v & 1 != 0;
        }
        Ok(())
    }
}
