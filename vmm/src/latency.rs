//! Scheduling of the daemon's latency-sensitive threads against the guests' threads.
//!
//! On a small host the guests' threads (a vCPU chasing a resize, the device thread plugging
//! and unplugging) can hold every core. An API request whose worker wakes behind them then
//! waits for their scheduler slice to end (2-3 ms, up to tens of ms behind a vCPU in guest
//! mode, measured with `perf sched` during `tidepool bench api`), although it needs the CPU
//! for a few microseconds. Two settings, neither needing privileges, put the daemon first:
//!
//! - **Guest threads run at a lower priority** than the daemon's own: nice
//!   [`DEFAULT_GUEST_NICE`] unless configured (`serve --guest-nice`, `daemon.guest_nice` for
//!   `up`). The VM thread applies it to itself ([`enter_guest_thread`]) before it starts
//!   anything, and the vCPU and device threads it creates inherit it. Every guest gets the
//!   same value, so guests stay equal among themselves; against the daemon's API, reclaim and
//!   monitor threads they weigh 335 to 1,024 at nice 5, so a waking API thread is picked at
//!   once. A nice value only matters while the cores are contended. A VM's swap fault
//!   handler is daemon work and keeps the daemon's priority.
//! - **API threads ask for a short slice.** Linux 6.12+ lets a `SCHED_OTHER` thread ask for
//!   a shorter slice (`sched_setattr` with `sched_runtime`, 0.1-100 ms), which gives it an
//!   earlier virtual deadline on wake-up. It does not change CPU shares. The daemon's async
//!   runtime asks for [`API_SLICE_NS`] on every worker and blocking thread ([`runtime`]).
//!   New threads inherit their creator's slice, so threads the API starts (a VM thread, a
//!   swap handler) go back to the kernel's default first ([`reset_thread_slice`]). Older
//!   kernels accept the call and ignore the field: the request is best effort.
//!
//! `docs/api.md` has the measurements behind the defaults.

use std::io;

/// The slice the daemon's API threads ask for, in nanoseconds (the kernel's minimum).
pub const API_SLICE_NS: u64 = 100_000;

/// The nice value of the guests' threads unless configured.
pub const DEFAULT_GUEST_NICE: i32 = 5;

/// The nice values a guest may be given: 0 (the daemon's own priority) to 19. Negative
/// values would put guests above the daemon (and need CAP_SYS_NICE).
pub const GUEST_NICE_RANGE: std::ops::RangeInclusive<i32> = 0..=19;

/// Set the calling thread's nice value (Linux keeps one per thread). Lowering the priority
/// (raising the value) needs no privilege.
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: PRIO_PROCESS with who = 0 is the calling thread; plain integers.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Make the calling thread a guest thread: the kernel's default slice (it may have been
/// created by an API thread with a short one) and nice `nice`. Best effort: a refusal is
/// logged and the thread runs as it was.
pub fn enter_guest_thread(nice: i32) {
    reset_thread_slice();
    if let Err(e) = set_thread_nice(nice) {
        tracing::warn!(nice, error = %e, "cannot lower the guest thread's priority");
    }
}

/// Ask for a `slice_ns` scheduler slice for the calling thread (0: the kernel's default),
/// keeping its policy (`SCHED_OTHER`) and nice value. Threads it creates afterwards inherit
/// the slice. Errors if the thread is not `SCHED_OTHER`/`SCHED_BATCH` or the kernel refuses.
pub fn set_thread_slice(slice_ns: u64) -> io::Result<()> {
    // SAFETY: sched_getscheduler(0) reads the calling thread's policy; no pointers.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the thread's scheduling policy ({policy}) has no fair-class slice"),
        ));
    }
    // getpriority can return -1 legitimately: clear errno first and check it after.
    // SAFETY: __errno_location has no preconditions; it returns this thread's errno slot.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: `errno` points at this thread's errno, valid and writable for the thread's life.
    unsafe { *errno = 0 };
    // SAFETY: PRIO_PROCESS with who = 0 reads the calling thread's nice value.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if nice == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error().unwrap_or(0) != 0 {
            return Err(e);
        }
    }
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: policy as u32,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: slice_ns,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_setattr(2) on the calling thread (pid 0) with a fully initialised
    // `sched_attr` whose `size` field matches the struct passed; the kernel only reads it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Put the calling thread back on the kernel's default slice (best effort: a refusal
/// leaves it as it was).
pub fn reset_thread_slice() {
    if let Err(e) = set_thread_slice(0) {
        tracing::debug!(error = %e, "could not reset the thread's scheduler slice");
    }
}

/// The calling thread's current fair-class slice in nanoseconds, from `/proc/thread-self/sched`
/// (`None` if the kernel does not report one).
pub fn thread_slice() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "se.slice").then(|| v.trim().parse().ok())?
    })
}

/// The daemon's multi-threaded async runtime: every thread it starts (workers and the
/// blocking pool) asks for [`API_SLICE_NS`]; a refusal is logged once per thread at debug
/// level and the thread keeps the default slice.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| {
            if let Err(e) = set_thread_slice(API_SLICE_NS) {
                tracing::debug!(error = %e, "API thread keeps the default scheduler slice");
            }
        })
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_slice_is_inherited_until_reset() {
        std::thread::spawn(|| {
            let before = thread_slice();
            set_thread_slice(API_SLICE_NS).expect("sched_setattr");
            // Kernels before 6.12 ignore the field and have no `se.slice` line to check.
            let Some(after) = thread_slice() else {
                return;
            };
            assert_eq!(after, API_SLICE_NS, "slice before: {before:?}");
            let child = std::thread::spawn(thread_slice).join().unwrap();
            assert_eq!(child, Some(API_SLICE_NS), "a new thread inherits the slice");
            let reset_child = std::thread::spawn(|| {
                reset_thread_slice();
                thread_slice()
            })
            .join()
            .unwrap();
            assert_eq!(reset_child, before, "reset goes back to the default");
            assert_eq!(
                thread_slice(),
                Some(API_SLICE_NS),
                "the parent keeps its own"
            );
        })
        .join()
        .unwrap();
    }

    /// The calling thread's nice value.
    fn nice() -> i32 {
        // SAFETY: reads the calling thread's nice value; no pointers.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    /// A nice value `by` above the calling thread's (tests may run under `nice`, and only a
    /// privileged thread may go back down).
    fn above(by: i32) -> i32 {
        (nice() + by).min(19)
    }

    #[test]
    fn nice_value_is_kept() {
        std::thread::spawn(|| {
            let target = above(3);
            set_thread_nice(target).expect("setpriority");
            set_thread_slice(API_SLICE_NS).expect("sched_setattr");
            assert_eq!(nice(), target);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn guest_threads_get_the_default_slice_and_the_nice_value_and_pass_them_on() {
        std::thread::spawn(|| {
            let default_slice = thread_slice();
            let creator = nice();
            let target = above(7);
            set_thread_slice(API_SLICE_NS).expect("sched_setattr");
            let (slice, guest, child) = std::thread::spawn(move || {
                enter_guest_thread(target);
                let child = std::thread::spawn(nice).join().unwrap();
                (thread_slice(), nice(), child)
            })
            .join()
            .unwrap();
            assert_eq!(slice, default_slice);
            assert_eq!(guest, target);
            assert_eq!(child, target, "threads the guest thread starts inherit it");
            assert_eq!(nice(), creator, "the creator keeps its own");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn runtime_threads_ask_for_the_short_slice() {
        let rt = runtime().expect("runtime");
        let slice = rt.block_on(async { tokio::spawn(async { thread_slice() }).await.unwrap() });
        if let Some(s) = slice {
            assert_eq!(s, API_SLICE_NS);
        }
        let blocking =
            rt.block_on(async { tokio::task::spawn_blocking(thread_slice).await.unwrap() });
        if let Some(s) = blocking {
            assert_eq!(s, API_SLICE_NS);
        }
    }
}
