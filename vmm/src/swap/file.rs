//! [`SwapFile`]: the host file guest pages are written to, its slot allocator, clustered
//! writes, reads for swap-in, congestion back-off and counters.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::congestion::{Advice, Congestion, CongestionConfig};
use super::slots::{Slot, SlotMap};
use super::{SwapError, PAGE};

/// How the file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// `O_DIRECT`: pages go straight from guest memory to the device; nothing lands in the
    /// host page cache. The default.
    Direct,
    /// Buffered writes followed by `sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)` and
    /// `POSIX_FADV_DONTNEED` on the written range, so the page cache copy is dropped at once.
    /// Used when the file system refuses `O_DIRECT`.
    Buffered,
}

/// How to create a [`SwapFile`].
#[derive(Clone, Debug)]
pub struct SwapFileConfig {
    /// Path of the file (created, truncated; removed again when the `SwapFile` drops).
    pub path: PathBuf,
    /// Capacity in bytes (rounded down to 4 KiB slots; at most 2^29 slots).
    pub capacity: u64,
    /// `None`: try `O_DIRECT`, fall back to buffered.
    pub io: Option<IoMode>,
    /// Back-off tuning.
    pub congestion: CongestionConfig,
}

impl SwapFileConfig {
    /// Defaults for `path` with `capacity` bytes.
    pub fn new(path: impl Into<PathBuf>, capacity: u64) -> SwapFileConfig {
        SwapFileConfig {
            path: path.into(),
            capacity,
            io: None,
            congestion: CongestionConfig::default(),
        }
    }
}

/// A snapshot of a swap file's counters and back-off state.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct SwapFileCounters {
    /// Bytes written.
    pub bytes_written: u64,
    /// Write system calls.
    pub writes: u64,
    /// Clusters written: runs of contiguous guest pages placed in contiguous slots (each is
    /// one write).
    pub clusters: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Read system calls.
    pub reads: u64,
    /// Failed writes.
    pub write_errors: u64,
    /// Failed or short reads.
    pub read_errors: u64,
    /// Times the writer went from normal to throttled.
    pub throttle_events: u64,
    /// Total time slept by throttled writers, in microseconds.
    pub throttle_sleep_us: u64,
    /// Whether writes are throttled now.
    pub congested: bool,
    /// EWMA of write latency per 4 KiB page, nanoseconds.
    pub write_ewma_ns_per_page: u64,
    /// Baseline latency per page (lowest EWMA after warm-up), nanoseconds.
    pub write_baseline_ns_per_page: u64,
    /// Batch size the back-off currently allows, pages.
    pub batch_pages: u32,
    /// Slots in use.
    pub slots_used: u32,
    /// Slots in the file.
    pub slots_total: u32,
}

#[derive(Debug, Default)]
struct Atomics {
    bytes_written: AtomicU64,
    writes: AtomicU64,
    clusters: AtomicU64,
    bytes_read: AtomicU64,
    reads: AtomicU64,
    write_errors: AtomicU64,
    read_errors: AtomicU64,
    throttle_sleep_us: AtomicU64,
    /// Fault injection: this many upcoming reads (writes) fail with EIO.
    fail_reads: AtomicU64,
    fail_writes: AtomicU64,
    /// Fault injection: extra latency added to each write, microseconds.
    write_delay_us: AtomicU64,
}

/// A swap file shared by the VMs of one daemon. All methods take `&self`.
#[derive(Debug)]
pub struct SwapFile {
    file: File,
    path: PathBuf,
    mode: IoMode,
    slots: Mutex<SlotMap>,
    congestion: Mutex<Congestion>,
    c: Atomics,
}

/// A 4 KiB-aligned heap buffer (O_DIRECT needs aligned user buffers).
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain owned memory; access goes through &/&mut self.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `pages` zeroed pages.
    pub fn new(pages: usize) -> AlignedBuf {
        let len = pages.max(1) * PAGE as usize;
        // SAFETY: a fresh private anonymous mapping; page-aligned, zero-filled.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let ptr = if p == libc::MAP_FAILED {
            // Allocation failure is fatal like any other out-of-memory in Rust.
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(len, PAGE as usize)
                    .unwrap_or(std::alloc::Layout::new::<u8>()),
            )
        } else {
            p as *mut u8
        };
        AlignedBuf { ptr, len }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is our mapping, initialised (zero-filled by mmap).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and no borrow of it outlives self.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Largest number of slots a file may have (slot numbers are packed in 29 bits).
pub const MAX_SLOTS: u64 = 1 << 29;

impl SwapFile {
    /// Create (or truncate) the file at `cfg.path`.
    pub fn create(cfg: SwapFileConfig) -> Result<SwapFile, SwapError> {
        let slots = (cfg.capacity / PAGE).min(MAX_SLOTS);
        if slots == 0 {
            return Err(SwapError::Config(format!(
                "capacity {} is below one 4 KiB slot",
                cfg.capacity
            )));
        }
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600);
            if direct {
                o.custom_flags(libc::O_DIRECT | libc::O_CLOEXEC);
            } else {
                o.custom_flags(libc::O_CLOEXEC);
            }
            o.open(&cfg.path)
        };
        let io_err = |source| SwapError::Open {
            path: cfg.path.clone(),
            source,
        };
        let (file, mode) = match cfg.io {
            Some(IoMode::Direct) => (open(true).map_err(io_err)?, IoMode::Direct),
            Some(IoMode::Buffered) => (open(false).map_err(io_err)?, IoMode::Buffered),
            None => match open(true) {
                Ok(f) => (f, IoMode::Direct),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    (open(false).map_err(io_err)?, IoMode::Buffered)
                }
                Err(e) => return Err(io_err(e)),
            },
        };
        Ok(SwapFile {
            file,
            path: cfg.path,
            mode,
            slots: Mutex::new(SlotMap::new(slots as u32)),
            congestion: Mutex::new(Congestion::new(cfg.congestion)),
            c: Atomics::default(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The I/O mode in use.
    pub fn io_mode(&self) -> IoMode {
        self.mode
    }

    fn slots(&self) -> MutexGuard<'_, SlotMap> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cong(&self) -> MutexGuard<'_, Congestion> {
        self.congestion.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocate up to `want` contiguous slots (see `SlotMap::alloc_run`).
    pub fn alloc(&self, want: u32) -> Result<(Slot, u32), SwapError> {
        self.slots().alloc_run(want).ok_or(SwapError::Full)
    }

    /// Free slots (unknown or already free ones are ignored).
    pub fn free(&self, slots: impl IntoIterator<Item = Slot>) {
        let mut m = self.slots();
        for s in slots {
            m.free(s);
        }
    }

    /// Bytes of swap in use.
    pub fn used_bytes(&self) -> u64 {
        u64::from(self.slots().used()) * PAGE
    }

    /// What the back-off advises for the next write; sleeps first if throttled.
    pub fn pace(&self) -> Advice {
        let a = self.cong().advice();
        if !a.sleep.is_zero() {
            std::thread::sleep(a.sleep);
            self.c
                .throttle_sleep_us
                .fetch_add(a.sleep.as_micros() as u64, Ordering::Relaxed);
        }
        a
    }

    /// Write `pages` pages from `src` to slots `slot..slot+pages` in one system call (one
    /// cluster).
    ///
    /// # Safety
    /// `src..src + pages*4096` must be mapped readable memory for the duration of the call
    /// (it may change concurrently: the caller decides whether the copy is current), and 4 KiB
    /// aligned for [`IoMode::Direct`].
    pub(crate) unsafe fn write_raw(
        &self,
        slot: Slot,
        src: *const u8,
        pages: u32,
    ) -> Result<(), SwapError> {
        let len = pages as usize * PAGE as usize;
        let off = u64::from(slot) * PAGE;
        let t0 = Instant::now();
        let injected = take_one(&self.c.fail_writes);
        let delay = self.c.write_delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        let rc = if injected {
            -1
        } else {
            // SAFETY: the caller guarantees src..src+len is readable.
            unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    src as *const libc::c_void,
                    len,
                    off as i64,
                )
            }
        };
        self.c.writes.fetch_add(1, Ordering::Relaxed);
        if rc < 0 || rc as usize != len {
            self.c.write_errors.fetch_add(1, Ordering::Relaxed);
            let source = if injected {
                std::io::Error::from_raw_os_error(libc::EIO)
            } else if rc < 0 {
                std::io::Error::last_os_error()
            } else {
                std::io::Error::new(std::io::ErrorKind::WriteZero, "short write")
            };
            return Err(SwapError::Write { slot, source });
        }
        if self.mode == IoMode::Buffered {
            self.drop_cache(off, len)?;
        }
        let took = t0.elapsed();
        self.c
            .bytes_written
            .fetch_add(len as u64, Ordering::Relaxed);
        self.c.clusters.fetch_add(1, Ordering::Relaxed);
        self.cong().record(pages, took);
        Ok(())
    }

    /// Write `data` (a multiple of 4 KiB, 4 KiB aligned for direct I/O: use [`AlignedBuf`])
    /// to slots starting at `slot`.
    pub fn write_slots(&self, slot: Slot, data: &[u8]) -> Result<(), SwapError> {
        if data.len() as u64 % PAGE != 0 || (data.as_ptr() as u64) % PAGE != 0 {
            return Err(SwapError::Config("unaligned write buffer".into()));
        }
        // SAFETY: `data` is a readable, aligned slice for the call's duration.
        unsafe { self.write_raw(slot, data.as_ptr(), (data.len() as u64 / PAGE) as u32) }
    }

    fn drop_cache(&self, off: u64, len: usize) -> Result<(), SwapError> {
        let fd = self.file.as_raw_fd();
        // SAFETY: plain syscalls on our descriptor with in-range arguments.
        let rc = unsafe {
            libc::sync_file_range(
                fd,
                off as i64,
                len as i64,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
        };
        if rc != 0 {
            return Err(SwapError::Write {
                slot: (off / PAGE) as Slot,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: as above; advice failures only leave pages cached, so the result is ignored.
        unsafe { libc::posix_fadvise(fd, off as i64, len as i64, libc::POSIX_FADV_DONTNEED) };
        Ok(())
    }

    /// Read slots `slot..slot+n` into `buf` (at least `n` pages).
    pub fn read(&self, slot: Slot, n: u32, buf: &mut AlignedBuf) -> Result<(), SwapError> {
        let len = n as usize * PAGE as usize;
        if buf.len < len {
            return Err(SwapError::Config("read buffer too small".into()));
        }
        let off = u64::from(slot) * PAGE;
        self.c.reads.fetch_add(1, Ordering::Relaxed);
        if take_one(&self.c.fail_reads) {
            self.c.read_errors.fetch_add(1, Ordering::Relaxed);
            return Err(SwapError::Read {
                slot,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        let mut done = 0usize;
        while done < len {
            let dst = buf.as_mut_slice()[done..].as_mut_ptr();
            // SAFETY: dst has room for `len - done` bytes; the descriptor is ours.
            let rc = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    dst as *mut libc::c_void,
                    len - done,
                    (off + done as u64) as i64,
                )
            };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                self.c.read_errors.fetch_add(1, Ordering::Relaxed);
                return Err(SwapError::Read { slot, source: e });
            }
            if rc == 0 {
                self.c.read_errors.fetch_add(1, Ordering::Relaxed);
                return Err(SwapError::ShortRead {
                    slot,
                    got: done as u64,
                    want: len as u64,
                });
            }
            done += rc as usize;
        }
        self.c.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Counters and back-off state.
    pub fn counters(&self) -> SwapFileCounters {
        let (congested, ewma, base, batch, events) = {
            let c = self.cong();
            (
                c.congested(),
                c.ewma_per_page().as_nanos() as u64,
                c.baseline_per_page().as_nanos() as u64,
                c.advice().batch_pages,
                c.throttle_events(),
            )
        };
        let (used, total) = {
            let s = self.slots();
            (s.used(), s.total())
        };
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SwapFileCounters {
            bytes_written: l(&self.c.bytes_written),
            writes: l(&self.c.writes),
            clusters: l(&self.c.clusters),
            bytes_read: l(&self.c.bytes_read),
            reads: l(&self.c.reads),
            write_errors: l(&self.c.write_errors),
            read_errors: l(&self.c.read_errors),
            throttle_events: events,
            throttle_sleep_us: l(&self.c.throttle_sleep_us),
            congested,
            write_ewma_ns_per_page: ewma,
            write_baseline_ns_per_page: base,
            batch_pages: batch,
            slots_used: used,
            slots_total: total,
        }
    }

    /// Fault injection for tests: the next `n` reads fail with EIO (`u64::MAX`: all).
    #[doc(hidden)]
    pub fn inject_read_errors(&self, n: u64) {
        self.c.fail_reads.store(n, Ordering::Relaxed);
    }

    /// Fault injection for tests: the next `n` writes fail with EIO.
    #[doc(hidden)]
    pub fn inject_write_errors(&self, n: u64) {
        self.c.fail_writes.store(n, Ordering::Relaxed);
    }

    /// Fault injection for tests: add `d` of latency to every write (congestion).
    #[doc(hidden)]
    pub fn inject_write_delay(&self, d: Duration) {
        self.c
            .write_delay_us
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Truncate the file to `bytes` (for tests of a damaged file).
    #[doc(hidden)]
    pub fn truncate_for_test(&self, bytes: u64) -> Result<(), SwapError> {
        self.file.set_len(bytes).map_err(|source| SwapError::Open {
            path: self.path.clone(),
            source,
        })
    }
}

/// Decrement a fault-injection counter; true if a fault should be injected now.
fn take_one(a: &AtomicU64) -> bool {
    a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| match n {
        0 => None,
        u64::MAX => Some(u64::MAX),
        n => Some(n - 1),
    })
    .is_ok()
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        // The file holds nothing once no VM uses it; a missing file is fine.
        let _ = std::fs::remove_file(&self.path);
    }
}
