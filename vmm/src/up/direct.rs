//! Direct mode: the daemon in this process on this host's KVM, and the default VM created
//! through the same [`ApiBackend`] the API serves. Also what `tidepool up --direct` runs
//! inside L1 in nested mode (with the L1 side of the relay).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool_api::types::VmState;
use tidepool_api::{ApiBackend, ServeConfig, Server};

use super::config::UpConfig;
pub use super::console::console_delta;
use super::console::{follow, ConsoleFollower, VmConsole, INIT_PATIENCE};
use super::paths::GuestImage;
use super::{daemon, relay, UpArgs, UpError};
use crate::manager::VmManager;

/// The marker the L1 side prints when the VM exists and the relay listens.
pub const READY_MARKER: &str = "TIDEPOOL-UP-READY";
/// The marker printed when the guest reached its `/init`.
pub const GUEST_INIT_MARKER: &str = "TIDEPOOL-UP-GUEST-INIT";
/// The marker printed after the clean shutdown.
pub const STOPPED_MARKER: &str = "TIDEPOOL-UP-STOPPED";

/// What the default VM boots.
#[derive(Debug, Clone)]
pub enum DefaultGuest {
    /// The stock guest image (kernel, initramfs, command line).
    Linux(GuestImage),
    /// The built-in tiny guest whose CPL3 virtio-mem driver follows resizes
    /// ([`crate::manager::images::virtio_mem_guest`]); one vCPU, no console.
    Tiny,
}

impl DefaultGuest {
    /// The create request for the default VM of `cfg`.
    pub fn create_request(
        &self,
        cfg: &UpConfig,
    ) -> Result<tidepool_api::types::CreateVmRequest, UpError> {
        match self {
            DefaultGuest::Linux(g) => Ok(cfg.create_request(
                &g.vmlinux.display().to_string(),
                &g.initramfs.display().to_string(),
                &g.cmdline,
            )),
            DefaultGuest::Tiny => {
                let mut req = cfg.create_request("", "", "");
                req.kernel = None;
                req.initrd = None;
                req.cmdline = None;
                req.vcpus = 1;
                req.image = Some(
                    crate::manager::images::virtio_mem_guest(
                        cfg.vm.memory_mib,
                        cfg.vm.hotplug_region_mib,
                    )
                    .map_err(|e| UpError::Failed(format!("building the tiny guest: {e}")))?,
                );
                Ok(req)
            }
        }
    }

    /// What to print about it.
    fn describe(&self) -> String {
        match self {
            DefaultGuest::Linux(g) => format!("kernel {}", g.vmlinux.display()),
            DefaultGuest::Tiny => "built-in tiny guest, CPL3 virtio-mem driver".into(),
        }
    }
}

fn failed(what: &str) -> impl FnOnce(String) -> UpError + '_ {
    move |e| UpError::Failed(format!("{what}: {e}"))
}

/// Follows the guest console on a thread until `stop` ([`super::console::follow`] over the
/// VM's serial console, printing to stdout).
fn follow_console(
    manager: Arc<VmManager>,
    id: String,
    all: bool,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let follower = ConsoleFollower::new(&id, all, t0, std::io::stdout());
        let source = VmConsole { manager, id };
        follow(source, follower, Duration::from_millis(500), &stop);
    })
}

/// ` --socket PATH`, or nothing when a client without `--socket` reaches `socket` anyway
/// (see [`super::paths::client_socket`]).
pub fn socket_flag(socket: &Path) -> String {
    let serve_default = Path::new(tidepool_api::server::DEFAULT_SOCKET_PATH);
    let reached = socket == serve_default
        || (socket == super::paths::default_socket_here() && !serve_default.exists());
    if reached {
        String::new()
    } else {
        format!(" --socket {}", socket.display())
    }
}

/// Prints how to use the running VM.
pub fn print_banner(socket: &Path, id: &str, memory_mib: u64, region_mib: u64) {
    let s = socket_flag(socket);
    let grow = (memory_mib + 512).min(memory_mib + region_mib);
    println!(
        "tidepool is up: VM {id} ({memory_mib} MiB boot RAM, {region_mib} MiB virtio-mem region)"
    );
    println!("  API socket:   {}", socket.display());
    println!("  list VMs:     tidepool vm list{s}");
    if region_mib > 0 {
        println!("  resize:       tidepool vm resize{s} {id} {grow}");
    }
    println!("  see memory:   tidepool vm memory{s} {id}");
    println!("  host memory:  tidepool host{s}");
    println!("  stop:         Ctrl-C (deletes the VM, removes the socket)");
}

/// Waits (at most [`INIT_PATIENCE`]) until the guest's virtio-mem driver is up, so that the
/// resize command printed next works at once; says so either way.
async fn wait_driver_ready(backend: &Arc<dyn ApiBackend>, id: &str, t0: Instant) {
    println!("waiting for the guest's virtio-mem driver (resizes are refused until it is up)...");
    while t0.elapsed() < INIT_PATIENCE {
        let b = backend.clone();
        let vm = id.to_string();
        let ready = tokio::task::spawn_blocking(move || b.get_memory(&vm))
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|m| m.resize.driver_ready);
        let b = backend.clone();
        let vm = id.to_string();
        let stopped = tokio::task::spawn_blocking(move || b.get_vm(&vm))
            .await
            .ok()
            .and_then(|r| r.ok())
            .is_none_or(|v| v.state == VmState::Stopped);
        if stopped {
            return;
        }
        match ready {
            Some(true) => {
                println!(
                    "the guest's virtio-mem driver is up {:.1} s after the VM was created",
                    t0.elapsed().as_secs_f64()
                );
                return;
            }
            // The VM is gone or stopped: the console follower says why.
            None => return,
            Some(false) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    println!(
        "the guest's virtio-mem driver is not up after {} s; resizes are refused until it is",
        INIT_PATIENCE.as_secs()
    );
}

/// Runs direct mode until SIGINT/SIGTERM (or, in L1, the relay's STOP).
pub fn run(
    args: &UpArgs,
    cfg: &UpConfig,
    socket: &Path,
    guest: &DefaultGuest,
) -> Result<(), UpError> {
    let host_mib = daemon::host_mem_bytes() >> 20;
    let pool_mib = cfg.pool_mib(host_mib);
    println!(
        "starting the daemon: pool {pool_mib} MiB of {host_mib} MiB host RAM, THP {}",
        if cfg.vm.thp { "on" } else { "off" }
    );
    let mut reclaim = crate::manager::DaemonReclaimConfig::default();
    reclaim
        .monitor
        .set_compaction(
            Some(cfg.daemon.compact_order_mib),
            Some(cfg.daemon.compact_threshold),
        )
        .map_err(|e| UpError::Failed(e.to_string()))?;
    let manager = daemon::build_manager_total(
        pool_mib,
        Duration::from_secs(cfg.daemon.vm_timeout_s),
        reclaim,
    )
    .map_err(UpError::Failed)?;
    manager
        .set_guest_nice(cfg.daemon.guest_nice)
        .map_err(|e| UpError::Failed(e.to_string()))?;
    let rt = crate::latency::runtime()
        .map_err(|e| failed("starting the async runtime")(e.to_string()))?;
    let result = rt.block_on(serve_with_vm(args, cfg, socket, guest, manager.clone()));
    manager.shutdown();
    result
}

async fn serve_with_vm(
    args: &UpArgs,
    cfg: &UpConfig,
    socket: &Path,
    guest: &DefaultGuest,
    manager: Arc<VmManager>,
) -> Result<(), UpError> {
    let backend: Arc<dyn ApiBackend> = manager.clone();
    let server = Server::bind(backend.clone(), ServeConfig::unix(socket))
        .map_err(|e| failed("starting the API server")(e.to_string()))?;
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
    let relay_task = match (&args.relay_listen, &args.relay_token_file) {
        (Some(addr), Some(tf)) => {
            let token = std::fs::read_to_string(tf)
                .map_err(|e| failed("reading the relay token")(e.to_string()))?
                .trim()
                .to_string();
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| failed("binding the relay")(e.to_string()))?;
            Some(tokio::spawn(relay::serve_l1(
                l,
                socket.to_path_buf(),
                token,
                stop_tx.clone(),
            )))
        }
        _ => None,
    };
    let req = guest.create_request(cfg)?;
    let t0 = Instant::now();
    let b = backend.clone();
    let info = tokio::task::spawn_blocking(move || b.create_vm(req))
        .await
        .map_err(|e| failed("creating the VM")(e.to_string()))?
        .map_err(|e| failed("creating the VM")(e.to_string()))?;
    let create_ms = t0.elapsed().as_millis();
    let id = info.id.clone();
    println!("created VM {id} in {create_ms} ms ({})", guest.describe());
    let stop_follow = Arc::new(AtomicBool::new(false));
    // The tiny guest has no console to follow.
    let follower = matches!(guest, DefaultGuest::Linux(_)).then(|| {
        follow_console(
            manager.clone(),
            id.clone(),
            args.console,
            t0,
            stop_follow.clone(),
        )
    });
    // Signals (and the relay's STOP) from here on end the server; the wait below gives way.
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        tokio::select! {
            _ = tidepool_api::server::shutdown_signal() => {}
            _ = stop_rx.recv() => {}
        }
        let _ = stopping_tx.send(true);
    };
    let server_task = tokio::spawn(server.run(shutdown));
    let announce = async {
        if cfg.vm.hotplug_region_mib > 0 {
            wait_driver_ready(&backend, &id, t0).await;
        }
        if relay_task.is_some() {
            // Inside L1: the host prints the banner with its own socket.
            println!("{READY_MARKER} vm={id} create_ms={create_ms}");
        } else {
            print_banner(socket, &id, cfg.vm.memory_mib, cfg.vm.hotplug_region_mib);
        }
    };
    tokio::select! {
        _ = announce => {}
        _ = stopping_rx.wait_for(|s| *s) => {}
    }
    let served = match server_task.await {
        Ok(r) => r,
        Err(e) => return Err(failed("the API server task")(e.to_string())),
    };
    if let Some(t) = relay_task {
        t.abort();
    }
    stop_follow.store(true, Ordering::Relaxed);
    if let Some(f) = follower {
        let _ = tokio::task::spawn_blocking(move || f.join()).await;
    }
    let b = backend.clone();
    let vm = id.clone();
    let deleted = tokio::task::spawn_blocking(move || b.delete_vm(&vm)).await;
    match deleted {
        Ok(Ok(())) => println!("deleted VM {id}"),
        Ok(Err(e)) => println!("deleting VM {id}: {e}"),
        Err(e) => println!("deleting VM {id}: {e}"),
    }
    println!("{STOPPED_MARKER} socket {} removed", socket.display());
    served.map_err(|e| failed("serving the API")(e.to_string()))
}
