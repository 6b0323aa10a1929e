//! The balloon's host side over the VM window: discarding goes through the window's backing
//! (`madvise(MADV_DONTNEED)` on the anonymous backing, `fallocate(PUNCH_HOLE)` in the pool file
//! for memfd, refused for hugetlbfs; the next guest touch reads zeroes), and residency is
//! `mincore` over the window (page-cache residency of the mapped offsets for memfd). Reports may cover boot RAM and the plugged blocks of the
//! virtio-mem region: both are the VM's RAM. A range of the region that is not plugged (not
//! placed in the window) is refused, so nothing outside what the VM holds is ever discarded.

use std::sync::Arc;

use tidepool_balloon::{BackendError, RamMap, ReclaimBackend, ResidencyProbe, HUGE_PAGE_SIZE};

use crate::memory::{GuestWindow, MemoryError};

const PAGE: u64 = 4096;

/// [`ReclaimBackend`] and [`ResidencyProbe`] over a VM's RAM in its window (boot RAM and
/// plugged virtio-mem blocks).
#[derive(Debug)]
pub struct WindowReclaim {
    window: Arc<GuestWindow>,
    ram: RamMap,
}

impl WindowReclaim {
    /// A backend over the boot RAM and the hot-plug region of `window`'s layout; within the
    /// region only placed (plugged) blocks can be discarded.
    pub fn new(window: Arc<GuestWindow>) -> Result<WindowReclaim, BackendError> {
        let layout = window.layout();
        let ranges: Vec<(u64, u64)> = layout
            .boot_ram_ranges()
            .into_iter()
            .chain(layout.hotplug())
            .map(|r| (r.start, r.end - r.start))
            .collect();
        let ram = RamMap::new(&ranges)?;
        Ok(WindowReclaim { window, ram })
    }

    /// Host address of `[gpa, gpa+len)` after checking it is the VM's RAM and placed.
    fn host_span(&self, gpa: u64, len: u64) -> Result<usize, BackendError> {
        if gpa % PAGE != 0 || len % PAGE != 0 {
            return Err(BackendError::Misaligned { gpa, len });
        }
        if !self.ram.contains(gpa, len) || !self.window.is_range_placed(gpa, len) {
            return Err(BackendError::NotGuestRam { gpa, len });
        }
        let host = self.window.host_addr(gpa);
        let end_ok = gpa
            .checked_add(len)
            .and_then(|e| self.window.host_addr(e - 1))
            .is_some();
        match host {
            Some(h) if end_ok => Ok(h),
            _ => Err(BackendError::NotGuestRam { gpa, len }),
        }
    }
}

fn os_err(op: &'static str, gpa: u64, len: u64) -> BackendError {
    BackendError::Os {
        op,
        gpa,
        len,
        errno: std::io::Error::last_os_error().to_string(),
    }
}

impl ReclaimBackend for WindowReclaim {
    fn discard(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        self.host_span(gpa, len)?;
        // The window checks placement again under its lock and picks the backing's primitive.
        // Guest memory is only accessed through volatile operations or by KVM, so dropping its
        // pages under a running guest is fine: the guest reads zeroes.
        self.window.discard(gpa, len).map_err(|e| match e {
            MemoryError::Unsupported(why) => BackendError::Unsupported(why),
            MemoryError::NotPlaced { .. } | MemoryError::OutOfRange { .. } => {
                BackendError::NotGuestRam { gpa, len }
            }
            MemoryError::Unaligned { .. } => BackendError::Misaligned { gpa, len },
            MemoryError::Host { call, source } => BackendError::Os {
                op: call,
                gpa,
                len,
                errno: source.to_string(),
            },
            other => BackendError::Os {
                op: "discard",
                gpa,
                len,
                errno: other.to_string(),
            },
        })
    }

    fn guest_ram(&self) -> &[(u64, u64)] {
        self.ram.ranges()
    }

    fn huge_page_size(&self) -> Option<u64> {
        // Anonymous with THP, hugetlbfs, and memfd when the host gives shmem huge pages.
        self.window
            .backing()
            .huge_page_size()
            .map(|_| HUGE_PAGE_SIZE)
    }
}

impl ResidencyProbe for WindowReclaim {
    fn residency(&self, gpa: u64, out: &mut [bool]) -> Result<(), BackendError> {
        let len = out.len() as u64 * PAGE;
        let host = self.host_span(gpa, len)?;
        let mut vec = vec![0u8; out.len()];
        // SAFETY: `[host, host+len)` lies inside the window mapping (checked by `host_span`)
        // and is page aligned; `vec` has one byte per page, as mincore requires.
        let rc =
            unsafe { libc::mincore(host as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(os_err("mincore", gpa, len));
        }
        for (o, v) in out.iter_mut().zip(vec) {
            *o = v & 1 != 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Layout, LayoutConfig, MIB};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn discard_drops_pages_and_stays_inside_the_vms_ram() {
        let layout = Layout::new(LayoutConfig {
            boot_ram: 8 * MIB,
            hotplug_size: 128 * MIB,
        })
        .expect("layout");
        let window = Arc::new(GuestWindow::new(layout).expect("window"));
        let mut r = WindowReclaim::new(Arc::clone(&window)).expect("backend");
        let hp = window.layout().hotplug().expect("region");
        assert_eq!(
            r.guest_ram(),
            &[(0, 8 * MIB), (hp.start, hp.end - hp.start)]
        );
        let mem = window.guest_memory().expect("view");
        for p in 0..16u64 {
            mem.write_obj(0xabcd_u64 + p, GuestAddress(2 * MIB + p * PAGE))
                .expect("write");
        }
        let mut res = vec![false; 16];
        r.residency(2 * MIB, &mut res).expect("mincore");
        assert!(res.iter().all(|x| *x));
        r.discard(2 * MIB, 8 * PAGE).expect("discard");
        r.residency(2 * MIB, &mut res).expect("mincore");
        assert!(res[..8].iter().all(|x| !*x), "{res:?}");
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(2 * MIB)).ok(),
            Some(0),
            "a discarded page reads zero"
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(2 * MIB + 8 * PAGE)).ok(),
            Some(0xabcd + 8)
        );
        // Outside the VM's RAM, unaligned, or in the unplugged part of the hot-plug region:
        // refused.
        let hp = hp.start;
        assert!(matches!(
            r.discard(hp, PAGE),
            Err(BackendError::NotGuestRam { .. })
        ));
        // A plugged block of the region is the VM's RAM: reports there are honoured.
        window.place_block(hp, 2 * MIB).expect("place");
        // A view taken after the plug covers the new block.
        let mem = window.guest_memory().expect("view after plug");
        mem.write_obj(0x5a5a_u64, GuestAddress(hp))
            .expect("write plugged");
        let mut one = [false];
        r.residency(hp, &mut one).expect("mincore");
        assert!(one[0]);
        r.discard(hp, 2 * MIB).expect("discard plugged block");
        r.residency(hp, &mut one).expect("mincore");
        assert!(!one[0], "a discarded plugged page is not resident");
        assert!(matches!(
            r.discard(hp + 2 * MIB, PAGE),
            Err(BackendError::NotGuestRam { .. })
        ));
        assert!(matches!(
            r.discard(8 * MIB - PAGE, 2 * PAGE),
            Err(BackendError::NotGuestRam { .. })
        ));
        assert!(matches!(
            r.discard(100, PAGE),
            Err(BackendError::Misaligned { .. })
        ));
        assert_eq!(r.huge_page_size(), Some(HUGE_PAGE_SIZE));
    }

    #[test]
    fn memfd_backed_discard_punches_the_pool_file() {
        use crate::memory::{BackingKind, BackingSpec, PoolBlock, PoolFiles};
        use guest_mm::frame::{FrameId, NodeId};
        let files = PoolFiles::new();
        let spec = BackingSpec {
            kind: BackingKind::Memfd,
            thp: true,
        };
        let backing = files.backing(spec).expect("backing");
        let layout = Layout::new(LayoutConfig {
            boot_ram: 4 * MIB,
            hotplug_size: 0,
        })
        .expect("layout");
        let blocks = [0u64, 1].map(|i| PoolBlock {
            frame: FrameId(i * 512),
            node: NodeId(0),
        });
        let window = Arc::new(GuestWindow::with_backing(layout, backing, &blocks).expect("window"));
        let mut r = WindowReclaim::new(Arc::clone(&window)).expect("backend");
        let file = files.file(BackingKind::Memfd, NodeId(0)).expect("file");
        let mem = window.guest_memory().expect("view");
        // Pages on both sides of the 2 MiB block boundary.
        for p in 508..516u64 {
            mem.write_obj(p, GuestAddress(p * PAGE)).expect("write");
        }
        assert_eq!(file.allocated_bytes().ok(), Some(8 * PAGE));
        // A report across the boundary is split per pool block and punched at the right offsets.
        r.discard(510 * PAGE, 4 * PAGE).expect("discard");
        let mut res = vec![false; 8];
        r.residency(508 * PAGE, &mut res).expect("mincore");
        assert_eq!(res, [true, true, false, false, false, false, true, true]);
        assert_eq!(file.allocated_bytes().ok(), Some(4 * PAGE));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(511 * PAGE)).ok(), Some(0));
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(514 * PAGE)).ok(),
            Some(514)
        );
        // THP on memfd only counts when the host's shmem_enabled gives shared huge pages.
        let huge = crate::memory::backing::shmem_thp_enabled();
        assert_eq!(r.huge_page_size(), huge.then_some(HUGE_PAGE_SIZE));
    }
}
