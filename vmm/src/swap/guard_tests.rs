//! The fault guard: a VMM thread that touches guest memory whose swap-in failed is parked,
//! not killed, and the process lives on; faults elsewhere still end a process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::memory::{GuestWindow, Layout, LayoutConfig, GIB, MIB};

fn swapped(seed: u64) -> (Arc<GuestWindow>, Arc<SwapFile>, VmSwap) {
    let layout = Layout::new(LayoutConfig {
        boot_ram: 4 * MIB,
        hotplug_size: 0,
    })
    .expect("layout");
    let w = Arc::new(GuestWindow::new(layout).expect("window"));
    let path =
        std::env::temp_dir().join(format!("tidepool-guard-test-{}-{seed}", std::process::id()));
    let f = Arc::new(SwapFile::create(SwapFileConfig::new(path, GIB)).expect("swap file"));
    let swap = VmSwap::new(Arc::clone(&w), Arc::clone(&f)).expect("swap");
    for gpa in (0..4 * MIB).step_by(PAGE as usize) {
        let p = w.host_addr(gpa).expect("in window") as *mut u64;
        // SAFETY: placed guest memory, accessed only through raw pointers in this test.
        unsafe { p.write_volatile(gpa ^ seed) };
    }
    swap.swap_out(0..4 * MIB, u64::MAX).expect("swap out");
    (w, f, swap)
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_vmm_thread_reading_a_failed_page_is_parked_and_the_process_lives() {
    let (w, f, swap) = swapped(0x77);
    let hooked = Arc::new(AtomicU64::new(0));
    let h2 = Arc::clone(&hooked);
    swap.set_failure_hook(move |_| {
        h2.fetch_add(1, Ordering::SeqCst);
    });
    f.inject_read_errors(1);
    let host = w.host_addr(9 * PAGE).expect("in window");
    let got = Arc::new(AtomicU64::new(u64::MAX));
    let got2 = Arc::clone(&got);
    // A "device model": a plain load from guest memory, as vm-memory does. Without the guard
    // this would be SIGSEGV and the end of the test process.
    let t = std::thread::spawn(move || {
        // SAFETY: the page lies in the window (alive: the test holds it); the access either
        // reads the page or parks this thread for good.
        let v = unsafe { (host as *const u64).read_volatile() };
        got2.store(v, Ordering::SeqCst);
    });
    wait("the reader parked", || swap.parked_threads() == 1);
    assert_eq!(hooked.load(Ordering::SeqCst), 1, "the hook ran once");
    assert!(swap.failure().is_some());
    assert_eq!(swap.counters().swap_in_errors, 1);
    assert!(!t.is_finished(), "the parked reader never returns");
    assert_eq!(got.load(Ordering::SeqCst), u64::MAX, "no data was used");
    assert!(guard::parked_threads() >= 1);
    // The rest of the VM's memory still comes back (the file reads again).
    for gpa in (0..4 * MIB)
        .step_by(PAGE as usize)
        .filter(|g| *g != 9 * PAGE)
    {
        let p = w.host_addr(gpa).expect("in window") as *const u64;
        // SAFETY: as above; these pages swap in from a healthy file.
        assert_eq!(unsafe { p.read_volatile() }, gpa ^ 0x77);
    }
    // Shutdown frees the slots although a thread stays parked on the window.
    swap.shutdown();
    assert_eq!(f.counters().slots_used, 0);
    // The parked thread is leaked on purpose (it holds nothing of the test's).
    drop(t);
}

#[test]
fn faults_outside_failed_windows_still_end_the_process() {
    guard::install().expect("install");
    // A child process with the guard installed (inherited) dereferences an inaccessible
    // page that belongs to no failed window: it must die of SIGSEGV, not park.
    // SAFETY: an anonymous PROT_NONE mapping; only its address is used.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(page, libc::MAP_FAILED);
    // SAFETY: the child only touches the page and exits; no locks are taken after fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: the access faults on purpose; the child ends either way.
        unsafe { (page as *const u64).read_volatile() };
        // SAFETY: _exit ends the child at once (not reached when the guard works).
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV,
        "status {status:#x}"
    );
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(page, 4096) };
}
