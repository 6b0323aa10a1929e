//! The userfaultfd handler thread: resolves missing faults (swap-in from the slot, or zeros for
//! pages never written) and write-protect faults (the first write to a clean page, or to a page
//! being written out).

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::file::AlignedBuf;
use super::pages::{Page, PageTable};
use super::uffd::Fault;
use super::vm::{bump, Inner, SwapInFailure};
use super::{SwapError, PAGE};

/// Pages read per swap-in at most: the faulting page plus its neighbours (within an aligned
/// group of this many pages) that sit in consecutive slots, i.e. that went out in one cluster.
pub const READ_AROUND: u64 = 32;

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// The handler loop; returns when `inner.stop` is set.
pub(super) fn run(inner: &Arc<Inner>) {
    let mut buf = AlignedBuf::new(READ_AROUND as usize);
    let zero = AlignedBuf::new(1);
    let mut faults = Vec::with_capacity(32);
    loop {
        if inner.stop.load(Ordering::Acquire) {
            return;
        }
        let mut fds = [
            libc::pollfd {
                fd: inner.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: inner.stop_evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 200) };
        if rc <= 0 || inner.stop.load(Ordering::Acquire) {
            continue;
        }
        if inner.paused.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(5));
            continue;
        }
        faults.clear();
        match inner.uffd.read_faults(&mut faults, 32) {
            Ok(_) => {}
            Err(_) => continue,
        }
        for f in &faults {
            let mut st = inner.lock();
            resolve(inner, &mut st, *f, &mut buf, &zero);
        }
    }
}

fn resolve(inner: &Inner, st: &mut PageTable, f: Fault, buf: &mut AlignedBuf, zero: &AlignedBuf) {
    let addr = f.addr & !(PAGE - 1);
    let host = addr;
    let Some(gpa) = addr.checked_sub(inner.base).filter(|g| *g < inner.size) else {
        return;
    };
    let p = gpa / PAGE;
    let wake = || {
        let _ = inner.uffd.wake(host, PAGE);
    };
    let unprotect = || {
        if inner.uffd.write_protect(host, PAGE, false).is_err() {
            wake();
        }
    };
    if f.is_wp() {
        bump(&inner.c.wp_faults, 1);
    } else {
        bump(&inner.c.missing_faults, 1);
    }
    match st.get(p) {
        None => wake(),
        Some(Page::Swapped(_)) => {
            // A write-protect fault on a swapped page is a stale message (the page was
            // discarded after the fault was raised): the writer still has to write.
            let write = f.is_write() || f.is_wp();
            if let Err(e) = swap_in(inner, st, p, write, buf) {
                fail(inner, p, e);
            }
        }
        Some(Page::Clean(s)) => {
            if f.is_wp() {
                // First write since swap-in: the slot copy goes stale.
                st.set(p, Page::Resident);
                inner.file.free([s]);
                unprotect();
            } else {
                // Missing although clean: either a stale message (the page is present:
                // EEXIST) or the page was discarded behind our back (a balloon or free page
                // report), which reads as zero.
                match inner.uffd.zeropage(host, PAGE) {
                    Ok(()) => {
                        st.set(p, Page::Resident);
                        inner.file.free([s]);
                        bump(&inner.c.zero_fills, 1);
                    }
                    Err(_) => wake(),
                }
            }
        }
        Some(Page::Busy) => {
            if f.is_wp() {
                st.set(p, Page::BusyDirty);
                unprotect();
            } else {
                // Unpopulated while being written out: it is zero; keep it protected so a
                // later write is still seen.
                match inner
                    .uffd
                    .copy(host, zero.as_slice().as_ptr(), PAGE, true, true)
                {
                    Ok(()) => bump(&inner.c.zero_fills, 1),
                    Err(_) => wake(),
                }
            }
        }
        Some(Page::BusyDirty) | Some(Page::Resident) => {
            // Any fault here makes the page writable or maps it without write protection
            // (the shared zero page): it leaves the hint epoch (see `super::hint`).
            st.disarm(p);
            if f.is_wp() {
                unprotect();
            } else {
                // Never populated: zero. A write gets a private zero page at once (no second
                // copy-on-write fault); a read gets the shared zero page.
                let r = if f.is_write() {
                    inner
                        .uffd
                        .copy(host, zero.as_slice().as_ptr(), PAGE, false, true)
                } else {
                    inner.uffd.zeropage(host, PAGE)
                };
                match r {
                    Ok(()) => bump(&inner.c.zero_fills, 1),
                    Err(_) => wake(),
                }
            }
        }
    }
}

/// A swap-in failed: never map zeros. Make the page inaccessible and wake the faulting thread
/// (a vCPU's KVM_RUN then fails with EFAULT), record the failure and tell the hook.
fn fail(inner: &Inner, p: u64, e: SwapError) {
    bump(&inner.c.swap_in_errors, 1);
    // Record and report before waking the faulting thread, so whoever sees its EFAULT also
    // finds the failure.
    let failure = SwapInFailure {
        gpa: p * PAGE,
        error: Arc::new(e),
    };
    {
        let mut f = inner.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(failure.clone());
        }
    }
    {
        let hook = inner.hook.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hook.as_ref() {
            h(&failure);
        }
    }
    // From here on a VMM thread touching this window parks instead of taking the process
    // down with SIGSEGV (vCPUs inside KVM_RUN get EFAULT instead).
    super::guard::mark_failed(inner.owner, inner.base..inner.base + inner.size);
    inner.poison(p..p + 1);
    let _ = inner.uffd.wake(inner.host(p), PAGE);
}

/// Swap page `p` (swapped) back in with its cluster neighbours, write-protected and clean;
/// if `write`, page `p` is made writable and dirty (its slot freed). Wakes waiters. Returns
/// the pages read. Called with the state lock held.
pub(super) fn swap_in(
    inner: &Inner,
    st: &mut PageTable,
    p: u64,
    write: bool,
    buf: &mut AlignedBuf,
) -> Result<u64, SwapError> {
    let Some(Page::Swapped(slot)) = st.get(p) else {
        return Ok(0);
    };
    let g0 = p & !(READ_AROUND - 1);
    let g1 = g0 + READ_AROUND;
    let mut a = p;
    while a > g0 && st.get(a - 1) == slot.checked_sub((p - a + 1) as u32).map(Page::Swapped) {
        a -= 1;
    }
    let mut e = p + 1;
    while e < g1 && st.get(e) == Some(Page::Swapped(slot + (e - p) as u32)) {
        e += 1;
    }
    let first = slot - (p - a) as u32;
    let n = (e - a) as u32;
    inner.file.read(first, n, buf)?;
    bump(&inner.c.swap_in_reads, 1);
    let src = buf.as_slice().as_ptr();
    let mut copied = inner
        .uffd
        .copy(inner.host(a), src, u64::from(n) * PAGE, true, false);
    if copied.as_ref().is_err_and(|e| errno(e) == libc::EAGAIN) {
        copied = inner
            .uffd
            .copy(inner.host(a), src, u64::from(n) * PAGE, true, false);
    }
    match copied {
        Ok(()) => {
            for i in 0..u64::from(n) {
                st.set(a + i, Page::Clean(first + i as u32));
            }
        }
        Err(_) => {
            // Page by page; a page already present (EEXIST) is authoritative: keep it and
            // drop its slot.
            for i in 0..u64::from(n) {
                // SAFETY: i < n and buf holds n pages.
                let s = unsafe { src.add((i * PAGE) as usize) };
                match inner.uffd.copy(inner.host(a + i), s, PAGE, true, false) {
                    Ok(()) => {
                        st.set(a + i, Page::Clean(first + i as u32));
                    }
                    Err(err) if errno(&err) == libc::EEXIST => {
                        st.set(a + i, Page::Resident);
                        inner.file.free([first + i as u32]);
                    }
                    Err(err) => {
                        let _ = inner.uffd.wake(inner.host(a), u64::from(n) * PAGE);
                        return Err(SwapError::host("UFFDIO_COPY", err));
                    }
                }
            }
        }
    }
    bump(&inner.c.swapped_in_pages, u64::from(n));
    if write {
        if let Some(Page::Clean(s)) = st.get(p) {
            st.set(p, Page::Resident);
            inner.file.free([s]);
            let _ = inner.uffd.write_protect(inner.host(p), PAGE, false);
        }
    }
    let _ = inner.uffd.wake(inner.host(a), u64::from(n) * PAGE);
    Ok(u64::from(n))
}
