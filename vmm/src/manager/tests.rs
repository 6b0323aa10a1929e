//! Tier-2 tests of the manager through its `ApiBackend` face: a tiny-guest VM's memory
//! figures, deletion returning every frame, two VMs at once, the lifecycle with 409s, a
//! resize refused while no virtio-mem driver runs, and unsupported boot sources.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mm::slab::TypedSlab;
use guest_mm::topology::Topology;
use tidepool_api::types::{BalloonConfig, CreateVmRequest, HotplugConfig, StateAction, VmState};
use tidepool_api::{ApiBackend, ErrorKind};

use super::images::{idle_guest, IDLE_GUEST_HELLO};
use super::*;
use crate::hostpool::{build_pool, FramePool};
use crate::tiny_guest::program::TAG_USER;

fn manager() -> Option<(VmManager, Arc<dyn FramePool>)> {
    if let Err(why) = crate::kvm::kvm_available() {
        eprintln!("skipping: {why}");
        return None;
    }
    let pool: Arc<dyn FramePool> =
        Arc::new(build_pool(Topology::single(1 << 30), Some(512 << 20)).expect("pool"));
    let slab = TypedSlab::new("manager-test-blocks").expect("slab");
    Some((
        VmManager::new(Arc::clone(&pool), slab, 1, Duration::from_secs(20)),
        pool,
    ))
}

fn request(mib: u64) -> CreateVmRequest {
    let mut r = CreateVmRequest::with_memory(mib);
    r.image = Some(idle_guest(mib).expect("image"));
    r
}

fn wait_for_hello(m: &VmManager, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let said = m
            .call(id, |vm| {
                vm.reports()
                    .iter()
                    .any(|r| r.tag == TAG_USER && r.value == IDLE_GUEST_HELLO)
            })
            .expect("call");
        if said {
            return;
        }
        assert!(Instant::now() < deadline, "{id}: the guest never reported");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn tiny_guest_vm_memory_figures_and_delete_returns_every_frame() {
    let Some((m, pool)) = manager() else { return };
    let mut req = request(64);
    req.hotplug = Some(HotplugConfig {
        region_mib: 128,
        block_mib: 2,
        memslots: Default::default(),
    });
    req.balloon = Some(BalloonConfig::default());
    let info = m.create_vm(req).expect("create");
    assert_eq!(info.state, VmState::Running);
    wait_for_hello(&m, &info.id);
    let mem = m.get_memory(&info.id).expect("memory");
    assert_eq!(mem.boot_mib, 64);
    assert_eq!(mem.region_mib, 128);
    assert_eq!(mem.plugged_mib, 64);
    assert_eq!(mem.requested_mib, 64);
    assert!(
        mem.resident_mib >= 1,
        "the image and its tables are resident"
    );
    assert!(mem.resident_mib <= 64);
    assert!(!mem.resize.driver_ready);
    // No driver: the resize is refused with 409 and nothing changes.
    let e = m.resize_memory(&info.id, 128).expect_err("no driver");
    assert_eq!(e.kind, ErrorKind::Conflict);
    assert!(e.message.contains("not ready"), "{}", e.message);
    let host = m.host().expect("host");
    assert_eq!(host.vm_count, 1);
    assert_eq!(host.total_mib, 512);
    assert_eq!(host.free_mib, 512 - 64);
    let b = m.set_balloon(&info.id, 16).expect("balloon");
    assert_eq!(b.target_mib, 16);
    let metrics = m.metrics().expect("metrics");
    assert_eq!(metrics.vms.len(), 1);
    assert_eq!(metrics.vms[0].boot_bytes, 64 << 20);
    m.delete_vm(&info.id).expect("delete");
    assert_eq!(
        m.get_vm(&info.id).expect_err("gone").kind,
        ErrorKind::NotFound
    );
    assert!(pool.figures().expect("figures").is_whole());
    assert_eq!(m.host().expect("host").free_mib, 512);
}

#[test]
fn two_vms_run_at_once_and_leave_the_pool_whole() {
    let Some((m, pool)) = manager() else { return };
    let a = m.create_vm(request(32)).expect("a");
    let b = m.create_vm(request(96)).expect("b");
    assert_ne!(a.id, b.id);
    wait_for_hello(&m, &a.id);
    wait_for_hello(&m, &b.id);
    let list = m.list_vms().expect("list");
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|v| v.state == VmState::Running));
    assert_eq!(m.host().expect("host").free_mib, 512 - 128);
    // Pausing one does not affect the other.
    m.set_state(&a.id, StateAction::Pause).expect("pause a");
    assert_eq!(m.get_vm(&a.id).expect("a").state, VmState::Paused);
    assert_eq!(m.get_vm(&b.id).expect("b").state, VmState::Running);
    assert_eq!(m.get_memory(&b.id).expect("b memory").boot_mib, 96);
    m.delete_vm(&a.id).expect("delete a");
    assert_eq!(m.host().expect("host").free_mib, 512 - 96);
    m.delete_vm(&b.id).expect("delete b");
    assert!(pool.figures().expect("figures").is_whole());
}

#[test]
fn lifecycle_through_the_backend_with_conflicts() {
    let Some((m, pool)) = manager() else { return };
    let mut req = request(32);
    req.start = false;
    let v = m.create_vm(req).expect("create");
    assert_eq!(v.state, VmState::Created);
    let e = m
        .set_state(&v.id, StateAction::Pause)
        .expect_err("pause created");
    assert_eq!(e.kind, ErrorKind::Conflict);
    assert_eq!(
        m.set_state(&v.id, StateAction::Start).expect("start").state,
        VmState::Running
    );
    assert_eq!(
        m.set_state(&v.id, StateAction::Resume)
            .expect_err("resume running")
            .kind,
        ErrorKind::Conflict
    );
    m.set_state(&v.id, StateAction::Pause).expect("pause");
    m.set_state(&v.id, StateAction::Resume).expect("resume");
    assert_eq!(
        m.set_state(&v.id, StateAction::Stop).expect("stop").state,
        VmState::Stopped
    );
    assert_eq!(
        m.set_state(&v.id, StateAction::Start)
            .expect_err("start stopped")
            .kind,
        ErrorKind::Conflict
    );
    // A stopped VM still answers and is deleted like any other.
    assert_eq!(m.get_memory(&v.id).expect("memory").boot_mib, 32);
    m.delete_vm(&v.id).expect("delete");
    assert!(pool.figures().expect("figures").is_whole());
    assert_eq!(
        m.delete_vm(&v.id).expect_err("twice").kind,
        ErrorKind::NotFound
    );
}

#[test]
fn bad_unsupported_and_impossible_requests_are_refused_without_leaks() {
    let Some((m, pool)) = manager() else { return };
    let mut linux = CreateVmRequest::with_memory(64);
    linux.kernel = Some("/nonexistent/vmlinux".into());
    let e = m.create_vm(linux).expect_err("linux");
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(e.message.contains("/nonexistent/vmlinux"), "{}", e.message);
    let e = m
        .create_vm(CreateVmRequest::with_memory(64))
        .expect_err("default guest");
    assert_eq!(e.kind, ErrorKind::Unsupported);
    // More than the pool holds: refused, and nothing is kept.
    let e = m.create_vm(request(1024)).expect_err("too big");
    assert_eq!(e.kind, ErrorKind::Conflict, "{}", e.message);
    assert!(pool.figures().expect("figures").is_whole());
    assert_eq!(m.list_vms().expect("list").len(), 0);
}

/// A 64 MiB tiny-guest VM running the virtio-mem driver over a 128 MiB region.
fn virtio_mem_vm(m: &VmManager) -> tidepool_api::types::VmInfo {
    let mut req = CreateVmRequest::with_memory(64);
    req.image = Some(super::images::virtio_mem_guest(64, 128).expect("image"));
    req.hotplug = Some(HotplugConfig {
        region_mib: 128,
        block_mib: 2,
        memslots: Default::default(),
    });
    m.create_vm(req).expect("create")
}

#[test]
fn resize_through_the_api_is_served_by_the_guest_driver() {
    let Some((m, pool)) = manager() else { return };
    let v = virtio_mem_vm(&m);
    let wait = |pred: &dyn Fn(&tidepool_api::types::MemoryInfo) -> bool, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mem = m.get_memory(&v.id).expect("memory");
            if pred(&mem) {
                return mem;
            }
            assert!(Instant::now() < deadline, "{what}: {mem:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait(&|mem| mem.resize.driver_ready, "driver up");
    let mem = m.resize_memory(&v.id, 80).expect("resize");
    assert_eq!(mem.requested_mib, 80);
    let mem = wait(&|mem| mem.plugged_mib == 80, "plugged");
    assert_eq!(mem.resize.phase, tidepool_api::types::ResizePhase::Idle);
    // The driver writes every page it plugged, after the plug was acknowledged.
    wait(&|mem| mem.resident_mib >= 16, "plugged memory touched");
    assert_eq!(m.host().expect("host").free_mib, 512 - 80);
    // Below boot RAM and above the region are refused.
    assert_eq!(
        m.resize_memory(&v.id, 32).expect_err("below").kind,
        ErrorKind::Conflict
    );
    assert_eq!(
        m.resize_memory(&v.id, 64 + 256).expect_err("above").kind,
        ErrorKind::Conflict
    );
    m.resize_memory(&v.id, 64).expect("shrink");
    wait(&|mem| mem.plugged_mib == 64, "unplugged");
    assert_eq!(m.host().expect("host").free_mib, 512 - 64);
    m.delete_vm(&v.id).expect("delete");
    assert!(pool.figures().expect("figures").is_whole());
}

#[test]
fn a_resize_waits_neither_for_the_vm_thread_nor_the_device() {
    let Some((m, _pool)) = manager() else { return };
    let v = virtio_mem_vm(&m);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !m.get_memory(&v.id).expect("memory").resize.driver_ready {
        assert!(Instant::now() < deadline, "driver never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Occupy the VM thread, and hold the virtio-mem device's lock on it, as a long plug
    // would: the resize must still be answered.
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    m.post(&v.id, move |vm| {
        let dev = vm.mem_device().cloned();
        let _held = dev.as_ref().map(|d| crate::devices::lock(d));
        let _ = entered_tx.send(());
        let _ = release_rx.recv_timeout(Duration::from_secs(60));
    })
    .expect("post");
    entered_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("VM thread took the call");
    let mem = m
        .resize_memory_now(&v.id, 80)
        .expect("the manager resizes without a blocking thread")
        .expect("resize");
    assert_eq!(mem.requested_mib, 80);
    assert_eq!(mem.boot_mib, 64);
    assert!(mem.resize.driver_ready);
    assert_eq!(
        m.resize_memory(&v.id, 32).expect_err("below boot RAM").kind,
        ErrorKind::Conflict
    );
    assert_eq!(
        m.resize_memory("vm-none", 80).expect_err("unknown").kind,
        ErrorKind::NotFound
    );
    release_tx.send(()).expect("release");
    // Once the device is free again the guest follows the target.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mem = m.get_memory(&v.id).expect("memory");
        if mem.plugged_mib == 80 {
            break;
        }
        assert!(Instant::now() < deadline, "not plugged: {mem:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    m.delete_vm(&v.id).expect("delete");
}

/// The guest image `resources/guest/build.sh` leaves in the cache, if it is there.
fn guest_image() -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    let dir = cache.join("tidepool/guest/current");
    (dir.join("vmlinux").is_file() && dir.join("initramfs.cpio.gz").is_file()).then_some(dir)
}

#[test]
fn linux_vm_is_created_started_and_deleted_whatever_the_guest_does() {
    let Some((m, pool)) = manager() else { return };
    let Some(dir) = guest_image() else {
        eprintln!("skipping linux_vm_...: no guest image (run resources/guest/build.sh)");
        return;
    };
    let mut req = CreateVmRequest::with_memory(256);
    req.kernel = Some(dir.join("vmlinux").display().to_string());
    req.initrd = Some(dir.join("initramfs.cpio.gz").display().to_string());
    req.hotplug = Some(HotplugConfig {
        region_mib: 128,
        block_mib: 2,
        memslots: Default::default(),
    });
    req.balloon = Some(BalloonConfig::default());
    let v = m.create_vm(req).expect("create");
    assert_eq!(v.boot_source, tidepool_api::types::BootSource::Kernel);
    // The kernel and initrd went into boot RAM; the DSDT names both devices.
    let (boot, devices) = m
        .call(&v.id, |vm| {
            (
                vm.boot_info()
                    .map(|b| (b.kernel, b.initrd, b.cmdline.clone())),
                vm.bus().slots().len(),
            )
        })
        .expect("call");
    let (kernel, initrd, cmdline) = boot.expect("boot info");
    assert!(kernel.1 > kernel.0);
    assert!(initrd.is_some());
    assert!(
        cmdline.contains("memhp_default_state=online_movable"),
        "{cmdline}"
    );
    assert_eq!(devices, 2);
    // Whatever the guest gets to on this host (it may stop on an instruction the emulator
    // lacks), the VM answers and the daemon lives on.
    let wait_ms = std::env::var("TP_LINUX_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    std::thread::sleep(Duration::from_millis(wait_ms));
    let state = m.get_vm(&v.id).expect("vm").state;
    assert!(
        matches!(state, VmState::Running | VmState::Stopped),
        "{state:?}"
    );
    let mem = m.get_memory(&v.id).expect("memory");
    assert_eq!(mem.boot_mib, 256);
    assert!(mem.resident_mib >= 1, "kernel and initrd are resident");
    let console = m
        .call(&v.id, |vm| vm.console().unwrap_or_default())
        .expect("console");
    eprintln!(
        "linux guest: {state:?}, {} console bytes, last: {:?}",
        console.len(),
        console.lines().last()
    );
    m.delete_vm(&v.id).expect("delete");
    assert!(pool.figures().expect("figures").is_whole());
}

#[test]
fn vm_threads_run_below_the_api_at_the_guest_nice_value() {
    let Some((m, pool)) = manager() else { return };
    assert_eq!(m.guest_nice(), crate::latency::DEFAULT_GUEST_NICE);
    assert!(matches!(
        m.set_guest_nice(20),
        Err(ManagerError::GuestNice(20))
    ));
    assert!(matches!(
        m.set_guest_nice(-1),
        Err(ManagerError::GuestNice(-1))
    ));
    // Above this thread's own (tests may run under `nice`; going back down needs privilege).
    // SAFETY: reads the calling thread's nice value.
    let target = (unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) } + 4).min(19);
    m.set_guest_nice(target).expect("guest nice");
    let m = Arc::new(m);
    // Created from a thread set up like an API thread: short slice, nice 0.
    let m2 = Arc::clone(&m);
    let (info, api_slice) = std::thread::spawn(move || {
        crate::latency::set_thread_slice(crate::latency::API_SLICE_NS).expect("slice");
        let slice = crate::latency::thread_slice();
        (m2.create_vm(request(32)).expect("create"), slice)
    })
    .join()
    .expect("creator");
    wait_for_hello(&m, &info.id);
    // The VM thread (its vCPU and device threads inherit from it: see the latency tests).
    let (nice, slice) = m
        .call(&info.id, |_vm| {
            // SAFETY: reads the calling thread's nice value.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            (nice, crate::latency::thread_slice())
        })
        .expect("call");
    assert_eq!(nice, target);
    if api_slice.is_some() {
        assert_ne!(slice, api_slice, "the VM thread kept the API's slice");
    }
    m.delete_vm(&info.id).expect("delete");
    assert!(pool.figures().expect("figures").is_whole());
}
