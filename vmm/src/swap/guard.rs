//! The fault guard: what happens to a VMM thread (not a vCPU inside `KVM_RUN`) that touches
//! guest memory whose swap-in failed.
//!
//! A failed swap-in leaves its page `PROT_NONE` (zeros are never mapped). A vCPU reaches the
//! page through KVM and gets `EFAULT`; a VMM thread (a device model processing a queue, the VM
//! thread, a vCPU thread handling an MMIO exit) does a plain load or store and gets
//! `SIGSEGV`, which would end the daemon. Device models read guest memory through vm-memory
//! and virtio-queue with plain loads, so there is no error path to return through.
//!
//! Instead, the window of a VM whose swap-in failed is registered here *before* the page is
//! made inaccessible, and a process-wide `SIGSEGV` handler **parks** a thread whose fault
//! address lies in such a window: the thread never returns from the handler, so it never
//! uses the data it could not read, and the process lives on. Parked threads are counted
//! and their thread ids kept, so the VM's teardown detaches them instead of joining them
//! (see `devices::NotifyThread`). Faults anywhere else go to the handler that was installed
//! before (the Rust runtime's stack-overflow reporter) or to the default action, so real
//! crashes still crash.
//!
//! A parked thread keeps whatever locks it held (a device transport's mutex): every other
//! user of a failed VM's transports takes them with [`crate::devices::lock_live`], which
//! gives up once the VM is marked failed, so nothing waits on a parked thread.
//!
//! Everything the handler touches is a fixed table of atomics (async-signal-safe); it calls
//! only `gettid`, `pause` and `sigaction`.

use std::ops::Range;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Windows of failed VMs that can be registered at once.
const WINDOWS: usize = 64;
/// Parked threads whose ids are kept.
const PARKED: usize = 256;

struct Window {
    /// Owner id; 0: the entry is free.
    owner: AtomicU64,
    start: AtomicU64,
    end: AtomicU64,
}

struct ParkedThread {
    /// Thread id; 0: the entry is free.
    tid: AtomicI32,
    owner: AtomicU64,
}

static FAILED: [Window; WINDOWS] = [const {
    Window {
        owner: AtomicU64::new(0),
        start: AtomicU64::new(0),
        end: AtomicU64::new(0),
    }
}; WINDOWS];

static PARKED_THREADS: [ParkedThread; PARKED] = [const {
    ParkedThread {
        tid: AtomicI32::new(0),
        owner: AtomicU64::new(0),
    }
}; PARKED];

/// Owner value of an entry being filled in.
const RESERVED: u64 = u64::MAX;

static PARKED_TOTAL: AtomicU64 = AtomicU64::new(0);
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// The SIGSEGV action that was installed before ours (or the install error).
static PREVIOUS: OnceLock<Result<libc::sigaction, i32>> = OnceLock::new();

/// A fresh owner id for a VM's swap.
pub(crate) fn new_owner() -> u64 {
    NEXT_OWNER.fetch_add(1, Ordering::Relaxed)
}

/// Install the SIGSEGV handler (once per process). Later calls return the first result.
pub fn install() -> std::io::Result<()> {
    let r = PREVIOUS.get_or_init(|| {
        // SAFETY: all-zero is a valid sigaction value; the fields are set below.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_segv as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: `act.sa_mask` is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: all-zero is a valid sigaction value to receive the old action.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid sigaction structs; the handler is an
        // `extern "C" fn(c_int, *mut siginfo_t, *mut c_void)` as SA_SIGINFO requires.
        if unsafe { libc::sigaction(libc::SIGSEGV, &act, &mut old) } != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        Ok(old)
    });
    match r {
        Ok(_) => Ok(()),
        Err(e) => Err(std::io::Error::from_raw_os_error(*e)),
    }
}

/// From now on, a SIGSEGV inside `range` (host addresses) parks the faulting thread under
/// `owner`. False if the table is full (the fault would then end the process: logged).
pub(crate) fn mark_failed(owner: u64, range: Range<u64>) -> bool {
    if FAILED
        .iter()
        .any(|w| w.owner.load(Ordering::Acquire) == owner)
    {
        return true;
    }
    for w in &FAILED {
        // Claim the entry (RESERVED), then set the bounds, then publish the owner: the
        // handler only trusts bounds of an entry whose owner it read with Acquire.
        if w.owner
            .compare_exchange(0, RESERVED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            w.start.store(range.start, Ordering::Relaxed);
            w.end.store(range.end, Ordering::Relaxed);
            w.owner.store(owner, Ordering::Release);
            return true;
        }
    }
    tracing::error!(
        owner,
        "fault guard table full: a VMM thread touching this VM's failed page would end the process"
    );
    false
}

/// Forget `owner`'s window (its VM is gone: the address range may be reused).
pub(crate) fn forget(owner: u64) {
    for w in &FAILED {
        if w.owner.load(Ordering::Acquire) == owner {
            w.owner.store(0, Ordering::Release);
        }
    }
}

/// Threads parked so far in this process.
pub fn parked_threads() -> u64 {
    PARKED_TOTAL.load(Ordering::Acquire)
}

/// Threads parked for `owner` (a VM's swap).
pub(crate) fn parked_for(owner: u64) -> u64 {
    PARKED_THREADS
        .iter()
        .filter(|p| p.tid.load(Ordering::Acquire) > 0 && p.owner.load(Ordering::Relaxed) == owner)
        .count() as u64
}

/// Whether thread `tid` is parked here.
pub fn is_parked(tid: i32) -> bool {
    tid > 0
        && PARKED_THREADS
            .iter()
            .any(|p| p.tid.load(Ordering::Acquire) == tid)
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn failed_owner(addr: u64) -> Option<u64> {
    FAILED.iter().find_map(|w| {
        let owner = w.owner.load(Ordering::Acquire);
        (owner != 0
            && owner != RESERVED
            && addr >= w.start.load(Ordering::Relaxed)
            && addr < w.end.load(Ordering::Relaxed))
        .then_some(owner)
    })
}

fn park(owner: u64) -> ! {
    let tid = gettid();
    for p in &PARKED_THREADS {
        // Claim (-1), fill in the owner, then publish the thread id.
        if p.tid
            .compare_exchange(0, -1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            p.owner.store(owner, Ordering::Relaxed);
            p.tid.store(tid, Ordering::Release);
            break;
        }
    }
    PARKED_TOTAL.fetch_add(1, Ordering::AcqRel);
    loop {
        // SAFETY: pause only sleeps until a signal handler ran; async-signal-safe.
        unsafe { libc::pause() };
    }
}

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo for this SIGSEGV.
    let si = unsafe { &*info };
    // SAFETY: for SIGSEGV the kernel fills in the fault address.
    let addr = unsafe { si.si_addr() } as u64;
    if let Some(owner) = failed_owner(addr) {
        park(owner);
    }
    match PREVIOUS.get() {
        Some(Ok(old)) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous action was installed with SA_SIGINFO, so its handler
                // has this signature; we pass it our own arguments unchanged.
                let f = unsafe {
                    std::mem::transmute::<
                        usize,
                        extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
                    >(old.sa_sigaction)
                };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler takes the signal number only.
                let f = unsafe {
                    std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(old.sa_sigaction)
                };
                f(sig);
            }
        }
        _ => {
            // Not ours and nobody else's: the default action (returning re-runs the access,
            // which then ends the process as it would have without this handler).
            // SAFETY: all-zero with SIG_DFL is a valid action; sigaction is async-signal-safe.
            let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
            dfl.sa_sigaction = libc::SIG_DFL;
            // SAFETY: valid pointer to the action; the old one is not wanted.
            unsafe { libc::sigaction(libc::SIGSEGV, &dfl, std::ptr::null_mut()) };
        }
    }
}
