//! A minimal userfaultfd wrapper: the kernel ABI of `<linux/userfaultfd.h>` (API handshake,
//! register/unregister, COPY, ZEROPAGE, WRITEPROTECT, WAKE, message reads), written against the
//! documented UAPI.
//!
//! Why not the `userfaultfd` crate: its `-sys` crate generates bindings with bindgen at build
//! time, which needs libclang; this machine (and a fresh CI machine) has none, so the crate does
//! not build here. The part of the ABI Tidepool needs is a dozen plain structs and ioctl numbers.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// ioctl type byte of userfaultfd.
const UFFDIO: u64 = 0xAA;
/// API version of the handshake.
const UFFD_API: u64 = 0xAA;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>());
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>());

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults are reported.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;

const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;
const COPY_MODE_DONTWAKE: u64 = 1 << 0;
const COPY_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

const EVENT_PAGEFAULT: u8 = 0x12;
/// Fault flag: the access was a write.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// Fault flag: a write-protect fault (the page is present and write-protected).
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `struct uffd_msg` (32 bytes): event byte, padding, then the page-fault arguments.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    feat: u64,
}

/// One page fault read from the descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Faulting host address (page-aligned by the kernel unless EXACT_ADDRESS is asked for).
    pub addr: u64,
    /// `PAGEFAULT_FLAG_*` bits.
    pub flags: u64,
}

impl Fault {
    /// A write-protect fault (page present).
    pub fn is_wp(&self) -> bool {
        self.flags & PAGEFAULT_FLAG_WP != 0
    }
    /// The access was a write.
    pub fn is_write(&self) -> bool {
        self.flags & PAGEFAULT_FLAG_WRITE != 0
    }
}

/// A userfaultfd descriptor, non-blocking, handling kernel-mode faults too (KVM's and
/// `copy_from_user`'s), with missing and write-protect faults reported.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Open a descriptor (the `userfaultfd` syscall; handling kernel faults needs
    /// CAP_SYS_PTRACE or `vm.unprivileged_userfaultfd=1`) and do the API handshake asking for
    /// write-protect fault reports.
    pub fn new() -> io::Result<Uffd> {
        // SAFETY: the syscall takes one flags argument and returns a new descriptor or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor the kernel just gave us and nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        let uffd = Uffd { fd };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: FEATURE_PAGEFAULT_FLAG_WP,
            ioctls: 0,
        };
        uffd.ioctl(UFFDIO_API, &mut api)?;
        Ok(uffd)
    }

    fn ioctl<T>(&self, req: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: `arg` is the #[repr(C)] struct the request number encodes (its size is in
        // the number), valid for reads and writes for the duration of the call.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) })
    }

    /// Register `[start, start+len)` for missing and write-protect faults.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_MISSING | REGISTER_MODE_WP,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut r)
    }

    /// Unregister the range; threads blocked on faults in it are woken.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        self.ioctl(UFFDIO_UNREGISTER, &mut r)
    }

    /// Wake threads blocked on faults in the range (they retry their access).
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        self.ioctl(UFFDIO_WAKE, &mut r)
    }

    /// Atomically map a copy of `src[..len]` at `dst` (which must be unpopulated), optionally
    /// write-protected, optionally without waking the faulting threads.
    pub fn copy(&self, dst: u64, src: *const u8, len: u64, wp: bool, wake: bool) -> io::Result<()> {
        let mut mode = 0;
        if wp {
            mode |= COPY_MODE_WP;
        }
        if !wake {
            mode |= COPY_MODE_DONTWAKE;
        }
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode,
            copy: 0,
        };
        self.ioctl(UFFDIO_COPY, &mut c)
    }

    /// Map the zero page over the (unpopulated) range and wake.
    pub fn zeropage(&self, start: u64, len: u64) -> io::Result<()> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: 0,
            zeropage: 0,
        };
        self.ioctl(UFFDIO_ZEROPAGE, &mut z)
    }

    /// Set (`on`) or clear write protection on the range; clearing also wakes waiters.
    pub fn write_protect(&self, start: u64, len: u64, on: bool) -> io::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if on { WRITEPROTECT_MODE_WP } else { 0 },
        };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut w)
    }

    /// Read pending page faults (non-blocking): up to `out.capacity()` of them; other events
    /// are skipped. Returns 0 when none is pending.
    pub fn read_faults(&self, out: &mut Vec<Fault>, max: usize) -> io::Result<usize> {
        let mut buf = [UffdMsg::default(); 32];
        let n = buf.len().min(max.max(1));
        // SAFETY: `buf` is valid for `n` messages of 32 bytes each.
        let rc = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                n * std::mem::size_of::<UffdMsg>(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(0);
            }
            return Err(e);
        }
        let got = rc as usize / std::mem::size_of::<UffdMsg>();
        let mut faults = 0;
        for m in &buf[..got] {
            if m.event == EVENT_PAGEFAULT {
                out.push(Fault {
                    addr: m.address,
                    flags: m.flags,
                });
                faults += 1;
            }
        }
        Ok(faults)
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes_and_numbers() {
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        // Values from the UAPI header, as the C macros expand them.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
    }
}
